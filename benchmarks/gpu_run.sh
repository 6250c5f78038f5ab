#!/usr/bin/env bash
# On the GPU machine (from the repository root, with .whl carried): install the carried wheels,
# then run the steps named, in order. Output goes to $OUT when set.
#   bash benchmarks/gpu_run.sh tests dashboard   # tests/gpu, then bench_dashboard.py
#   bash benchmarks/gpu_run.sh bench=1,5         # bench_offload.py --cases 1,5 (bench = all cases)
#   BENCH_ARGS="--read-threads 8" BENCH_TAG=-t8 bash benchmarks/gpu_run.sh bench=5   # extra options
#   bash benchmarks/gpu_run.sh quant             # bench_quant.py (needs the bitsandbytes wheel in .whl); QUANT_ARGS too
#   bash benchmarks/gpu_run.sh load              # bench_load.py (as root: it drops the page cache); LOAD_ARGS too
#   bash benchmarks/gpu_run.sh graph             # bench_graph.py (the captured decode step); GRAPH_ARGS too
#   bash benchmarks/gpu_run.sh moe hybrid        # bench_moe.py (MOE_ARGS), bench_hybrid.py (HYBRID_ARGS)
#   bash benchmarks/gpu_run.sh fetch             # bench_fetch.py: routed rows read by a kernel over the link
#   bash benchmarks/gpu_run.sh cpublock          # bench_cpu_block.py: a block computed on the CPU, what slows it
#   bash benchmarks/gpu_run.sh blockrest         # bench_block_rest.py: the load's CPU rate against the blocks' decoding
#   bash benchmarks/gpu_run.sh handoff           # handoff_latency.py: a CPU block's output reaching the GPU beside the link
#   bash benchmarks/gpu_run.sh hostbound         # host_bound.py: the cores and the link reading host memory at once
#   bash benchmarks/gpu_run.sh fused             # fused_check.py: the captured step's fused kernels against eager
#   TESTS=tests/gpu/test_graph_gpu.py bash benchmarks/gpu_run.sh tests      # a part of tests/gpu
set -uo pipefail
export PYTHONPATH="$(pwd):/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# run_bench NAME SCRIPT LIMIT ARGS LINES: benchmarks/SCRIPT --json $OUT/NAME$BENCH_TAG.json ARGS under a time
# limit, the libraries' progress noise filtered out, its output kept in $OUT/NAME.log, the last LINES shown
run_bench() {
    timeout "$3" python3 "benchmarks/$2" --json "$OUT/$1${BENCH_TAG:-}.json" $4 2>&1 \
        | grep --line-buffered -v "Loading weights\|Writing model\|will be cast\|attention mask" | tee "$OUT/$1.log" | tail -"$5"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
for step in "${@:-tests}"; do
    start=$SECONDS
    case "$step" in
        tests)
            timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -s ${TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu-tests.log" \
                | grep -E "passed|failed|error|budget|hold=|PCIe|capture|static|^FAILED|^E " | tail -40 ;;
        graph) run_bench graph bench_graph.py "${GRAPH_TIMEOUT:-540}" "${GRAPH_ARGS:-}" 20 ;;
        moe) run_bench moe bench_moe.py "${MOE_TIMEOUT:-540}" "${MOE_ARGS:-}" 20 ;;
        hybrid) run_bench hybrid bench_hybrid.py "${HYBRID_TIMEOUT:-540}" "${HYBRID_ARGS:-}" 12 ;;
        fetch) run_bench fetch bench_fetch.py "${FETCH_TIMEOUT:-200}" "${FETCH_ARGS:-}" 40 ;;
        cpublock) run_bench cpublock bench_cpu_block.py "${CPUBLOCK_TIMEOUT:-300}" "${CPUBLOCK_ARGS:-}" 20 ;;
        blockrest) run_bench block-rest bench_block_rest.py "${BLOCKREST_TIMEOUT:-300}" "${BLOCKREST_ARGS:-}" 6 ;;
        handoff) run_bench handoff-latency handoff_latency.py "${HANDOFF_TIMEOUT:-120}" "${HANDOFF_ARGS:-}" 8 ;;
        hostbound) run_bench host-bound host_bound.py "${HOSTBOUND_TIMEOUT:-200}" "${HOSTBOUND_ARGS:-}" 20 ;;
        fused) timeout 150 python3 benchmarks/fused_check.py 2>&1 | tee "$OUT/fused_check.txt" | tail -12 ;;
        dashboard)
            timeout 300 python3 benchmarks/bench_dashboard.py --json "$OUT/dashboard.json" 2>&1 | tail -3 ;;
        bench|bench=*)
            cases="${step#bench}"; cases="${cases#=}"
            run_bench bench bench_offload.py "${BENCH_TIMEOUT:-590}" "--cases ${cases:-all} ${BENCH_ARGS:-}" 16 ;;
        quant) run_bench quant bench_quant.py "${QUANT_TIMEOUT:-540}" "${QUANT_ARGS:-}" 16 ;;
        load) run_bench load bench_load.py "${LOAD_TIMEOUT:-540}" "${LOAD_ARGS:-}" 16 ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
    echo "[$step: $((SECONDS - start)) s]"
done
