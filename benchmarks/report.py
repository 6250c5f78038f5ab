"""Render a bench_offload.py JSON file as the Markdown rows of RESULTS.md (no figure typed by hand).

    python3 benchmarks/report.py benchmarks/raw-2026-11-25-h100-run2.json --command "..." >> benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json

GiB = 2**30


def fmt(v, digits=2):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render(data, command, title=None) -> str:
    m = data["meta"]
    links = data.get("links", [])
    lines = [f"## {title or m['date']} · {m['card']} · torch {m['torch']}, transformers {m['transformers']}, "
             f"accelerate {m['accelerate']}", "", "Command (GPU machine, repository root):", "",
             f"    {command}", "",
             f"Model: LLaMA-7B shape, {m['layers']} layers, random bf16 weights. Page-locked host-to-GPU rate: "
             f"median {m.get('link_gbps_median', 0):.1f} GB/s of {len(links)} samples "
             f"({min(links):.1f}-{max(links):.1f}). Drive (best of 3, nb_offload's reader"
             + (f", {m['read_threads']} threads" if "read_threads" in m else "") + "): cold "
             f"{fmt(m.get('drive_cold_gbps'))} GB/s, warm page cache {fmt(m.get('drive_warm_gbps'))} GB/s."
             + (f" Accelerate's own peak GPU memory at the {m.get('accelerate_budget', 4 * GiB) / GiB:.0f} GiB budget: "
                f"{m['accelerate_peak_gpu'] / GiB:.2f} GiB." if "accelerate_peak_gpu" in m else ""), "",
             "| case | streamed / token | held | nb_offload | spread | bound | % of bound | % of PCIe limit | "
             "vs Accelerate | peak GPU / budget | same tokens |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        if "pct_of_bound" in r:
            streamed = r.get("streamed_bytes", r.get("streamed_from_cpu", 0) + r.get("streamed_from_disk", 0))
            unit = "tok/s"
            same_budget = r.get("gpu_budget") == m.get("accelerate_budget", 4 * GiB)   # Accelerate ran at one budget
            acc = (f"{r['x_accelerate']:.1f}x ({r['accelerate_tok_s']:.2f} tok/s)"
                   if "x_accelerate" in r and same_budget else "")
            pcie = f"{r['pct_of_pcie']:.1f} %" if "pct_of_pcie" in r else ""
            same = r.get("tokens_identical", r.get("next_token_identical"))
            lines.append(
                f"| {r['case']} | {streamed / 1e9:.2f} GB | {r.get('held_units', '')} | "
                f"{r['nb_tok_s']:.2f} {unit} | {r['nb_spread']} | "
                f"{r['bound_tok_s']:.2f} {unit} | {r['pct_of_bound']:.1f} % | {pcie} | {acc} | "
                f"{r['peak_gpu'] / GiB:.2f} / {r['gpu_budget'] / GiB:.0f} GiB | {'yes' if same else 'NO'} |")
    if any("held_units" in r for r in data["rows"]):
        lines.append("\n*held*: streamed units (pieces, where blocks stream split) held on the GPU, for one generate, in the room its length left "
                     "unused of the plan's KV-cache and activation reservation (`hold_spare`); streamed bytes "
                     "are counted by nb_offload during the timed runs.")
    for r in data["rows"]:
        if "drive_units_gbps" in r and r["drive_units_gbps"]:
            lines.append(f"\n{r['case']}: the drive was reading {r['drive_busy_pct']:.0f} % of the time; read "
                         f"alone, unit after unit, the bytes this case streams from disk came off it at "
                         f"{r['drive_units_gbps']:.2f} GB/s, against {r['drive_gbps']:.2f} GB/s on the first "
                         f"4 GiB of the checkpoint: {r['pct_of_bound_units_probe']:.1f} % of the bound "
                         f"that rate gives.")
        if "no_hold_tok_s" in r:
            acc = (f", {r['no_hold_x_accelerate']:.1f}x Accelerate" if "no_hold_x_accelerate" in r else "")
            lines.append(f"\nSame model without holding ({r['case'].split(' (')[0]}, `hold_spare=False`, same "
                         f"rounds): {r['no_hold_tok_s']:.2f} tok/s (spread {r['no_hold_spread']}), "
                         f"{r['no_hold_streamed_bytes'] / 1e9:.2f} GB streamed per token{acc}.")
        if "accelerate_spread" in r:
            lines.append(f"\nAccelerate, in the same interleaved rounds: {r['accelerate_tok_s']:.2f} tok/s "
                         f"(spread {r['accelerate_spread']}).")
        if "trace_cost_pct" in r:
            lines.append(f"\nTrace on against trace off ({r['case'].split(' (')[0]}): {r['nb_tok_s']:.2f} against "
                         f"{r['trace_off_tok_s']:.2f} tok/s, cost {r['trace_cost_pct']:+.1f} % "
                         f"(spreads {r['nb_spread']} and {r['trace_off_spread']}).")
        if "slower_pct" in r:
            pooled = (f" (median of {r['steps_per_variant']} steps each; the medians of whole runs give "
                      f"{r['per_run_slower_pct']:+.1f} %, run medians spread {r['resident_spread']} and "
                      f"{r['nb_spread']})" if "steps_per_variant" in r else
                      f" (spreads {r['resident_spread']} and {r['nb_spread']})")
            lines.append(f"\nEverything resident (case 6): plain transformers {r['resident_tok_s']:.2f} tok/s, "
                         f"nb_offload {r['nb_tok_s']:.2f} tok/s ({r['slower_pct']:+.1f} %), nb_offload with "
                         f"trace off {r['nb_trace_off_tok_s']:.2f} tok/s ({r['slower_trace_off_pct']:+.1f} %)"
                         + pooled + ".")
        if "error" in r:
            lines.append(f"\nCase {r['case']} failed: `{r['error'].splitlines()[-1]}`")
    return "\n".join(lines) + "\n"


def render_dashboard(row, command) -> str:
    """bench_dashboard.py's JSON (issue 5: generation with the dashboard live against without)."""
    return "\n".join([
        f"## {row['date']}, dashboard overhead · {row['card']}", "", "Command (GPU machine, repository root):", "",
        f"    {command}", "",
        f"Decode at gpu {row['gpu_budget']} (the case 1 model), repeats interleaved: without the dashboard "
        f"{row['without_tok_s']:.2f} tok/s (spread {row['without_spread']}), with the dashboard live "
        f"{row['dashboard_tok_s']:.2f} tok/s (spread {row['dashboard_spread']}): {row['slower_pct']:+.2f} % "
        f"({row['trace_events']} trace events in the ring at the end)."]) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--dashboard", action="store_true", help="the JSON is bench_dashboard.py's")
    ap.add_argument("--command", default="PYTHONPATH=. python3 benchmarks/bench_offload.py --json out.json")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    with open(args.json) as fh:
        data = json.load(fh)
    print(render_dashboard(data, args.command) if args.dashboard else render(data, args.command, args.title))


if __name__ == "__main__":
    main()
