#!/usr/bin/env bash
# On the GPU machine (from the repository root, with .whl carried): install the carried wheels,
# then run the steps named, in order. Output goes to $OUT when set.
#   bash benchmarks/gpu_run.sh tests dashboard   # tests/gpu, then bench_dashboard.py
#   bash benchmarks/gpu_run.sh bench=1,5         # bench_offload.py --cases 1,5 (bench = all cases)
#   BENCH_ARGS="--read-threads 8" BENCH_TAG=-t8 bash benchmarks/gpu_run.sh bench=5   # extra options
#   bash benchmarks/gpu_run.sh quant             # bench_quant.py (needs the bitsandbytes wheel in .whl); QUANT_ARGS too
#   bash benchmarks/gpu_run.sh load              # bench_load.py (as root: it drops the page cache); LOAD_ARGS too
#   bash benchmarks/gpu_run.sh graph             # bench_graph.py (the captured decode step); GRAPH_ARGS too
#   TESTS=tests/gpu/test_graph_gpu.py bash benchmarks/gpu_run.sh tests      # a part of tests/gpu
set -uo pipefail
export PYTHONPATH="$(pwd):/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
for step in "${@:-tests}"; do
    start=$SECONDS
    case "$step" in
        tests)
            timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -s ${TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu-tests.log" \
                | grep -E "passed|failed|error|budget|hold=|PCIe|capture|static|^FAILED|^E " | tail -40 ;;
        graph)
            timeout "${GRAPH_TIMEOUT:-540}" python3 benchmarks/bench_graph.py --json "$OUT/graph${BENCH_TAG:-}.json" \
                ${GRAPH_ARGS:-} 2>&1 | grep -v "Loading weights\|Writing model\|will be cast" | tee "$OUT/graph.log" | tail -20 ;;
        moe)
            timeout "${MOE_TIMEOUT:-540}" python3 benchmarks/bench_moe.py --json "$OUT/moe${BENCH_TAG:-}.json" \
                ${MOE_ARGS:-} 2>&1 | grep -v "Loading weights\|Writing model\|will be cast" | tee "$OUT/moe.log" | tail -20 ;;
        dashboard)
            timeout 300 python3 benchmarks/bench_dashboard.py --json "$OUT/dashboard.json" 2>&1 | tail -3 ;;
        bench|bench=*)
            cases="${step#bench}"; cases="${cases#=}"
            timeout "${BENCH_TIMEOUT:-590}" python3 benchmarks/bench_offload.py --cases "${cases:-all}" \
                --json "$OUT/bench${BENCH_TAG:-}.json" ${BENCH_ARGS:-} 2>&1 \
                | grep -v "Loading weights\|Writing model\|attention mask" | tee "$OUT/bench.log" | tail -16 ;;
        quant)
            timeout "${QUANT_TIMEOUT:-540}" python3 benchmarks/bench_quant.py --json "$OUT/quant${BENCH_TAG:-}.json" \
                ${QUANT_ARGS:-} 2>&1 | grep -v "Loading weights\|Writing model\|will be cast" | tee "$OUT/quant.log" | tail -16 ;;
        load)
            timeout "${LOAD_TIMEOUT:-540}" python3 benchmarks/bench_load.py --json "$OUT/load${BENCH_TAG:-}.json" \
                ${LOAD_ARGS:-} 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/load.log" | tail -16 ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
    echo "[$step: $((SECONDS - start)) s]"
done
