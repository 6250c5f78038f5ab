"""benchmarks/report.py renders saved runs into RESULTS.md sections: llama-bench's tables are read by their
headers, and this session's kinds of runs render with their goals."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
RUNS = os.path.join(BENCH, "runs")


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, BENCH)
    try:
        import report
        yield report
    finally:
        sys.path.remove(BENCH)


def test_llama_bench_tables_are_read_by_their_headers(report, tmp_path):
    log = tmp_path / "llama.txt"
    log.write_text(
        "| model | size | params | backend | ngl | threads | test | t/s |\n"
        "| --- | ---: | ---: | --- | --: | ---: | ---: | ---: |\n"
        "| llama 7B F16 | 12.55 GiB | 6.74 B | CUDA | 8 | 12 | tg32 | 7.25 ± 0.31 |\n"
        "| llama 7B F16 | 12.55 GiB | 6.74 B | CUDA | 8 | 16 | tg32 | 7.63 ± 0.76 |\n"
        "| llama 7B F16 | 12.55 GiB | 6.74 B | CUDA | 99 | tg32 | 219.12 ± 2.29 |\n"
        "| model | size | params | backend | ngl | n_cpu_moe | test | t/s |\n"
        "| --- | ---: | ---: | --- | --: | ---: | ---: | ---: |\n"
        "| llama ?B F16 | 8.87 GiB | 4.76 B | CUDA | 99 | 16 | tg32 | 32.75 ± 0.49 |\n")
    rows = report.llamacpp_rows(str(log))
    assert rows[("llama 7B F16", 8, None, "tg32")] == (7.63, 0.76)     # the threads column: the best count
    assert rows[("llama 7B F16", 99, None, "tg32")] == (219.12, 2.29)
    assert rows[("llama ?B F16", 99, 16, "tg32")] == (32.75, 0.49)       # n_cpu_moe, by its header
    assert len(rows) == 3
    # a table run at one thread count has no threads column (llama-bench leaves out a column of one value)
    log.write_text(
        "| model | size | params | backend | ngl | test | t/s |\n"
        "| --- | ---: | ---: | --- | --: | ---: | ---: |\n"
        "| llama 7B F16 | 12.55 GiB | 6.74 B | CUDA | 26 | tg32 | 22.90 ± 0.49 |\n"
        "| model | size | params | backend | ngl | threads | test | t/s |\n"
        "| --- | ---: | ---: | --- | --: | ---: | ---: | ---: |\n"
        "| llama 7B F16 | 12.55 GiB | 6.74 B | CUDA | 26 | 12 | tg32 | 24.79 ± 1.21 |\n")
    assert report.llamacpp_rows(str(log)) == {("llama 7B F16", 26, None, "tg32"): (24.79, 1.21)}


@pytest.mark.parametrize("name, expect", [
    ("raw-2026-12-02-h200-s6-hybrid-c.json", ["hybrid over streaming 0.83x (goal 1.6x at 4GiB: **not met**)",
                                              "variant hybrid_p1", "copied ahead: 5 units"]),
    ("raw-2026-12-02-h200-s6-moe-b.json", ["| mixtral | split |", "(goal 1.2x: **not met**)"]),
    ("raw-2026-12-02-h200-s6-cpublock.json", ["| block, page-locked weights, the link copying beside it | 12 |"]),
    ("raw-2026-12-04-h200-s17-host-bound.json", ["| sum | 12 | 70.4 | 65.7 | 50.6 | **116.2** |",
                                                 "The link alone: 54.4 GB/s", "|   8 |      12 |            tg32 |   "
                                                 "       6.13 ± 0.05 |", "whole run: 52.8 GB/s"]),
    ("raw-2026-12-05-h200-s21-host-bound-own.json", [
        "| products by a plain AVX-512 BF16 kernel (gemv_bf16.c) | 12 | 75.3 | 62.5 | 51.0 | **113.5** |",
        "1 of its 19200 outputs differ from F.linear's"]),
    ("raw-2026-12-05-cpu-s22-host-bound.json", [
        "a machine without a GPU, 2 cores", "| products compiled (inductor, frozen, max-autotune) | 2 | 25.4 |",
        "2 threads: outputs differing from F.linear's over the order-revealing check of `cpu_products.matches`, by "
        "shape: 4096x4096 0/12288"]),
    ("raw-2026-12-05-cpu-s22-cpu-device.json", [
        "| nb_offload cpu_kernel=\"fast\" | 14.74 | **1.34x** | 23.2 |", "| nb_offload exact | 11.62 | **1.06x**",
        "differ from plain's in 8 of 16", "1.57 GB read a step"]),
    ("raw-2026-12-05-cpu-s24-block-rest.json", [
        "| F.linear | 21.4 | 1.38 | 19.9 | 19.0 (20.4, 1.44) | +12.5 % | +4.9 % |",
        "| amx | 26.4 | 1.32 | 24.3 | 24.6 (26.9, 1.41) | +7.3 % | -1.3 % |"]),
    ("raw-2026-12-05-cpu-s24-plan-depths.json", [
        "| 50.0 | 4GiB | **hybrid** | 3 | yes | 13 | 2.29 | 11.19 | 512 | 8.66 |",
        "| 41.4 | 12GiB | **streamed** | 1 | no | 0 | 10.38 | 3.10 | 772 | 19.55 |"]),
])
def test_saved_runs_render_with_their_goals(report, name, expect, capsys, monkeypatch):
    llama = os.path.join(RUNS, "raw-2026-12-04-h200-s17-llamacpp-beside-link.txt" if "host-bound" in name
                         else "raw-2026-12-02-h200-s6-llamacpp.txt")
    monkeypatch.setattr(sys, "argv", ["report.py", os.path.join(RUNS, name), "--llama", llama])
    report.main()
    text = capsys.readouterr().out
    for piece in expect:
        assert piece in text


def test_a_timeline_is_summarised_per_decode_step():
    """bench_moe.step_breakdown: per step after the first two, the link's busy time (copies' union), the CPU's,
    both at once, neither, the GPU's compute and the bytes, the median over the steps; cut at each step's mark."""
    sys.path.insert(0, BENCH)
    try:
        from bench_moe import step_breakdown
    finally:
        sys.path.remove(BENCH)
    rows = []
    for step in range(5):
        t = step * 1.0
        rows += [("step", "forward", t, t + 0.100, 0, step),
                 ("copy", "a", t + 0.000, t + 0.040, 4_000_000_000, step),
                 ("copy", "b", t + 0.030, t + 0.060, 2_000_000_000, step),     # overlaps a: the union counts
                 ("cpu", "c", t + 0.050, t + 0.090, 1_000_000_000, step),
                 ("compute", "d", t + 0.095, t + 0.099, 0, step),
                 ("copy", "next", t + 0.095, t + 0.130, 0, step)]                # past the step's end: cut
    b = step_breakdown(rows)
    assert b["steps"] == 3
    approx = pytest.approx
    assert b["step_ms"] == approx(100) and b["link_busy_ms"] == approx(65) and b["cpu_busy_ms"] == approx(40)
    assert b["both_ms"] == approx(10) and b["neither_ms"] == approx(5) and b["gpu_compute_ms"] == approx(4)
    assert b["link_gb"] == approx(6.0) and b["cpu_gb"] == approx(1.0)
    assert step_breakdown(rows[:12]) is None            # two steps: a prefill's and a capture's, no more
