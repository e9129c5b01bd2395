"""Run-to-run spread of dense mode at head dim 128 (issue 5): rounds of cuDNN / the Gluon ping-pong kernel / the
Triton-language kernel on full lists, fresh tensors each round, with the GPU's SM clock, temperature and power logged
beside (``nvidia-smi``), to tell throttling from the kernel's own variation.

    python benchmarks/labs/pingpong-attention/spread.py [--out DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess

import torch
import torch.nn.functional as F

from diffusers_block.bench import report
from diffusers_block.bench.attention import bench_ms, smooth_qkv
from diffusers_block.kernels import block_sparse_attention, dense_block_index
from diffusers_block.kernels import block_sparse_attention_hopper as hop

BLOCK = 128
SHAPES = [(75776, 128), (32768, 128)]


def one_round(seq: int, dim: int, seed: int, device) -> dict:
    heads = 1536 // dim
    q, k, v = smooth_qkv(1, heads, seq, dim, BLOCK, device, torch.bfloat16, seed=seed)
    nb = -(-seq // BLOCK)
    index, count = dense_block_index(1, heads, nb, nb, device=device)
    row = {"cudnn_ms": bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, device_only=True)}
    row["gluon_ms"] = bench_ms(
        lambda: block_sparse_attention(q, k, v, index, count, block_size=BLOCK), device, device_only=True
    )
    with hop.turned_off():
        row["triton_ms"] = bench_ms(
            lambda: block_sparse_attention(q, k, v, index, count, block_size=BLOCK), device, device_only=True
        )
    row["gluon_vs_cudnn"] = row["cudnn_ms"] / row["gluon_ms"]
    row["triton_vs_cudnn"] = row["cudnn_ms"] / row["triton_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda")
    log_path = os.path.join(args.out, "gpu-clocks.csv")
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,temperature.gpu,power.draw", "--format=csv", "-lms", "500"],
        stdout=open(log_path, "w"),
    )
    rows = {}
    try:
        for seq, dim in SHAPES:
            rows[f"{seq}_{dim}"] = []
            for r in range(args.rounds):
                rows[f"{seq}_{dim}"].append(one_round(seq, dim, seed=r, device=device))
                print(json.dumps({f"{seq}_{dim}": rows[f"{seq}_{dim}"][-1]}), flush=True)
                torch.cuda.empty_cache()
    finally:
        smi.terminate()
    summary = {
        key: {
            name: {
                "median": statistics.median(x[name] for x in rs),
                "min": min(x[name] for x in rs),
                "max": max(x[name] for x in rs),
            }
            for name in ("gluon_vs_cudnn", "triton_vs_cudnn")
        }
        for key, rs in rows.items()
    }
    clocks = open(log_path).read().splitlines()
    payload = {
        "environment": report.environment(device),
        "command": f"python benchmarks/labs/pingpong-attention/spread.py --rounds {args.rounds}",
        "rounds": rows,
        "summary": summary,
        "gpu_log": clocks,
    }
    print(json.dumps(summary, indent=1))
    print("wrote", report.write_json(report.result_path(args.out, "pingpong-spread", device), payload))


if __name__ == "__main__":
    main()
