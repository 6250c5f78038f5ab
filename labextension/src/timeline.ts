// The transfer timeline: one lane per event kind, drawn on a canvas (one fillRect per pixel
// run, not an element per event, so 10,000+ events pan and zoom smoothly). Wheel zooms
// around the pointer, drag pans, double-click fits; new events keep the view fitted until
// the user zooms or pans. Events fall into runs (a generate, a cell) separated by idle time:
// the view fits the last run, and "All runs" shows every run with the idle time cut out.

import type { AnyModel } from "@anywidget/types";
import { EventStore } from "./events";
import { el } from "./dom";
import { formatSeconds, formatSize } from "./format";
import type { PackedHeader, TimelineState } from "./types";
import type { Lifetime } from "./views";

const LANE_H = 22;
const GUTTER = 64;
const AXIS_H = 20;
const MIN_SPAN = 1e-6;
const IDLE = 0.25; // seconds with no event that end a run (as nb_offload.trace.IDLE)
const JOIN_SHARE = 0.02; // all runs: the idle time between two is cut to this share of the busy time

interface Range { t0: number; t1: number; follow: boolean }

export function renderTimeline(model: AnyModel<TimelineState>, root: HTMLElement, life: Lifetime): void {
  const lanes = model.get("lanes");
  const store = new EventStore(lanes.length, model.get("max_events"));
  const loadSnapshot = () => {
    const snap = model.get("events");
    if (snap && snap.count !== undefined) store.reset(snap, snap.buffers);
  };
  loadSnapshot();

  root.classList.add("nbo-timeline");
  const bar = el("div", "nbo-toolbar");
  const title = el("b", "", "Timeline");
  const summary = el("span", "nbo-summary");
  const buttons = el("span", "nbo-buttons");
  const zoomIn = el("button", "nbo-btn", "+");
  const zoomOut = el("button", "nbo-btn", "\u2212");
  const fit = el("button", "nbo-btn", "Fit");
  const allRuns = el("button", "nbo-btn", "All runs");
  zoomIn.title = "Zoom in (or scroll up over the lanes)";
  zoomOut.title = "Zoom out (or scroll down)";
  fit.title = "Show the run and follow new events (or double-click)";
  allRuns.title = "Every run, with the idle time between them cut out (click again: the last run)";
  buttons.append(zoomIn, zoomOut, fit, allRuns);
  bar.append(title, summary, buttons);
  const frame = el("div", "nbo-canvas-frame");
  const canvas = el("canvas");
  const tip = el("div", "nbo-tip");
  frame.append(canvas, tip);
  root.append(bar, frame);
  const ctx = canvas.getContext("2d")!;

  let width = 0;
  const height = lanes.length * LANE_H + AXIS_H;
  let queued = false; // a frame is already requested
  function schedule() {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      draw();
    });
  }

  // Runs, and where the idle time between them is cut out when all are shown: display time is
  // trace time less the idle time cut before its run.
  let runs: { t0: number; t1: number }[] = [];
  let removed: number[] = [];
  let showAll = false;
  function computeRuns() {
    const order = Array.from({ length: store.length }, (_, i) => i).sort((a, b) => store.start[a] - store.start[b]);
    runs = [];
    for (const i of order) {
      const last = runs[runs.length - 1];
      if (!last || store.start[i] - last.t1 > IDLE) runs.push({ t0: store.start[i], t1: store.end[i] });
      else last.t1 = Math.max(last.t1, store.end[i]);
    }
    const busy = runs.reduce((sum, r) => sum + r.t1 - r.t0, 0) || MIN_SPAN;
    removed = [];
    let cut = 0;
    runs.forEach((r, k) => {
      if (k) cut += r.t0 - runs[k - 1].t1 - JOIN_SHARE * busy;
      removed.push(cut);
    });
  }
  const warped = () => showAll && runs.length > 1;
  const runOf = (t: number, at: (k: number) => number) => {
    let lo = 0;
    let hi = runs.length - 1;
    let k = 0;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (at(mid) <= t) {
        k = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return k;
  };
  const toDisplay = (t: number) => (warped() ? t - removed[runOf(t, (k) => runs[k].t0)] : t);
  const toTrace = (x: number) => (warped() ? x + removed[runOf(x, (k) => runs[k].t0 - removed[k])] : x);
  const shownSpan = (): [number, number] => {
    if (!runs.length) return store.span;
    if (showAll) return [toDisplay(runs[0].t0), toDisplay(runs[runs.length - 1].t1)];
    return [runs[runs.length - 1].t0, runs[runs.length - 1].t1];
  };

  let range: Range = model.get("_range") ?? { t0: 0, t1: 0, follow: true };
  const setRange = (r: Range) => {
    range = r;
    model.set("_range", r); // kept on the model, unsaved: a redrawn view keeps the zoom
    schedule();
  };
  const fitAll = () => {
    const [t0, t1] = shownSpan();
    setRange({ t0, t1: Math.max(t1, t0 + MIN_SPAN), follow: true });
  };
  computeRuns();
  if (range.follow) fitAll();

  const resize = () => {
    width = Math.max(frame.clientWidth, 200);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = width * dpr;
    canvas.height = height * dpr;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    schedule();
  };

  const style = getComputedStyle(root);
  const fg = style.getPropertyValue("--jp-ui-font-color1").trim() || "#333";
  const grid = style.getPropertyValue("--jp-border-color2").trim() || "#ddd";
  const colors = model.get("colors").lanes;

  function draw() {
    const { t0, t1 } = range;
    const scale = (width - GUTTER) / Math.max(t1 - t0, MIN_SPAN);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "middle";
    lanes.forEach((lane, l) => {
      const y = l * LANE_H;
      ctx.fillStyle = fg;
      ctx.fillText(lane, 4, y + LANE_H / 2);
      ctx.fillStyle = grid;
      ctx.fillRect(GUTTER, y + LANE_H - 1, width - GUTTER, 1);
      ctx.fillStyle = colors[lane] ?? "#999";
      // Events that overlap one pixel run are drawn as one rectangle.
      const idx = store.byLane[l];
      let run0 = -1;
      let run1 = -1;
      for (let k = store.lowerBound(l, toTrace(t0) - store.maxDuration[l]); k < store.laneLength[l]; k++) {
        const i = idx[k];
        const s = toDisplay(store.start[i]);
        if (s > t1) break;
        const e = s + store.end[i] - store.start[i];
        if (e < t0) continue;
        const x0 = Math.max(GUTTER, GUTTER + Math.floor((s - t0) * scale));
        const x1 = Math.min(width, Math.max(x0 + 1, GUTTER + Math.ceil((e - t0) * scale)));
        if (x0 <= run1) {
          run1 = Math.max(run1, x1);
          continue;
        }
        if (run1 > run0) ctx.fillRect(run0, y + 4, run1 - run0, LANE_H - 8);
        run0 = x0;
        run1 = x1;
      }
      if (run1 > run0) ctx.fillRect(run0, y + 4, run1 - run0, LANE_H - 8);
    });
    if (warped()) { // where idle time was cut out: a dotted line
      const busy = runs.reduce((sum, r) => sum + r.t1 - r.t0, 0);
      ctx.fillStyle = fg;
      for (let k = 1; k < runs.length; k++) {
        const x = GUTTER + (toDisplay(runs[k].t0) - (JOIN_SHARE * busy) / 2 - t0) * scale;
        if (x < GUTTER || x > width) continue;
        for (let y = 0; y < lanes.length * LANE_H; y += 6) ctx.fillRect(Math.round(x), y, 1, 3);
      }
    }
    drawAxis(t0, t1, scale);
  }

  function drawAxis(t0: number, t1: number, scale: number) {
    if (store.length === 0) return; // nothing to measure: no "0 µs, 0 µs, 1 µs" ticks over an empty span
    const y = lanes.length * LANE_H;
    const raw = (t1 - t0) / 8;
    const mag = Math.pow(10, Math.floor(Math.log10(Math.max(raw, MIN_SPAN / 10))));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
    ctx.fillStyle = fg;
    ctx.textBaseline = "top";
    for (let k = Math.ceil(t0 / step); k * step <= t1; k++) {
      const t = k * step; // not a running sum: it would drift off round numbers
      const x = GUTTER + (t - t0) * scale;
      const label = formatSeconds(t);
      ctx.fillRect(x, y, 1, 4);
      // The last label would run off the right edge: end it at the tick instead.
      const w = ctx.measureText(label).width;
      ctx.fillText(label, x + 2 + w > width ? x - 2 - w : x + 2, y + 5);
    }
  }

  function updateSummary() {
    computeRuns();
    const last = runs[runs.length - 1];
    const from = showAll || !last ? -Infinity : last.t0; // the runs shown
    const busy = new Array(lanes.length).fill(0);
    const moved = new Array(lanes.length).fill(0);
    const counts = new Array(lanes.length).fill(0);
    let shown = 0;
    for (let i = 0; i < store.length; i++) {
      if (store.start[i] < from) continue;
      const l = Math.min(store.kind[i], lanes.length - 1);
      busy[l] += store.end[i] - store.start[i];
      moved[l] += store.bytes[i];
      counts[l] += 1;
      shown += 1;
    }
    const [t0, t1] = shownSpan();
    const which = runs.length < 2 ? ""
      : showAll ? ` (${runs.length} runs, idle time cut out)` : ` (the last of ${runs.length} runs)`;
    const parts = lanes
      .map((lane, l) => (counts[l]
        ? `${lane} ${counts[l]}${moved[l] ? ` (${formatSize(moved[l])})` : ""} busy ${formatSeconds(busy[l])}`
        : ""))
      .filter(Boolean);
    summary.textContent = store.length
      ? `${shown} events over ${formatSeconds(t1 - t0)}${which} \u00b7 ${parts.join(" \u00b7 ")}`
      : "no events yet: run a generate";
    root.dataset.events = String(store.length);
  }

  // -- data ---------------------------------------------------------------------------------
  const onMessage = (msg: { type?: string } & PackedHeader, buffers: DataView[]) => {
    if (msg.type !== "events") return;
    store.append(msg, buffers);
    afterData();
  };
  const onSnapshot = () => {
    loadSnapshot();
    afterData();
  };
  function afterData() {
    updateSummary();
    if (range.follow) fitAll();
    else schedule();
  }
  life.on("msg:custom", onMessage);
  life.on("change:events", onSnapshot);
  updateSummary();

  // -- interaction --------------------------------------------------------------------------
  const timeAt = (x: number) => range.t0 + ((x - GUTTER) / (width - GUTTER)) * (range.t1 - range.t0);
  const zoom = (factor: number, x: number) => {
    const t = timeAt(Math.max(x, GUTTER));
    const span = Math.max((range.t1 - range.t0) * factor, MIN_SPAN);
    const frac = (t - range.t0) / Math.max(range.t1 - range.t0, MIN_SPAN);
    setRange({ t0: t - frac * span, t1: t - frac * span + span, follow: false });
  };
  const pan = (dx: number) => {
    const dt = (dx / (width - GUTTER)) * (range.t1 - range.t0);
    setRange({ t0: range.t0 - dt, t1: range.t1 - dt, follow: false });
  };
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    if (Math.abs(ev.deltaX) > Math.abs(ev.deltaY)) pan(-ev.deltaX);
    else zoom(Math.exp(ev.deltaY * 0.002), ev.offsetX);
  }, { passive: false });
  let dragX: number | null = null;
  canvas.addEventListener("pointerdown", (ev) => {
    dragX = ev.offsetX;
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointerup", () => (dragX = null));
  canvas.addEventListener("pointermove", (ev) => {
    if (dragX !== null) {
      pan(ev.offsetX - dragX);
      dragX = ev.offsetX;
      tip.style.display = "none";
      return;
    }
    showTip(ev.offsetX, ev.offsetY);
  });
  canvas.addEventListener("pointerleave", () => (tip.style.display = "none"));
  canvas.addEventListener("dblclick", fitAll);
  allRuns.onclick = () => {
    showAll = !showAll;
    allRuns.textContent = showAll ? "Last run" : "All runs";
    updateSummary();
    fitAll();
  };
  zoomIn.onclick = () => zoom(0.5, GUTTER + (width - GUTTER) / 2);
  zoomOut.onclick = () => zoom(2, GUTTER + (width - GUTTER) / 2);
  fit.onclick = fitAll;

  function showTip(x: number, y: number) {
    const l = Math.floor(y / LANE_H);
    if (l >= lanes.length || x < GUTTER) {
      tip.style.display = "none";
      return;
    }
    const t = toTrace(timeAt(x));
    const slack = 3 * (range.t1 - range.t0) / (width - GUTTER); // a few pixels either side
    const idx = store.byLane[l];
    let found = -1;
    for (let k = store.lowerBound(l, t - store.maxDuration[l] - slack); k < store.laneLength[l]; k++) {
      const i = idx[k];
      if (store.start[i] > t + slack) break;
      if (store.end[i] >= t - slack) found = i;
    }
    if (found < 0) {
      tip.style.display = "none";
      return;
    }
    const i = found;
    const size = store.bytes[i] ? ` \u00b7 ${formatSize(store.bytes[i])}` : "";
    tip.textContent = `${lanes[l]} ${store.names[store.unit[i]] ?? "?"} \u00b7 ${formatSeconds(store.end[i] - store.start[i])}`
      + `${size} \u00b7 step ${store.step[i]} \u00b7 at ${formatSeconds(store.start[i])}`;
    tip.style.display = "block";
    tip.style.left = `${Math.min(x + 12, width - 260)}px`;
    tip.style.top = `${y + 12}px`;
  }

  const observer = new ResizeObserver(resize);
  observer.observe(frame);
  resize();
  life.add(() => observer.disconnect());
}
