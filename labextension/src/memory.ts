// Memory per tier: a bar of weights, then each reservation (KV cache, activations,
// workspace, staging), against the budget; the numbers beside it.

import type { AnyModel } from "@anywidget/types";
import { el } from "./dom";
import { formatSize } from "./format";
import type { MemoryState } from "./types";
import type { Lifetime } from "./views";

export function renderMemory(model: AnyModel<MemoryState>, root: HTMLElement, life: Lifetime): void {
  root.classList.add("nbo-memory");
  const head = el("div", "nbo-toolbar");
  head.append(el("b", "", "Memory"));
  const body = el("div", "nbo-memory-rows");
  root.append(head, body);

  function draw() {
    const colors = model.get("colors");
    body.replaceChildren(...model.get("rows").map((row) => {
      const scale = Math.max(row.budget ?? 0, row.used, 1);
      const line = el("div", "nbo-mem-row");
      line.dataset.tier = row.tier;
      const label = el("span", "nbo-mem-tier", row.tier);
      const bar = el("div", "nbo-mem-bar");
      const parts = [{ name: "weights", bytes: row.weights, color: colors.tiers[row.tier] }]
        .concat(row.reserved.map((r) => ({ ...r, color: colors.reserved[r.name] ?? "#9e9e9e" })));
      for (const p of parts) {
        if (!p.bytes) continue;
        const seg = el("span", "nbo-mem-seg");
        seg.style.width = `${(100 * p.bytes) / scale}%`;
        seg.style.background = p.color;
        seg.title = `${p.name.replace(/_/g, " ")}: ${formatSize(p.bytes)}`;
        seg.dataset.part = p.name;
        bar.append(seg);
      }
      const pct = row.budget ? ` (${((100 * row.used) / row.budget).toFixed(1)}%)` : "";
      const of = row.budget !== null ? ` of ${formatSize(row.budget)}${pct}` : "";
      const total = el("span", "nbo-mem-total", `${formatSize(row.used)} used${of}`);
      const keys = el("div", "nbo-mem-keys");
      for (const p of parts) {
        if (!p.bytes) continue;
        const key = el("span", "nbo-legend-item");
        const swatch = el("span", "nbo-swatch");
        swatch.style.background = p.color;
        key.append(swatch, `${p.name.replace(/_/g, " ")} ${formatSize(p.bytes)}`);
        keys.append(key);
      }
      line.append(label, bar, total, keys);
      return line;
    }));
  }
  life.on("change:rows", draw);
  draw();
}
