// The layer map: a cell per unit of the plan, coloured by tier, pinned ones marked. The
// units at work light up: each live message carries the latest step's events, replayed here
// at a speed the eye can follow. Selecting cells and pressing Apply asks the kernel to pin
// them; the kernel handles that once idle, so until it answers the request shows as pending.

import type { AnyModel } from "@anywidget/types";
import { EventStore } from "./events";
import { el } from "./dom";
import { formatSize } from "./format";
import type { LayerMapState, PackedHeader, Status } from "./types";
import type { Lifetime } from "./views";

const REPLAY_MIN_MS = 250;
const REPLAY_MAX_MS = 900;
const MAX_TICKS = 16; // experts drawn one tick each; more: shares of a bar

export function renderLayerMap(model: AnyModel<LayerMapState>, root: HTMLElement, life: Lifetime): void {
  root.classList.add("nbo-layermap");
  const head = el("div", "nbo-toolbar");
  const title = el("b", "", "Layer map");
  const info = el("span", "nbo-summary");
  head.append(title, info);
  const legend = el("div", "nbo-legend");
  const grid = el("div", "nbo-grid");
  const controls = el("div", "nbo-controls");
  const chosen = el("span", "nbo-chosen");
  const tierSelect = el("select", "nbo-tier");
  tierSelect.title = "Tier to pin the selected units to (auto: let the planner place them)";
  const apply = el("button", "nbo-btn nbo-apply", "Apply");
  const clear = el("button", "nbo-btn", "Clear");
  controls.append(chosen, tierSelect, apply, clear);
  const status = el("div", "nbo-status");
  root.append(head, legend, grid, controls, status);

  let cells: HTMLDivElement[] = [];
  let anchor = -1; // where a shift-click range starts
  let myRequest: string | null = null;

  // -- plan ---------------------------------------------------------------------------------
  function drawPlan() {
    const plan = model.get("plan");
    const colors = model.get("colors").tiers;
    info.textContent = `${plan.model} \u00b7 compute on ${plan.device} \u00b7 ${plan.entries.length} units`;
    legend.replaceChildren(...Object.entries(colors).map(([tier, color]) => {
      const units = plan.entries.filter((e) => e.tier === tier);
      if (!units.length) return "";
      const item = el("span", "nbo-legend-item");
      const swatch = el("span", "nbo-swatch");
      swatch.style.background = color;
      item.append(swatch, `${tier}: ${units.length} (${formatSize(units.reduce((a, e) => a + e.bytes, 0))})`);
      return item;
    }), el("span", "nbo-legend-item nbo-pin-key", "pinned"),
    plan.entries.some((e) => e.compute === "cpu") ? el("span", "nbo-legend-item nbo-cpu-key", "computed on the CPU") : "");
    cells = plan.entries.map((e, i) => {
      const onCpu = e.compute === "cpu";
      const cell = el("div", `nbo-cell nbo-${e.kind}${e.pinned ? " nbo-pinned" : ""}${onCpu ? " nbo-cpu-compute" : ""}`,
        e.label);
      cell.style.backgroundColor = colors[e.tier] ?? "#999";
      const format = e.format ? ` \u00b7 ${e.format}` : "";
      const where = onCpu ? " \u00b7 computed on the CPU where its bytes are, not streamed" : "";
      cell.title = `${e.name}\n${e.tier}${format} \u00b7 ${formatSize(e.bytes)}${e.pinned ? " \u00b7 pinned" : ""}${where}`;
      cell.dataset.name = e.name;
      cell.dataset.tier = e.tier;
      cell.dataset.index = String(i);
      cell.onclick = (ev) => select(i, ev);
      if (e.experts) {
        cell.dataset.experts = String(e.experts.count);
        cell.dataset.moves = e.experts.moves;
        cell.append(el("div", "nbo-experts"));
      }
      return cell;
    });
    grid.replaceChildren(...cells);
    drawExperts();
    const targets = plan.targets;
    const current = tierSelect.value;
    tierSelect.replaceChildren(...targets.map((t) => {
      const opt = el("option", "", t);
      opt.value = t;
      return opt;
    }));
    if (targets.includes(current)) tierSelect.value = current;
    drawSelection();
  }

  // -- MoE blocks: a strip of their experts under the label ------------------------------------
  // One tick per expert (a bar of shares where there are too many to draw): picked by the router in
  // the last step, held in the GPU expert cache, computed on the CPU from host memory in the last step
  // (expert_compute), or none of these. The tooltip says how a step brings them.
  function drawExperts() {
    const plan = model.get("plan");
    const state = model.get("experts") ?? {};
    const gpu = model.get("colors").tiers.gpu ?? "#2e7d32";
    const host = model.get("colors").tiers.cpu ?? "#1565c0";
    cells.forEach((cell, i) => {
      const info = plan.entries[i]?.experts;
      const strip = cell.querySelector<HTMLDivElement>(".nbo-experts");
      if (!info || !strip) return;
      const live = state[cell.dataset.name!] ?? { routed: [], cached: [], cpu: [] };
      const onCpu = live.cpu ?? [];
      const routed = new Set(live.routed);
      const cached = new Set(live.cached);
      const computed = new Set(onCpu);
      cell.dataset.routed = live.routed.join(",");
      cell.dataset.cached = String(live.cached.length);
      cell.dataset.cpu = onCpu.join(",");
      if (info.count <= MAX_TICKS) {
        strip.replaceChildren(...Array.from({ length: info.count }, (_, x) => {
          const tick = el("span", `nbo-expert${routed.has(x) ? " nbo-routed" : ""}${computed.has(x) ? " nbo-on-cpu" : ""}`);
          if (computed.has(x)) tick.style.background = host;
          else if (cached.has(x)) tick.style.background = gpu;
          return tick;
        }));
      } else {
        const share = el("span", "nbo-expert-share");
        share.style.width = `${(100 * live.cached.length) / info.count}%`;
        share.style.background = gpu;
        const picked = el("span", "nbo-expert-share nbo-routed");
        picked.style.width = `${(100 * (live.routed.length - onCpu.length)) / info.count}%`;
        const hostShare = el("span", "nbo-expert-share nbo-routed nbo-on-cpu");
        hostShare.style.width = `${(100 * onCpu.length) / info.count}%`;
        hostShare.style.background = host;
        strip.replaceChildren(share, picked, hostShare);
      }
      const how = info.moves === "routed" ? `a step brings only the ${info.top_k} routed to (per token)`
        : info.moves === "whole" ? "streamed with the block, every one each step" : "resident";
      const last = live.routed.length ? `\nlast step: ${live.routed.join(", ")}` : "";
      const held = live.cached.length ? `\n${live.cached.length} in the GPU expert cache` : "";
      const cpu = onCpu.length ? `\ncomputed on the CPU from host memory: ${onCpu.join(", ")}` : "";
      const base = cell.title.split("\nexperts:")[0];
      cell.title = `${base}\nexperts: ${info.count}, ${info.top_k} a token; ${how}${last}${cpu}${held}`;
    });
  }

  // -- selection ----------------------------------------------------------------------------
  function select(i: number, ev: MouseEvent) {
    const names = model.get("plan").entries.map((e) => e.name);
    let sel = new Set(model.get("selection"));
    if (ev.shiftKey && anchor >= 0) {
      const [a, b] = anchor < i ? [anchor, i] : [i, anchor];
      sel = new Set(names.slice(a, b + 1));
    } else if (ev.ctrlKey || ev.metaKey) {
      if (sel.has(names[i])) sel.delete(names[i]);
      else sel.add(names[i]);
      anchor = i;
    } else {
      sel = sel.size === 1 && sel.has(names[i]) ? new Set() : new Set([names[i]]);
      anchor = i;
    }
    setSelection(names.filter((n) => sel.has(n)));
  }
  function setSelection(names: string[]) {
    model.set("selection", names);
    model.save_changes();
    drawSelection();
  }
  function drawSelection() {
    const sel = new Set(model.get("selection"));
    cells.forEach((c) => c.classList.toggle("nbo-selected", sel.has(c.dataset.name!)));
    chosen.textContent = sel.size ? `${sel.size} selected \u2192` : "Click a unit (shift-click: range)";
    apply.disabled = !sel.size || myRequest !== null || model.get("status").state === "unloaded";
  }

  // -- re-pinning ---------------------------------------------------------------------------
  apply.onclick = () => {
    const names = model.get("selection");
    if (!names.length) return;
    myRequest = `${Date.now()}-${Math.random().toString(36).slice(2)}`;
    showStatus({ state: "pending", message: `pin ${names.length} unit(s) to ${tierSelect.value}: waiting for `
      + "the kernel (it runs when the current cell finishes)" });
    cells.forEach((c) => c.classList.toggle("nbo-pending", names.includes(c.dataset.name!)));
    model.send({ type: "apply", tier: tierSelect.value, names, request: myRequest });
    drawSelection();
  };
  clear.onclick = () => setSelection([]);

  function showStatus(s: Status) {
    status.textContent = s.message;
    status.className = `nbo-status nbo-${s.state}`;
    root.dataset.status = s.state;
  }
  function onStatus() {
    const s = model.get("status");
    // A status for another view's request (or none) is shown too, but leaves ours pending.
    const over = s.state === "done" || s.state === "error" || s.state === "unloaded";
    if (myRequest !== null && (s.request === myRequest || s.state === "unloaded") && over) {
      myRequest = null;
      cells.forEach((c) => c.classList.remove("nbo-pending"));
    }
    if (myRequest === null || s.request === myRequest || s.state === "unloaded") showStatus(s);
    drawSelection();
  }

  // -- activity -----------------------------------------------------------------------------
  let frame = 0;
  function replay(msg: PackedHeader, buffers: DataView[]) {
    const store = new EventStore(msg.kinds.length, msg.count);
    store.reset(msg, buffers);
    const [t0, t1] = store.span;
    const ms = Math.min(Math.max((t1 - t0) * 1e3, REPLAY_MIN_MS), REPLAY_MAX_MS);
    const began = performance.now();
    const byName = new Map(cells.map((c) => [c.dataset.name!, c]));
    cancelAnimationFrame(frame);
    const tick = (now: number) => {
      const f = Math.min((now - began) / ms, 1);
      const t = t0 + f * (t1 - t0);
      const computing = new Set<HTMLElement>();
      const moving = new Set<HTMLElement>();
      for (let i = 0; i < store.length; i++) {
        if (store.start[i] > t || store.end[i] < t) continue;
        const cell = byName.get(store.names[store.unit[i]]);
        if (!cell) continue; // "step" events name the whole forward pass
        (msg.kinds[store.kind[i]] === "compute" ? computing : moving).add(cell);
      }
      cells.forEach((c) => {
        c.classList.toggle("nbo-computing", f < 1 && computing.has(c));
        c.classList.toggle("nbo-moving", f < 1 && moving.has(c));
      });
      if (f < 1) frame = requestAnimationFrame(tick);
    };
    frame = requestAnimationFrame(tick);
  }

  const onMessage = (msg: { type?: string } & PackedHeader, buffers: DataView[]) => {
    if (msg.type === "activity") replay(msg, buffers);
  };
  life.on("msg:custom", onMessage);
  life.on("change:plan", drawPlan);
  life.on("change:selection", drawSelection);
  life.on("change:status", onStatus);
  life.on("change:experts", drawExperts);
  life.add(() => cancelAnimationFrame(frame));
  drawPlan();
  showStatus(model.get("status"));
}
