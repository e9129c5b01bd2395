"""Non-finite output rows per (head dim, config, lengths, full / partial lists), two repeats each: how the race of the
first version showed (key lengths that are not a multiple of 16 at head dim 128, where register allocation reused P's
registers while its PV product was in flight).

    python benchmarks/labs/gluon-hopper-attention/tail_debug.py      # on an H100; writes $OUT/tail_debug.json
"""

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import random_lists, ref_mod, rel, run  # noqa: E402

CONFIGS = ((128, (64, 4, 128)), (128, (64, 3, 128)), (128, (64, 3, 64)), (64, (128, 3, 64)))
# (S_q, S_k, full lists, empty query blocks)
CASES = (
    (1000, 777, False, 1),
    (1024, 777, True, 0),
    (1024, 1024, False, 1),
    (1024, 777, False, 0),
    (1024, 832, True, 0),
)


def main():
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d, cfg in CONFIGS:
        for s_q, s_k, full, empty in CASES:
            b, h, bs = 2, 3, 128
            q = torch.randn(b, h, s_q, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            k, v = (torch.randn(b, h, s_k, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
            nq, nk = math.ceil(s_q / bs), math.ceil(s_k / bs)
            index, count = random_lists(b, h, nq, nk, nk if full else max(1, nk // 2), gen, empty_rows=empty)
            if full:
                count.fill_(nk)
            ref = ref_mod.block_sparse_attention_reference(
                q.float(), k.float(), v.float(), index, count, block_size=bs, scale=d**-0.5
            )
            runs = []
            for _ in range(2):
                o, _lse = run(q, k, v, index, count, bs, cfg)
                bad = ~torch.isfinite(o.float()).all(-1)
                runs.append({"rel": rel(torch.nan_to_num(o), ref), "n_bad_rows": int(bad.sum()),
                             "where": bad.nonzero()[:8].tolist()})  # fmt: skip
            key = f"d{d} {cfg} sq{s_q} sk{s_k} full{full} empty{empty}"
            out[key] = runs
            print(key, runs, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "tail_debug.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
