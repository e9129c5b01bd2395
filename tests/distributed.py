"""Run a function on several local CPU processes joined in a gloo process group, and collect what each returns.

Tests of context parallelism need real collectives between real processes (a rank that takes another decision than
its peers hangs in the next all-to-all, which no single-process mock shows). Each rank is a fresh spawned interpreter
on one thread, with torchrun's environment variables set; ``fn(rank, world_size, *args)`` must be a module-level function (spawn pickles it by name) and return
something ``torch.save`` can write. diffusers' ``enable_parallelism`` cannot build a mesh without an accelerator
(``rank % device_count()`` with a count of 0): wrap it in ``diffusers_block.parallel.cpu_context_parallel()``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, folder: str, fn, args: tuple) -> None:
    os.environ.setdefault("DIFFUSERS_BLOCK_ALLOW_DIRTY", "1")
    # torchrun's variables, so that accelerate (which reads them) sees the same multi-process run
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` sets: else each rank runs alone
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    except BaseException:
        (Path(folder) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def run(fn, *args, world_size: int = 2, timeout: float = 300.0) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each run in its own process.

    Raises with the failing ranks' tracebacks if any rank fails, or if the ranks are still running after
    ``timeout`` seconds (a collective one rank never entered)."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        port = _free_port()
        processes = [
            context.Process(target=_worker, args=(rank, world_size, port, folder, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout)
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in hung:
            processes[rank].kill()
            processes[rank].join()
        errors = {
            rank: (Path(folder) / f"rank{rank}.error").read_text()
            for rank in range(world_size)
            if (Path(folder) / f"rank{rank}.error").exists()
        }
        if errors or hung:
            raise RuntimeError(
                f"distributed run of {fn.__name__} failed (hung ranks: {hung}):\n"
                + "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in errors.items())
            )
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
