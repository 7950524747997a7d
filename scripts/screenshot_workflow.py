"""Load the example workflows in the real web UI, check them, and take the README's pictures of a real training run.

A real ComfyUI starts with the pack, the tiny SD1.5 checkpoint and ControlNet under the file names
the workflows use (so every dropdown value exists), a photo folder and a layout image. A headless
Chromium, driven by Playwright from Node, then opens the UI and, for every
``example_workflows/*.json``, loads it with ``app.loadGraphData`` and fails on page errors, console
errors, a dialog (e.g. "missing nodes"), a node type the frontend does not know, a combo value that
is not among the options, widget values that come back different when the frontend serialises the
graph, or nodes drawn over each other.

Then it trains for real through the page, as a user would: it opens the chosen workflow, shortens the
training through the nodes' widgets (``SHORT_RUN``: 64 px, rank 4, no text-encoder training, a few
class images, a validation sample every 30 steps), clicks Run, and waits until the real trainer has
put ``--min-steps`` losses in the train node's chart and ``--min-samples`` validation samples in its
gallery. It fits the whole graph into the view for the full picture (``--out``), zooms in on the
train node for the close-up (``--detail``), clicks the panel's Stop button and waits for "stopped at
step N (checkpoint kept)"; ``--when stopped`` takes the pictures after that instead of while it
trains. The model is the tiny random-weight test checkpoint, so the samples are noise-like. The run
is stopped before the workflow's generation half, which the pictures are not about (on the tiny
models it would only add more noise-like images).

The pictures use the newest frontend the browser tests install (1.58.1, served with
``--front-end-root``, classic canvas); ``--frontend 1.32.9`` uses the one ComfyUI 0.3.75 pins
(installed in the venv).

Needs Node, ``playwright-core`` and a Chromium, found as the browser tests find them
(``tests/support/browser.py``): ``python3 scripts/dev.py test --legs browser`` installs them and
the newest frontend. Run with the test venv:

    .venv/bin/python scripts/screenshot_workflow.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
DEFAULT_WORKFLOW = "dreambooth_train_then_generate"
DEFAULT_OUT = REPO / "docs" / "workflow_train_generate.png"
DEFAULT_DETAIL = REPO / "docs" / "train_node_live_panel.png"
PINNED_FRONTEND = "1.32.9"  # the one ComfyUI 0.3.75 pins, installed in the venv
VIEWPORT = (1600, 1000)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Settings of a fresh user that would otherwise open a templates dialog over the graph, or draw a
# minimap and frame-rate figures over part of it; the classic canvas, not the Vue nodes.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
               "Comfy.VueNodes.Enabled": False}
# Set through the page's widgets, by node type: a run two CPU cores get through in minutes that still
# draws a long loss curve and takes several validation samples. Prior preservation stays connected,
# with a few class images generated in few steps.
SHORT_RUN: dict[str, dict[str, Any]] = {
    "DreamBoothDataset": {"resolution": 64},
    "DreamBoothPriorPreservation": {"num_class_images": 4, "class_generation_steps": 5},
    "DreamBoothTrain": {
        "steps": 300, "rank": 4, "alpha": 4.0, "train_text_encoder": False,
        "validation_prompts": "a photo of fac dog on the beach", "validation_steps": 30,
        "checkpointing_steps": 150,
    },
}
# Seconds; each wait in the browser script names what it waited for when it runs out.
TIMEOUTS = {"boot": 60, "train": 1200, "stop": 120}


def _module(name: str, path: Path) -> ModuleType:
    """A sibling script loaded from its path (scripts/ is not a package and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def prepare(server: Any, tiny_models: Any, comfyui_root: Path) -> Path:
    """Models, photos and UI settings so every value the workflows name exists on the server.
    Returns the placeholder LoRA file."""
    wf = _module("dreambooth_scripts_make_workflows", REPO / "scripts" / "make_workflows.py")
    subject = _module("dreambooth_scripts_sample_subject", REPO / "scripts" / "sample_subject.py")
    server.add_model("checkpoints", tiny_models.tiny_sd15_checkpoint(comfyui_root), wf.SD15)
    # The SDXL workflow's files: the tiny SDXL checkpoint and ControlNet under the names it uses.
    server.add_model("checkpoints", tiny_models.tiny_sdxl_checkpoint(comfyui_root), wf.SDXL)
    server.add_model("controlnet", tiny_models.tiny_sdxl_controlnet(comfyui_root), wf.CANNY_SDXL)
    # ComfyUI reads a .pth file with torch.load: the tiny ControlNet's tensors re-saved that way, since
    # the run loads it (upstream of the generation half) before the training starts.
    import torch  # noqa: PLC0415  (heavy: only this function needs it)
    from safetensors.torch import load_file  # noqa: PLC0415

    controlnet = server.models_dir / "controlnet" / wf.CANNY
    controlnet.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_file(tiny_models.tiny_controlnet(comfyui_root)), controlnet)
    photos = subject.write_sample_subject(server.input_dir / wf.PHOTOS, count=4)
    shutil.copy2(photos[1], server.input_dir / "example.png")
    # The LoRA the generation workflow loads by name: it only has to be in the dropdown when the
    # frontend boots; the browser script deletes it before the run, which writes a LoRA of that name.
    lora = server.models_dir / "loras" / f"{wf.LORA}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    header = b"{}      "
    lora.write_bytes(struct.pack("<Q", len(header)) + header)
    settings = server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(UI_SETTINGS), encoding="utf-8")
    return lora


