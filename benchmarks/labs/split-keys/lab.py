"""Lab: does splitting the keys into chunks keep K/V in L2 at 75K tokens and head dim 128? (issue 5, dense mode)

Our kernels lose 5-6 points of cuDNN throughput from 32K to 75K tokens at head dim 128 and 2 at head dim 64; one head's
K and V at 75K x 128 (38.8 MB) nearly fill the H100's 50 MB L2. If that is the cause, attending to the keys in chunks
(every query block listing only the chunk's key blocks, the chunks merged by their log-sum-exp, as split-K decoding
does) should run faster per key than one pass over all of them. Device time of the package's kernel on full lists, on
each chunk's lists, and of the merge; error of the merged output against cuDNN.

    python benchmarks/labs/split-keys/lab.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from diffusers_block.bench import report
from diffusers_block.bench.attention import bench_ms, smooth_qkv
from diffusers_block.kernels import block_sparse_attention

SHAPES = [(75776, 128), (32768, 128), (75776, 64)]
BLOCK = 128
CHUNKS = [2, 4]


def chunk_lists(heads: int, nb: int, chunks: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk, lists in which every query block keeps that chunk's key blocks (contiguous ranges)."""
    bounds = [round(nb * c / chunks) for c in range(chunks + 1)]
    lists = []
    for lo, hi in zip(bounds, bounds[1:]):
        index = torch.arange(lo, hi, dtype=torch.int32, device=device).expand(1, heads, nb, hi - lo).contiguous()
        count = torch.full((1, heads, nb), hi - lo, dtype=torch.int32, device=device)
        lists.append((index, count))
    return lists


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Outputs of attention over disjoint key sets, merged by their log-sum-exp (exact attention over the union)."""
    lse = torch.stack([p[1] for p in parts])
    weights = torch.softmax(lse, dim=0)[..., None]
    return sum(w * p[0].float() for w, p in zip(weights, parts)).to(parts[0][0].dtype)


def shape_row(seq: int, dim: int, device: torch.device) -> dict:
    heads = 1536 // dim
    q, k, v = smooth_qkv(1, heads, seq, dim, BLOCK, device, torch.bfloat16, seed=3)
    nb = math.ceil(seq / BLOCK)
    ref = F.scaled_dot_product_attention(q, k, v)
    row = {"seq": seq, "head_dim": dim}
    row["cudnn_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, device_only=True)
    (full_index, full_count) = chunk_lists(heads, nb, 1, device)[0]
    row["full_ms"] = bench_ms(
        lambda: block_sparse_attention(q, k, v, full_index, full_count, block_size=BLOCK), device, device_only=True
    )
    for chunks in CHUNKS:
        lists = chunk_lists(heads, nb, chunks, device)

        def attend(index, count):
            return block_sparse_attention(q, k, v, index, count, block_size=BLOCK, return_lse=True)

        parts = [attend(*lst) for lst in lists]
        merged = merge(parts)
        entry = {
            "chunk_ms": [bench_ms(lambda lst=lst: attend(*lst), device, device_only=True) for lst in lists],
            "merge_ms": bench_ms(lambda parts=parts: merge(parts), device, device_only=True),
            "rel_err_vs_cudnn": ((merged.float() - ref.float()).norm() / ref.float().norm()).item(),
        }
        entry["total_ms"] = sum(entry["chunk_ms"]) + entry["merge_ms"]
        entry["attention_vs_full"] = sum(entry["chunk_ms"]) / row["full_ms"]
        entry["total_vs_cudnn"] = row["cudnn_ms"] / entry["total_ms"]
        row[f"chunks_{chunks}"] = entry
    row["full_vs_cudnn"] = row["cudnn_ms"] / row["full_ms"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for seq, dim in SHAPES:
        rows.append(shape_row(seq, dim, device))
        torch.cuda.empty_cache()
    payload = {
        "environment": report.environment(device),
        "command": "python benchmarks/labs/split-keys/lab.py",
        "rows": rows,
    }
    print("wrote", report.write_json(report.result_path(args.out, "split-keys", device), payload))


if __name__ == "__main__":
    main()
