// The live training view in a real browser, against a real ComfyUI and a real trainer.
//
// Run by tests/test_browser_live_view.py: `node live_view.cjs CONFIG.json` with NODE_PATH naming the
// node_modules that holds playwright-core. Every step goes through the page as a user would: the
// example workflow is loaded into the frontend, its widgets set, the prompt queued with the Queue/Run
// button, the panel's Stop button clicked, the page reloaded. The result (what was seen, the problems,
// the screenshots) is written to cfg.result as JSON; the Python test asserts on it.
"use strict";

const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const report = { problems: [], phases: [], seen: {}, screenshots: {}, console: [], ignored: [] };
// The frontend's own noise on a healthy page (boot error of 1.32.9, optional files, the /api/jobs
// 404s of newer frontends), shared with the other browser checks.
const { watchPage: watchPageNoise } = require("./known_noise.cjs");
const STOPPED = /^stopped at step (\d+) \(checkpoint kept\)/;

let phase = "start-up";
let context = null;
let page = null;

const problem = (what) => { report.problems.push(`[${phase}] ${what}`); console.error(`problem: [${phase}] ${what}`); };
const enter = (name) => { phase = name; report.phases.push({ name, t: Date.now() }); console.error(`phase: ${name}`); };

// Wait until `fn(arg)` in the page returns a truthy value; on timeout, fail naming what was awaited
// and what the panel showed last.
async function waitFor(what, fn, arg, timeoutS) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout: timeoutS * 1000, polling: 250 });
    return await handle.jsonValue();
  } catch (err) {
    if (!/Timeout/i.test(String(err))) throw err;
    const panel = await page.evaluate(readPanel).catch((e) => `unreadable: ${e}`);
    throw new Error(`timed out after ${timeoutS} s waiting for ${what}; the panel showed ${JSON.stringify(panel)}`);
  }
}

