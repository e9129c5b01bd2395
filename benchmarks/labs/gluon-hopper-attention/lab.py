"""Lab for the warp-specialized Gluon kernel (diffusers_block.kernels.block_sparse_attention_hopper): correctness on edge cases against the package reference,
then dense / 10% / 5% timing per config against cuDNN at 32K / 75K tokens, head dim 64 / 128.

    python benchmarks/labs/gluon-hopper-attention/lab.py      # on an H100, Triton >= 3.6; writes $OUT/lab.json
"""

import importlib
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
hop = importlib.import_module("diffusers_block.kernels.block_sparse_attention_hopper")
#: (BLOCK_N, NUM_STAGES, BLOCK_M) candidates per head dim (the kernel's CONFIG is the winner of these).
CONFIGS = {128: [(64, 4, 128), (64, 3, 64), (64, 5, 128)], 64: [(128, 4, 128), (128, 3, 64), (64, 4, 64)]}
if os.environ.get("LAB_ONLY"):
    CONFIGS = {128: [(64, 4, 128), (64, 6, 128)], 64: [(128, 3, 64)]}
ref_mod = importlib.import_module("diffusers_block.kernels.reference")
OUT = os.environ.get("OUT", "/tmp")
res = {
    "triton": __import__("triton").__version__,
    "torch": torch.__version__,
    "enabled": hop.enabled(),
    "checks": [],
    "timing": {},
}


def dump():
    with open(os.path.join(OUT, "lab.json"), "w") as f:
        json.dump(res, f, indent=1)


def run(q, k, v, index, count, bs, cfg, out_rows=None, out=None):
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    hop.launch(q, k, v, out, out_rows, lse, index, count, q.shape[-1] ** -0.5, bs, cfg)
    return out, lse


def random_lists(b, h, nq, nk, per_row, gen, empty_rows=0):
    scores = torch.rand(b, h, nq, nk, generator=gen, device="cuda")
    index = scores.argsort(-1)[..., :per_row].to(torch.int32).contiguous()
    count = torch.full((b, h, nq), per_row, dtype=torch.int32, device="cuda")
    if empty_rows:
        count[..., :empty_rows] = 0
    count[..., -1] = max(1, per_row // 2)
    return index, count


def checks():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in (64, 128):
        for cfg in CONFIGS[d]:
            for case in ("odd", "dense", "scatter", "fp16", "strided", "bs64", "bshd"):
                try:
                    bs = 64 if case == "bs64" else 128
                    if bs < cfg[2] or bs < cfg[0]:
                        continue
                    s_q, s_k = (1000, 777) if case in ("odd", "scatter", "strided") else (1024, 1024)
                    dtype = torch.float16 if case == "fp16" else torch.bfloat16
                    b, h = 2, 3
                    if case == "bshd":  # (B, S, H, D) buffer seen as (B, H, S, D): the (B*S, H*D) TMA view
                        q, k, v = (
                            torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
                            for s in (1024, 1024, 1024)
                        )
                        s_q = s_k = 1024
                    elif case == "strided":  # a slice of a fused projection: head rows strided by 3 * D
                        q, k, v = (
                            torch.randn(b, h, s, 3 * d, device="cuda", dtype=dtype, generator=gen)[..., d : 2 * d]
                            for s in (s_q, s_k, s_k)
                        )
                    else:
                        q = torch.randn(b, h, s_q, d, device="cuda", dtype=dtype, generator=gen)
                        k, v = (torch.randn(b, h, s_k, d, device="cuda", dtype=dtype, generator=gen) for _ in "kv")
                    nq, nk = math.ceil(s_q / bs), math.ceil(s_k / bs)
                    per_row = nk if case == "dense" else max(1, nk // 2)
                    index, count = random_lists(b, h, nq, nk, per_row, gen, empty_rows=0 if case == "dense" else 1)
                    out_rows = torch.randperm(s_q, device="cuda", generator=gen) if case == "scatter" else None
                    out, lse = run(q, k, v, index, count, bs, cfg, out_rows=out_rows)
                    ref, ref_lse = ref_mod.block_sparse_attention_reference(
                        q.float(), k.float(), v.float(), index, count, block_size=bs, scale=d**-0.5, return_lse=True
                    )
                    if out_rows is not None:
                        out = out[:, :, out_rows.long()]
                    finite = torch.isfinite(ref_lse)
                    row = {
                        "d": d,
                        "cfg": cfg,
                        "case": case,
                        "tma_view": [hop.tma_view(t) for t in (q, k)],
                        "rel_err": rel(out, ref),
                        "lse_max_err": (lse[finite] - ref_lse[finite]).abs().max().item(),
                        "lse_inf_match": bool(torch.equal(torch.isinf(lse), ~finite)),
                        "empty_rows_zero": bool((out.float()[~finite[..., None].expand_as(out)] == 0).all()),
                    }
                    row["ok"] = row["rel_err"] < 1e-2 and row["lse_max_err"] < 1e-2 and row["lse_inf_match"]
                except Exception:  # noqa: BLE001
                    row = {"d": d, "cfg": cfg, "case": case, "error": traceback.format_exc()[-1500:]}
                res["checks"].append(row)
                print(row, flush=True)
                dump()


def timing():
    for seq, d in ((32768, 128), (75776, 128), (32768, 64), (75776, 64)):
        h = 1536 // d
        q, k, v = [torch.randn(1, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = event_median(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), target_ms=300)
            ref = F.scaled_dot_product_attention(q, k, v)
        key = f"{seq}_{d}"
        row = res["timing"][key] = {"cudnn_ms": cudnn}
        print(f"\n{key}: cuDNN {cudnn:.3f} ms", flush=True)
        nk = math.ceil(seq / 128)
        gen = torch.Generator(device="cuda").manual_seed(1)
        lists = {"dense": random_lists(1, h, nk, nk, nk, gen)}
        lists["dense"][1].fill_(nk)
        lists["dense"] = (
            torch.arange(nk, device="cuda", dtype=torch.int32).expand(1, h, nk, nk).contiguous(),
            lists["dense"][1],
        )
        for dens in (0.1, 0.05):
            lists[str(dens)] = random_lists(1, h, nk, nk, max(1, round(dens * nk)), gen)
            lists[str(dens)][1].fill_(max(1, round(dens * nk)))
        for cfg in CONFIGS[d]:
            name = str(cfg)
            try:
                t0 = time.time()
                err = rel(run(q, k, v, *lists["dense"], 128, cfg)[0], ref)
                r = {"rel_err_vs_cudnn": err, "compile_s": time.time() - t0}
                for lname, (index, count) in lists.items():
                    ms = event_median(
                        lambda i=index, c=count, g=cfg, q=q, k=k, v=v: run(q, k, v, i, c, 128, g), target_ms=200
                    )
                    r[lname + "_ms"] = ms
                r["dense_vs_cudnn"] = cudnn / r["dense_ms"]
            except Exception:  # noqa: BLE001
                r = {"error": traceback.format_exc()[-1500:]}
            row[name] = r
            print(f"  {name:20s}", {a: (round(b, 4) if isinstance(b, float) else b) for a, b in r.items()}, flush=True)
            dump()
        del q, k, v, ref
        torch.cuda.empty_cache()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def event_median(fn, target_ms=200.0):
    """Median CUDA-event time of fn (ms), enough repetitions for about target_ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    n = max(5, min(200, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in events)[n // 2]


if __name__ == "__main__":
    print(res, flush=True)
    if not os.environ.get("LAB_ONLY"):
        checks()
    timing()
    dump()
