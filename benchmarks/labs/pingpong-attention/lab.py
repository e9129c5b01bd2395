"""Lab: FA-3's ping-pong and intra-warpgroup order in the Gluon Hopper kernel, head dim 128 (issue 5, dense mode).

Each variant of :mod:`pingpong` runs in its own process under a time limit (a wrong barrier id would hang the GPU, not
fail): checks against the package reference on odd lengths with empty and short lists and on full lists, then device
time on full lists at 32K and 75K tokens against cuDNN, the package's Gluon kernel and its Triton-language kernel,
timed in the parent.

    python benchmarks/labs/pingpong-attention/lab.py [--out DIR] [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusers_block.bench import report  # noqa: E402
from diffusers_block.bench.attention import bench_ms, rel_err, smooth_qkv  # noqa: E402
from diffusers_block.kernels import block_sparse_attention, dense_block_index  # noqa: E402
from diffusers_block.kernels import block_sparse_attention_hopper as hop  # noqa: E402
from diffusers_block.kernels.reference import block_sparse_attention_reference  # noqa: E402

#: Full lists at these (tokens, head dim); 32,760 (Wan2.1 at 480p x 81 frames) has a partial last key block.
SHAPES = [(32768, 128), (75776, 128), (32760, 128)]
BLOCK = 128
#: name -> (config (BLOCK_N, NUM_STAGES, BLOCK_M), ping-pong, one partition per consumer warpgroup)
VARIANTS = {
    "fa3-order-n128": ((128, 2, 128), False, False),
    "pingpong-n128": ((128, 2, 128), True, False),
    "pingpong-split-n128": ((128, 2, 128), True, True),
    "fa3-order-split-n128": ((128, 2, 128), False, True),
    "fa3-order-n64": ((64, 4, 128), False, False),
    "pingpong-n64": ((64, 4, 128), True, False),
    "pingpong-split-n64": ((64, 4, 128), True, True),
}
CHILD_TIMEOUT_S = 150


def check_cases(attend, device) -> list[dict]:
    """Odd lengths with an empty row, one-block rows and half lists; full lists; fp16."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for case, (s_q, s_k, dtype) in {
        "odd": (1000, 777, torch.bfloat16),
        "full": (1024, 1024, torch.bfloat16),
        "fp16": (1024, 896, torch.float16),
    }.items():
        b, h, d = 2, 3, 128
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen) for s in (s_q, s_k, s_k))
        nq, nk = math.ceil(s_q / BLOCK), math.ceil(s_k / BLOCK)
        per_row = nk if case == "full" else max(1, nk // 2)
        order = torch.rand(b, h, nq, nk, generator=gen, device=device).argsort(-1)
        index = order[..., :per_row].to(torch.int32).contiguous()
        count = torch.full((b, h, nq), per_row, dtype=torch.int32, device=device)
        if case != "full":
            count[..., 0] = 0
            count[..., -1] = 1
        out, lse = attend(q, k, v, index, count)
        ref, ref_lse = block_sparse_attention_reference(
            q.float(), k.float(), v.float(), index, count, block_size=BLOCK, scale=d**-0.5, return_lse=True
        )
        finite = torch.isfinite(ref_lse)
        row = {
            "case": case,
            "rel_err": rel_err(out, ref),
            "lse_max_err": (lse[finite] - ref_lse[finite]).abs().max().item(),
            "lse_inf_match": bool(torch.equal(torch.isinf(lse), ~finite)),
            "finite": bool(torch.isfinite(out.float()).all()),
        }
        row["ok"] = row["rel_err"] < 1e-2 and row["lse_max_err"] < 1e-2 and row["lse_inf_match"] and row["finite"]
        rows.append(row)
    return rows


def run_variant(name: str) -> dict:
    import pingpong  # the lab kernel (needs Gluon: imported in the child only)

    config, ping, split = VARIANTS[name]
    device = torch.device("cuda")

    def attend(q, k, v, index, count):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        pingpong.launch(
            q, k, v, out, None, lse, index, count, q.shape[-1] ** -0.5, BLOCK, config, pingpong=ping, split=split
        )
        return out, lse

    result = {
        "variant": name,
        "config": config,
        "pingpong": ping,
        "split": split,
        "checks": check_cases(attend, device),
    }
    if not all(c["ok"] for c in result["checks"]):
        return result
    for seq, dim in SHAPES:
        result[f"{seq}_{dim}"] = time_full_lists(attend, seq, dim, device)
        torch.cuda.empty_cache()
    return result


def time_full_lists(attend, seq: int, dim: int, device) -> dict:
    heads = 1536 // dim
    q, k, v = smooth_qkv(1, heads, seq, dim, BLOCK, device, torch.bfloat16, seed=3)
    nb = math.ceil(seq / BLOCK)
    index, count = dense_block_index(1, heads, nb, nb, device=device)
    out = attend(q, k, v, index, count)[0]
    return {
        "ms": bench_ms(lambda: attend(q, k, v, index, count), device, device_only=True),
        "rel_err_vs_cudnn": rel_err(out, F.scaled_dot_product_attention(q, k, v)),
    }


def baseline_row(seq: int, dim: int, device) -> dict:
    """cuDNN, the package's Triton-language kernel and its Gluon kernel (with the package's config: the ping-pong
    since it was adopted) on full lists."""
    heads = 1536 // dim
    q, k, v = smooth_qkv(1, heads, seq, dim, BLOCK, device, torch.bfloat16, seed=3)
    nb = math.ceil(seq / BLOCK)
    index, count = dense_block_index(1, heads, nb, nb, device=device)
    row = {"cudnn_ms": bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, device_only=True)}
    with hop.turned_off():
        row["triton_language_ms"] = bench_ms(
            lambda: block_sparse_attention(q, k, v, index, count, block_size=BLOCK), device, device_only=True
        )

    def gluon(q, k, v, index, count):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=device, dtype=torch.float32)
        hop.launch(q, k, v, out, None, lse, index, count, dim**-0.5, BLOCK)
        return out, lse

    timed = time_full_lists(gluon, seq, dim, device)
    row["package_gluon_ms"] = timed["ms"]
    row["package_gluon_rel_err_vs_cudnn"] = timed["rel_err_vs_cudnn"]
    return row


def baselines(device) -> dict:
    rows = {}
    for seq, dim in SHAPES:
        rows[f"{seq}_{dim}"] = baseline_row(seq, dim, device)
        print(json.dumps({f"{seq}_{dim}": rows[f"{seq}_{dim}"]}), flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="none: the baselines only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child)), flush=True)
        return
    device = torch.device("cuda")
    path = report.result_path(args.out, "pingpong-attention", device)
    payload = {
        "environment": report.environment(device),
        "command": "python benchmarks/labs/pingpong-attention/lab.py " + " ".join(sys.argv[1:]),
        "baselines": baselines(device),
        "variants": [],
    }
    for name in [v for v in args.variants if v != "none"]:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name],
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            row = {"variant": name, "error": f"timed out after {CHILD_TIMEOUT_S} s (hang?)"}
        for key, base in payload["baselines"].items():
            if key in row:
                row[key]["vs_cudnn"] = base["cudnn_ms"] / row[key]["ms"]
        payload["variants"].append(row)
        print(json.dumps(row), flush=True)
        report.write_json(path, payload)
    for base in payload["baselines"].values():
        base["triton_language_vs_cudnn"] = base["cudnn_ms"] / base["triton_language_ms"]
        base["package_gluon_vs_cudnn"] = base["cudnn_ms"] / base["package_gluon_ms"]
    print("wrote", report.write_json(path, payload))


if __name__ == "__main__":
    main()
