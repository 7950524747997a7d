"""Load the example workflows in the real web UI, check them, and screenshot one with a live training view.

A real ComfyUI starts with the pack, the tiny SD1.5 checkpoint and ControlNet under the file names
the workflows use (so every dropdown value exists), a photo folder and a layout image. A headless
Chromium, driven by Playwright from Node, then opens the UI and, for every
``example_workflows/*.json``:

- loads it with ``app.loadGraphData`` and fails on page errors, console errors, a dialog (e.g.
  "missing nodes"), a node type the frontend does not know, a combo value that is not among the
  options, or widget values that come back different when the frontend serialises the graph;

and for the chosen workflow it also feeds fake ``dreambooth.train`` websocket messages (hello,
progress, falling loss, a sample, a status) through the page's real socket handler, checks that
the train node's panel shows the step and loss, fits the view and saves a PNG.

Needs Node, ``playwright-core`` (``npm install playwright-core`` in any folder outside the repo;
pass its ``node_modules`` with ``--node-modules`` or ``NODE_PATH``) and a Chromium binary
(``--chromium``, default: ``chromium`` on PATH). Run with the test venv:

    .venv/bin/python scripts/screenshot_workflow.py --node-modules /path/to/node_modules
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
DEFAULT_WORKFLOW = "dreambooth_train_then_generate"
DEFAULT_OUT = REPO / "docs" / "workflow_train_generate.png"
VIEWPORT = (1600, 1000)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Settings of a fresh user that would otherwise open a templates dialog over the graph.
# Settings of a fresh user that would otherwise open a templates dialog over the graph, or draw a
# minimap and frame-rate figures over part of it.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def _module(name: str, path: Path) -> ModuleType:
    """A sibling script loaded from its path (scripts/ is not a package and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fake_events(steps: int = 40, total: int = 500) -> list[dict[str, Any]]:
    """Trainer protocol events as a short run on a GPU would send them, with a noisy falling loss
    (illustrative values, not a measurement: they only drive the panel)."""
    events: list[dict[str, Any]] = [
        {"type": "hello", "version": 1, "pid": 4242},
        {"type": "status", "message": "caching latents of 6 photos", "level": "info"},
        {"type": "progress", "phase": "cache", "step": 6, "total": 6},
    ]
    for step in range(1, steps + 1):
        wobble = 0.035 * ((step * 7919) % 13 - 6) / 6
        loss = 0.05 + 0.25 * 0.93 ** step + wobble * (0.3 + 0.7 * 0.95 ** step)
        events.append({"type": "progress", "phase": "train", "step": step * 5, "total": total})
        events.append({"type": "metrics", "step": step * 5, "total": total, "loss": round(loss, 5),
                       "lr": 1e-4, "ms_per_step": 310.0, "eta_s": (total - step * 5) * 0.31, "vram_peak_gb": 5.93})
    events.append({"type": "sample", "step": steps * 5, "path": "toy_00.png", "prompt": "a photo of fac dog on the beach",
                   "url": "/view?filename=toy_00.png&subfolder=my_subject&type=input"})
    events.append({"type": "status", "message": f"training: step {steps * 5} of {total}", "level": "info"})
    return events


def prepare(server: Any, tiny_models: Any, comfyui_root: Path) -> None:
    """Models, photos and UI settings so every value the workflows name exists on the server."""
    wf = _module("dreambooth_scripts_make_workflows", REPO / "scripts" / "make_workflows.py")
    subject = _module("dreambooth_scripts_sample_subject", REPO / "scripts" / "sample_subject.py")
    server.add_model("checkpoints", tiny_models.tiny_sd15_checkpoint(comfyui_root), wf.SD15)
    # Only the file name has to exist for the dropdown; nothing here runs the ControlNet.
    server.add_model("controlnet", tiny_models.tiny_controlnet(comfyui_root), wf.CANNY)
    photos = subject.write_sample_subject(server.input_dir / wf.PHOTOS, count=4)
    shutil.copy2(photos[1], server.input_dir / "example.png")
    # The LoRA the generation workflow loads by name; listed in the dropdown, never read here.
    lora = server.models_dir / "loras" / f"{wf.LORA}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    header = b"{}      "
    lora.write_bytes(struct.pack("<Q", len(header)) + header)
    settings = server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(UI_SETTINGS), encoding="utf-8")


