// Every example workflow opened in the real frontend, as "Open workflow" would.
//
// Run by tests/test_browser_workflows.py: `node load_workflows.cjs CONFIG.json` with NODE_PATH naming
// the node_modules that holds playwright-core. One page; each workflow is loaded with the app's own
// app.loadGraphData, then read back from the live graph and app.graph.serialize(). What was seen and
// the problems go to cfg.result as JSON; the Python test asserts on it.
"use strict";

const fs = require("fs");
const { chromium } = require("playwright-core");
const { watchPage: watchPageNoise } = require("./known_noise.cjs");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const report = { problems: [], workflows: {}, console: [], ignored: [], jobsApiErrors: 0, seconds: {} };
let phase = "start-up";
let context = null;
let page = null;

const problem = (what) => { report.problems.push(`[${phase}] ${what}`); console.error(`problem: [${phase}] ${what}`); };

async function main() {
  const t0 = Date.now();
  context = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, headless: true, args: cfg.args,
    viewport: { width: cfg.viewport[0], height: cfg.viewport[1] },
  });
  page = context.pages()[0] ?? (await context.newPage());
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  watchPage();
  await page.goto(cfg.url, { waitUntil: "load" });
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app;
    return !!(app?.graph && app.canvas && app.vueAppReady && window.comfyAPI.api?.api?.socket?.readyState === 1
              && (app.extensions ?? []).some((e) => e.name === "dreambooth_lora.train_progress")
              && !document.getElementById("splash-loader"));
  }, null, { timeout: cfg.timeouts.boot * 1000, polling: 250 });
  await page.waitForTimeout(500); // the last extensions finish their set-up
  report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  for (const text of await visibleDialogs()) problem(`dialog shown at start-up: ${text}`);
  report.seconds.boot = (Date.now() - t0) / 1000;

  for (const [name, workflow] of Object.entries(cfg.workflows)) {
    phase = name;
    const t = Date.now();
    const seen = await page.evaluate(checkWorkflow, { name, workflow });
    // A "missing node types" or other dialog opens a moment after the load returns.
    await page.waitForTimeout(cfg.settleMs);
    seen.dialogs = await visibleDialogs();
    report.workflows[name] = seen;
    for (const d of seen.dialogs) problem(`dialog shown: ${d}`);
    for (const m of seen.unregistered) problem(`node type not registered in the frontend: ${m}`);
    for (const w of seen.changed) problem(`widget values changed on load: ${w}`);
    if (seen.nodes !== workflow.nodes.length)
      problem(`${seen.nodes} nodes after the load, the file has ${workflow.nodes.length}`);
    if (seen.links !== workflow.links.length)
      problem(`${seen.links} links after the load, the file has ${workflow.links.length}`);
    report.seconds[name] = (Date.now() - t) / 1000;
  }
  phase = "done";
}

function watchPage() {
  watchPageNoise(page, { baseUrl: cfg.url, report, problem, phase: () => phase });
  page.on("dialog", (dialog) => {
    problem(`browser dialog: ${dialog.type()} ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
}

// The frontend's visible dialogs (e.g. "missing node types"), closed so the next load sees the canvas.
async function visibleDialogs() {
  const found = await page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog")].filter((d) => d.getClientRects().length)
      .map((d) => (d.querySelector(".p-dialog-header")?.textContent || d.textContent || "").trim().slice(0, 300)));
  for (let i = 0; i < found.length; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(200); }
  return found;
}

// ------------------------------------------------------------------ run inside the page

async function checkWorkflow({ name, workflow }) {
  const app = window.comfyAPI.app.app;
  await app.loadGraphData(structuredClone(workflow), true, true, `${name}.json`);
  const graph = app.graph;
  const registered = window.LiteGraph?.registered_node_types ?? {};
  const unregistered = graph.nodes.filter((n) => !registered[n.type] || n.has_errors)
    .map((n) => `#${n.id} ${n.type}${n.has_errors ? " (has errors)" : ""}`);
  const inFile = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.widgets_values ?? []]));
  // What the frontend would save: the graph as serialised, compared node by node with the file.
  const saved = graph.serialize();
  const changed = [];
  for (const node of saved.nodes) {
    const now = node.widgets_values ?? [];
    if (!(node.id in inFile)) changed.push(`#${node.id} ${node.type}: not in the file`);
    else if (JSON.stringify(now) !== JSON.stringify(inFile[node.id]))
      changed.push(`#${node.id} ${node.type}: file ${JSON.stringify(inFile[node.id])} -> frontend ${JSON.stringify(now)}`);
  }
  return {
    nodes: graph.nodes.length, serialized: saved.nodes.length, links: saved.links.length,
    types: [...new Set(graph.nodes.map((n) => n.type))].sort(), unregistered, changed,
  };
}

main()
  .catch((err) => problem(`failed: ${err.message || err}`))
  .finally(async () => {
    fs.writeFileSync(cfg.result, JSON.stringify(report, null, 1));
    await context?.close().catch(() => {});
  });
