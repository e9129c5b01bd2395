"""Where the block selection's time goes, on the GPU (issue 5: 5% density at 32K tokens / head dim 128 >= 12x).

Per shape of `bench attention`'s kernel rows (heads x head dim = 1536, bf16, blocks of 128), device time only
(`bench_ms(device_only=True)`):
  * the pooling pass over q and over k (`block_sums`), and the same sums by PyTorch (`block_sums_reference`);
  * the selection as `bench attention` calls it (pooling included), and with the sums handed over (the kernel
    alone, as when `gather_tokens` pooled on the way);
  * the host time of one selection call (what `select_ms` measured before kernel rows became device time);
  * torch.profiler: device time per kernel of one selection call;
  * what reading q and k once costs at the GPU's copy bandwidth (a `torch.add` of q and k into a buffer reads the
    same bytes), as the floor of any selection that pools both;
  * the pooling kernel's chunk size and warps (`SUMS_CHUNK_ELEMENTS`, `SUMS_NUM_WARPS`), and both poolings on the
    (B, S, H, D) layout processors hand over;
  * the cut kernel's values per thread (`ROW_ELEMENTS_PER_THREAD`, which sets its warps) and the autotuned rows;
  * antidiagonal scoring;
  * with `--old MODULE` (the selection module of an earlier commit, importable), the same calls through it.

    python benchmarks/labs/block-selection/lab.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from diffusers_block.bench import report
from diffusers_block.bench.attention import WIDTH, bench_ms, smooth_qkv
from diffusers_block.kernels import block_selection, block_sums, block_sums_reference, select_blocks, token_gather

SHAPES = [(32768, 64), (32768, 128), (75776, 64), (75776, 128)]
SUMS_CONFIGS = [(8192, 4), (16384, 4), (8192, 2), (4096, 2), (16384, 8)]
#: Values per thread of the cut kernel (sets its warps), tried after the default.
ROW_ELEMENTS = [16, 64, 8]
BLOCK = 128
DENSITY = 0.05


def device_ms(fn) -> float:
    return bench_ms(fn, torch.device("cuda"), device_only=True)


def kernel_times(fn, calls: int = 10) -> dict[str, float]:
    """Mean device ms per call of each kernel ``fn`` launches (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total > 0:
            out[event.key[:80]] = total / calls / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def case(seq: int, head_dim: int, old) -> dict:
    heads = WIDTH // head_dim
    q, k, _ = smooth_qkv(1, heads, seq, head_dim, BLOCK, torch.device("cuda"), torch.bfloat16, seed=3)
    nb = math.ceil(seq / BLOCK)
    keep = max(1, round(DENSITY * nb))
    q_sums, k_sums = block_sums(q, BLOCK), block_sums(k, BLOCK)
    ref = block_sums_reference(q, BLOCK)
    sink = torch.empty_like(q)

    def select(**sums):
        return select_blocks(q, k, block_size=BLOCK, threshold=1.0, max_blocks=keep, local_blocks=0, **sums)

    index, count = select()
    handed = select(query_sums=q_sums, key_sums=k_sums)
    torch.cuda.synchronize()
    host = []
    for _ in range(20):
        t0 = time.perf_counter()
        select()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    row = {
        "seq": seq,
        "head_dim": head_dim,
        "heads": heads,
        "blocks_per_row": keep,
        "sums_rel_err_vs_torch": ((q_sums - ref).abs().max() / ref.abs().max()).item(),
        "handed_over_equal": bool(torch.equal(index, handed[0]) and torch.equal(count, handed[1])),
        "read_q_and_k_ms": device_ms(lambda: torch.add(q, k, out=sink)),
        "block_sums_q_ms": device_ms(lambda: block_sums(q, BLOCK)),
        "block_sums_torch_q_ms": device_ms(lambda: block_sums_reference(q, BLOCK)),
        "select_ms": device_ms(select),
        "select_with_sums_ms": device_ms(lambda: select(query_sums=q_sums, key_sums=k_sums)),
        "select_host_ms_median": sorted(host)[len(host) // 2],
        "select_antidiagonal_ms": device_ms(lambda: select(scoring="antidiagonal", stride=8)),
        "kernels_of_select_ms": kernel_times(select),
    }
    for chunk, warps in SUMS_CONFIGS:
        token_gather.SUMS_CHUNK_ELEMENTS, token_gather.SUMS_NUM_WARPS = chunk, warps
        row[f"block_sums_q_ms_chunk{chunk}_warps{warps}"] = device_ms(lambda: block_sums(q, BLOCK))
    token_gather.SUMS_CHUNK_ELEMENTS, token_gather.SUMS_NUM_WARPS = SUMS_CONFIGS[0]
    # The layout a processor hands over: a (B, H, S, D) view of a (B, S, H, D) projection.
    q_bshd = q.transpose(1, 2).contiguous().transpose(1, 2)
    row["block_sums_q_bshd_ms"] = device_ms(lambda: block_sums(q_bshd, BLOCK))
    row["block_sums_torch_q_bshd_ms"] = device_ms(lambda: block_sums_reference(q_bshd, BLOCK))
    # The cut kernel alone (sums handed over, logits cached in the scratch the call writes anyway), per warp rule.
    default = block_selection.ROW_ELEMENTS_PER_THREAD
    tuner = block_selection._select_blocks_fwd_autotuned
    row["cut_autotuned"] = {str(key): str(config) for key, config in tuner.cache.items()}
    for elements in ROW_ELEMENTS:
        block_selection.ROW_ELEMENTS_PER_THREAD = elements
        tuner.cache.clear()
        got = select(query_sums=q_sums, key_sums=k_sums)
        assert torch.equal(got[0], index) and torch.equal(got[1], count)
        row[f"select_with_sums_ms_elements{elements}"] = device_ms(lambda: select(query_sums=q_sums, key_sums=k_sums))
        row[f"cut_autotuned_elements{elements}"] = {str(key): str(config) for key, config in tuner.cache.items()}
    block_selection.ROW_ELEMENTS_PER_THREAD = default
    tuner.cache.clear()
    if old is not None:

        def select_old(**kw):
            return old.select_blocks(q, k, block_size=BLOCK, threshold=1.0, max_blocks=keep, local_blocks=0, **kw)

        old_index, old_count = select_old()
        row["old_equal"] = bool(torch.equal(old_index, index) and torch.equal(old_count, count))
        row["old_select_ms"] = device_ms(select_old)
        row["old_select_antidiagonal_ms"] = device_ms(lambda: select_old(scoring="antidiagonal", stride=8))
    print(json.dumps({key: value for key, value in row.items() if key != "kernels_of_select_ms"}), flush=True)
    for name, ms in list(row["kernels_of_select_ms"].items())[:6]:
        print(f"    {ms:8.4f} ms  {name}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--old", default=None, help="an earlier selection module to compare, e.g. a copy in the tree")
    args = parser.parse_args()
    import importlib

    old = importlib.import_module(args.old) if args.old else None
    rows = [case(seq, head_dim, old) for seq, head_dim in SHAPES]
    device = torch.device("cuda")
    payload = {
        "environment": report.environment(device),
        "command": "python benchmarks/labs/block-selection/lab.py" + (f" --old {args.old}" if args.old else ""),
        "rows": rows,
    }
    print("wrote", report.write_json(report.result_path(args.out, "selection", device), payload))


if __name__ == "__main__":
    main()
