#!/usr/bin/env bash
# The students we ship, trained side by side on one GPU and benched, in one device call:
#   bash benchmarks/labs/distill/ship.sh
# Training is launch-bound on these tiny teachers (a step costs about the same at batch 512 or 4096), so the
# batches are large and the step counts small. Each student is archived to $OUT the moment it is saved, before
# the benches, so a call cut short still returns what finished.
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
train image ${IMAGE_LIMIT:-300} --teacher models/digits-image --guidance 3 --fine-steps 48 --trajectories 20000 \
  --segments 2 --steps-per-segment 4 --steps ${IMAGE_STEPS:-2000} --batch-size 4096 --max-minutes 2.5 &
train video ${VIDEO_LIMIT:-300} --teacher models/digits-video --guidance 5 --fine-steps 32 --trajectories 4000 \
  --generation-batch 256 --segments 2 --steps-per-segment 4 --steps ${VIDEO_STEPS:-1500} --batch-size 512 \
  --max-minutes 2.5 &
wait
cat "$work/status"
[ -f "$work/image/config.json" ] && python -m diffusers_block.bench distill --model digits-image \
  --students models/digits-image-distilled "$work/image" --per-class ${PER_CLASS:-30} --out "$OUT" \
  --name distill-digits-image-h100 --plot 2>&1 | grep -v Warning
[ -f "$work/video/config.json" ] && python -m diffusers_block.bench distill --model digits-video \
  --students "$work/video" --per-class 1 --out "$OUT" --name distill-digits-video-h100 --plot 2>&1 | grep -v Warning
