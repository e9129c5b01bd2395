"""Block-sparse attention: kernel correctness and speed against cuDNN SDPA and FlexAttention, and end to end.

Three parts, each written to the JSON as soon as it is done (a later failure keeps the earlier results):

  validate  every kernel on the device against its PyTorch reference (fp64 on the same rounded inputs): the
            block-sparse forward (bf16/fp16, head dim 64/128, tails, random lists), its approximation of skipped
            blocks, the selection kernel (block masks), and the dense mode against cuDNN SDPA at full size;
  kernel    per sequence length and head dim (heads x head dim = 1536, Wan2.1-1.3B's width), batch 1, bf16:
            cuDNN SDPA dense; ours with every block listed ("dense mode"); FlexAttention (compiled) dense and with
            the same block mask as ours; ours at each density with the selection kernel included (the threshold
            is 1.0 and ``max_blocks`` = density x blocks, so every row keeps exactly that many blocks, chosen by
            the full selection), and the selection and the attention alone; every kernel row is device time
            (``bench_ms(device_only=True)``: calls queued behind a GPU sleep, so host launch work never shows),
            and the host time of queuing a selection and a selection + attention call is recorded beside it;
  e2e       the Wan2.1-1.3B architecture with random weights (bench/architectures.py) at 480x832x81 frames:
            full flow-matching schedules, dense (cuDNN SDPA) vs sparse attention vs sparse attention + block
            caching, ms per step, the density reached, and the final latents' relative L2 to dense; with
            ``--config default`` exactly ``SparseAttentionConfig()`` and ``enable_block_cache()``'s default, as a
            user gets them (bench/sparse_config.py);
  profile   one transformer forward of that model per mode (dense; sparse reusing masks; the same with the
            rotary embedding left in the processor; sparse selecting masks) under torch.profiler: GPU time per
            kernel, grouped, so that what is not attention shows.

On a CPU (tests) everything runs at toy sizes through the PyTorch references: it checks the plumbing, and its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time
import traceback
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .. import (
    SparseAttentionConfig,
    StaticScheduleConfig,
    block_cache_summary,
    disable_block_cache,
    disable_sparse_attention,
    enable_block_cache,
    enable_sparse_attention,
    sparse_attention_summary,
)
from ..attention.functional import sparse_self_attention
from ..cache.apply import default_cache_config
from ..kernels import (
    block_mask_from_index,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_index,
    runtime,
    select_blocks,
    select_blocks_reference,
)
from ..kernels import block_sparse_attention_hopper as hopper
from . import refresh as refresh_option
from . import report, sparse_config
from .architectures import ARCHITECTURES, build, conditioning, noise, num_tokens
from .cache import sample

WIDTH = 1536  # heads x head dim of Wan2.1-1.3B
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["validate", "kernel", "e2e", "profile"],
        default=["validate", "kernel", "e2e"],
    )
    parser.add_argument("--seq", nargs="+", type=int, default=[32768, 75776], help="kernel: sequence lengths")
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 128], help="kernel: head dims")
    parser.add_argument("--density", nargs="+", type=float, default=[0.1, 0.05], help="kernel: kept fractions")
    parser.add_argument(
        "--dense-rounds",
        type=int,
        default=3,
        help="kernel: rounds of the dense comparison (cuDNN, ours, the Triton-language kernel, each round in a rotated "
        "order); ratios are medians over rounds (an H100 at its power cap moves its clock within a run)",
    )
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--model", default="wan2.1-1.3b", choices=list(ARCHITECTURES), help="e2e architecture")
    parser.add_argument("--steps", type=int, default=12, help="e2e: sampling steps per schedule")
    parser.add_argument("--e2e-density", type=float, default=0.125, help="e2e: max kept fraction of key blocks")
    parser.add_argument("--threshold", type=float, default=0.9, help="e2e: cumulative mass threshold")
    parser.add_argument("--dense-steps", type=int, default=2, help="e2e: dense steps at the start")
    parser.add_argument("--refresh", type=refresh_option.parse, default=5, help="e2e: " + refresh_option.HELP)
    parser.add_argument("--cache-interval", type=int, default=2, help="e2e: block cache static interval")
    parser.add_argument("--scoring", choices=["mean", "antidiagonal"], default="mean", help="e2e: block scoring")
    parser.add_argument(
        "--approximation",
        choices=["none", "zeroth", "first", "cached"],
        default="none",
        help="e2e: what stands in for the skipped key blocks (none: dropped)",
    )
    parser.add_argument("--stride", type=int, default=8, help="antidiagonal stride (kernel timing, validation, e2e)")
    parser.add_argument("--repeats", type=int, default=2, help="e2e: timed schedules per run (median)")
    sparse_config.add_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", default="attention", help="result file stem")


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(
    fn,
    device: torch.device,
    warmup: int = 3,
    min_time_ms: float = 300.0,
    max_iters: int = 200,
    *,
    device_only: bool = False,
) -> float:
    """Median time of ``fn`` in ms. On a GPU as ``triton.testing.do_bench`` times: CUDA events around each call,
    calls queued back to back and one synchronisation at the end, so the host's launch work overlaps the device's
    and a call costs its device time (what a model running layer after layer sees). Host clock on a CPU.

    A call whose host work outlasts its device work (the selection at 32K tokens: a few small launches) would still
    be timed at the host's pace; ``device_only`` queues the calls behind a GPU sleep that outlasts queuing them all,
    so that the events time the device alone."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        times, total = [], 0.0
        while len(times) < max_iters and (total < min_time_ms or len(times) < 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            total += times[-1]
        return statistics.median(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    fn()
    end.record()
    host = (time.perf_counter() - host) * 1e3
    end.synchronize()
    iters = max(5, min(max_iters, int(min_time_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    if device_only:  # twice the host time of queuing every call, at most a few seconds
        torch.cuda._sleep(int(_sleep_cycles_per_ms(device) * min(2.0 * host * iters + 1.0, SLEEP_CAP_MS)))
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def host_ms(fn, device: torch.device, calls: int = 20) -> float:
    """Median host time of queuing one call of ``fn`` (no synchronisation in between): the Python and launch work a
    call costs the CPU, which a model hides behind the GPU as long as it is shorter than the call's device time."""
    fn()
    _sync(device)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    _sync(device)
    return statistics.median(times)


#: Longest GPU sleep ``bench_ms(device_only=True)`` queues its calls behind.
SLEEP_CAP_MS = 5000.0
_SLEEP_RATE: dict[int, float] = {}


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """``torch.cuda._sleep`` spins for a number of clock cycles: cycles per ms of this GPU, measured once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_RATE:
        cycles = 10_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles // 10)  # wake the clocks up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_RATE[index] = cycles / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_RATE[index]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def smooth_qkv(batch, heads, seq, dim, block_size, device, dtype, seed=0):
    """Random q, k, v with a smooth per-block component (so block masses differ and approximation is meaningful)."""
    gen = torch.Generator(device).manual_seed(seed)
    nb = math.ceil(seq / block_size)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    centers = draw(batch, heads, nb, dim).repeat_interleave(block_size, 2)[:, :, :seq]
    q = draw(batch, heads, seq, dim) + centers
    k = 0.5 * draw(batch, heads, seq, dim) + centers
    v = 0.5 * draw(batch, heads, seq, dim) + draw(batch, heads, nb, dim).repeat_interleave(block_size, 2)[:, :, :seq]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_lists(batch, heads, nq, nk, keep, device, seed=0):
    """Unique random key blocks per row, ``keep`` of them (counts random in [0, keep] for validation)."""
    gen = torch.Generator(device).manual_seed(seed)
    perm = torch.argsort(torch.rand(batch, heads, nq, nk, generator=gen, device=device), dim=-1)
    index = perm[..., :keep].to(torch.int32).contiguous()
    count = torch.randint(0, keep + 1, (batch, heads, nq), generator=gen, device=device, dtype=torch.int32)
    return index, count


def _last_tuning(module: str, name: str) -> dict:
    """ms of every config the autotuner tried at its last tuning (Triton keeps them in ``configs_timings``)."""
    import importlib

    tuner = getattr(importlib.import_module(f"diffusers_block.kernels.{module}"), name, None)
    timings = getattr(tuner, "configs_timings", None) or {}
    return {str(config): (ms[0] if isinstance(ms, (list, tuple)) else ms) for config, ms in timings.items()}


def _capture(fn, results: dict, key: str):
    try:
        results[key] = fn()
    except Exception as error:  # keep the other parts' results
        results[key] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        print(f"  {key} FAILED: {type(error).__name__}: {error}")


def _autotuned_configs() -> dict:
    """The configs Triton's autotuner picked, per key (what 'tuned for Hopper' came to on this device)."""
    found = {}
    try:
        import importlib

        sel = importlib.import_module("diffusers_block.kernels.block_selection")
        scores = importlib.import_module("diffusers_block.kernels.antidiagonal_masses")
        bsa = importlib.import_module("diffusers_block.kernels.block_sparse_attention")
        tuners = [
            ("attention", getattr(bsa, "_block_sparse_attn_fwd_autotuned", None)),
            ("antidiagonal_scores", getattr(scores, "_antidiagonal_masses_fwd_autotuned", None)),
            ("selection", getattr(sel, "_select_blocks_fwd_autotuned", None)),
        ]
        for name, tuner in tuners:
            cache = getattr(tuner, "cache", {}) if tuner is not None else {}
            found[name] = {str(key): str(config) for key, config in cache.items()}
        tma = getattr(bsa, "_block_sparse_attn_fwd_tma_autotuned", None)
        found["attention_tma_race"] = {str(k): str(c) for k, c in getattr(tma, "cache", {}).items()}
        found["tma_failure"] = dict(getattr(getattr(bsa, "TMA_PATH", None), "failures", {})) or None
    except Exception as error:  # pragma: no cover - informational only
        found["error"] = str(error)
    return found


# ------------------------------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------------------------------
@contextmanager
def _fixed_configs():
    """Validation runs many shapes once each: skip autotuning (one config per shape, far fewer compiles)."""
    saved = runtime.AUTOTUNE
    runtime.AUTOTUNE = False
    try:
        yield
    finally:
        runtime.AUTOTUNE = saved


def validate(args, device: torch.device) -> dict:
    with _fixed_configs():
        return _validate(args, device)


#: Relative L2 error against fp64 dense attention that the cached-skipped-blocks path must stay under (about 5x the
#: kernel's own rounding in that dtype: two kernel calls, an lse merge and the inverse permutation's scatter).
CACHED_REL_TOL = {"bf16": 1e-2, "fp16": 2e-3}


def _validate_cached(q, k, v, block_size: int, dtype: str) -> dict:
    """approximation="cached" through the attention layer's call (reordering, lists + complement, lse merge): on
    its selection call and on a reuse with the same inputs it is exact attention."""
    heads = q.shape[1]
    config = SparseAttentionConfig(threshold=0.5, block_size=block_size, min_tokens=0, approximation="cached")
    common = dict(config=config, thresholds=torch.full((heads,), 0.5, device=q.device), scale=None, text=0)
    out, selection = sparse_self_attention(q, k, v, text_first=False, grid=None, **common)
    again, _ = sparse_self_attention(q, k, v, text_first=False, grid=None, selection=selection, **common)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    return {
        "dtype": dtype,
        "head_dim": q.shape[-1],
        "seq": q.shape[2],
        "kept": float(selection.density().mean()),
        "rel_err_vs_dense": rel_err(out, dense),
        "reuse_rel_err_vs_dense": rel_err(again, dense),
    }


def _validate(args, device: torch.device) -> dict:
    cpu = device.type != "cuda"
    out: dict = {
        "attention": [],
        "approximation": [],
        "cached": [],
        "selection": [],
        "dense_vs_sdpa": [],
        "gather": [],
        "scatter": [],
    }
    cases = [(64, 64, 1000), (128, 128, 777), (64, 128, 4096), (128, 64, 300)] if not cpu else [(32, 16, 100)]
    for dtype in ("bf16", "fp16"):
        for head_dim, bs, seq in cases if dtype == "bf16" else cases[:2]:
            q, k, v = (t.to(DTYPES[dtype]) for t in smooth_qkv(1, 3, seq, head_dim, bs, device, torch.float32))
            nb = math.ceil(seq / bs)
            index, count = random_lists(1, 3, nb, nb, nb, device)
            o, lse = block_sparse_attention(q, k, v, index, count, block_size=bs, return_lse=True)
            r, rlse = block_sparse_attention_reference(
                q.double(), k.double(), v.double(), index, count, block_size=bs, return_lse=True
            )
            finite = torch.isfinite(rlse)
            out["attention"].append(
                {
                    "dtype": dtype,
                    "head_dim": head_dim,
                    "block_size": bs,
                    "seq": seq,
                    "max_abs_err": (o.double() - r).abs().max().item(),
                    "rel_err": rel_err(o, r),
                    "lse_max_abs_err": (lse.double() - rlse)[finite].abs().max().item(),
                    "empty_rows_zero": bool((o[~finite] == 0).all()),
                }
            )
            out["cached"].append(_validate_cached(q, k, v, bs, dtype))
            for order in ("zeroth", "first") if bs == 64 or cpu else ():
                keep = max(1, nb // 4)
                index4, count4 = random_lists(1, 3, nb, nb, keep, device, seed=1)
                o = block_sparse_attention(q, k, v, index4, count4, block_size=bs, approximation=order)
                r = block_sparse_attention_reference(
                    q.double(), k.double(), v.double(), index4, count4, block_size=bs, approximation=order
                )
                drop = block_sparse_attention_reference(
                    q.double(), k.double(), v.double(), index4, count4, block_size=bs
                )
                dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                out["approximation"].append(
                    {
                        "order": order,
                        "dtype": dtype,
                        "head_dim": head_dim,
                        "seq": seq,
                        "kernel_vs_reference_max_abs_err": (o.double() - r).abs().max().item(),
                        "rel_err_vs_dense": rel_err(o, dense),
                        "drop_only_rel_err_vs_dense": rel_err(drop, dense),
                    }
                )
        for (head_dim, bs, seq), scoring in (
            [(case, "mean") for case in cases] + [(case, "antidiagonal") for case in cases if case[1] >= 128 or cpu]
            if dtype == "bf16"
            else ()
        ):
            try:  # a failing case is recorded, the others still run
                q, k, _ = smooth_qkv(1, 3, seq, head_dim, bs, device, DTYPES[dtype], seed=2)
                nb = math.ceil(seq / bs)
                stride = args.stride if not cpu else 2
                index, count = select_blocks(
                    q, k, block_size=bs, threshold=0.8, local_blocks=0, scoring=scoring, stride=stride
                )
                r_index, r_count = select_blocks_reference(
                    q.float(),
                    k.float(),
                    torch.full((3,), 0.8, device=device),
                    block_size=bs,
                    scale=1 / math.sqrt(head_dim),
                    min_blocks=1,
                    max_blocks=nb,
                    width=index.shape[-1],
                    local=0,
                    force=(0, 0),
                    dense=(0, 0),
                    scoring=scoring,
                    stride=stride,
                )
                mask = block_mask_from_index(index, count, nb)
                ref = block_mask_from_index(r_index, r_count, nb)
                out["selection"].append(
                    {
                        "scoring": scoring,
                        "dtype": dtype,
                        "head_dim": head_dim,
                        "block_size": bs,
                        "seq": seq,
                        "mask_mismatch_fraction": (mask != ref).float().mean().item(),
                        "density": mask.float().mean().item(),
                        "ascending": bool(
                            all(
                                torch.all(row[1:n] > row[: n - 1])
                                for row, n in zip(index.view(-1, index.shape[-1])[:64], count.view(-1)[:64].tolist())
                            )
                        ),
                    }
                )
            except Exception as error:
                row = {"scoring": scoring, "dtype": dtype, "head_dim": head_dim, "block_size": bs, "seq": seq}
                out["selection"].append({**row, "error": f"{type(error).__name__}: {error}"[:500]})
    if not cpu:
        for head_dim in (64, 128):
            heads = WIDTH // head_dim
            q, k, v = smooth_qkv(1, heads, 32768, head_dim, 128, device, torch.bfloat16)
            index, count = dense_block_index(1, heads, 256, 256, device=device)
            ours = block_sparse_attention(q, k, v, index, count, block_size=128)
            with _cudnn():
                cudnn = F.scaled_dot_product_attention(q, k, v)
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out["dense_vs_sdpa"].append(
                {
                    "head_dim": head_dim,
                    "seq": 32768,
                    "ours_rel_err_vs_fp32": rel_err(ours, exact),
                    "cudnn_rel_err_vs_fp32": rel_err(cudnn, exact),
                }
            )
            del q, k, v, ours, cudnn, exact
    _validate_gather_and_scatter(out, device, cpu)
    tol = {"bf16": 2e-2, "fp16": 2e-3}
    out["passed"] = bool(
        all(
            r["max_abs_err"] <= tol[r["dtype"]] * 2 and r["lse_max_abs_err"] <= 1e-3 and r["empty_rows_zero"]
            for r in out["attention"]
        )
        and all(r["kernel_vs_reference_max_abs_err"] <= 5e-2 for r in out["approximation"])
        and all(
            max(r["rel_err_vs_dense"], r["reuse_rel_err_vs_dense"]) <= CACHED_REL_TOL[r["dtype"]] for r in out["cached"]
        )
        and all(r.get("mask_mismatch_fraction", 1.0) <= 1e-3 and r.get("ascending") for r in out["selection"])
        and all(r["ours_rel_err_vs_fp32"] <= 2 * r["cudnn_rel_err_vs_fp32"] + 1e-3 for r in out["dense_vs_sdpa"])
        and all(r["within_one_ulp"] and r["sums_rel_err"] <= 1e-2 for r in out["gather"])
        and all(r["all_written"] and r["max_abs_err"] == 0.0 for r in out["scatter"])
    )
    print(f"validate: {'passed' if out['passed'] else 'FAILED'}")
    for group in ("attention", "approximation", "cached", "selection", "dense_vs_sdpa", "gather", "scatter"):
        for row in out[group]:
            print(
                f"  {group}: "
                + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            )
    return out


def _validate_gather_and_scatter(out: dict, device: torch.device, cpu: bool) -> None:
    """The token gather (+ rotation, + block sums) and the attention's scattered store, at the e2e shape."""
    from ..kernels import gather_tokens, gather_tokens_reference

    seq, heads, head_dim, bs = (32760, 12, 128, 128) if not cpu else (100, 2, 32, 16)
    gen = torch.Generator(device).manual_seed(5)
    x = torch.randn(1, seq, heads, head_dim, generator=gen, device=device).to(torch.bfloat16).transpose(1, 2)
    perm = torch.randperm(seq, generator=gen, device=device)
    angles = torch.rand(seq, head_dim // 2, generator=gen, device=device) * 6.0
    cos, sin = (f(angles).repeat_interleave(2, dim=1) for f in (torch.cos, torch.sin))
    got, sums = gather_tokens(x, perm, rotary=(cos, sin), block_size=bs)
    ref, ref_sums = gather_tokens_reference(x, perm, rotary=(cos, sin), block_size=bs)
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1.0)
    out["gather"].append(
        {
            "seq": seq,
            "head_dim": head_dim,
            "within_one_ulp": bool(((got.float() - ref.float()).abs() <= ulp).all()),
            "mismatch_fraction": (got != ref).float().mean().item(),
            "sums_rel_err": ((sums - ref_sums).norm() / ref_sums.norm()).item(),
        }
    )
    nb = math.ceil(seq / bs)
    index, count = random_lists(1, heads, nb, nb, max(1, nb // 8), device, seed=6)
    plain = block_sparse_attention(got, got, got, index, count, block_size=bs)
    buffer = torch.full((1, seq, heads, head_dim), float("nan"), device=device, dtype=torch.bfloat16)
    block_sparse_attention(got, got, got, index, count, block_size=bs, out=buffer.transpose(1, 2), out_rows=perm)
    out["scatter"].append(
        {
            "seq": seq,
            "all_written": not bool(torch.isnan(buffer).any()),
            "max_abs_err": (buffer.transpose(1, 2)[:, :, perm].float() - plain.float()).abs().max().item(),
        }
    )


@contextmanager
def _cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        yield


# ------------------------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------------------------
def kernel(args, device: torch.device, progress=None) -> dict:
    """All kernel cases; ``progress`` gets the rows so far after each case (the run can checkpoint them: a long
    multi-shape run that is stopped keeps its finished cases)."""
    cpu = device.type != "cuda"
    dtype = DTYPES[args.dtype]
    bs = args.block_size if not cpu else 16
    rows = []
    flex = None
    if not cpu and not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            flex = (torch.compile(flex_attention, dynamic=False), BlockMask)
        except Exception as error:  # pragma: no cover - older torch
            print(f"  FlexAttention unavailable: {error}")
    seqs = args.seq if not cpu else [200]
    for seq in seqs:
        for head_dim in args.head_dim:
            try:  # one failing case keeps the others' numbers
                rows.append(_kernel_case(args, device, seq, head_dim, bs, dtype, flex))
                _print_kernel(rows[-1])
            except Exception as error:
                rows.append({"seq": seq, "head_dim": head_dim, "error": f"{type(error).__name__}: {error}"})
                rows[-1]["traceback"] = traceback.format_exc()[-3000:]
                print(f"  kernel case {seq} x {head_dim} FAILED: {rows[-1]['error']}")
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
            if progress is not None:
                progress({"rows": rows, "partial": True})
    return {"rows": rows, "autotuned": _autotuned_configs()}


def _kernel_case(args, device, seq: int, head_dim: int, bs: int, dtype, flex) -> dict:
    """All timings of one (sequence length, head dim)."""
    cpu = device.type != "cuda"
    heads = WIDTH // head_dim if not cpu else 2
    q, k, v = smooth_qkv(1, heads, seq, head_dim, bs, device, dtype, seed=3)
    nb = math.ceil(seq / bs)
    flops = 4.0 * seq * seq * head_dim * heads
    result = {"seq": seq, "head_dim": head_dim, "heads": heads, "block_size": bs, "dense_tflop": flops / 1e12}
    print(f"\nkernel: {seq} tokens, {heads} heads x {head_dim}, blocks of {bs}")

    def timed(fn) -> float:  # device time, even of calls the host cannot launch as fast as the GPU runs them
        return bench_ms(fn, device, device_only=True)

    full_index, full_count = dense_block_index(1, heads, nb, nb, device=device)

    def dense_mode():  # every block listed: the width is known, no count is read
        return block_sparse_attention(q, k, v, full_index, full_count, block_size=bs, list_width=nb)

    def dense_triton():  # the Triton-language kernel on the same lists, for comparison
        with hopper.turned_off():
            return dense_mode()

    def cudnn():
        with _cudnn():
            return F.scaled_dot_product_attention(q, k, v)

    gluon = hopper.eligible(q, k, v, full_index, full_count, bs, None, list_width=nb)
    result["dense_kernel"] = "gluon-hopper" if gluon else "triton"
    contenders = {"ours_dense_ms": dense_mode}
    if result["dense_kernel"] != "triton":
        contenders["ours_dense_triton_ms"] = dense_triton
    if not cpu:
        contenders = {"cudnn_ms": cudnn, **contenders}
    result.update(_dense_rounds(contenders, timed, args.dense_rounds if not cpu else 1))
    result["dense_config_ms"] = _last_tuning("block_sparse_attention", "_block_sparse_attn_fwd_tma_autotuned")
    if flex is not None:
        flex_fn, block_mask_cls = flex
        full_mask = _flex_mask(block_mask_cls, full_count, full_index, bs)
        result["flex_dense_ms"] = timed(lambda: flex_fn(q, k, v, block_mask=full_mask))
    result["densities"] = {}
    for density in args.density:
        keep = max(1, round(density * nb))

        def select(keep=keep):
            return select_blocks(q, k, block_size=bs, threshold=1.0, max_blocks=keep, local_blocks=0)

        index, count = select()
        row = {"blocks_per_row": keep, "actual_density": count.float().mean().item() / nb}
        row["select_ms"] = timed(select)
        try:  # the optional scoring must not cost the main numbers
            row["select_antidiagonal_ms"] = timed(
                lambda keep=keep: select_blocks(
                    q, k, block_size=bs, threshold=1.0, max_blocks=keep, local_blocks=0, scoring="antidiagonal",
                    stride=args.stride if not cpu else 2,
                )
            )  # fmt: skip
        except Exception as error:
            row["select_antidiagonal_error"] = f"{type(error).__name__}: {error}"[:500]
        # Threshold 1.0: every row lists exactly `keep` blocks, so the calls pass the width (no count is read).
        row["attention_ms"] = timed(
            lambda index=index, count=count, keep=keep: block_sparse_attention(
                q, k, v, index, count, block_size=bs, list_width=keep
            )
        )
        row["total_ms"] = timed(
            lambda keep=keep: block_sparse_attention(q, k, v, *select(), block_size=bs, list_width=keep)
        )
        row["select_host_ms"] = host_ms(select, device)
        row["total_host_ms"] = host_ms(
            lambda keep=keep: block_sparse_attention(q, k, v, *select(), block_size=bs, list_width=keep), device
        )
        row["total_zeroth_ms"] = timed(
            lambda keep=keep: block_sparse_attention(
                q, k, v, *select(), block_size=bs, approximation="zeroth", list_width=keep
            )
        )
        if flex is not None:
            padded = torch.zeros(1, heads, nb, nb, dtype=torch.int32, device=device)
            padded[..., : index.shape[-1]] = index
            mask = _flex_mask(block_mask_cls, count, padded, bs)
            row["flex_ms"] = timed(lambda mask=mask: flex_fn(q, k, v, block_mask=mask))
            # Same mask, same outputs: FlexAttention doubles as a check of our sparse kernel.
            row["ours_vs_flex_rel_err"] = rel_err(
                block_sparse_attention(q, k, v, index, count, block_size=bs), flex_fn(q, k, v, block_mask=mask)
            )
        if "cudnn_ms" in result:
            row["speedup_vs_cudnn"] = result["cudnn_ms"] / row["total_ms"]
            row["speedup_vs_cudnn_without_selection"] = result["cudnn_ms"] / row["attention_ms"]
            if "flex_ms" in row:
                row["flex_speedup_vs_cudnn"] = result["cudnn_ms"] / row["flex_ms"]
        result["densities"][str(density)] = row
    for key in ("cudnn_ms", "ours_dense_ms", "ours_dense_triton_ms", "flex_dense_ms"):
        if key in result:
            result[key.replace("_ms", "_tflops")] = flops / result[key] / 1e9
    return result


def time_in_rounds(contenders: dict, timed, rounds: int) -> tuple[dict, list[dict]]:
    """Time each contender once per round, rotating who goes first, so that clock drift (an H100 at its power cap)
    spreads over all of them: each one's median over rounds, and the rounds (for :func:`median_ratio`)."""
    names = list(contenders)
    per_round = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        per_round.append({name: timed(contenders[name]) for name in order})
    return {name: statistics.median(t[name] for t in per_round) for name in names}, per_round


def median_ratio(per_round: list[dict], numerator: str, denominator: str) -> float:
    """Median over rounds of one contender's time over another's (each round's pair ran under the same clock)."""
    return statistics.median(t[numerator] / t[denominator] for t in per_round)


def _dense_rounds(contenders: dict, timed, rounds: int) -> dict:
    """The dense comparison: medians, each ratio to cuDNN as the median of the rounds' ratios
    (``*_vs_cudnn_throughput``), the rounds kept in ``dense_rounds``."""
    out, per_round = time_in_rounds(contenders, timed, rounds)
    out["dense_rounds"] = per_round
    for name in contenders:
        if name != "cudnn_ms" and "cudnn_ms" in contenders:
            out[name.replace("_ms", "_vs_cudnn_throughput")] = median_ratio(per_round, "cudnn_ms", name)
    return out


def _flex_mask(block_mask_cls, count, index, block_size):
    """A BlockMask whose listed blocks are all full (no mask_mod evaluated inside them): FlexAttention's fastest case."""
    return block_mask_cls.from_kv_blocks(
        torch.zeros_like(count), torch.zeros_like(index), count, index, BLOCK_SIZE=block_size
    )


def _print_kernel(result: dict) -> None:
    dense = [
        ("cuDNN SDPA dense", "cudnn_ms"),
        (f"ours dense mode ({result.get('dense_kernel', 'triton')})", "ours_dense_ms"),
        ("ours dense mode (triton)", "ours_dense_triton_ms"),
        ("Flex dense", "flex_dense_ms"),
    ]
    table = [
        {"what": label, "ms": result[key], "tflops": result.get(key.replace("_ms", "_tflops"))}
        for label, key in dense
        if key in result
    ]
    for density, row in result["densities"].items():
        table.append(
            {
                "what": f"ours {float(density):.0%} (select + attn)",
                "ms": row["total_ms"],
                "speedup": row.get("speedup_vs_cudnn"),
            }
        )
        table.append(
            {
                "what": "  select / attn only / +zeroth",
                "ms": row["select_ms"],
                "note": f"{row['attention_ms']:.2f} / {row['total_zeroth_ms']:.2f} ms",
            }
        )
        if "flex_ms" in row:
            table.append(
                {
                    "what": f"Flex {float(density):.0%} (same mask, no selection)",
                    "ms": row["flex_ms"],
                    "speedup": row.get("flex_speedup_vs_cudnn"),
                }
            )
    report.print_table(
        table,
        [
            ("what", "run", str),
            ("ms", "ms", "{:.3f}".format),
            ("tflops", "TFLOP/s", "{:.0f}".format),
            ("speedup", "vs cuDNN", "{:.2f}x".format),
            ("note", "", str),
        ],
    )


# ------------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------------
def _model_sparse_options(args, tokens: int, cpu: bool) -> dict:
    """The SparseAttentionConfig options of the command line that e2e and profile share (blocks of 8 on the CPU,
    where the models are toy-sized); the caller adds when it runs dense and how often it selects."""
    block_size = args.block_size if not cpu else 8
    return {
        "threshold": args.threshold,
        "block_size": block_size,
        "max_blocks": max(1, round(args.e2e_density * math.ceil(tokens / block_size))),
        "min_tokens": 0,
        "scoring": args.scoring,
        "stride": args.stride,
        "approximation": None if args.approximation == "none" else args.approximation,
    }


def _model_config(args, tokens: int, cpu: bool) -> SparseAttentionConfig:
    """The sparse config of e2e: the command line's options (``--config options``), or the library default itself
    (``--config default``, with any ``--default-override``; the command line's sparse options are ignored)."""
    if args.config == "default":
        return sparse_config.default_config(args)
    return SparseAttentionConfig(
        **_model_sparse_options(args, tokens, cpu),
        dense_steps=args.dense_steps,
        **refresh_option.config_options(args.refresh),
    )


def e2e(args, device: torch.device) -> dict:
    cpu = device.type != "cuda"
    name = args.model
    arch = ARCHITECTURES[name]
    dtype = DTYPES[args.dtype] if not cpu else torch.float32
    model = build(arch, device, dtype, args.seed)
    tokens = num_tokens(arch)
    config = _model_config(args, tokens, cpu)
    block_size = config.block_size
    # --config default: the block cache's default too (enable_block_cache with no config), as a user gets both.
    cache = (
        None
        if args.config == "default"
        else StaticScheduleConfig(interval=args.cache_interval, warmup_steps=args.dense_steps, cooldown_steps=1)
    )
    latents = noise(arch, device, args.seed)
    prompts = {"cond": conditioning(arch, device, dtype, args.seed + 1)}
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
    steps = args.steps

    def generate():
        return sample(model, arch, scheduler, latents, prompts, steps)

    @contextmanager
    def dense():
        with _cudnn() if not cpu else nullcontext():
            yield

    @contextmanager
    def sparse():
        enable_sparse_attention(model, config)
        try:
            with _cudnn() if not cpu else nullcontext():  # dense steps and cross-attention: cuDNN as in dense
                yield
        finally:
            summaries["sparse"] = sparse_attention_summary(model)
            disable_sparse_attention(model)

    @contextmanager
    def sparse_cached():
        enable_sparse_attention(model, config)
        enable_block_cache(model, cache)
        try:
            with _cudnn() if not cpu else nullcontext():
                yield
        finally:
            summaries["sparse+cache"] = sparse_attention_summary(model)
            cache_fractions["sparse+cache"] = block_cache_summary(model).fraction_computed
            disable_block_cache(model)
            disable_sparse_attention(model)

    @contextmanager
    def cached():
        enable_block_cache(model, cache)
        try:
            with _cudnn() if not cpu else nullcontext():
                yield
        finally:
            cache_fractions["cache"] = block_cache_summary(model).fraction_computed
            disable_block_cache(model)

    summaries: dict = {}
    cache_fractions: dict = {}  # block work the cache computed, of the last schedule
    runs = {"dense": dense, "sparse": sparse, "sparse+cache": sparse_cached, "cache": cached}
    print(f"\ne2e: {name}, {tokens} tokens, {steps} steps, {config}, cache {cache or default_cache_config()}")
    times = {key: [] for key in runs}
    final = {}
    with torch.inference_mode():
        forward_ms = _forward_times(model, arch, latents, prompts, config, device, cpu)
        for context in runs.values():  # warm-up: kernel selection, autotuning, allocator
            with context():
                sample(model, arch, scheduler, latents, prompts, min(steps, config.dense_steps + 2))
        for repeat in range(args.repeats):
            for key, context in runs.items():
                with context():
                    _sync(device)
                    t0 = time.perf_counter()
                    final[key] = generate()
                    _sync(device)
                    times[key].append((time.perf_counter() - t0) * 1e3)
            print("  round", repeat + 1, {k: round(v[-1]) for k, v in times.items()})
    reference = final["dense"]
    result = {
        "model": name,
        "tokens": tokens,
        "steps": steps,
        "block_size": block_size,
        "forward_ms": forward_ms,
        "config": {f: getattr(config, f) for f in config.__dataclass_fields__},
        "sparse_config": sparse_config.record(config),
        "cache_config": {"repr": repr(default_cache_config() if cache is None else cache), "is_default": cache is None},
        "runs": {},
    }
    dense_ms = statistics.median(times["dense"])
    rows = []
    for key in runs:
        ms = statistics.median(times[key])
        row = {
            "ms_per_schedule": ms,
            "ms_per_step": ms / steps,
            "speedup": dense_ms / ms,
            "rel_l2": rel_err(final[key].float(), reference.float()),
            "times_ms": times[key],
        }
        if key in summaries:
            row["sparse_density"] = summaries[key].sparse_density
            row["overall_density"] = summaries[key].overall_density
        if key in cache_fractions:
            row["cache_fraction_computed"] = cache_fractions[key]
        result["runs"][key] = row
        rows.append({"run": key, **row})
    report.print_table(
        rows,
        [
            ("run", "run", str),
            ("ms_per_step", "ms/step", "{:.1f}".format),
            ("speedup", "speedup", "{:.2f}x".format),
            ("sparse_density", "density (sparse steps)", "{:.1%}".format),
            ("rel_l2", "rel L2", "{:.3f}".format),
        ],
    )
    print(
        "  one forward (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in forward_ms.items())
        + f"; dense / sparse (reused masks) = {forward_ms['dense'] / forward_ms['sparse_reuse']:.2f}x"
    )
    return result


def _forward_times(model, arch, latents, prompts, config, device, cpu) -> dict:
    """One transformer call per mode: dense (cuDNN), sparse selecting new masks, sparse reusing masks."""
    prompt = prompts["cond"]
    timestep = torch.full((1,), 500.0 * arch.timestep_scale, device=device)
    hidden = latents.to(model.dtype)
    counter = iter(range(10**9))

    def call(step):
        with model.cache_context("cond", step_index=step, num_inference_steps=10**9):
            model(hidden_states=hidden, timestep=timestep, **prompt, return_dict=False)

    times = {}
    with _cudnn() if not cpu else nullcontext():
        times["dense"] = bench_ms(lambda: call(0), device, warmup=2, min_time_ms=0, max_iters=5)
        # Every call selects, or every call reuses the first call's lists (the stage-wise schedule is off).
        selecting = dataclasses.replace(config, dense_steps=0, refresh_interval=1, refresh_schedule=None)
        reusing = dataclasses.replace(selecting, refresh_interval=10**9)
        enable_sparse_attention(model, selecting)
        times["sparse_select"] = bench_ms(lambda: call(next(counter)), device, warmup=2, min_time_ms=0, max_iters=5)
        enable_sparse_attention(model, reusing)
        times["sparse_reuse"] = bench_ms(lambda: call(0), device, warmup=2, min_time_ms=0, max_iters=5)
        # The same, with the rotary embedding left to the processor (what the fused gather saves).
        enable_sparse_attention(model, dataclasses.replace(reusing, fuse_rotary=False))
        times["sparse_reuse_unfused_rotary"] = bench_ms(lambda: call(0), device, warmup=2, min_time_ms=0, max_iters=5)
        disable_sparse_attention(model)
    return times


# ------------------------------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------------------------------
#: Kernel-name fragments -> group, first match wins (names of cuDNN, cuBLAS, Triton and ATen kernels).
PROFILE_GROUPS = (
    ("attention (ours)", ("_block_sparse_attn_fwd",)),
    ("selection", ("_select_blocks_fwd", "_mean_block_logits_fwd", "_antidiagonal_masses_fwd", "reduce_kernel")),
    ("token gather, block sums (ours)", ("_gather_tokens_fwd",)),
    ("attention (cuDNN/flash)", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")),
    ("index/gather (ATen)", ("index", "gather", "scatter")),
    ("copy/cast", ("copy", "cast", "convert")),
    ("norm", ("norm",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def _group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in PROFILE_GROUPS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return group
    return "other"


def profile(args, device: torch.device) -> dict:
    """GPU time per kernel (and per group) of one transformer forward per mode."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cpu = device.type != "cuda"
    arch = ARCHITECTURES[args.model]
    dtype = DTYPES[args.dtype] if not cpu else torch.float32
    model = build(arch, device, dtype, args.seed)
    tokens = num_tokens(arch)
    # Every forward sparse (no dense steps, no stage-wise schedule), selecting or reusing as the mode says.
    base = dataclasses.replace(_model_config(args, tokens, cpu), dense_steps=0, refresh_schedule=None)
    block_size = base.block_size
    modes = {
        "dense": None,
        "sparse_reuse": dataclasses.replace(base, refresh_interval=10**9),
        "sparse_reuse_unfused_rotary": dataclasses.replace(base, refresh_interval=10**9, fuse_rotary=False),
        "sparse_select": dataclasses.replace(base, refresh_interval=1),
    }
    hidden = noise(arch, device, args.seed).to(model.dtype)
    prompt = conditioning(arch, device, dtype, args.seed + 1)
    timestep = torch.full((1,), 500.0 * arch.timestep_scale, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not cpu else [])
    result = {"model": args.model, "tokens": tokens, "block_size": block_size, "modes": {}}
    print(f"\nprofile: {args.model}, {tokens} tokens, one forward per mode")
    rows = []
    with torch.inference_mode(), _cudnn() if not cpu else nullcontext():
        for name, config in modes.items():
            if config is not None:
                enable_sparse_attention(model, config)
            steps = iter(range(10**9))

            def call(steps=steps):
                with model.cache_context("cond", step_index=next(steps), num_inference_steps=10**9):
                    model(hidden_states=hidden, timestep=timestep, **prompt, return_dict=False)

            for _ in range(3):  # warm-up: compiles, autotuning, selection at step 0
                call()
            _sync(device)
            with torch_profile(activities=activities) as prof:
                call()
                _sync(device)
            if config is not None:
                disable_sparse_attention(model)
            kernels: dict = {}
            for avg in prof.key_averages():
                if cpu or avg.device_type != torch.autograd.DeviceType.CUDA:
                    continue  # kernels are the CUDA-side entries; their self time is the kernel time
                us = getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0.0)
                kernels[avg.key] = [us / 1e3, avg.count]
            groups: dict = {}
            for kernel_name, (ms, _) in kernels.items():
                group = _group_of(kernel_name)
                groups[group] = groups.get(group, 0.0) + ms
            total = sum(groups.values())
            top = sorted(kernels.items(), key=lambda item: -item[1][0])[:25]
            result["modes"][name] = {
                "gpu_ms": total,
                "groups_ms": dict(sorted(groups.items(), key=lambda item: -item[1])),
                "top_kernels": [{"name": n[:160], "ms": ms, "calls": c} for n, (ms, c) in top],
            }
            rows.append({"mode": name, "gpu_ms": total, **{g: ms for g, ms in groups.items()}})
            print(f"  {name}: {total:.1f} ms GPU; " + ", ".join(f"{g} {ms:.1f}" for g, ms in groups.items()))
            for n, (ms, c) in top[:12]:
                print(f"      {ms:8.2f} ms {c:4d}x  {n[:110]}")
    return result


def run(args) -> dict:
    device = torch.device(args.device)
    path = report.result_path(args.out, args.name, device)
    payload = {
        "benchmark": "attention",
        "command": report.command_line(getattr(args, "argv", [])),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "environment": report.environment(device, args.allow_dirty),
    }

    def checkpoint(partial: dict) -> None:
        payload["kernel"] = partial
        report.write_json(path, payload)

    parts = {
        "validate": validate,
        "kernel": lambda args, device: kernel(args, device, progress=checkpoint),
        "e2e": e2e,
        "profile": profile,
    }
    for part in args.parts:
        _capture(lambda part=part: parts[part](args, device), payload, part)
        report.write_json(path, payload)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    return payload