async function main() {
  context = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, headless: true, args: cfg.args,
    viewport: { width: cfg.viewport[0], height: cfg.viewport[1] },
  });
  page = context.pages()[0] ?? (await context.newPage());
  // One-time banners and tours, remembered in local storage, would cover the graph.
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  watchPage();

  enter("open the frontend");
  await page.goto(cfg.url, { waitUntil: "load" });
  await waitForApp();
  report.seen.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  report.seen.vueNodes = await page.evaluate(() => window.comfyAPI.app.app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled") ?? null);
  await closeDialogs("start-up");

  enter("load the workflow");
  const loaded = await page.evaluate(loadWorkflow, { workflow: cfg.workflow, name: cfg.workflowName,
                                                     remove: cfg.removeTypes, widgets: cfg.widgets });
  report.seen.loaded = loaded;
  for (const p of loaded.problems) problem(p);
  if (loaded.problems.length) throw new Error("the workflow could not be set up for a short run");
  const node = loaded.trainNode;
  await page.waitForTimeout(300);
  await closeDialogs("load");
  await page.evaluate(showNode, node);
  await waitFor("the train node's live panel", () => !!document.querySelector(".dreambooth-status"), null, 20);
  if (cfg.scenario === "disk full") return diskFull(node);

  enter("queue the training");
  await queueFromPage();
  await waitFor("the trainer's first steps in the panel (.dreambooth-step 'step N')",
                () => /^step \d+/.test(document.querySelector(".dreambooth-step")?.textContent ?? ""), null, cfg.timeouts.firstStep);
  await waitFor("3 loss points in the chart (canvas.dreambooth-loss data-points >= 3)",
                () => Number(document.querySelector("canvas.dreambooth-loss")?.dataset.points ?? 0) >= 3, null, cfg.timeouts.train);
  await waitFor("a validation sample in the gallery (.dreambooth-gallery img.dreambooth-thumb loaded)",
                () => [...document.querySelectorAll(".dreambooth-gallery img.dreambooth-thumb")].some((i) => i.complete && i.naturalWidth > 0),
                null, cfg.timeouts.train);
  report.seen.running = await page.evaluate(readPanel);

  enter("stop from the panel");
  await page.locator("button.dreambooth-stop").click({ timeout: 10000 });
  const stoppedText = await waitFor("the status 'stopped at step N (checkpoint kept)'",
                                    (re) => { const t = document.querySelector(".dreambooth-status")?.textContent ?? "";
                                              return new RegExp(re).test(t) ? t : false; },
                                    STOPPED.source, cfg.timeouts.stop);
  const stoppedAt = Number(STOPPED.exec(stoppedText)[1]);
  report.seen.stopped = { ...(await page.evaluate(readPanel)), step: stoppedAt };
  await page.waitForTimeout(300); // let the chart draw its last point for the picture
  await screenshots(node);
  // The node sends a last status once the trainer has exited; arriving while the reloaded page boots,
  // before the extension listens, the frontend would log it as an unknown message type.
  await waitForIdleServer("the stopped prompt to leave the server's queue");

  enter("reload the page");
  await page.reload({ waitUntil: "load" });
  await waitForApp();
  // The frontend restores the open workflow from the browser's storage a moment after it boots.
  await waitFor(`the workflow restored after the reload (node ${node} in the graph, with its panel)`,
                (id) => !!window.comfyAPI.app.app.graph.getNodeById(id) && !!document.querySelector(".dreambooth-status"),
                node, cfg.timeouts.boot);
  await closeDialogs("reload");
  await page.evaluate(showNode, node);
  const before = report.seen.stopped.points;
  await waitFor(`the run's history in the panel after the reload (data-points >= ${before}, status 'stopped at step ${stoppedAt}')`,
                ({ points, re }) => Number(document.querySelector("canvas.dreambooth-loss")?.dataset.points ?? 0) >= points
                  && new RegExp(re).test(document.querySelector(".dreambooth-status")?.textContent ?? ""),
                { points: before, re: STOPPED.source }, cfg.timeouts.history);
  report.seen.reloaded = await page.evaluate(readPanel);

  enter("resume");
  await queueFromPage();
  const resumed = await waitFor(`the run resuming (status 'resumed from ...' or a step above ${stoppedAt})`,
                                (stopped) => {
                                  const status = document.querySelector(".dreambooth-status")?.textContent ?? "";
                                  const step = /^step (\d+)/.exec(document.querySelector(".dreambooth-step")?.textContent ?? "");
                                  if (/resumed from/.test(status)) return { by: "status", status };
                                  if (step && Number(step[1]) > stopped && !/^stopped/.test(status)) return { by: "step", step: Number(step[1]) };
                                  return false;
                                }, stoppedAt, cfg.timeouts.resume);
  report.seen.resumed = { ...resumed, panel: await page.evaluate(readPanel) };

  enter("stop again");
  await page.locator("button.dreambooth-stop").click({ timeout: 10000 });
  const finalText = await waitFor("the status 'stopped at step N (checkpoint kept)' after the resumed run",
                                  (re) => { const t = document.querySelector(".dreambooth-status")?.textContent ?? "";
                                            return new RegExp(re).test(t) ? t : false; },
                                  STOPPED.source, cfg.timeouts.stop);
  report.seen.final = { ...(await page.evaluate(readPanel)), step: Number(STOPPED.exec(finalText)[1]) };
  await waitForIdleServer("the resumed prompt to leave the server's queue");
  if (report.seen.final.step < stoppedAt)
    problem(`the resumed run stopped at step ${report.seen.final.step}, before the first stop (${stoppedAt})`);
  enter("done");
}

// The LoRA's folder is a full disk (cfg.filler fills it): the panel must keep saying why the run sits at
// its last step for as long as it waits, not for a passing moment, and finish once the space is freed.
async function diskFull(node) {
  enter("queue the training");
  await queueFromPage();
  const waiting = await waitFor("the status 'waiting for disk space: ...'",
                                () => { const t = document.querySelector(".dreambooth-status")?.textContent ?? "";
                                        return t.startsWith("waiting for disk space") ? t : false; },
                                null, cfg.timeouts.firstStep + cfg.timeouts.train);
  report.seen.waiting = await page.evaluate(readPanel);
  report.seen.waitingLevel = await page.evaluate(() => document.querySelector(".dreambooth-status")?.dataset.level ?? null);
  enter("still waiting");
  await page.waitForTimeout(cfg.briefMs + 1500); // longer than a passing message stays
  report.seen.stillWaiting = await page.evaluate(readPanel);
  if (report.seen.stillWaiting.status !== waiting)
    problem(`the waiting message went away while the trainer still waits: ${JSON.stringify(report.seen.stillWaiting.status)}`);
  await screenshots(node);
  enter("free the space");
  fs.unlinkSync(cfg.filler);
  await waitFor("the status 'done: N steps' once the disk has room",
                () => /^done: \d+ steps/.test(document.querySelector(".dreambooth-status")?.textContent ?? ""),
                null, cfg.timeouts.stop);
  report.seen.final = await page.evaluate(readPanel);
  await waitForIdleServer("the prompt to leave the server's queue");
  enter("done");
}