def train_node_id(workflow: dict[str, Any]) -> int | None:
    return next((n["id"] for n in workflow["nodes"] if n["type"] == "DreamBoothTrain"), None)


def run_browser(config: dict[str, Any], node_modules: Path, work: Path) -> dict[str, Any]:
    script = work / "shoot.js"
    script.write_text(JS, encoding="utf-8")
    cfg_path = work / "config.json"
    result_path = work / "result.json"
    config["result"] = str(result_path)
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH: install Node.js (18 or later)")
    proc = subprocess.run([node, str(script), str(cfg_path)], env=env, check=False, timeout=600)
    if not result_path.is_file():
        raise SystemExit(f"the browser script exited {proc.returncode} without a result")
    return json.loads(result_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="example workflow to screenshot (file stem)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--detail", type=Path, default=None,
                        help="also write a close-up of the train node's live panel at 100%% zoom to this PNG")
    parser.add_argument("--node-modules", type=Path, default=os.environ.get("NODE_PATH"),
                        help="node_modules folder holding playwright-core (default: $NODE_PATH)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    if not args.node_modules or not (Path(args.node_modules) / "playwright-core").is_dir():
        parser.error("pass --node-modules DIR (or set NODE_PATH) where `npm install playwright-core` put it")
    if not args.chromium:
        parser.error("no Chromium found: pass --chromium PATH")
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    if args.workflow not in names:
        parser.error(f"--workflow {args.workflow!r} is not one of {names}")

    _module("dreambooth_scripts_support_loader", REPO / "scripts" / "support_loader.py").load_test_support()
    from dreambooth_test_support import comfyui, paths, tiny_models  # noqa: PLC0415

    root = comfyui.provision_comfyui()
    with tempfile.TemporaryDirectory(prefix="workflow shot ") as tmp:
        work = Path(tmp)
        server = comfyui.ComfyServer(root, work / "base")
        server.install_pack(REPO, paths.PACK_NAME)
        prepare(server, tiny_models, root)
        target = json.loads((WORKFLOWS / f"{args.workflow}.json").read_text(encoding="utf-8"))
        with server:
            config = {
                "url": server.url,
                "chromium": args.chromium,
                "args": CHROMIUM_ARGS,
                "profile": str(work / "profile"),
                "viewport": VIEWPORT,
                "pack": paths.PACK_NAME,
                "workflows": {n: json.loads((WORKFLOWS / f"{n}.json").read_text(encoding="utf-8")) for n in names},
                "target": args.workflow,
                "train_node": train_node_id(target),
                "events": fake_events(),
                "out": str(Path(args.out).resolve()),
                "detail": str(Path(args.detail).resolve()) if args.detail else None,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            result = run_browser(config, Path(args.node_modules).resolve(), work)
            # Opening a workflow with a training node asks the server for a warm trainer (web/dreambooth.js).
            warm = server.warm_trainers()
            result["warm_trainers"] = warm
            if train_node_id(target) is not None and not warm:
                result.setdefault("problems", []).append("no warm trainer after opening a training workflow")
    print(json.dumps(result, indent=1))
    if result.get("problems"):
        print(f"FAILED: {len(result['problems'])} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(names)} workflows load cleanly; screenshot {args.out}")
    return 0


JS = r"""
const fs = require("fs");
const { chromium } = require("playwright-core");
const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const report = { problems: [], extension: {}, workflows: {}, panel: null, console: [], ignored: [] };
// Frontend 1.32.9 writes a setting while it boots, before the setting is defined (its
// useRenderModeSetting), and logs this; the stack lies wholly in the frontend's own bundles.
const FRONTEND_BOOT_ERROR = /^TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange \([^)]*\/assets\/index-[^)]*\)\n\s+at Proxy\.set [^]*\/assets\/GraphView-/;
const problem = (what) => { report.problems.push(what); console.error("problem:", what); };
let phase = "start-up";
let context = null;

(async () => {
  context = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, headless: true, args: cfg.args,
    viewport: { width: cfg.viewport[0], height: cfg.viewport[1] },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  // A one-time "try Nodes 2.0" banner, remembered in local storage, would cover the top of the graph.
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  page.on("pageerror", (err) => problem(`[${phase}] page error: ${err.message}`));
  // The frontend asks the online node registry about every node pack; offline, those fail
  // harmlessly. Only what comes from our own server counts.
  // It also probes for optional user files (user.css, saved templates, a workflows folder) and
  // takes a 404 as "none".
  const optional = /^\/(api\/userdata\/(user\.css|comfy\.templates\.json)|user\.css|api\/userdata|favicon\.ico)$/;
  const local = (url) => !url || url.startsWith(cfg.url) || url.startsWith("data:") || url.startsWith("blob:");
  const benign = (url) => !local(url) || optional.test(new URL(url).pathname);
  page.on("console", (msg) => {
    const text = msg.text();
    if (msg.location()?.url && benign(msg.location().url)) { report.ignored.push(`${msg.location().url}: ${text}`); return; }
    const where = msg.location()?.url ? ` (${msg.location().url})` : "";
    if (msg.type() === "error" && FRONTEND_BOOT_ERROR.test(text)) { report.ignored.push(text.split("\n")[0]); return; }
    if (msg.type() === "error") problem(`[${phase}] console error: ${text}${where}`);
    else if (msg.type() === "warning") report.console.push(`[${phase}] ${text}`);
    if (msg.type() === "warning" && /invalid|validation|unknown message|unhandled message/i.test(text))
      problem(`[${phase}] console warning: ${text}`);
  });
  const prefix = `/extensions/${cfg.pack}/`;
  page.on("response", (res) => {
    const url = new URL(res.url());
    if (url.pathname.startsWith(prefix)) report.extension[url.pathname] = res.status();
    if (res.status() >= 400 && !benign(res.url())) problem(`[${phase}] HTTP ${res.status()} for ${url.pathname}`);
  });
  page.on("requestfailed", (req) => !benign(req.url()) && problem(`[${phase}] request failed: ${req.url()} ${req.failure()?.errorText}`));

  await page.goto(cfg.url, { waitUntil: "load" });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.comfyAPI?.api?.api?.socket
                             && window.comfyAPI.app.app.canvas, null, { timeout: 60000 });
  await page.waitForTimeout(1500);
  report.extension.registered = await page.evaluate(() =>
    (window.comfyAPI.app.app.extensions ?? []).some((e) => e.name === "dreambooth_lora.train_progress"));
  if (!report.extension.registered) problem("extension dreambooth_lora.train_progress is not registered");
  if (report.extension[`${prefix}dreambooth.js`] !== 200) problem(`${prefix}dreambooth.js was not served (200)`);
  if (report.extension[`${prefix}dreambooth.css`] !== 200) problem(`${prefix}dreambooth.css was not served (200)`);
  report.startDialogs = await dialogs(page);

  const names = Object.keys(cfg.workflows).sort((a, b) => (a === cfg.target) - (b === cfg.target));
  for (const name of names) {
    phase = name;
    const info = await page.evaluate(checkWorkflow, { name, workflow: cfg.workflows[name] });
    await page.waitForTimeout(800);
    info.dialogs = await dialogs(page);
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

  phase = "live events";
  await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    await app.extensionManager.command.execute("Workspace.ToggleFocusMode");
    await new Promise((r) => setTimeout(r, 300));
  });
  await page.waitForTimeout(300);
  await page.evaluate(fitGraph, 16);
  await page.evaluate(() => {
    // Keep node text drawn at the zoom that fits the whole graph (this page only, not saved).
    const app = window.comfyAPI.app.app;
    app.canvas.min_font_size_for_lod = 0;
    app.canvas.setDirty(true, true);
  });
  const fitted = await page.evaluate(() => ({ scale: window.comfyAPI.app.app.canvas.ds.scale }));
  report.scale = fitted.scale;
  await page.waitForTimeout(500);
  if (cfg.train_node !== null) {
    report.panel = await page.evaluate(sendEvents, { node: cfg.train_node, events: cfg.events });
    await page.waitForTimeout(1000);
    report.panel = { ...report.panel, ...(await page.evaluate(readPanel, cfg.train_node)) };
    const p = report.panel;
    if (p.step !== "step 200 / 500 · 3.2 it/s · eta 1:33 · VRAM 5.9 GB") problem(`panel step text is ${JSON.stringify(p.step)}`);
    if (p.points !== 40) problem(`the loss chart has ${p.points} points, expected 40`);
    if (!p.visible) problem(`panel is not visible on the canvas: ${JSON.stringify(p.rect)}`);
    if (!p.sparkline) problem("loss sparkline canvas is blank");
    if (!p.sampleLoaded) problem("latest sample image did not load");
    if (p.clipped || p.squashed.length) problem(`panel content clipped: ${JSON.stringify(p.heights)} ${p.squashed}`);
  }
  phase = "screenshot";
  await page.screenshot({ path: cfg.out });
  if (cfg.detail && cfg.train_node !== null) {
    const clip = await page.evaluate((id) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      const ds = app.canvas.ds;
      ds.scale = 1;
      ds.offset = [40 - node.pos[0], 60 - node.pos[1]];
      app.canvas.setDirty(true, true);
      return { x: 0, y: 0, width: node.size[0] + 80, height: Math.min(node.size[1] + 100, window.innerHeight) };
    }, cfg.train_node);
    await page.waitForTimeout(800);
    await page.screenshot({ path: cfg.detail, clip });
  }
})().catch((err) => problem(`[${phase}] script failed: ${err.stack || err}`))
  .finally(async () => {
    fs.writeFileSync(cfg.result, JSON.stringify(report, null, 1));
    await context?.close().catch(() => {});
  });

// Scale and offset so the bounding box of all nodes (with titles) fills the canvas; the built-in
// "fit view" leaves a wide margin.
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
}

// Titles of the visible dialogs, closed afterwards so the next step sees the canvas.
async function dialogs(page) {
  const found = await page.evaluate(() =>
    [...document.querySelectorAll(".p-dialog")].filter((d) => d.offsetParent !== null || d.getClientRects().length)
      .map((d) => (d.querySelector(".p-dialog-header")?.textContent || d.textContent || "").trim().slice(0, 300)));
  for (let i = 0; i < found.length; i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(200); }
  return found;
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

// Through the socket's own message handler, so the frontend's routing of custom events is tested too.
async function sendEvents({ node, events }) {
  const api = window.comfyAPI.api.api;
  const trainNode = window.comfyAPI.app.app.graph.getNodeById(node);
  const run_name = trainNode?.widgets?.find((w) => w.name === "lora_name")?.value;
  for (const event of events) {
    const data = JSON.stringify({ type: "dreambooth.train", data: { node: String(node), prompt_id: "demo", run_name, event } });
    api.socket.dispatchEvent(new MessageEvent("message", { data }));
    await new Promise((r) => setTimeout(r, 5));
  }
  return { sent: events.length };
}

async function readPanel(nodeId) {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(nodeId);
  const panel = node?.__dreambooth;
  if (!panel) return { error: "no panel on the train node" };
  const rect = panel.root.getBoundingClientRect();
  const hit = document.elementFromPoint(rect.x + rect.width / 2, rect.y + Math.min(rect.height / 2, 10));
  const ctx = panel.canvas.getContext("2d");
  const pixels = panel.canvas.width && panel.canvas.height
    ? ctx.getImageData(0, 0, panel.canvas.width, panel.canvas.height).data : [];
  let inked = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
  if (!panel.image.hidden && !panel.image.complete) await new Promise((r) => panel.image.addEventListener("load", r, { once: true }));
  return {
    status: panel.status.textContent, step: panel.step.textContent, caption: panel.caption.textContent,
    points: Number(panel.canvas.dataset.points),
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
