#!/usr/bin/env bash
# SparseAttentionConfig() measured as a user gets it (issue 17, "Defaults that win"), on one GPU in one device call
# (sized for about 5 minutes on an H100, not yet timed whole: earlier 50-step e2e runs of this architecture took 32 s
# dense and 16 s sparse per schedule), the JSON of each step written to $OUT as soon as it is done:
#   OUT=/path/to/out bash benchmarks/labs/sparse-default/run.sh
# A CPU smoke test of the same steps at toy sizes (tiny-wan, 1 clip, 3 steps; timings mean nothing there):
#   SMOKE=1 OUT=/tmp/sd bash benchmarks/labs/sparse-default/run.sh
# On a copy of the tree without git metadata, set DIFFUSERS_BLOCK_COMMIT to the commit it is (bench/report.py).
#
#   1. e2e-default: the Wan2.1-1.3B architecture (random weights, 32,760 tokens), 50 steps: dense (cuDNN) against
#      exactly SparseAttentionConfig(), the same + enable_block_cache()'s default, and that cache alone.
#   2. quality-default: the shipped video model (576 tokens), 16 clips x 50 steps, PSNR / SSIM / per-frame accuracy
#      against dense, on exactly SparseAttentionConfig(). Its min_tokens (4096) keeps this model dense: the run
#      records that (sparse_calls 0) rather than assume it.
#   3. quality-default-rule: the default's selection rule at this scale (min_tokens=0, blocks of 32 as every other
#      quality run on this model; threshold 0.9, 5 dense steps, refresh every 5, no max_blocks, mean scoring).
#   4. e2e-max-blocks-32: the default with max_blocks=32 (12.5% of the 256 key blocks, what docs/benchmarks.md
#      measured before), in the same call, so that the two are compared on one machine; ALTERNATIVE=0 skips it
#      where the call must stay short.
set -u
OUT=${OUT:-/tmp/sparse-default-out}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  e2e=(--device cpu --model tiny-wan --steps 3 --repeats 1)
  quality=(--device cpu --clips 1 --steps 3)
  # 3 steps and 48 tokens: the sparse path runs only with fewer dense steps and min_tokens 0
  rule=(min_tokens=0 block_size=32 dense_steps=1)
  alternative=(max_blocks=2 min_tokens=0 block_size=8 dense_steps=1)
  limit=600
else
  e2e=(--steps ${STEPS:-50} --repeats ${REPEATS:-1})
  quality=(--clips ${CLIPS:-16} --steps ${STEPS:-50})
  rule=(min_tokens=0 block_size=32)
  alternative=(max_blocks=32)
  limit=400
fi
bench() {  # name, then the bench's arguments
  local name=$1; shift
  echo "== $name $(date +%T)"
  timeout -k 10 "$limit" "$PYTHON" -m diffusers_block.bench "$@" --out "$OUT" --name "$name" 2>&1 \
    | grep -v -e Warning -e 'Loading pipeline'
  echo "== $name rc=${PIPESTATUS[0]} $(date +%T)"
}
bench attention-e2e-default attention --parts e2e --config default "${e2e[@]}"
bench attention-quality-digits-video-default attention-quality --config default "${quality[@]}"
bench attention-quality-digits-video-default-rule attention-quality --config default \
  --default-override "${rule[@]}" "${quality[@]}"
[ "${ALTERNATIVE:-1}" = 1 ] && bench attention-e2e-default-max-blocks-32 attention --parts e2e --config default \
  --default-override "${alternative[@]}" "${e2e[@]}"
ls -l "$OUT"
