"""Draw the documentation's plots from the committed benchmark JSON: ``python docs/make_plots.py [--out docs/img]``.

- ``quality-digits-{image,video}.png``: PSNR against the uncached output vs block-work speed-up (1 / fraction of
  block work computed) for every cache in ``benchmarks/results/quality-digits-*.json``;
- ``attention-kernel-speedup.png``: the sparse attention kernel's speed-up over cuDNN's dense attention vs the kept
  fraction of key blocks, per shape, from ``benchmarks/results/attention-kernel-pingpong-routing-*.json``.

Only the JSON is read (nothing is run); needs matplotlib (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUALITY = {
    "image": "quality-digits-image-nvidia-h100-80gb-hbm3-2026-11-22.json",
    "video": "quality-digits-video-nvidia-h100-80gb-hbm3-2026-11-22.json",
}
KERNEL = "attention-kernel-pingpong-routing-nvidia-h100-80gb-hbm3-2026-11-23.json"

# result-name family -> (legend label, ours?); families not listed are not drawn
FAMILIES = {
    "bac-validated": ("ours: BAC validated (tune_schedule)", True),
    "bac-shared-keep": ("ours: BAC shared, keep_first=0.2", True),
    "bac-shared": ("ours: BAC shared (cosine)", True),
    "bac": ("ours: BAC per block (paper)", True),
    "static": ("ours: static every 2 / 3 / 4", True),
    "static-taylor1": ("ours: static + taylor1", True),
    "bwcache-model": ('ours: BWCache scope="model"', True),
    "bwcache": ("ours: BWCache per block", True),
    "diffusers-magcache": ("diffusers MagCache", False),
    "diffusers-taylorseer": ("diffusers TaylorSeerCache", False),
    "diffusers-fbcache": ("diffusers FirstBlockCache", False),
    "cache-dit-dbcache": ("cache-dit DBCache", False),
}


def family(name: str) -> str:
    """``bac-validated-18`` -> ``bac-validated``; ``static-2-taylor1`` -> ``static-taylor1``."""
    return re.sub(r"-[0-9.]+(?=-|$)", "", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 6.5})
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def quality_plot(kind: str, out: Path) -> Path:
    plt = _pyplot()
    data = json.loads((RESULTS / QUALITY[kind]).read_text())
    groups: dict[str, list[dict]] = {}
    for row in data["results"]:
        if not row.get("error") and family(row["name"]) in FAMILIES:
            groups.setdefault(family(row["name"]), []).append(row)
    fig, ax = plt.subplots(figsize=(7.6, 3.7))
    markers = "os^vD<>ph*Xd"
    colors = plt.get_cmap("tab20").colors[::2] + ("#000000", "#8c6d31")  # one fixed colour per family
    for index, (key, (label, ours)) in enumerate(FAMILIES.items()):
        rows = sorted(groups.get(key, []), key=lambda r: r["fraction_computed"])
        if not rows:
            continue
        ax.plot(
            [1 / r["fraction_computed"] for r in rows],
            [r["psnr_db"] for r in rows],
            marker=markers[index % len(markers)],
            color=colors[index % len(colors)],
            linestyle="-" if ours else "--",
            linewidth=2.0 if key == "bac-validated" else 1.0,
            markersize=4,
            label=label,
        )
    reference = data["reference"]["accuracy"]
    accuracy = "per-frame accuracy" if kind == "video" else "classifier accuracy"
    ax.set_title(f"shipped digits-{kind} model, one H100, 50 steps (uncached {accuracy} {reference:.1%})")
    ax.set_xlabel("block-work speed-up (1 / fraction of block work computed)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path = _save(fig, out / f"quality-digits-{kind}.png")
    plt.close(fig)
    return path


def kernel_plot(out: Path) -> Path:
    plt = _pyplot()
    rows = json.loads((RESULTS / KERNEL).read_text())["kernel"]["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    for index, row in enumerate(rows):
        color = f"C{index}"
        shape = f"{row['seq']:,} tokens, head dim {row['head_dim']}"
        points = [(1.0, row["ours_dense_vs_cudnn_throughput"], row["ours_dense_vs_cudnn_throughput"])]
        for values in row["densities"].values():
            points.append((values["actual_density"], values["speedup_vs_cudnn"], values["flex_speedup_vs_cudnn"]))
        points.sort()
        sparse, dense = points[:-1], points[-1]
        ax.plot([p[0] for p in sparse], [p[1] for p in sparse], "o-", color=color, markersize=4, label=f"ours, {shape}")
        ax.plot([dense[0]], [dense[1]], "o", color=color, markersize=4)
        ax.plot([p[0] for p in sparse], [p[2] for p in sparse], "x--", color=color, markersize=4, linewidth=0.8)
    ideal = [0.045, 1.0]
    ax.plot(ideal, [1 / d for d in ideal], ":", color="gray", linewidth=1, label="1 / density (no overhead)")
    ax.plot([], [], "x--", color="gray", linewidth=0.8, label="FlexAttention, same mask (no selection)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([0.05, 0.1, 0.2, 0.5, 1.0], ["5%", "10%", "20%", "50%", "100%\n(dense mode)"])
    ax.set_yticks([1, 2, 5, 10, 20], ["1x", "2x", "5x", "10x", "20x"])
    ax.minorticks_off()
    ax.set_xlabel("kept fraction of key blocks")
    ax.set_ylabel("speed-up over cuDNN dense attention")
    ax.set_title("block-sparse attention on one H100, bf16 (measured points; selection time included)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    path = _save(fig, out / "attention-kernel-speedup.png")
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [quality_plot("image", args.out), quality_plot("video", args.out), kernel_plot(args.out)]
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return paths


if __name__ == "__main__":
    main()
