#!/usr/bin/env bash
# Distillation variants trained side by side on one GPU (the same minutes each), then `bench distill` on all of them,
# in one device call:
#   VARIANTS="uniform optimal calibration8" bash benchmarks/labs/distill/variants.sh [MINUTES]
# Image variants, each a 2 segments x 4 steps student unless named otherwise:
#   uniform        equal steps in sigma, every block kept (the default method)
#   optimal        the curvature-optimal grid (--grid optimal)
#   calibration8   8 of 10 blocks kept per segment, chosen by calibration
#   first8         the first 8 blocks (the simple baseline for the two block choices)
#   weights8       8 of 10 blocks chosen from the weights alone (Gardener-style)
#   dmd            the trajectory loss plus a distribution-matching term (--dmd-weight 0.5)
#   4x2-rank2      4 segments x 2 steps at rank 2 (the same storage as 2 x 4 at rank 4)
#   fra2           feature residual approximation of the first 2 blocks, trained on the shipped image student
#   trunkcache2    the same trunk, untrained residual networks: the first step's trunk output reused as it is
# (fra2 and trunkcache2 also put the shipped image student in the bench, the row they are compared with.)
#   video          the video model, 2 x 4, uniform (benched on its own)
# Students and logs go to $OUT/students.tar.gz, bench JSON and plots to $OUT. TRAJECTORIES (image teacher solves, default
# 20000), STEPS (image, default 3000: a tenth of it, at most 200, is warmup), PER_CLASS (bench images per digit, default
# 30), REPEATS (0: quality only, untimed) and DEVICE=cpu size it for a CPU run.
set -u
OUT=${OUT:-/tmp/distill-out}
minutes=${1:-3.5}
work=/tmp/distill-work
mkdir -p "$OUT" "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
image="--teacher models/digits-image --guidance 3 --fine-steps 48 --trajectories ${TRAJECTORIES:-20000} --steps ${STEPS:-3000}"
image="$image --batch-size 512 --max-minutes $minutes ${DEVICE:+--device $DEVICE}"
two_by_four="--segments 2 --steps-per-segment 4"
video="--teacher models/digits-video --guidance 5 --fine-steps 48 --trajectories 8000 --generation-batch 256"
video="$video --steps 3000 --batch-size 128 --max-minutes $minutes"
shipped=models/digits-image-distilled
train() {
  local name=$1; shift
  python -m diffusers_block.train distill --out "$work/$name" "$@" > "$work/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$work/status"
}
benched=()
for variant in ${VARIANTS:-uniform optimal calibration8 video}; do
  case $variant in
    uniform) train image-2x4-uniform $image $two_by_four & ;;
    optimal) train image-2x4-optimal $image $two_by_four --grid optimal & ;;
    calibration8 | first8 | weights8)
      train "image-2x4-$variant" $image $two_by_four --blocks "${variant%8}" --keep 8 & ;;
    dmd) train image-2x4-dmd $image $two_by_four --dmd-weight 0.5 --critic-steps 2 & ;;
    4x2-rank2) train image-4x2-rank2 $image --segments 4 --steps-per-segment 2 --rank 2 & ;;
    fra2)
      train image-shipped-fra2 $image --init-student $shipped --steps 0 --residual-trunk 2 --residual-steps 1000 &
      benched+=("$shipped") ;;
    trunkcache2)
      train image-shipped-trunkcache2 $image --init-student $shipped --steps 0 --residual-trunk 2 --residual-steps 0 &
      benched+=("$shipped") ;;
    video) train video-2x4-uniform $video $two_by_four & ;;
    *) echo "unknown variant '$variant': pick from uniform optimal calibration8 first8 weights8 dmd 4x2-rank2 fra2" \
      "trunkcache2 video" >&2; exit 2 ;;
  esac
done
wait
cat "$work/status"
tar czf "$OUT/students.tar.gz" --exclude=checkpoints -C "$work" .  # kept even if a bench below is cut short
for d in "$work"/image-*/; do [ -f "$d/config.json" ] && benched+=("$d"); done
[ ${#benched[@]} -gt 0 ] && python -m diffusers_block.bench distill --model digits-image \
  --students $(printf '%s\n' "${benched[@]}" | sort -u) --per-class ${PER_CLASS:-30} --out "$OUT" \
  ${DEVICE:+--device $DEVICE} ${REPEATS:+--repeats $REPEATS} --name distill-digits-image-variants --plot 2>&1 | grep -v Warning
[ -f "$work/video-2x4-uniform/config.json" ] && python -m diffusers_block.bench distill --model digits-video \
  --students "$work/video-2x4-uniform" --per-class 1 --out "$OUT" --name distill-digits-video-variants --plot 2>&1 \
  | grep -v Warning
tar czf "$OUT/students.tar.gz" --exclude=checkpoints -C "$work" .
