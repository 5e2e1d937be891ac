#!/usr/bin/env bash
# The GPU check of the fast path, one prepared run on one H100 or H200 (about 7 minutes):
# correctness at full size, then the per-op and whole-loop benchmarks; tables to OUTDIR.
#
#   here:  bash loadtest/gpu_wheels.sh        (the packages the GPU image lacks, into .whl/)
#   there: bash loadtest/gpu_check.sh "$OUT"  (device run with carry [".whl"], timeout 600)
#
# Each part has its own time limit, so a slow part leaves the others' tables; the exit status
# is the tests' (the benchmarks report, they do not judge).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: loadtest/gpu_check.sh OUTDIR}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
  | tee "$out/device.txt"

# 1. Correctness: both kernels vs fp32/fp64 references (bf16 included), graph replays vs eager,
#    the Skip-DiT-XL/2 fast paths vs the fp32 network (tests/model/test_fast_path.py).
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_graphs.py \
  tests/model/test_fast_path.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}

# 2. Per op at DiT-XL/2 shapes: LSC fusion vs cat + layer_norm + linear; attention vs SDPA.
timeout 60 python3 -m kernels.bench_lsc_fusion 2>&1 | tee "$out/lsc_fusion.md"
timeout 60 python3 -m kernels.bench_attention 2>&1 | tee "$out/attention.md"

# 3. The whole loop per path, diffusers' DiT beside ours, images/s through the engine.
timeout 330 python3 loadtest/bench_fast_path.py --total 32 --out "$out" 2>&1 | tail -n 60
exit "$tests"
