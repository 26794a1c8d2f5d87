#!/usr/bin/env bash
# The GPU checks of this repository in one run, for a lent GPU (about 6 minutes on one H200):
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
# 1. the Triton flash-attention kernel's tests on the device (tests/engine/attention), and the
#    unit tests with a CUDA case (resharded optimizer state on the device, grouped-GEMM alignment);
# 2. benchmarks.gpu_step: a Mixtral-8x7B-shaped training step, TFLOP/s, MFU, peak memory;
# 3. benchmarks/planner_gemms.py: every GEMM of the planner's top layouts and of the papers'
#    layouts, measured next to the planner's prediction (docs/planner.md, issue 14).
# At most 8 files land in $OUT (the device tool brings back 8). Each step has its own
# timeout and a failing step does not stop the others; the exit status is the worst one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
status=0

step() {   # step NAME TIMEOUT_S COMMAND...: output to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee "$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
    [ "$rc" -gt "$status" ] && status=$rc
    return 0
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --format='commit %H %cd'; } >"$OUT/machine.txt" 2>&1
step triton_flash 150 python3 -m pytest -q -p no:cacheprovider tests/engine/attention/test_triton_flash.py
step cuda_units 120 python3 -m pytest -q -rs -p no:cacheprovider tests/engine/checkpoint/test_reshard.py \
    tests/engine/moe/test_experts.py tests/engine/attention/test_block.py tests/engine/train/test_step_metrics.py
step gpu_step 200 python3 -m benchmarks.gpu_step --layers 2 --steps 5 --json "$OUT/gpu_step.json"
step gemms_qwen2 90 python3 benchmarks/planner_gemms.py --preset qwen2-57b-a14b --gpus 64 --top 5 \
    --only tp=2,pp=4,ep=4,cp=1 --json "$OUT/gemms_qwen2.json"
step gemms_mixtral 90 python3 benchmarks/planner_gemms.py --preset mixtral-8x22b --gpus 128 --top 3 \
    --only tp=2,pp=8,ep=8,cp=1 --json "$OUT/gemms_mixtral.json"
exit $status