def train_node_id(workflow: dict[str, Any]) -> int | None:
    return next((n["id"] for n in workflow["nodes"] if n["type"] == "DreamBoothTrain"), None)


def run_browser(config: dict[str, Any], node: str, node_modules: Path, work: Path, timeout: float) -> dict[str, Any]:
    """Run the Node script; kill it with its browser if it overruns. Returns its JSON report."""
    script = work / "shoot.js"
    script.write_text(JS, encoding="utf-8")
    cfg_path = work / "config.json"
    result_path = work / "result.json"
    config["result"] = str(result_path)
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    # Its own process group, so a kill also takes Chromium's processes with it.
    proc = subprocess.Popen([node, str(script), str(cfg_path)], env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not result_path.is_file():
        raise SystemExit(f"the browser script exited {proc.returncode} without a result")
    return json.loads(result_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    _module("dreambooth_scripts_support_loader", REPO / "scripts" / "support_loader.py").load_test_support()
    from dreambooth_test_support import browser, comfyui, paths, tiny_models  # noqa: PLC0415

    install_hint = "`python3 scripts/dev.py test --legs browser` installs it"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="example workflow to run and picture (file stem)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG of the whole graph to write")
    parser.add_argument("--detail", default=str(DEFAULT_DETAIL),
                        help="PNG of the train node's live panel, close up, to write ('' for none)")
    parser.add_argument("--when", choices=("running", "stopped"), default="running",
                        help="take the pictures while the trainer runs or after Stop")
    parser.add_argument("--min-steps", type=int, default=200, help="training steps in the chart before the pictures")
    parser.add_argument("--min-samples", type=int, default=3, help="validation samples in the gallery before the pictures")
    parser.add_argument("--frontend", choices=(browser.NEW_FRONTEND_VERSION, PINNED_FRONTEND),
                        default=browser.NEW_FRONTEND_VERSION, help="ComfyUI frontend version to serve")
    parser.add_argument("--node-modules", type=Path, default=browser.node_modules(),
                        help="node_modules folder holding playwright-core (default: the browser tests' own)")
    parser.add_argument("--chromium", default=browser.find_chromium(),
                        help=f"Chromium executable (default: ${browser.CHROMIUM_ENV}, else chromium on PATH)")
    args = parser.parse_args(argv)
    if not args.node_modules or not (Path(args.node_modules) / "playwright-core").is_dir():
        parser.error(f"no playwright-core {browser.PLAYWRIGHT_CORE_VERSION} found: {install_hint} "
                     "(or pass --node-modules DIR)")
    if not args.chromium:
        parser.error(f"no Chromium found: {install_hint} where it can, or pass --chromium PATH")
    node = browser.node_executable()
    if node is None:
        parser.error("node is not on PATH: install Node.js 18 or later")
    extra_args: list[str] = []
    if args.frontend != PINNED_FRONTEND:
        root = browser.frontend_root(args.frontend)
        if not (root / "index.html").is_file():
            parser.error(f"frontend {args.frontend} is not installed: {install_hint} (or pass --frontend {PINNED_FRONTEND})")
        extra_args = ["--front-end-root", str(root)]
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    if args.workflow not in names:
        parser.error(f"--workflow {args.workflow!r} is not one of {names}")
    target = json.loads((WORKFLOWS / f"{args.workflow}.json").read_text(encoding="utf-8"))
    if train_node_id(target) is None:
        parser.error(f"--workflow {args.workflow!r} has no DreamBoothTrain node to run")

    root = comfyui.provision_comfyui()
    with tempfile.TemporaryDirectory(prefix="workflow shot ") as tmp:
        work = Path(tmp)
        server = comfyui.ComfyServer(root, work / "base", extra_args=extra_args)
        server.install_pack(REPO, paths.PACK_NAME)
        placeholder = prepare(server, tiny_models, root)
        with server:
            config = {
                "url": server.url,
                "chromium": args.chromium,
                "args": CHROMIUM_ARGS,
                "profile": str(work / "profile"),
                "viewport": VIEWPORT,
                "pack": paths.PACK_NAME,
                "knownNoise": str(REPO / "tests" / "browser" / "known_noise.cjs"),
                "workflows": {n: json.loads((WORKFLOWS / f"{n}.json").read_text(encoding="utf-8")) for n in names},
                "target": args.workflow,
                "widgets": SHORT_RUN,
                "placeholderLora": str(placeholder),
                "minSteps": args.min_steps,
                "minSamples": args.min_samples,
                "when": args.when,
                "timeouts": TIMEOUTS,
                "out": str(Path(args.out).resolve()),
                "detail": str(Path(args.detail).resolve()) if args.detail else None,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            result = run_browser(config, node, Path(args.node_modules).resolve(), work,
                                 timeout=sum(TIMEOUTS.values()) + 300)
            result["seconds"] = round(time.monotonic() - started)
            if result.get("problems"):
                result["server_log"] = server.log_tail(4000).splitlines()
    print(json.dumps(result, indent=1))
    if result.get("problems"):
        print(f"FAILED: {len(result['problems'])} problem(s)", file=sys.stderr)
        return 1
    shots = ", ".join(str(p) for p in (args.out, args.detail) if p)
    print(f"ok: {len(names)} workflows load cleanly; frontend {result.get('frontend')}; "
          f"pictures at step {result['panel']['trainStep']} ({args.when}): {shots}")
    return 0


JS = r"""
const fs = require("fs");
const { chromium } = require("playwright-core");
const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const report = { problems: [], extension: {}, workflows: {}, prewarm: [], panel: null, console: [], ignored: [] };
// The frontend's own noise on a healthy page, shared with the tests (tests/browser/known_noise.cjs).
const { FRONTEND_BOOT_ERROR, OPTIONAL, JOBS_API, JOBS_API_ERROR, FRONTEND_LAYOUT_WARNING } = require(cfg.knownNoise);
const STOPPED = /^stopped at step (\d+) \(checkpoint kept\)/;
const problem = (what) => { report.problems.push(what); console.error("problem:", what); };
let phase = "start-up";
let context = null;
let page = null;

(async () => {
  context = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, headless: true, args: cfg.args,
    viewport: { width: cfg.viewport[0], height: cfg.viewport[1] },
  });
  page = context.pages()[0] ?? (await context.newPage());
  // A one-time "try Nodes 2.0" banner, remembered in local storage, would cover the top of the graph.
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  watchPage();

  await page.goto(cfg.url, { waitUntil: "load" });
  await waitFor("the frontend to boot (app, graph, canvas, open socket, no splash screen)", () => {
    const app = window.comfyAPI?.app?.app;
    return !!(app?.graph && app.canvas && window.comfyAPI.api?.api?.socket?.readyState === 1
              && !document.getElementById("splash-loader"));
  }, null, cfg.timeouts.boot);
  await page.waitForTimeout(1500);
  report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  report.extension.registered = await page.evaluate(() =>
    (window.comfyAPI.app.app.extensions ?? []).some((e) => e.name === "dreambooth_lora.train_progress"));
  const prefix = `/extensions/${cfg.pack}/`;
  if (!report.extension.registered) problem("extension dreambooth_lora.train_progress is not registered");
  if (report.extension[`${prefix}dreambooth.js`] !== 200) problem(`${prefix}dreambooth.js was not served (200)`);
  if (report.extension[`${prefix}dreambooth.css`] !== 200) problem(`${prefix}dreambooth.css was not served (200)`);
  report.startDialogs = await dialogs();

  // The target last, so it stays open for the run.
  const names = Object.keys(cfg.workflows).sort((a, b) => (a === cfg.target) - (b === cfg.target));
  for (const name of names) {
    phase = name;
    const info = await page.evaluate(checkWorkflow, { name, workflow: cfg.workflows[name] });
    await page.waitForTimeout(800);
    info.dialogs = await dialogs();
    report.workflows[name] = info;
    for (const d of info.dialogs) problem(`[${name}] dialog shown: ${d}`);
    for (const m of info.missing) problem(`[${name}] node type unknown to the frontend: ${m}`);
    for (const c of info.badCombos) problem(`[${name}] combo value not among the options: ${c}`);
    for (const w of info.changed) problem(`[${name}] widget values changed on load: ${w}`);
    for (const o of info.overlaps) problem(`[${name}] nodes overlap: ${o}`);
    if (info.nodes !== cfg.workflows[name].nodes.length || info.links !== cfg.workflows[name].links.length)
      problem(`[${name}] ${info.nodes} nodes / ${info.links} links after load, file has ` +
              `${cfg.workflows[name].nodes.length} / ${cfg.workflows[name].links.length}`);
  }
  if (report.problems.length) throw new Error("a workflow did not load cleanly");
  // Opening a workflow with a training node asks the server for a warm trainer (web/dreambooth.js).
  // Starting it takes a while: its answer comes some seconds after the request.
  for (let waited = 0; !report.prewarm.some((r) => r.warm) && waited < cfg.timeouts.boot; waited++) await page.waitForTimeout(1000);
  if (!report.prewarm.some((r) => r.warm))
    problem(`no warm trainer after opening a training workflow (POST /dreambooth/prewarm answered ${JSON.stringify(report.prewarm)})`);

  phase = "short run";
  // The training writes its LoRA under the placeholder's name and refuses to replace a file it did not
  // train. The placeholder only had to be in the loader's dropdown, which the frontend read at boot.
  fs.rmSync(cfg.placeholderLora, { force: true });
  const set = await page.evaluate(setWidgets, cfg.widgets);
  report.widgets = set;
  for (const p of set.problems) problem(p);
  if (set.problems.length) throw new Error("the workflow could not be set up for a short run");
  const node = set.trainNode;
  // The top bar's Queue/Run button (the same test id from frontend 1.32 to 1.58), before focus mode hides it.
  phase = "run";
  const button = page.locator('[data-testid="queue-button"]').first();
  await button.waitFor({ state: "visible", timeout: 20000 });
  await button.click();
  await page.evaluate(async () => {
    await window.comfyAPI.app.app.extensionManager.command.execute("Workspace.ToggleFocusMode");
  });
  await page.waitForTimeout(500);
  await page.evaluate(fitGraph, 16);
  await progress(`${cfg.minSteps} steps in the loss chart and ${cfg.minSamples} validation samples in the gallery`,
                 // "training" again, not a passing "checkpoint saved" line.
                 (p) => p.trainStep >= cfg.minSteps && p.thumbsLoaded >= cfg.minSamples && /^training/.test(p.status),
                 node, cfg.timeouts.train);
  report.running = await page.evaluate(readPanel, node);
  if (cfg.when === "running") await pictures(node, report.running);

  phase = "stop";
  await page.evaluate(fitGraph, 16);
  await page.locator("button.dreambooth-stop").click({ timeout: 10000 });
  const stoppedText = await waitFor("the status 'stopped at step N (checkpoint kept)'", (re) => {
    const t = document.querySelector(".dreambooth-status")?.textContent ?? "";
    return new RegExp(re).test(t) ? t : false;
  }, STOPPED.source, cfg.timeouts.stop);
  report.stoppedAt = Number(STOPPED.exec(stoppedText)[1]);
  await page.waitForTimeout(500); // the chart draws its last point
  report.stopped = await page.evaluate(readPanel, node);
  if (cfg.when === "stopped") await pictures(node, report.stopped);
  // The node raises the interruption once the trainer has exited; wait so the server shuts down idle.
  await waitFor("the stopped prompt to leave the server's queue", async () => {
    const res = await window.comfyAPI.api.api.fetchApi("/queue");
    const queue = res.ok ? await res.json() : null;
    return !!queue && queue.queue_running.length === 0 && queue.queue_pending.length === 0;
  }, null, cfg.timeouts.stop);
  phase = "done";
})().catch((err) => problem(`[${phase}] script failed: ${err.stack || err}`))
  .finally(async () => {
    fs.writeFileSync(cfg.result, JSON.stringify(report, null, 1));
    await context?.close().catch(() => {});
  });

function watchPage() {
  page.on("pageerror", (err) => problem(`[${phase}] page error: ${err.message}`));
  // The frontend asks the online node registry about every node pack; offline, those fail
  // harmlessly. Only what comes from our own server counts.
  // It also probes for optional user files (user.css, saved templates, a workflows folder) and
  // takes a 404 as "none".
  const local = (url) => !url || url.startsWith(cfg.url) || url.startsWith("data:") || url.startsWith("blob:");
  const benign = (url) => !local(url) || OPTIONAL.test(new URL(url).pathname);
  page.on("console", (msg) => {
    const text = msg.text();
    if (msg.location()?.url && benign(msg.location().url)) { report.ignored.push(`${msg.location().url}: ${text}`); return; }
    const where = msg.location()?.url ? ` (${msg.location().url})` : "";
    if (msg.type() === "error" && FRONTEND_BOOT_ERROR.test(text)) { report.ignored.push(text.split("\n")[0]); return; }
    if (msg.type() === "error" && JOBS_API_ERROR.test(text)) { report.jobsApiErrors = (report.jobsApiErrors ?? 0) + 1; return; }
    // The browser's own line for a failed request; the response handler below judges the request.
    if (msg.type() === "error" && /^Failed to load resource/.test(text)) { report.ignored.push(`${msg.location()?.url}: ${text}`); return; }
    if (msg.type() === "warning" && FRONTEND_LAYOUT_WARNING.test(text)) { report.ignored.push(text); return; }
    if (msg.type() === "error") problem(`[${phase}] console error: ${text}${where}`);
    else if (msg.type() === "warning") report.console.push(`[${phase}] ${text}`);
    if (msg.type() === "warning" && /invalid|validation|unknown message|unhandled message/i.test(text))
      problem(`[${phase}] console warning: ${text}`);
  });
  const prefix = `/extensions/${cfg.pack}/`;
  page.on("response", async (res) => {
    const url = new URL(res.url());
    if (url.pathname.startsWith(prefix)) report.extension[url.pathname] = res.status();
    if (/^(\/api)?\/dreambooth\/prewarm$/.test(url.pathname)) report.prewarm.push(await res.json().catch(() => ({ status: res.status() })));
    if (res.status() === 404 && JOBS_API.test(url.pathname)) return;
    if (res.status() >= 400 && !benign(res.url())) problem(`[${phase}] HTTP ${res.status()} for ${url.pathname}`);
  });
  page.on("requestfailed", (req) => {
    if (benign(req.url()) || JOBS_API.test(new URL(req.url()).pathname)) return;
    problem(`[${phase}] request failed: ${req.url()} ${req.failure()?.errorText}`);
  });
  // A node that fails before the trainer starts reports it only as the prompt's execution error.
  page.on("websocket", (ws) => ws.on("framereceived", ({ payload }) => {
    if (typeof payload !== "string" || !payload.includes('"execution_error"')) return;
    try {
      const { type, data } = JSON.parse(payload);
      if (type === "execution_error") problem(`[${phase}] ${data.node_type} #${data.node_id} failed: ${data.exception_message}`);
    } catch { /* not JSON: not ComfyUI's */ }
  }));
  page.on("dialog", (dialog) => {
    problem(`[${phase}] browser dialog: ${dialog.type()} ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
}

// Wait until `fn(arg)` in the page returns a truthy value; on timeout, fail naming what was awaited
// and what the panel showed last.
async function waitFor(what, fn, arg, timeoutS) {
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout: timeoutS * 1000, polling: 250 });
    return await handle.jsonValue();
  } catch (err) {
    if (!/Timeout/i.test(String(err))) throw err;
    const panel = await page.evaluate(readPanel, null).catch((e) => `unreadable: ${e}`);
    throw new Error(`timed out after ${timeoutS} s waiting for ${what}; the panel showed ${JSON.stringify(panel)}`);
  }
}

// Like waitFor, printing the panel's progress as it changes; fails at once on an error status.
async function progress(what, done, node, timeoutS) {
  const end = Date.now() + timeoutS * 1000;
  let last = "";
  for (;;) {
    const p = await page.evaluate(readPanel, node);
    const line = `${p.status} | ${p.step} | ${p.points} points, ${p.thumbsLoaded} samples`;
    if (line !== last) { console.error(`panel: ${line}`); last = line; }
    if (done(p)) return p;
    if (report.problems.length) throw new Error(`gave up waiting for ${what}`);
    if (p.level === "error" || /^(stopped|error|done|failed)/.test(p.status ?? ""))
      throw new Error(`the run ended before ${what}: ${JSON.stringify(p)}`);
    if (Date.now() > end) throw new Error(`timed out after ${timeoutS} s waiting for ${what}; the panel showed ${JSON.stringify(p)}`);
    await page.waitForTimeout(2000);
  }
}

// The whole graph fitted into the view (--out), then the train node's panel close up (--detail).
async function pictures(node, panel) {
  phase = "pictures";
  const shown = await dialogs();
  for (const d of shown) problem(`dialog over the graph: ${d}`);
  if (!panel.visible) problem(`the panel is not visible on the canvas: ${JSON.stringify(panel.rect)}`);
  if (!panel.sparkline) problem("the loss chart is blank");
  if (panel.clipped || panel.squashed.length) problem(`panel content clipped: ${JSON.stringify(panel.heights)} ${panel.squashed}`);
  report.panel = panel;
  await page.evaluate(fitGraph, 16);
  await page.waitForTimeout(800);
  report.scale = await page.evaluate(() => window.comfyAPI.app.app.canvas.ds.scale);
  await page.screenshot({ path: cfg.out });
  if (!cfg.detail) return;
  const clip = await page.evaluate(showPanel, { id: node, scale: 1.5, from: "validation_steps" });
  await page.waitForTimeout(800);
  await page.screenshot({ path: cfg.detail, clip });
  await page.evaluate(fitGraph, 16);
}

// Titles of the visible dialogs, closed afterwards so the next step sees the canvas.
async function dialogs() {
  const found = await page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog")].filter((d) => d.offsetParent !== null || d.getClientRects().length)
      .map((d) => (d.querySelector(".p-dialog-header")?.textContent || d.textContent || "").trim().slice(0, 300)));
  for (let i = 0; i < found.length; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(200); }
  return found;
}

// ------------------------------------------------------------------ functions run inside the page

// Scale and offset so the bounding box of all nodes (with titles) fills the canvas; the built-in
// "fit view" leaves a wide margin. Node text stays drawn at that zoom (this page only, not saved).
function fitGraph(pad) {
  const app = window.comfyAPI.app.app;
  // The title bar, and above it the badge naming the node's pack.
  const title = (window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30) + 22;
  const nodes = app.graph.nodes;
  const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const el = app.canvas.canvas;
  const w = el.clientWidth, h = el.clientHeight;
  const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [(w / scale - (x1 - x0)) / 2 - x0, (h / scale - (y1 - y0)) / 2 - y0];
  app.canvas.min_font_size_for_lod = 0;
  app.canvas.setDirty(true, true);
}

// The train node's panel zoomed in, from the widget `from` down; returns the clip in page pixels.
function showPanel({ id, scale, from }) {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(id);
  const ds = app.canvas.ds;
  const box = app.canvas.canvas.getBoundingClientRect();
  // The panel's top in canvas units below the node's origin, from where it is drawn now.
  const panelTop = (node.__dreambooth.root.getBoundingClientRect().y - box.y) / ds.scale - ds.offset[1] - node.pos[1];
  const widget = node.widgets.find((w) => w.name === from);
  const above = panelTop - (widget?.last_y ?? widget?.y ?? panelTop - 60) + 4;
  const margin = 12;
  ds.scale = scale;
  ds.offset = [2 * margin / scale - node.pos[0], 2 * margin / scale + above - node.pos[1] - panelTop];
  app.canvas.setDirty(true, true);
  const height = (node.size[1] - panelTop + above) * scale + 3 * margin;
  return { x: box.x + margin, y: box.y + margin, width: node.size[0] * scale + 2 * margin,
           height: Math.min(height, box.height - margin) };
}

async function checkWorkflow({ name, workflow }) {
  const app = window.comfyAPI.app.app;
  await app.loadGraphData(structuredClone(workflow), true, true, `${name}.json`);
  await new Promise((r) => setTimeout(r, 300));
  const graph = app.graph;
  const saved = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.widgets_values ?? []]));
  const out = { nodes: graph.nodes.length, links: 0, missing: [], badCombos: [], changed: [] };
  out.links = [...(graph.links?.values?.() ?? Object.values(graph.links ?? {}))].length;
  for (const node of graph.nodes) {
    const label = `#${node.id} ${node.type}`;
    if (node.has_errors || !node.comfyClass || node.constructor?.nodeData === undefined) out.missing.push(label);
    for (const w of node.widgets ?? []) {
      if (w.type !== "combo") continue;
      let values = w.options?.values;
      if (typeof values === "function") values = values(w, node);
      if (Array.isArray(values) && !values.includes(w.value))
        out.badCombos.push(`${label}.${w.name} = ${JSON.stringify(w.value)} (options: ${values.slice(0, 8).join(", ")})`);
    }
    const now = node.serialize().widgets_values ?? [];
    if (JSON.stringify(now) !== JSON.stringify(saved[node.id]))
      out.changed.push(`${label}: file ${JSON.stringify(saved[node.id])} -> frontend ${JSON.stringify(now)}`);
  }
  // Boxes with the title bar: the frontend grows nodes that are too small, so a file with
  // sizes that are too small shows nodes drawn over each other.
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const boxes = graph.nodes.map((n) => [n, n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
  out.overlaps = [];
  for (let i = 0; i < boxes.length; i++)
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, ax0, ay0, ax1, ay1] = boxes[i];
      const [b, bx0, by0, bx1, by1] = boxes[j];
      if (ax0 < bx1 && bx0 < ax1 && ay0 < by1 && by0 < ay1) out.overlaps.push(`#${a.id} ${a.type} and #${b.id} ${b.type}`);
    }
  return out;
}

// Widget values by node type, set as the UI sets them (value, then the widget's callback).
function setWidgets(byType) {
  const app = window.comfyAPI.app.app;
  const problems = [];
  const set = {};
  for (const [type, widgets] of Object.entries(byType)) {
    const nodes = app.graph.nodes.filter((n) => n.type === type);
    if (nodes.length !== 1) { problems.push(`expected one ${type} node, found ${nodes.length}`); continue; }
    for (const [name, value] of Object.entries(widgets)) {
      const widget = nodes[0].widgets?.find((w) => w.name === name);
      if (!widget) { problems.push(`${type} has no widget ${name}`); continue; }
      widget.value = value;
      widget.callback?.(value, app.canvas, nodes[0]);
      if (widget.value !== value) problems.push(`${type}.${name} is ${JSON.stringify(widget.value)} after setting ${JSON.stringify(value)}`);
      set[`${type}.${name}`] = widget.value;
    }
  }
  app.graph.setDirtyCanvas(true, true);
  const train = app.graph.nodes.find((n) => n.type === "DreamBoothTrain");
  return { problems, set, trainNode: train?.id ?? null };
}

async function readPanel(nodeId) {
  const app = window.comfyAPI.app.app;
  const node = nodeId === null ? app.graph.nodes.find((n) => n.__dreambooth) : app.graph.getNodeById(nodeId);
  const panel = node?.__dreambooth;
  if (!panel) return { error: "no panel on the train node" };
  const rect = panel.root.getBoundingClientRect();
  const hit = document.elementFromPoint(rect.x + rect.width / 2, rect.y + Math.min(rect.height / 2, 10));
  const ctx = panel.canvas.getContext("2d");
  const pixels = panel.canvas.width && panel.canvas.height
    ? ctx.getImageData(0, 0, panel.canvas.width, panel.canvas.height).data : [];
  let inked = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
  const thumbs = [...panel.gallery.querySelectorAll("img.dreambooth-thumb")];
  const step = /^step (\d+)/.exec(panel.step.textContent ?? "");
  return {
    status: panel.status.textContent, level: panel.status.dataset.level ?? null, step: panel.step.textContent,
    trainStep: step ? Number(step[1]) : 0, caption: panel.caption.textContent,
    points: Number(panel.canvas.dataset.points),
    thumbs: thumbs.length, thumbsLoaded: thumbs.filter((i) => i.complete && i.naturalWidth > 0).length,
    rect: { x: rect.x, y: rect.y, w: rect.width, h: rect.height },
    visible: rect.width > 40 && rect.height > 40 && !!hit && panel.root.contains(hit),
    sparkline: inked > 20, inked, sampleLoaded: !panel.image.hidden && panel.image.naturalWidth > 0,
    nodeSize: [...node.size], nodePos: [...node.pos],
    clipped: panel.root.scrollHeight > panel.root.clientHeight + 1,
    heights: { panel: panel.root.clientHeight, content: panel.root.scrollHeight,
               parts: [...panel.root.children].map((c) => `${c.className}:${c.hidden ? "hidden" : c.offsetHeight}`) },
    squashed: [panel.status, panel.step, panel.caption].filter((el) => el.textContent && el.offsetHeight < 10)
      .map((el) => `${el.className} ${el.offsetHeight}px`),
  };
}
"""


if __name__ == "__main__":
    sys.exit(main())
