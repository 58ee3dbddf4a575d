#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent CUDA machine (about 8 minutes in all):
#   1. the CUDA lane of the test suite (pytest -m cuda)          -> $OUT/pytest_cuda.log
#   2. benchmarks/runtime.py --device cuda --dtype fp16 --shape gpu (every question) and --shape 1b
#      (batch 1, plus generation when its exports are ready)     -> $OUT/runtime_<shape>.log, BENCHMARKS.md
# The ONNX exports run on the CPU, so they start in the background at once and overlap the tests;
# a benchmark waits for its own exports. Each step has a time limit and the script goes on after
# one fails, so what finished still comes back; $OUT/gpu_check.txt records each step's exit
# status (124 = ran out of time) and BENCHMARKS.md is copied to $OUT after every step.
# Run from the repository root with onnxruntime-gpu installed:  OUT=/some/dir bash benchmarks/gpu_check.sh
# PYTHON picks the interpreter (default: python). Models are exported to /tmp/onnx_peft_bench_rt.
set -u
: "${OUT:?set OUT to the folder the results go to}"
PYTHON="${PYTHON:-python}"
CACHE=/tmp/onnx_peft_bench_rt
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
summary="$OUT/gpu_check.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record its exit status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "$name: rc $rc, $((SECONDS - started)) s (limit $limit s)" | tee -a "$summary"
    cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}

wait_for() {  # wait_for PID SECONDS: until the process ends or the time is up
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 2; done
}

{ nvidia-smi || true; "$PYTHON" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"; } \
    > "$OUT/machine.txt" 2>&1

"$PYTHON" benchmarks/runtime.py --dtype fp16 --shape gpu --prepare-only > "$OUT/prepare_gpu.log" 2>&1 &
prepare_gpu=$!
"$PYTHON" benchmarks/runtime.py --dtype fp16 --shape 1b --questions single,generate --prepare-only \
    > "$OUT/prepare_1b.log" 2>&1 &
prepare_1b=$!

step pytest_cuda 150 bash -c "\"$PYTHON\" -m pytest -q -m cuda -n 4 -p no:cacheprovider tests/ > \"$OUT/pytest_cuda.log\" 2>&1"
tail -n 3 "$OUT/pytest_cuda.log" >> "$summary"

wait_for $prepare_gpu 45
kill $prepare_gpu 2>/dev/null  # still exporting: the benchmark exports what is missing itself
step runtime_gpu 140 "$PYTHON" benchmarks/runtime.py --device cuda --dtype fp16 --shape gpu \
    --runs 15 --multi-runs 15 --gen-runs 5 --profile-runs 5 > "$OUT/runtime_gpu.log" 2>&1
cp "$CACHE/gpu_fp16/last_run.json" "$OUT/runtime_gpu.json" 2>/dev/null

wait_for $prepare_1b 20
questions=single,generate
if kill $prepare_1b 2>/dev/null; then  # its generation exports are not done: batch 1 only
    questions=single
fi
echo "1b questions: $questions" >> "$summary"
step runtime_1b 150 "$PYTHON" benchmarks/runtime.py --device cuda --dtype fp16 --shape 1b \
    --questions $questions --no-new-session --runs 15 --gen-runs 3 --profile-runs 5 > "$OUT/runtime_1b.log" 2>&1
cp "$CACHE/1b_fp16/last_run.json" "$OUT/runtime_1b.json" 2>/dev/null
exit 0
