"""`python -m diffusers_block.bench attention` end to end on CPU (toy sizes, PyTorch references): the plumbing and
the JSON it writes. Its timings on CPU mean nothing; the H100 numbers come from the same command on the GPU."""

import json

import pytest
import torch

from diffusers_block.bench.__main__ import main


def test_attention_benchmark_cpu(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            [
                "attention",
                "--device",
                "cpu",
                "--model",
                "tiny-wan",
                "--steps",
                "3",
                "--repeats",
                "1",
                "--dense-steps",
                "1",
                "--refresh",
                "2",
                "--density",
                "0.1",
                "--head-dim",
                "64",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    [path] = tmp_path.glob("attention-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["command"].startswith("python -m diffusers_block.bench attention")
    assert result["validate"]["passed"] is True
    [row] = result["kernel"]["rows"]
    assert row["ours_dense_ms"] > 0 and row["densities"]["0.1"]["total_ms"] > 0
    assert row["dense_kernel"] == "triton"  # the Gluon kernel serves CUDA tensors on Hopper only
    sparse = row["densities"]["0.1"]
    assert sparse["select_host_ms"] > 0 and sparse["total_host_ms"] >= sparse["select_host_ms"] * 0.5
    e2e = result["e2e"]
    assert set(e2e["runs"]) == {"dense", "sparse", "sparse+cache", "cache"}
    assert e2e["runs"]["dense"]["rel_l2"] == 0.0
    assert 0.0 < e2e["runs"]["sparse"]["sparse_density"] < 1.0
    assert e2e["runs"]["sparse"]["rel_l2"] > 0.0  # sparse attention changed the result, a little
    assert set(e2e["forward_ms"]) == {"dense", "sparse_select", "sparse_reuse", "sparse_reuse_unfused_rotary"}
    validate = result["validate"]
    assert {r["scoring"] for r in validate["selection"]} == {"mean", "antidiagonal"}
    assert validate["gather"][0]["within_one_ulp"] and validate["scatter"][0]["all_written"]
    assert row["densities"]["0.1"]["select_antidiagonal_ms"] > 0


def test_attention_profile_part_cpu(tmp_path):
    """The profile part runs one forward per mode (on CPU it records no GPU kernels: plumbing only)."""
    payload = main(
        ["attention", "--parts", "profile", "--device", "cpu", "--model", "tiny-wan", "--out", str(tmp_path)]
    )
    assert set(payload["profile"]["modes"]) == {"dense", "sparse_reuse", "sparse_reuse_unfused_rotary", "sparse_select"}


def test_attention_quality_benchmark_on_the_shipped_video_model(tmp_path):
    payload = main(
        ["attention-quality", "--device", "cpu", "--clips", "2", "--steps", "3", "--dense-steps", "1"]
        + ["--thresholds", "1.0", "0.5", "--approximations", "none", "--out", str(tmp_path)]
    )
    everything, half = payload["results"]
    assert everything["sparse_density"] == 1.0 and everything["psnr_db"] > 60  # all blocks kept: dense output
    assert half["sparse_density"] < 0.6 and half["psnr_db"] < everything["psnr_db"]
    layers = len(payload["layer_names"])
    assert layers == 8 and all(len(row["attention_error_per_layer"]) == layers for row in payload["results"])
    assert everything["attention_error_mean"] < 1e-5  # all blocks kept: exact attention, layer by layer
    assert min(half["attention_error_per_layer"]) > 1e-3 and half["attention_error_mean"] > 1e-3
    written = json.loads(next(tmp_path.glob("attention-quality-*.json")).read_text())
    assert written["results"] == payload["results"]


def test_attention_quality_benchmark_passes_the_block_scoring_on(tmp_path):
    runs = {
        scoring: main(
            ["attention-quality", "--device", "cpu", "--clips", "1", "--steps", "3", "--dense-steps", "1"]
            + ["--thresholds", "0.5", "--approximations", "none", "--scoring", scoring, "--out", str(tmp_path)]
        )["results"][0]
        for scoring in ("mean", "antidiagonal")
    }
    # The two scorings rank key blocks differently, so they keep different sets and the outputs differ.
    assert runs["mean"]["psnr_db"] != runs["antidiagonal"]["psnr_db"]


def test_attention_quality_sweeps_refresh_intervals_with_cached_skipped_blocks(tmp_path):
    """Each (approximation, refresh, threshold) is a row; cached skipped blocks make every selection step exact,
    so they beat dropping the same blocks, and selection steps count as computing every block."""
    rows = main(
        ["attention-quality", "--device", "cpu", "--clips", "1", "--steps", "5", "--dense-steps", "1"]
        + ["--thresholds", "0.3", "--approximations", "none", "cached", "--out", str(tmp_path)]
        + ["--refresh", "1", "2", "0:1,0.7:3"]
    )["results"]
    assert [(r["approximation"], r["refresh"]) for r in rows] == [
        (approximation, refresh) for approximation in ("none", "cached") for refresh in (1, 2, "0:1,0.7:3")
    ]
    dropped, _, _, every_step, every_other, scheduled = rows
    assert every_other["sparse_density"] < scheduled["sparse_density"] < 1.0  # selects at steps 1-3 (R2: 1, 3)
    assert every_step["sparse_density"] == 1.0 and every_step["psnr_db"] > 60  # selected at every step: exact
    assert dropped["sparse_density"] < every_other["sparse_density"] < 1.0
    assert every_other["psnr_db"] > dropped["psnr_db"]


def test_attention_quality_names_the_training_command_of_a_model_that_does_not_ship(tmp_path, monkeypatch):
    from diffusers_block.bench import attention_quality

    folder, size, command = attention_quality.MODELS["digits-video-64"]
    monkeypatch.setitem(attention_quality.MODELS, "digits-video-64", (tmp_path / "absent", size, command))
    with pytest.raises(FileNotFoundError, match="--canvas 64 --digit-size 14"):
        main(["attention-quality", "--model", "digits-video-64", "--device", "cpu", "--out", str(tmp_path)])


def test_dense_rounds_rotate_order_and_take_median_ratios():
    from diffusers_block.bench.attention import _dense_rounds

    calls = []
    # a clock that slows down call after call: whoever goes first in every round would look fastest
    clock = iter(range(1, 100))

    def timed(fn):
        calls.append(fn())
        return float(next(clock))

    contenders = {"cudnn_ms": lambda: "cudnn", "ours_dense_ms": lambda: "ours", "ours_dense_triton_ms": lambda: "tri"}
    out = _dense_rounds(contenders, timed, rounds=3)
    assert calls == ["cudnn", "ours", "tri", "ours", "tri", "cudnn", "tri", "cudnn", "ours"]
    assert [list(r) for r in out["dense_rounds"]] == [
        ["cudnn_ms", "ours_dense_ms", "ours_dense_triton_ms"],
        ["ours_dense_ms", "ours_dense_triton_ms", "cudnn_ms"],
        ["ours_dense_triton_ms", "cudnn_ms", "ours_dense_ms"],
    ]
    # cuDNN took 1, 6, 8; ours 2, 4, 9: medians 6 and 4, ratio the median of 1/2, 6/4, 8/9
    assert out["cudnn_ms"] == 6.0 and out["ours_dense_ms"] == 4.0
    assert out["ours_dense_vs_cudnn_throughput"] == 8 / 9
    assert "cudnn_vs_cudnn_throughput" not in out
