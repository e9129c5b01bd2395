"""Run a kernel test file's checks under ``TRITON_INTERPRET=1``, in a child process.

Triton reads the interpreter flag when it is imported, so kernels cannot be interpreted inside a pytest process that
has already imported them for real. Each kernel test file therefore has a ``_worker()`` that runs its Triton checks
and returns JSON-able results, and prints them when started with ``--worker``; its ``interpreted`` fixture calls
:func:`run_worker` and the tests assert on the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(test_file: str, timeout: int = 300) -> dict:
    """The results ``test_file``'s ``_worker()`` printed, run with the interpreter on."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, test_file, "--worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
