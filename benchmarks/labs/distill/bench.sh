#!/usr/bin/env bash
# The shipped students against the teacher and the same-budget baselines, alone on one GPU (wall-clock is quoted):
#   bash benchmarks/labs/distill/bench.sh        (writes JSON + plots to $OUT)
# STUDENTS=<folder> benches the students trained there by ship.sh instead of the shipped ones (same folder names).
set -u
OUT=${OUT:-/tmp/distill-out}
STUDENTS=${STUDENTS:-models}
image_student=$STUDENTS/digits-image-distilled; [ -d "$image_student" ] || image_student=models/digits-image-distilled
timeout -k 5 ${IMAGE_LIMIT:-120} python -m diffusers_block.bench distill --model digits-image --students "$image_student" --per-class ${IMAGE_PER_CLASS:-30} --out "$OUT" --plot 2>&1 | grep -v Warning
[ -d "$STUDENTS/digits-video-distilled" ] && timeout -k 5 ${VIDEO_LIMIT:-120} python -m diffusers_block.bench distill --model digits-video \
  --students "$STUDENTS/digits-video-distilled" --per-class ${VIDEO_PER_CLASS:-2} --out "$OUT" --plot 2>&1 | grep -v Warning
