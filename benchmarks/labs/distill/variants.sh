#!/usr/bin/env bash
# Distillation variants trained side by side on one GPU, then `bench distill` on each model, in one device call:
#   bash benchmarks/labs/distill/variants.sh [MINUTES]
# Image: 2 segments x 4 steps (uniform / curvature-optimal grid), and students keeping 8 of 10 blocks chosen by
# calibration; with DMD=1 (or FULL=1) a 2 x 4 student with a distribution-matching term (--dmd-weight 0.5); with
# FULL=1 also 4 segments x 2 steps (rank 2: the same storage) and 8 of 10 blocks chosen by weights
# or first-n. Video: 2 x 4, uniform (VIDEO=0 skips it).
# Students and logs go to $OUT/students.tar.gz, bench JSON and plots to $OUT. TRAJECTORIES (image teacher solves, default
# 20000), STEPS (image, default 3000: a tenth of it, at most 200, is warmup), PER_CLASS (bench images per digit, default 30), REPEATS (0: quality only, untimed) and DEVICE=cpu size it for a CPU run.
set -u
OUT=${OUT:-/tmp/distill-out}
minutes=${1:-3.5}
work=/tmp/distill-work
mkdir -p "$OUT" "$work"
image="--teacher models/digits-image --guidance 3 --fine-steps 48 --trajectories ${TRAJECTORIES:-20000} --steps ${STEPS:-3000}"
image="$image --batch-size 512 --max-minutes $minutes ${DEVICE:+--device $DEVICE}"
video="--teacher models/digits-video --guidance 5 --fine-steps 48 --trajectories 8000 --generation-batch 256"
video="$video --steps 3000 --batch-size 128 --max-minutes $minutes"
train() {
  local name=$1; shift
  python -m diffusers_block.train distill --out "$work/$name" "$@" > "$work/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$work/status"
}
train image-2x4-uniform $image --segments 2 --steps-per-segment 4 &
train image-2x4-optimal $image --segments 2 --steps-per-segment 4 --grid optimal &
train image-2x4-calibration8 $image --segments 2 --steps-per-segment 4 --blocks calibration --keep 8 &
if [ "${DMD:-0}" = 1 ] || [ "${FULL:-0}" = 1 ]; then  # the trajectory loss plus a distribution-matching term
  train image-2x4-dmd $image --segments 2 --steps-per-segment 4 --dmd-weight 0.5 --critic-steps 2 &
fi
if [ "${FULL:-0}" = 1 ]; then
  train image-4x2-rank2 $image --segments 4 --steps-per-segment 2 --rank 2 &
  train image-2x4-first8 $image --segments 2 --steps-per-segment 4 --blocks first --keep 8 &
  train image-2x4-weights8 $image --segments 2 --steps-per-segment 4 --blocks weights --keep 8 &
fi
[ "${VIDEO:-1}" = 1 ] && train video-2x4-uniform $video --segments 2 --steps-per-segment 4 &
wait
cat "$work/status"
tar czf "$OUT/students.tar.gz" --exclude=checkpoints -C "$work" .  # kept even if a bench below is cut short
students=$(ls -d "$work"/image-*/ 2>/dev/null | while read d; do [ -f "$d/config.json" ] && echo "$d"; done)
python -m diffusers_block.bench distill --model digits-image --students $students --per-class ${PER_CLASS:-30} --out "$OUT" ${DEVICE:+--device $DEVICE} ${REPEATS:+--repeats $REPEATS} \
  --name distill-digits-image-variants --plot 2>&1 | grep -v Warning
[ -f "$work/video-2x4-uniform/config.json" ] && python -m diffusers_block.bench distill --model digits-video \
  --students "$work/video-2x4-uniform" --per-class 1 --out "$OUT" --name distill-digits-video-variants --plot 2>&1 \
  | grep -v Warning
tar czf "$OUT/students.tar.gz" --exclude=checkpoints -C "$work" .
