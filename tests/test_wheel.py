"""The wheel holds the package and nothing else of the repository: no models, benchmarks, labs, tests or demo app."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffusers_block

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_builds_it() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77  # pyproject's build requirement (SPDX license)


@pytest.mark.skipif(not _setuptools_builds_it(), reason="needs setuptools>=77 here (the build runs without isolation)")
def test_wheel_holds_the_package_only(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "app.py"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "diffusers_block", source / "diffusers_block", ignore=shutil.ignore_patterns("__pycache__"))
    # Stand-ins for what lives beside the package, made importable-looking on purpose: none may reach the wheel.
    for folder in ("benchmarks/labs/some-lab", "models/digits-image", "tests", "examples"):
        (source / folder).mkdir(parents=True)
        (source / folder / "__init__.py").write_text("")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "out"),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "out").glob("*.whl")
    assert wheel.name == f"diffusers_block-{diffusers_block.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"diffusers_block-{diffusers_block.__version__}.dist-info"
    assert {name.split("/")[0] for name in names} == {"diffusers_block", dist_info}
    assert "diffusers_block/py.typed" in names and f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    core = sorted(
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert [line.split()[1].split(">")[0].split("<")[0].split(";")[0] for line in core] == sorted(
        ["torch", "diffusers", "safetensors", "numpy", "triton"]
    )