function watchPage() {
  watchPageNoise(page, { baseUrl: cfg.url, report, problem, phase: () => phase });
  // The pack's websocket messages as the page received them, to tell in a failure what the server sent when.
  report.events = [];
  page.on("websocket", (ws) => ws.on("framereceived", ({ payload }) => {
    if (typeof payload !== "string" || !payload.includes('"dreambooth.')) return;
    try {
      const { type, data } = JSON.parse(payload);
      const e = data?.event ?? {};
      report.events.push(`${((Date.now() - report.phases[0].t) / 1000).toFixed(1)} s [${phase}] ${type} node=${data?.node} `
                         + `${e.type ?? ""} ${e.step ?? ""} ${e.message ?? e.status ?? ""}`.trim());
      if (report.events.length > 400) report.events.splice(0, 100);
    } catch { /* not JSON: not ours */ }
  }));
  page.on("dialog", (dialog) => {
    // "Leave site? Changes may not be saved" on the reload, for the edited workflow: leave, as a user would.
    if (dialog.type() === "beforeunload") { dialog.accept().catch(() => {}); return; }
    problem(`browser dialog: ${dialog.type()} ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
}

// Booted: app, graph, canvas and socket exist, the pack's extension is registered and the splash
// screen (frontends since about 1.40) is gone.
async function waitForApp() {
  await waitFor("the frontend to boot (app, graph, canvas, open socket, the pack's extension, no splash screen)",
                () => {
                  const app = window.comfyAPI?.app?.app;
                  return !!(app?.graph && app.canvas && app.vueAppReady && window.comfyAPI.api?.api?.socket?.readyState === 1
                            && (app.extensions ?? []).some((e) => e.name === "dreambooth_lora.train_progress")
                            && !document.getElementById("splash-loader"));
                }, null, cfg.timeouts.boot);
  await page.waitForTimeout(500); // the last extensions finish their set-up
}

// The frontend's dialogs (e.g. "missing nodes") are problems; they are closed so the run can go on.
async function closeDialogs(when) {
  const found = await page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog")].filter((d) => d.getClientRects().length)
      .map((d) => (d.querySelector(".p-dialog-header")?.textContent || d.textContent || "").trim().slice(0, 300)));
  for (const text of found) {
    problem(`dialog shown (${when}): ${text}`);
    await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
}

async function waitForIdleServer(what) {
  await waitFor(what, async () => {
    const res = await window.comfyAPI.api.api.fetchApi("/queue");
    const queue = res.ok ? await res.json() : null;
    return !!queue && queue.queue_running.length === 0 && queue.queue_pending.length === 0;
  }, null, cfg.timeouts.stop);
}

// The Queue/Run button of the top bar (the same test id from frontend 1.32 to 1.58).
async function queueFromPage() {
  const button = page.locator('[data-testid="queue-button"]').first();
  await button.waitFor({ state: "visible", timeout: 20000 });
  await button.click();
}

async function screenshots(nodeId) {
  const dir = cfg.screenshotDir;
  fs.mkdirSync(dir, { recursive: true });
  // The panel: the smallest element holding both the status line and the loss chart.
  const panel = await page.evaluateHandle(() => {
    let el = document.querySelector(".dreambooth-status");
    while (el && !el.querySelector("canvas.dreambooth-loss")) el = el.parentElement;
    return el;
  });
  report.screenshots.panel = path.join(dir, `panel-${cfg.label}.png`);
  await panel.asElement().screenshot({ path: report.screenshots.panel });
  const clip = await page.evaluate(nodeBox, nodeId);
  report.screenshots.node = path.join(dir, `node-${cfg.label}.png`);
  await page.screenshot({ path: report.screenshots.node, clip });
  report.screenshots.page = path.join(dir, `page-${cfg.label}.png`);
  await page.screenshot({ path: report.screenshots.page });
}

// ------------------------------------------------------------------ functions run inside the page

async function loadWorkflow({ workflow, name, remove, widgets }) {
  const app = window.comfyAPI.app.app;
  const problems = [];
  await app.loadGraphData(structuredClone(workflow), true, true, name);
  await new Promise((r) => setTimeout(r, 300));
  const graph = app.graph;
  for (const node of [...graph.nodes]) if (remove.includes(node.type)) graph.remove(node);
  const trains = graph.nodes.filter((n) => n.type === "DreamBoothTrain");
  if (trains.length !== 1) problems.push(`expected one DreamBoothTrain node, found ${trains.length}`);
  const set = {};
  for (const [wname, value] of Object.entries(widgets)) {
    const owners = graph.nodes.filter((n) => (n.widgets ?? []).some((w) => w.name === wname));
    if (owners.length !== 1) { problems.push(`widget ${wname}: ${owners.length} nodes have one, expected 1`); continue; }
    const widget = owners[0].widgets.find((w) => w.name === wname);
    widget.value = value;
    widget.callback?.(value, app.canvas, owners[0]);
    if (widget.value !== value) problems.push(`widget ${wname} is ${JSON.stringify(widget.value)} after setting ${JSON.stringify(value)}`);
    set[wname] = `#${owners[0].id} ${owners[0].type}`;
  }
  graph.setDirtyCanvas(true, true);
  return { problems, trainNode: trains[0]?.id ?? null, set, nodes: graph.nodes.map((n) => `#${n.id} ${n.type}`) };
}

// Scale and scroll so the train node fills most of the view, the panel included.
function showNode(id) {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(id);
  const el = app.canvas.canvas;
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const scale = Math.min(1, (el.clientHeight - 150) / (node.size[1] + title), (el.clientWidth - 120) / node.size[0]);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [80 / scale - node.pos[0], (110 + title) / scale - node.pos[1]];
  app.canvas.setDirty(true, true);
}

// The train node on screen, title bar included, in page pixels.
function nodeBox(id) {
  const vue = document.querySelector(`[data-node-id="${id}"]`);
  if (vue) {
    const r = vue.getBoundingClientRect();
    return { x: Math.max(0, r.x - 8), y: Math.max(0, r.y - 8), width: r.width + 16, height: r.height + 16 };
  }
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(id);
  const ds = app.canvas.ds;
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const rect = app.canvas.canvas.getBoundingClientRect();
  const x = rect.x + (node.pos[0] + ds.offset[0]) * ds.scale;
  const y = rect.y + (node.pos[1] - title + ds.offset[1]) * ds.scale;
  return { x: Math.max(0, x - 8), y: Math.max(0, y - 8), width: node.size[0] * ds.scale + 16,
           height: (node.size[1] + title) * ds.scale + 16 };
}

function readPanel() {
  const one = (sel) => document.querySelector(sel);
  const app = window.comfyAPI?.app?.app;
  const boot = { app: !!app, graph: !!app?.graph, canvas: !!app?.canvas, vueAppReady: !!app?.vueAppReady,
                 socket: window.comfyAPI?.api?.api?.socket?.readyState ?? null,
                 extension: (app?.extensions ?? []).some((e) => e.name === "dreambooth_lora.train_progress"),
                 splash: !!document.getElementById("splash-loader"), nodes: app?.graph?.nodes?.length ?? null };
  const loss = one("canvas.dreambooth-loss");
  const thumbs = [...document.querySelectorAll(".dreambooth-gallery img.dreambooth-thumb")];
  return {
    boot,
    panels: document.querySelectorAll(".dreambooth-status").length,
    inVueNode: !!one(".dreambooth-status")?.closest("[data-node-id]"),
    status: one(".dreambooth-status")?.textContent ?? null,
    step: one(".dreambooth-step")?.textContent ?? null,
    points: loss ? Number(loss.dataset.points ?? NaN) : null,
    thumbs: thumbs.length,
    thumbsLoaded: thumbs.filter((i) => i.complete && i.naturalWidth > 0).length,
    stopButton: one("button.dreambooth-stop") ? { disabled: one("button.dreambooth-stop").disabled } : null,
  };
}

main()
  .catch(async (err) => {
    problem(`failed: ${err.message || err}`);
    if (page && cfg.screenshotDir) {
      fs.mkdirSync(cfg.screenshotDir, { recursive: true });
      report.screenshots.failure = path.join(cfg.screenshotDir, `failure-${cfg.label}.png`);
      await page.screenshot({ path: report.screenshots.failure }).catch(() => {});
    }
  })
  .finally(async () => {
    report.phases = report.phases.map((p, i, all) => ({ name: p.name, s: ((all[i + 1]?.t ?? Date.now()) - p.t) / 1000 }));
    fs.writeFileSync(cfg.result, JSON.stringify(report, null, 1));
    await context?.close().catch(() => {});
  });
