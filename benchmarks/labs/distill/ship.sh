#!/usr/bin/env bash
# The students we ship, trained side by side on one GPU, in one device call:
#   bash benchmarks/labs/distill/ship.sh   (then STUDENTS=/tmp/distill-ship bash benchmarks/labs/distill/bench.sh)
# IMAGE=0 or VIDEO=0 skips one. Each student is archived to $OUT the moment it is saved, so a call cut short still returns what finished.
# Measured on an H100 (2026-12-06): with both running, a training step took ~0.4 s at batch 4096 (image) and ~0.34 s
# at batch 512 (video); the video teacher's trajectory solve takes most of its first minutes. Alone (2026-12-07), the
# video student's 1,000 steps (its defaults here, as shipped) took 342 s.
set -u
OUT=${OUT:-/tmp/distill-out}
work=/tmp/distill-ship
mkdir -p "$OUT" "$work"
export OMP_NUM_THREADS=4
train() {
  local name=$1 limit=$2; shift 2
  timeout -k 5 "$limit" python -m diffusers_block.train distill --out "$work/$name" "$@" > "$work/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$work/status"
  tar czf "$OUT/$name.tar.gz" --exclude=checkpoints -C "$work" "$name" "$name.log"
}
[ "${IMAGE:-1}" = 1 ] && train digits-image-distilled ${IMAGE_LIMIT:-330} --teacher models/digits-image --guidance 3 --fine-steps 48 --trajectories 20000 \
  --segments 2 --steps-per-segment 4 --steps ${IMAGE_STEPS:-2000} --batch-size 4096 --max-minutes ${IMAGE_MINUTES:-3.5} &
[ "${VIDEO:-1}" = 1 ] && train digits-video-distilled ${VIDEO_LIMIT:-480} --teacher models/digits-video --guidance 5 --fine-steps 32 --trajectories ${VIDEO_TRAJECTORIES:-3000} \
  --generation-batch 256 --segments 2 --steps-per-segment 4 --steps ${VIDEO_STEPS:-1000} --batch-size 512 \
  --max-minutes ${VIDEO_MINUTES:-6} &
wait
cat "$work/status"
