#!/usr/bin/env bash
# On the GPU machine (from the repository root, with .whl carried): install the carried wheels,
# then run the GPU tests and, with an argument, the benchmark. Output goes to $OUT when set.
#   bash benchmarks/gpu_run.sh            # tests/gpu only
#   bash benchmarks/gpu_run.sh bench 1,5  # and bench_offload.py --cases 1,5
set -uo pipefail
export PYTHONPATH="$(pwd):/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
timeout 240 python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" | tail -5
if [ "${1:-}" = "bench" ]; then
    timeout 480 python3 benchmarks/bench_offload.py --cases "${2:-all}" --json "$OUT/bench.json" 2>&1 \
        | grep -v "Loading weights\|Writing model\|attention mask" | tee "$OUT/bench.log" | tail -14
fi
if [ "${1:-}" = "dashboard" ]; then
    timeout 300 python3 benchmarks/bench_dashboard.py --json "$OUT/dashboard.json" 2>&1 | tail -3
fi
