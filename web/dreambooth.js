// Live training view on the DreamBooth Train node: status, step/total, loss sparkline, latest sample.
//
// The server relays the trainer's events as `dreambooth.train` websocket messages
// ({node, prompt_id, event}); `node` is the execution id, "12" or "5:12" inside a subgraph.
// app/api come from window.comfyAPI (the frontend's public handles) rather than relative imports,
// so this file works wherever the extension is served from.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_TYPE = "DreamBoothTrain";
const EVENT = "dreambooth.train";
const MAX_POINTS = 5000;

const css = document.createElement("link");
css.rel = "stylesheet";
css.href = new URL("./dreambooth.css", import.meta.url).href;
document.head.appendChild(css);

function lookup(graph, id) {
  if (!graph) return null;
  return graph.getNodeById(id) ?? graph.getNodeById(Number(id)) ?? null;
}

// "5:12" = node 12 inside the subgraph of node 5 (of the root graph).
function findNode(executionId) {
  if (executionId === null || executionId === undefined) return null;
  const parts = String(executionId).split(":");
  let graph = app.rootGraph ?? app.graph;
  for (const id of parts.slice(0, -1)) {
    graph = lookup(graph, id)?.subgraph;
    if (!graph) return null;
  }
  return lookup(graph, parts[parts.length - 1]);
}

function element(tag, className, parent) {
  const el = document.createElement(tag);
  el.className = className;
  parent?.appendChild(el);
  return el;
}

function ensurePanel(node) {
  if (node.__dreambooth) return node.__dreambooth;
  const root = element("div", "dreambooth-panel");
  const panel = {
    root,
    status: element("div", "dreambooth-status", root),
    step: element("div", "dreambooth-step", root),
    canvas: element("canvas", "dreambooth-loss", root),
    image: element("img", "dreambooth-sample", root),
    caption: element("div", "dreambooth-caption", root),
    losses: [],
    total: 0,
  };
  panel.status.textContent = "idle: queue the prompt to train";
  panel.image.alt = "latest validation sample";
  panel.image.hidden = true;
  const widget = node.addDOMWidget("dreambooth_progress", "dreambooth-progress", root, {
    serialize: false, // display only: nothing of it belongs in the saved workflow
    hideOnZoom: false,
    getMinHeight: () => 96,
  });
  widget.serialize = false;
  panel.widget = widget;
  node.__dreambooth = panel;
  return panel;
}

function setStatus(panel, text, level = "info") {
  panel.status.textContent = text;
  panel.status.dataset.level = level;
}

function smooth(values, strength = 0.9) {
  let avg = 0;
  return values.map((v, i) => {
    avg = strength * avg + (1 - strength) * v;
    return avg / (1 - strength ** (i + 1));
  });
}

function drawLoss(panel) {
  const canvas = panel.canvas;
  const width = Math.max(50, canvas.clientWidth || 200);
  const height = Math.max(24, canvas.clientHeight || 48);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const points = panel.losses;
  if (points.length < 2) return;
  const steps = points.map((p) => p[0]);
  const raw = points.map((p) => p[1]);
  const avg = smooth(raw);
  const x0 = steps[0];
  const x1 = Math.max(steps[steps.length - 1], panel.total || 0, x0 + 1);
  const sorted = [...raw].sort((a, b) => a - b);
  const lo = Math.min(sorted[0], ...avg);
  const hi = Math.max(sorted[Math.floor(0.98 * (sorted.length - 1))], ...avg);
  const span = hi - lo || 1;
  const x = (s) => 2 + ((width - 4) * (s - x0)) / (x1 - x0);
  const y = (v) => height - 2 - ((height - 4) * (Math.min(Math.max(v, lo), hi) - lo)) / span;
  const line = (values, style, lineWidth) => {
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(steps[i]), y(v)) : ctx.moveTo(x(steps[i]), y(v))));
    ctx.strokeStyle = style;
    ctx.lineWidth = lineWidth;
    ctx.stroke();
  };
  line(raw, "rgba(140, 170, 220, 0.45)", 1);
  line(avg, "rgb(90, 160, 255)", 2);
}

function onEvent(panel, event) {
  switch (event.type) {
    case "hello":
      panel.losses = [];
      drawLoss(panel);
      setStatus(panel, `trainer ${event.version ?? ""} running (pid ${event.pid})`);
      break;
    case "ready":
      setStatus(panel, `trainer ready (libraries imported in ${Number(event.import_s ?? 0).toFixed(1)} s)`);
      break;
    case "status":
      setStatus(panel, event.message ?? "", event.level === "warning" ? "warning" : "info");
      break;
    case "progress":
      panel.total = event.total ?? panel.total;
      panel.step.textContent =
        event.phase === "train" ? `step ${event.step} / ${event.total}` : `${event.phase}: ${event.step} / ${event.total}`;
      break;
    case "metrics": {
      panel.total = event.total ?? panel.total;
      const loss = Number(event.loss);
      if (Number.isFinite(loss)) {
        panel.losses.push([event.step, loss]);
        if (panel.losses.length > MAX_POINTS) panel.losses.splice(0, panel.losses.length - MAX_POINTS);
      }
      const eta = event.eta_s !== undefined ? ` · eta ${Math.round(event.eta_s)} s` : "";
      const vram = event.vram_peak_gb !== undefined ? ` · VRAM ${Number(event.vram_peak_gb).toFixed(1)} GB` : "";
      panel.step.textContent = `step ${event.step} / ${panel.total || "?"} · loss ${Number.isFinite(loss) ? loss.toFixed(4) : event.loss}${eta}${vram}`;
      drawLoss(panel);
      break;
    }
    case "sample":
      if (event.url) {
        panel.image.src = api.apiURL(event.url);
        panel.image.hidden = false;
        panel.caption.textContent = `step ${event.step}: ${event.prompt ?? ""}`;
      }
      break;
    case "checkpoint":
      setStatus(panel, `checkpoint saved at step ${event.step}`);
      break;
    case "done":
      setStatus(panel, event.status === "stopped" ? `stopped at step ${event.step}` : `done: ${event.step} steps`);
      break;
    case "error":
      setStatus(panel, `error: ${event.message ?? "see the trainer log"}`, "error");
      break;
    default:
      break;
  }
}

// Opening a workflow that trains starts a trainer process on the server ahead of the run (it imports
// torch and diffusers while the user picks photos and settings); the server ends it when unused.
const PREWARM_EVERY_MS = 60_000;
let lastPrewarm = 0;

function prewarmTrainer() {
  const now = Date.now();
  if (now - lastPrewarm < PREWARM_EVERY_MS) return;
  lastPrewarm = now;
  api.fetchApi("/dreambooth/prewarm", { method: "POST" }).catch(() => {});
}

app.registerExtension({
  name: "dreambooth_lora.train_progress",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    ensurePanel(node);
    prewarmTrainer();
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = findNode(detail?.node);
      if (!node || node.comfyClass !== NODE_TYPE || !detail.event) return;
      const panel = ensurePanel(node);
      onEvent(panel, detail.event);
      node.setDirtyCanvas?.(true, false);
    });
  },
});
