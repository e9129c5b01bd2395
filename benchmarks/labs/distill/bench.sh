#!/usr/bin/env bash
# The shipped students against the teacher and the same-budget baselines, alone on one GPU (wall-clock is quoted):
#   bash benchmarks/labs/distill/bench.sh        (writes JSON + plots to $OUT)
# STUDENTS=<folder> benches the students trained there by ship.sh instead of the shipped ones (same folder names).
set -u
OUT=${OUT:-/tmp/distill-out}
STUDENTS=${STUDENTS:-models}
python -m diffusers_block.bench distill --model digits-image --students "$STUDENTS/digits-image-distilled" --per-class ${IMAGE_PER_CLASS:-30} --out "$OUT" \
  --name distill-digits-image-h100 --plot 2>&1 | grep -v Warning
[ -d "$STUDENTS/digits-video-distilled" ] && python -m diffusers_block.bench distill --model digits-video \
  --students "$STUDENTS/digits-video-distilled" --per-class ${VIDEO_PER_CLASS:-2} --out "$OUT" --name distill-digits-video-h100 --plot 2>&1 | grep -v Warning
