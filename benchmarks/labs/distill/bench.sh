#!/usr/bin/env bash
# The shipped students against the teacher and the same-budget baselines, alone on one GPU (wall-clock is quoted):
#   bash benchmarks/labs/distill/bench.sh        (writes JSON + plots to $OUT)
set -u
OUT=${OUT:-/tmp/distill-out}
python -m diffusers_block.bench distill --model digits-image --per-class ${IMAGE_PER_CLASS:-30} --out "$OUT" \
  --name distill-digits-image-h100 --plot 2>&1 | grep -v Warning
[ -d models/digits-video-distilled ] && python -m diffusers_block.bench distill --model digits-video \
  --per-class ${VIDEO_PER_CLASS:-2} --out "$OUT" --name distill-digits-video-h100 --plot 2>&1 | grep -v Warning
