// Drives JupyterLab in headless Chromium: runs the notebook written by make_notebook.py,
// checks the dashboard (layer map tiers and colours, live timeline, memory rows), re-pins
// two blocks by clicking while a cell runs (pending, then done), checks the kernel's plan in
// a later cell, runs each teaching notebook (notebooks/) top to bottom, reopens the saved notebook
// with its kernel gone in JupyterLab and in Notebook 7, and fails on any browser console error.
// Screenshots go to $OUT.
// Environment: LAB_URL, NB_URL (Notebook 7 on the same folder), LAB_TOKEN, CHROMIUM, OUT, BUSY_SECONDS.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const { LAB_URL, NB_URL, LAB_TOKEN, CHROMIUM, OUT } = process.env;
const BUSY_SECONDS = Number(process.env.BUSY_SECONDS);
const TIER_RGB = { gpu: "rgb(46, 125, 50)", cpu: "rgb(21, 101, 192)", disk: "rgb(141, 110, 99)" };
const LANE_RGB = { read: [141, 110, 99], compute: [46, 125, 50] };

fs.mkdirSync(OUT, { recursive: true });
const userData = fs.mkdtempSync(path.join(OUT, "chromium-profile-"));
// A fresh profile each run (playwright passes it as --user-data-dir).
const browser = await chromium.launchPersistentContext(userData, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const errors = [];
let step = "start";
const log = (msg) => console.log(`[browser-test] ${msg}`);

try {
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(`console: ${msg.text()}`);
  });
  page.on("pageerror", (err) => errors.push(`page: ${err.message}`));
  const shot = (name) => page.screenshot({ path: path.join(OUT, `${name}.png`) });

  step = "open notebook";
  await page.goto(`${LAB_URL}/lab/tree/widgets.ipynb?token=${LAB_TOKEN}`);
  const cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell");
  await cells.first().waitFor({ timeout: 60_000 });
  // Cells are run through JupyterLab's own command (the server exposes the app for this):
  // keystrokes race the editor's focus; the widgets are then driven with real clicks.
  await page.waitForFunction(() => window.jupyterapp?.shell.currentWidget?.sessionContext, null, { timeout: 60_000 });
  await page.evaluate(() => window.jupyterapp.shell.currentWidget.sessionContext.ready);

  const prompt = (i) => cells.nth(i).locator(".jp-InputArea-prompt");
  const output = (i) => cells.nth(i).locator(".jp-OutputArea-output");
  async function startCell(i) {
    await page.evaluate((i) => {
      const { shell, commands } = window.jupyterapp;
      shell.currentWidget.content.activeCellIndex = i;
      void commands.execute("notebook:run-cell");
    }, i);
    await page.waitForFunction(
      ([sel, i]) => /\[[*\d]+\]/.test(document.querySelectorAll(sel)[i]?.textContent ?? ""),
      [".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .jp-InputArea-prompt", i], { timeout: 30_000 });
  }
  async function finishCell(i, timeout = 120_000) {
    await page.waitForFunction(
      ([sel, i]) => /\[\d+\]/.test(document.querySelectorAll(sel)[i]?.textContent ?? ""),
      [".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .jp-InputArea-prompt", i], { timeout });
    const err = await cells.nth(i).locator("[data-mime-type='application/vnd.jupyter.error']").count();
    if (err) throw new Error(`cell ${i} failed:\n${await output(i).allInnerTexts()}`);
  }
  async function runCell(i, timeout) {
    await startCell(i);
    await finishCell(i, timeout);
  }

  step = "load and generate (cell 0)";
  await runCell(0, 180_000);
  const expected = JSON.parse((await output(0).innerText()).match(/EXPECTED (.*)/)[1]);
  log(`plan tiers ${expected.tiers.join(",")}; ${expected.events} events so far`);

  step = "display the dashboard (cell 1)";
  await runCell(1);
  const map = cells.nth(1).locator(".nbo-layermap");
  const mapCells = map.locator(".nbo-cell");
  await mapCells.first().waitFor({ timeout: 30_000 });
  assert.equal(await mapCells.count(), expected.tiers.length, "one cell per plan entry");
  for (let i = 0; i < expected.tiers.length; i++) {
    const cell = mapCells.nth(i);
    const tier = expected.tiers[i];
    assert.equal(await cell.getAttribute("data-tier"), tier, `cell ${i} tier`);
    assert.equal(await cell.evaluate((e) => getComputedStyle(e).backgroundColor), TIER_RGB[tier], `cell ${i} colour`);
  }
  assert.equal(await map.locator(".nbo-cell.nbo-pinned").count(), 2, "layers 2-3 pinned at load");
  assert.equal(await cells.nth(1).locator(".nbo-mem-row").count(), 2, "memory rows: cpu and disk");
  const memParts = await cells.nth(1).locator(".nbo-mem-row[data-tier='cpu'] .nbo-mem-seg").evaluateAll(
    (segs) => segs.map((s) => s.dataset.part));
  assert.ok(memParts.includes("weights") && memParts.includes("kv_cache"), `cpu memory parts: ${memParts}`);
  const timeline = cells.nth(1).locator(".nbo-timeline");
  assert.equal(Number(await timeline.getAttribute("data-events")), expected.events, "history shown at display");
  await shot("1-dashboard");

  step = "live timeline (cell 2)";
  const seen = new Set();
  let lit = 0; // polls that found units lit up (computing, or being read/copied)
  await startCell(2);
  while (/\[\*\]/.test(await prompt(2).innerText())) {
    seen.add(Number(await cells.nth(1).locator(".nbo-timeline").getAttribute("data-events").catch(() => 0)));
    if (await map.locator(".nbo-computing, .nbo-moving").count()) {
      if (!lit++) await shot("2a-units-at-work");
    }
    await page.waitForTimeout(100);
  }
  await finishCell(2);
  const events = Number((await output(2).innerText()).match(/EVENTS (\d+)/)[1]);
  const grewLive = [...seen].filter((n) => n > expected.events && n < events);
  log(`timeline counts seen while the cell ran: ${[...seen].sort((a, b) => a - b).join(" ")}; polls lit: ${lit}`);
  assert.ok(grewLive.length >= 2, "timeline grew while the cell was running");
  assert.ok(lit >= 2, `layer map lit up the units at work (${lit} polls)`);
  await page.waitForFunction(
    ([n]) => Number(document.querySelector(".nbo-timeline")?.dataset.events) === n, [events], { timeout: 15_000 });
  const lanePixels = await cells.nth(1).locator(".nbo-timeline canvas").evaluate((canvas, laneRgb) => {
    const ctx = canvas.getContext("2d");
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const count = {};
    for (const [lane, [r, g, b]] of Object.entries(laneRgb)) {
      count[lane] = 0;
      for (let i = 0; i < img.length; i += 4) {
        if (img[i] === r && img[i + 1] === g && img[i + 2] === b) count[lane]++;
      }
    }
    return count;
  }, LANE_RGB);
  assert.ok(lanePixels.read > 100 && lanePixels.compute > 100, `timeline lanes drawn: ${JSON.stringify(lanePixels)}`);
  await shot("2-timeline-after-generate");

  step = "timeline runs: the last by default, all with the idle time cut out";
  const timelineSummary = cells.nth(1).locator(".nbo-timeline .nbo-summary");
  assert.match(await timelineSummary.innerText(), /\(the last of \d+ runs\)/);
  await cells.nth(1).locator(".nbo-timeline button", { hasText: "All runs" }).click();
  assert.match(await timelineSummary.innerText(), /^\d+ events over .* \(\d+ runs, idle time cut out\)/);
  await shot("2b-timeline-all-runs");
  await cells.nth(1).locator(".nbo-timeline button", { hasText: "Last run" }).click();
  assert.match(await timelineSummary.innerText(), /\(the last of \d+ runs\)/);
  // zoom and hover over every run: the last alone is a few short steps, mostly gaps when zoomed in
  await cells.nth(1).locator(".nbo-timeline button", { hasText: "All runs" }).click();

  step = "timeline zoom and hover";
  const canvas = cells.nth(1).locator(".nbo-timeline canvas");
  const box = await canvas.boundingBox();
  const drawn = () => page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  // The first x (CSS px) where the compute lane is drawn, or -1. Compute is the third lane, 22 px each.
  const computeX = () => canvas.evaluate((c, [r, g, b]) => {
    const dpr = window.devicePixelRatio || 1;
    const row = c.getContext("2d").getImageData(0, Math.round((2 * 22 + 11) * dpr), c.width, 1).data;
    for (let i = 0; i < row.length; i += 4) if (row[i] === r && row[i + 1] === g && row[i + 2] === b) return i / 4 / dpr;
    return -1;
  }, LANE_RGB.compute);
  // Zoom in around a compute event (the wheel zooms about the pointer), then drag it towards the wider side:
  // where the gaps fall depends on the machine's speed, so a fixed spot could land in one.
  await drawn();
  const before = await computeX();
  assert.ok(before >= 0, "compute lane drawn before zooming");
  await page.mouse.move(box.x + before + 0.5, box.y + 10);
  for (let k = 0; k < 5; k++) await page.mouse.wheel(0, -200);
  const shift = (before < box.width / 2 ? 1 : -1) * box.width * 0.15;
  await page.mouse.down();
  await page.mouse.move(box.x + before + 0.5 + shift, box.y + 10, { steps: 5 });
  await page.mouse.up();
  await drawn();
  // Hover the compute lane where it is drawn: the tooltip names the event.
  const x = await computeX();
  assert.ok(x >= 0, "compute lane visible after zooming and dragging");
  await page.mouse.move(box.x + x + 1, box.y + 2 * 22 + 11);
  const tip = cells.nth(1).locator(".nbo-tip");
  await tip.waitFor({ state: "visible", timeout: 5_000 });
  assert.match(await tip.innerText(), /^compute model\.layers\.\d+ /);
  await shot("3-timeline-zoomed");

  step = "re-pin error shown in the widget";
  await map.locator(".nbo-cell[data-name='model.embed_tokens']").click();
  await map.locator("select.nbo-tier").selectOption("auto");
  await map.locator("button.nbo-apply").click();
  const status = map.locator(".nbo-status");
  await page.waitForFunction(() => document.querySelector(".nbo-layermap")?.dataset.status === "error",
    null, { timeout: 30_000 });
  assert.match(await cells.nth(1).locator(".nbo-status").innerText(), /no pinned unit/);
  await shot("4-repin-error");

  step = "re-pin by click while a cell runs (pending, then done)";
  await startCell(3); // the kernel is busy for BUSY_SECONDS
  const m = cells.nth(1).locator(".nbo-layermap");
  await m.locator(".nbo-cell[data-name='model.layers.0']").click();
  await m.locator(".nbo-cell[data-name='model.layers.1']").click({ modifiers: ["Shift"] });
  assert.equal(await m.locator(".nbo-cell.nbo-selected").count(), 2, "shift-click selects a range");
  await m.locator("select.nbo-tier").selectOption("disk");
  await m.locator("button.nbo-apply").click();
  assert.equal(await m.getAttribute("data-status"), "pending");
  // Pending at once: the front-end's own word, or already the kernel's reply (it can come first).
  assert.match(await m.locator(".nbo-status").innerText(), /waiting for the kernel|queued in the kernel/);
  assert.equal(await m.locator(".nbo-cell.nbo-pending").count(), 2);
  // The kernel gets the request at once (on a subshell) and queues it behind the running cell.
  await page.waitForFunction(() => /queued in the kernel/.test(
    document.querySelector(".nbo-layermap .nbo-status")?.textContent ?? ""), null, { timeout: 10_000 });
  await shot("5-repin-pending");
  await finishCell(3, (BUSY_SECONDS + 60) * 1000);
  const during = JSON.parse((await output(3).innerText()).match(/DURING (.*)/)[1]);
  assert.deepEqual(during, expected.tiers, "no re-pin while the cell ran");
  await page.waitForFunction(() => document.querySelector(".nbo-layermap")?.dataset.status === "done",
    null, { timeout: 60_000 });
  const after = cells.nth(1).locator(".nbo-layermap");
  for (const name of ["model.layers.0", "model.layers.1"]) {
    const cell = after.locator(`.nbo-cell[data-name='${name}']`);
    assert.equal(await cell.getAttribute("data-tier"), "disk", `${name} now on disk`);
    assert.equal(await cell.evaluate((e) => getComputedStyle(e).backgroundColor), TIER_RGB.disk);
    assert.ok((await cell.getAttribute("class")).includes("nbo-pinned"), `${name} pinned`);
  }
  assert.match(await after.locator(".nbo-status").innerText(), /moved 2 units/);
  await shot("6-repin-done");

  step = "the kernel's plan after the re-pin (cell 4)";
  await runCell(4);
  const plan = JSON.parse((await output(4).innerText()).match(/PLAN (.*)/)[1]);
  assert.deepEqual(plan["model.layers.0"], ["disk", true]);
  assert.deepEqual(plan["model.layers.1"], ["disk", true]);
  assert.deepEqual(plan["model.embed_tokens"], ["cpu", false], "the failed unpin changed nothing");

  step = "12,000 more events (cell 5): zoom and pan stay smooth";
  await runCell(5);
  const total = Number((await output(5).innerText()).match(/STRESS (\d+)/)[1]);
  await page.waitForFunction(
    ([n]) => Number(document.querySelector(".nbo-timeline")?.dataset.events) === n, [total], { timeout: 30_000 });
  await cells.nth(1).locator(".nbo-timeline button", { hasText: "Fit" }).click();
  // Time a frame per wheel step, zooming in then out over the whole trace.
  const frameMs = await cells.nth(1).locator(".nbo-timeline canvas").evaluate(async (c) => {
    const r = c.getBoundingClientRect();
    const frame = () => new Promise((done) => requestAnimationFrame(() => done()));
    await frame();
    const times = [];
    for (let k = 0; k < 40; k++) {
      const t0 = performance.now();
      c.dispatchEvent(new WheelEvent("wheel", { deltaY: k < 20 ? -120 : 120, clientX: r.left + r.width / 2,
        clientY: r.top + 10, bubbles: true, cancelable: true }));
      await frame();
      times.push(performance.now() - t0);
    }
    times.sort((a, b) => a - b);
    return times[Math.floor(times.length / 2)];
  });
  log(`${total} events: median frame ${frameMs.toFixed(1)} ms while zooming`);
  assert.ok(frameMs < 50, `timeline frames take ${frameMs} ms with ${total} events`);
  await cells.nth(1).locator(".nbo-timeline button", { hasText: "Fit" }).click();
  await shot("7-timeline-12k-events");

  step = "a MoE model's experts on the layer map (cells 6-7)";
  await runCell(6, 180_000);
  const moe = JSON.parse((await output(6).allInnerTexts()).join("\n").match(/MOE (.*)/)[1]);
  const moeMap = cells.nth(6).locator(".nbo-layermap");
  const moeBlocks = moeMap.locator(".nbo-cell[data-experts]");
  await moeBlocks.first().waitFor({ timeout: 30_000 });
  assert.equal(await moeBlocks.count(), moe.blocks.length, "a strip of experts on every MoE block");
  for (const name of moe.blocks) {
    const cell = moeMap.locator(`.nbo-cell[data-name='${name}']`);
    assert.equal(await cell.getAttribute("data-moves"), "routed", `${name}: only routed experts read`);
    assert.equal(await cell.locator(".nbo-expert").count(), moe.experts, `${name}: a tick per expert`);
    assert.match(await cell.getAttribute("title"), /experts: \d+, \d+ a token; a step brings only/);
  }
  await runCell(7);
  const routed = JSON.parse((await output(7).innerText()).match(/ROUTED (.*)/)[1]);
  await page.waitForFunction(([names]) => names.every((n) =>
    document.querySelectorAll(".nbo-layermap")[1]?.querySelector(`.nbo-cell[data-name='${n}']`)?.dataset.routed),
  [moe.blocks], { timeout: 15_000 });
  const onCpu = JSON.parse((await output(7).innerText()).match(/ON_CPU (.*)/)[1]);
  for (const name of moe.blocks) {
    const cell = moeMap.locator(`.nbo-cell[data-name='${name}']`);
    assert.equal(await cell.getAttribute("data-routed"), routed[name].join(","), `${name}: the last step's experts`);
    assert.equal(await cell.locator(".nbo-expert.nbo-routed").count(), routed[name].length);
    assert.ok(onCpu[name].length >= 1, `${name}: half the step's experts computed on the CPU`);
    assert.equal(await cell.getAttribute("data-cpu"), onCpu[name].join(","), `${name}: those the CPU computed`);
    assert.equal(await cell.locator(".nbo-expert.nbo-on-cpu").count(), onCpu[name].length);
    assert.match(await cell.getAttribute("title"), /computed on the CPU from host memory: \d/);
  }
  log(`MoE layer map: ${moe.blocks.length} blocks, last step's experts ${JSON.stringify(routed)}, on the CPU `
    + JSON.stringify(onCpu));
  await moeMap.screenshot({ path: path.join(OUT, "7b-moe-experts.png") });

  step = "save";
  await page.evaluate(() => window.jupyterapp.commands.execute("docmanager:save"));

  // The teaching notebooks, each run top to bottom in this JupyterLab: no error output, their
  // plotly figures and widgets drawn (run.sh copies notebooks/ and the benchmark runs they read).
  const teaching = { "01-quick-start.ipynb": [".nbo-layermap", "The old baker opened his shop"],
    "02-tiers-and-budgets.ipynb": [".js-plotly-plot", "correct"],
    "03-timelines-and-repinning.ipynb": [".js-plotly-plot", "same text: True"],
    "04-quantization.ipynb": [".js-plotly-plot", "correct"],
    "05-disk-and-cache.ipynb": [null, "warned: True"] };
  for (const [name, [drawn, text]] of Object.entries(teaching)) {
    step = `teaching notebook ${name}`;
    await page.evaluate(async (name) => {
      await window.jupyterapp.commands.execute("docmanager:open", { path: `notebooks/${name}` });   // a widget: not returned
    }, name);
    await page.waitForFunction((name) => window.jupyterapp.shell.currentWidget?.context?.path === `notebooks/${name}`
      && window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel, name, { timeout: 60_000 });
    await page.evaluate(() => window.jupyterapp.shell.currentWidget.sessionContext.ready);
    const t0 = Date.now();
    await page.evaluate(async () => {
      await window.jupyterapp.commands.execute("notebook:run-all-cells");
    });
    await page.waitForFunction(() => {
      const nb = window.jupyterapp.shell.currentWidget;
      const prompts = [...nb.node.querySelectorAll(".jp-CodeCell .jp-InputArea-prompt")].map((p) => p.textContent);
      return prompts.length && prompts.every((p) => /\[\d+\]/.test(p))
        && nb.sessionContext.session?.kernel?.status === "idle";
    }, null, { timeout: 120_000 });
    const panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)");
    const failed = await panel.locator("[data-mime-type='application/vnd.jupyter.error']").count();
    assert.equal(failed, 0, `${name}: ${await panel.locator("[data-mime-type='application/vnd.jupyter.error']").allInnerTexts()}`);
    if (drawn) await panel.locator(drawn).first().waitFor({ timeout: 30_000 });
    assert.ok((await panel.innerText()).includes(text), `${name} shows "${text}"`);
    log(`${name}: ran top to bottom in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    await shot(`8-${name.replace(".ipynb", "")}`);
  }

  step = "reopened without a kernel";
  await page.evaluate(async () => {
    const { commands, serviceManager } = window.jupyterapp;
    await commands.execute("docmanager:save-all");     // so closing asks nothing
    await commands.execute("application:close-all");
    await serviceManager.sessions.refreshRunning();     // every kernel shut down: the widget models are gone
    for (const s of [...serviceManager.sessions.running()]) await serviceManager.sessions.shutdown(s.id);
  });
  // A fresh page: a new widget manager, which knows only what the notebook file carries.
  await page.goto(`${LAB_URL}/lab/tree/widgets.ipynb?token=${LAB_TOKEN}`);
  const reopened = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)");
  await reopened.locator(".jp-Cell").first().waitFor({ timeout: 60_000 });
  await reopened.locator(".nbo-layermap").first().waitFor({ timeout: 30_000 });
  assert.ok(!(await reopened.innerText()).includes("model not found"), "no 'model not found' in the reopened notebook");
  assert.ok(await reopened.locator(".nbo-timeline").count() > 0 && await reopened.locator(".nbo-memory").count() > 0,
    "the reopened notebook draws its dashboard from the saved widget state");
  await shot("9-reopened-without-kernel");

  step = "reopened in Notebook 7 without its kernel";
  // Notebook 7 is a second server on the same folder (run.sh). Opening the notebook starts a fresh
  // kernel there: the widget manager draws nothing, not even saved state, with no kernel at all
  // (ipywidgets#3773). That kernel never ran a cell, so the dashboards can come only from the file.
  const nb7Errors = errors.length;
  await page.goto(`${NB_URL}/notebooks/widgets.ipynb?token=${LAB_TOKEN}`);
  const nb7 = page.locator(".jp-NotebookPanel");
  await nb7.locator(".jp-Cell").first().waitFor({ timeout: 60_000 });
  await nb7.locator(".nbo-layermap .nbo-cell").first().waitFor({ timeout: 60_000 });
  assert.ok(!(await nb7.innerText()).includes("model not found"), "no 'model not found' in Notebook 7");
  for (const view of [".nbo-layermap", ".nbo-timeline", ".nbo-memory"]) {
    assert.ok(await nb7.locator(view).count() > 0, `Notebook 7 draws ${view} from the saved widget state`);
  }
  await shot("10-notebook7-reopened");
  const liveModels = await page.evaluate(async () => {
    const { sessionContext } = window.jupyterapp.shell.currentWidget;
    await sessionContext.ready;
    const reply = await sessionContext.session.kernel.requestCommInfo({ target_name: "jupyter.widget" });
    return Object.keys(reply.content.comms);
  });
  assert.deepEqual(liveModels, [], "Notebook 7's kernel holds no widget models");
  // Notebook 7's own start-up race (jupyter/notebook#7862), not ours: any other error still fails.
  const notebookRace = /Cannot read properties of undefined \(reading 'schema'\)/;
  errors.splice(nb7Errors, Infinity, ...errors.slice(nb7Errors).filter((e) => !notebookRace.test(e)));

  step = "console";
  assert.deepEqual(errors, [], "no errors in the browser console");
  log("all browser checks passed");
} catch (err) {
  console.error(`[browser-test] FAILED at "${step}": ${err.stack ?? err}`);
  if (errors.length) console.error(`[browser-test] console errors:\n  ${errors.join("\n  ")}`);
  const pages = browser.pages();
  if (pages.length) await pages[0].screenshot({ path: path.join(OUT, "failure.png") }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
  fs.rmSync(userData, { recursive: true, force: true });
}
