"""At which list widths should the Gluon kernel serve? (issue 5; ``MIN_LIST_SHARE`` in the Hopper module)

Per (tokens, head dim) and share of the key blocks listed (random blocks in ascending order, as the selection writes
them), device time of the Gluon kernel (``launch``: the ping-pong at head dim 128, one warpgroup at 64) and of the
Triton-language kernel on the same lists, in rounds with a rotating order (medians; the H100's clock drifts at its
power cap).

    python benchmarks/labs/pingpong-attention/list_width.py [--out DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from diffusers_block.bench import report
from diffusers_block.bench.attention import bench_ms, median_ratio, smooth_qkv, time_in_rounds
from diffusers_block.kernels import block_sparse_attention
from diffusers_block.kernels import block_sparse_attention_hopper as hop

BLOCK = 128
SHAPES = [(32768, 128), (75776, 128), (32768, 64)]
SHARES = [1.0, 0.5, 0.25, 0.125, 0.1, 0.05]


def random_lists(heads: int, nb: int, width: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.rand(1, heads, nb, nb, generator=gen, device=device).argsort(-1)[..., :width]
    index = order.sort(-1).values.to(torch.int32).contiguous()
    return index, torch.full((1, heads, nb), width, dtype=torch.int32, device=device)


def shape_rows(seq: int, dim: int, rounds: int, device) -> list[dict]:
    heads = 1536 // dim
    q, k, v = smooth_qkv(1, heads, seq, dim, BLOCK, device, torch.bfloat16, seed=3)
    nb = -(-seq // BLOCK)
    rows = []
    for share in SHARES:
        width = max(1, round(share * nb))
        index, count = random_lists(heads, nb, width, device)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=device, dtype=torch.float32)

        def gluon(index=index, count=count, out=out, lse=lse):
            hop.launch(q, k, v, out, None, lse, index, count, dim**-0.5, BLOCK)

        def triton_language(index=index, count=count):
            with hop.turned_off():
                return block_sparse_attention(q, k, v, index, count, block_size=BLOCK)

        gluon()
        err = (out.float() - triton_language().float()).abs().max().item()
        medians, per_round = time_in_rounds(
            {"gluon_ms": gluon, "triton_ms": triton_language},
            lambda fn: bench_ms(fn, device, device_only=True),
            rounds,
        )
        row = {"seq": seq, "head_dim": dim, "share": share, "blocks": width, "max_abs_diff": err, **medians}
        row["triton_over_gluon"] = median_ratio(per_round, "triton_ms", "gluon_ms")
        row["rounds"] = per_round
        print(json.dumps({key: val for key, val in row.items() if key != "rounds"}), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    path = report.result_path(args.out, "pingpong-list-width", device)
    payload = {
        "environment": report.environment(device),
        "command": f"python benchmarks/labs/pingpong-attention/list_width.py --rounds {args.rounds}",
        "rows": [],
    }
    for seq, dim in SHAPES:  # written after every shape: a time limit keeps what was measured
        payload["rows"] += shape_rows(seq, dim, args.rounds, device)
        report.write_json(path, payload)
        torch.cuda.empty_cache()
    print("wrote", path)


if __name__ == "__main__":
    main()
