#!/usr/bin/env bash
# The GPU check of the fast path, one prepared run on one H100 or H200: correctness at full
# size, then the per-op and whole-loop benchmarks; each stage writes its table to OUTDIR as it
# finishes, so a run cut short keeps what it measured.
#
#   here:  bash loadtest/gpu_wheels.sh          (the packages the GPU image lacks, into .whl/)
#          bash loadtest/gpu_travel.sh prepare  (the shipped weights stay here: see that file)
#   there: bash loadtest/gpu_check.sh "$OUT"    (device run, carry [".whl"], timeout_s 480)
#   here:  bash loadtest/gpu_travel.sh restore
#
# Budget: 7 minutes in all, so one 10-minute device call leaves room to rerun. Stage shares:
#   setup (wheels, device line)                      20 s
#   1. tests (kernels, graphs, fast path)           170 s
#   2a. per op: LSC fusion, bf16, batch 16 and 64    40 s
#   2b. per op: attention, the same grid             40 s
#   3. whole loops and the engine                   110 s
#   4. optional (GPU_CHECK_DIFFUSERS=0 skips it):
#      diffusers' DiT and torch.compile beside ours  40 s
#                                                   ----
#                                                   420 s
# The exit status is the tests' (the benchmarks report, they do not judge).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: loadtest/gpu_check.sh OUTDIR}
mkdir -p "$out"
SECONDS=0
stage() {  # stage NAME LIMIT_S CMD...: run CMD under its share, log its wall time
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  timeout "$limit" "$@"
  rc=$?
  echo "$name: rc $rc, $((SECONDS - began)) s of $limit s (run total $SECONDS s)" | tee -a "$out/stages.txt"
  return $rc
}
if [ -d .whl ]; then
  timeout 20 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
  | tee "$out/device.txt"

# 1. Correctness: both kernels vs fp32/fp64 references (bf16 included), graph replays vs eager,
#    the Skip-DiT-XL/2 fast paths vs the fp32 network (tests/model/test_fast_path.py).
stage tests 170 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_graphs.py \
  tests/model/test_fast_path.py > "$out/tests.txt" 2>&1
tests=$?
tail -n 15 "$out/tests.txt"

# 2. Per op at DiT-XL/2 shapes: LSC fusion vs cat + layer_norm + linear; attention vs SDPA.
grid=(--batch 16 64 --tokens 256 --dtype bf16)
stage lsc 40 python3 -m kernels.bench_lsc_fusion "${grid[@]}" > "$out/lsc_fusion.md" 2>&1
stage attention 40 python3 -m kernels.bench_attention "${grid[@]}" > "$out/attention.md" 2>&1

# 3. The whole loop per path, images/s through the engine (fast_path.md, written as it goes).
stage fast_path 110 python3 -m loadtest.bench_fast_path --rows 16 64 --skip diffusers \
  --total 16 --out "$out" > "$out/fast_path.log" 2>&1

# 4. Optional: diffusers' DiT eager and compiled beside ours, at 16 rows.
if [ "${GPU_CHECK_DIFFUSERS:-1}" = 1 ]; then
  mkdir -p "$out/diffusers"
  stage diffusers 40 python3 -m loadtest.bench_fast_path --rows 16 --paths eager --vanilla skip \
    --skip engine --out "$out/diffusers" > "$out/diffusers/log.txt" 2>&1
fi
cat "$out/stages.txt"
exit "$tests"
