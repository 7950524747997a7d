// Live training view on the DreamBooth Train node: status, step line, loss chart, sample gallery, Stop.
//
// The server relays the trainer's events to every open tab as `dreambooth.train` websocket messages
// ({node, prompt_id, run_name, event}); `node` is the execution id, "12" or "5:12" inside a subgraph,
// and run_name is the LoRA name, which tells this workflow's node from another workflow's node with
// the same id. GET /dreambooth/runs has each recent run's events so far: they are replayed when the
// page opens, a workflow is loaded and the socket reconnects, so a reloaded page shows the run too.
// app/api come from window.comfyAPI (the frontend's public handles) rather than relative imports,
// so this file works wherever the extension is served from.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_TYPE = "DreamBoothTrain";
const EVENT = "dreambooth.train";
const PRESTART_SETTING = "DreamBooth.PrestartTrainer";
const MAX_POINTS = 5000;
const BRIEF_MS = 4000; // how long a passing message (checkpoint saved, a warning) covers "training"
const PHASES = {
  cache: "caching latents", latents: "caching latents", cache_latents: "caching latents",
  class_images: "generating class images", sample: "sampling", sampling: "sampling", validation: "sampling",
};

const css = document.createElement("link");
css.rel = "stylesheet";
css.href = new URL("./dreambooth.css", import.meta.url).href;
document.head.appendChild(css);

// ------------------------------------------------------------------------------------ nodes

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
  const node = lookup(graph, parts[parts.length - 1]);
  return node?.comfyClass === NODE_TYPE ? node : null;
}

// The server's sanitize_lora_name (nodes/train.py), so "my dog.safetensors" matches the run "my dog".
const BAD_CHARS = /[<>:"|?*\x00-\x1f]/g;
const RESERVED = new Set(["CON", "PRN", "AUX", "NUL", ...[1, 2, 3, 4, 5, 6, 7, 8, 9].flatMap((i) => [`COM${i}`, `LPT${i}`])]);
function runName(value) {
  let text = String(value ?? "").trim().replace(/\\/g, "/");
  if (text.toLowerCase().endsWith(".safetensors")) text = text.slice(0, -".safetensors".length);
  const parts = [];
  for (const raw of text.split("/")) {
    let part = raw.trim().replace(BAD_CHARS, "_").replace(/[. ]+$/, "");
    if (!part) continue;
    if (part.startsWith(".")) part = `_${part.slice(1)}`;
    if (RESERVED.has(part.split(".")[0].toUpperCase())) part = `_${part}`;
    parts.push(part);
  }
  return parts.join("/");
}

// The run name this node trains, or null when it cannot be known here (lora_name comes from a link).
function nodeRunName(node) {
  const linked = node.inputs?.find((i) => i.name === "lora_name")?.link;
  const widget = node.widgets?.find((w) => w.name === "lora_name");
  if ((linked !== null && linked !== undefined) || !widget) return null;
  return runName(widget.value);
}

function isThisNodesRun(node, name) {
  const mine = nodeRunName(node);
  return mine === null || name === null || name === undefined || mine === name;
}

// ------------------------------------------------------------------------------------ panel

function element(tag, className, parent) {
  const el = document.createElement(tag);
  el.className = className;
  parent?.appendChild(el);
  return el;
}

function ensurePanel(node) {
  if (node.__dreambooth) return node.__dreambooth;
  const root = element("div", "dreambooth-panel");
  const status = element("div", "dreambooth-status", root);
  const stop = element("button", "dreambooth-stop", root); // top right, beside the status (CSS)
  const step = element("div", "dreambooth-step", root);
  const chart = element("div", "dreambooth-chart", root);
  const canvas = element("canvas", "dreambooth-loss", chart);
  const tooltip = element("div", "dreambooth-tooltip", chart);
  const gallery = element("div", "dreambooth-gallery", root);
  const image = element("img", "dreambooth-sample", root);
  const caption = element("div", "dreambooth-caption", root);
  const panel = { node, root, status, stop, step, chart, canvas, tooltip, gallery, image, caption };
  reset(panel);
  stop.type = "button";
  stop.title = "Stop the training: the trainer saves a checkpoint; queue the prompt again to resume";
  stop.addEventListener("click", (e) => { e.stopPropagation(); requestStop(panel); });
  image.alt = "validation sample";
  image.title = "click to open the full image in a new tab";
  image.addEventListener("click", () => panel.selected && window.open(panel.selected.src, "_blank", "noopener"));
  canvas.addEventListener("pointermove", (e) => hover(panel, e));
  canvas.addEventListener("pointerleave", () => hover(panel, null));
  new ResizeObserver(() => drawLoss(panel)).observe(canvas);
  const widget = node.addDOMWidget("dreambooth_progress", "dreambooth-progress", root, {
    serialize: false, // display only: nothing of it belongs in the saved workflow
    hideOnZoom: false,
    getMinHeight: () => 200,
  });
  widget.serialize = false;
  panel.widget = widget;
  node.__dreambooth = panel;
  watchLoraName(node);
  render(panel);
  return panel;
}

// Forget the shown run: a new run, or this node now trains another LoRA.
function reset(panel) {
  clearTimeout(panel.briefTimer);
  Object.assign(panel, {
    run: null, losses: [], samples: [], selected: null, pinned: false, total: 0, train: null,
    phase: null, phaseStep: 0, phaseTotal: 0, rate: null, eta: null, vram: null, lastTiming: null,
    base: "idle: queue the prompt to train", level: "info", brief: null, final: null, resumed: null,
    stopping: false, hoverIndex: null, waiting: false,
  });
  panel.gallery.replaceChildren();
  panel.image.hidden = true;
  panel.image.removeAttribute("src");
  panel.caption.textContent = "";
  panel.tooltip.hidden = true;
}

function startRun(panel, detail) {
  reset(panel);
  panel.run = { node: String(detail.node), prompt_id: detail.prompt_id ?? null,
                run_name: detail.run_name ?? null, state: detail.state ?? "running" };
}

function setBrief(panel, text, level, replaying) {
  if (replaying) return; // old news when replayed
  clearTimeout(panel.briefTimer);
  panel.brief = { text, level };
  panel.briefTimer = setTimeout(() => { panel.brief = null; render(panel); }, BRIEF_MS);
}

function training(panel) {
  return panel.resumed ? `training · ${panel.resumed}` : "training";
}

function finish(panel, state, text, level = "info") {
  if (panel.run) panel.run.state = state;
  panel.final ??= { text, level };
  panel.stopping = false;
  panel.brief = null;
  panel.phase = null;
}

function addLoss(panel, step, loss) {
  const points = panel.losses;
  while (points.length && points[points.length - 1][0] >= step) points.pop(); // replayed twice, or restarted
  points.push([step, loss]);
  if (points.length > MAX_POINTS) panel.losses = points.filter((_, i) => i % 2 === 0 || i === points.length - 1);
}

function addSample(panel, event) {
  if (!event.url) return;
  const src = api.apiURL(event.url);
  if (panel.samples.some((s) => s.src === src)) return;
  const sample = { src, step: event.step, prompt: event.prompt ?? "", index: event.index ?? 0 };
  panel.samples.push(sample);
  const thumb = document.createElement("img");
  thumb.className = "dreambooth-thumb";
  thumb.loading = "lazy";
  thumb.src = src;
  thumb.alt = thumb.title = `step ${sample.step}: ${sample.prompt}`;
  thumb.addEventListener("click", (e) => {
    e.stopPropagation();
    panel.pinned = true;
    select(panel, sample);
  });
  sample.thumb = thumb;
  // Newest first, by step: a resumed run first sends the samples taken before its checkpoint.
  thumb.dataset.step = String(sample.step);
  const older = [...panel.gallery.children].find((el) => Number(el.dataset.step) < Number(sample.step));
  panel.gallery.insertBefore(thumb, older ?? null);
  const newest = panel.samples.every((s) => Number(s.step) <= Number(sample.step));
  if (!panel.pinned && newest) select(panel, sample);
}

function select(panel, sample) {
  panel.selected = sample;
  panel.image.src = sample.src;
  panel.image.hidden = false;
  panel.caption.textContent = `step ${sample.step}: ${sample.prompt}`;
  for (const s of panel.samples) s.thumb?.classList.toggle("selected", s === sample);
}

// One trainer or node event. `replaying`: from GET /dreambooth/runs, so nothing is brief any more.
function apply(panel, event, replaying = false) {
  const ended = panel.final !== null;
  switch (event.type) {
    case "hello":
      panel.base = `trainer ${event.version ?? ""} running (pid ${event.pid})`;
      break;
    case "ready":
      panel.base = `trainer ready (libraries imported in ${Number(event.import_s ?? 0).toFixed(1)} s)`;
      break;
    case "status": {
      const message = String(event.message ?? "");
      const level = event.level === "warning" ? "warning" : "info";
      if (event.reused) finish(panel, "finished", message);
      else if (event.interrupted) finish(panel, "stopped", "stopped (checkpoint kept)");
      if (ended || event.reused || event.interrupted) {
        panel.status.title = message; // the line keeps the final state; the detail is on hover
      } else if (message.startsWith("resumed from")) {
        panel.resumed = message;
        panel.base = message;
      } else if (event.waiting) {
        // A wait that lasts until the user acts (no room on the disk for the LoRA): on the line until it
        // ends, not a passing message that leaves "training" at the last step with no reason given.
        panel.waiting = true;
        panel.base = message;
        panel.level = "warning";
        clearTimeout(panel.briefTimer);
        panel.brief = null;
      } else if (panel.train) {
        if (panel.waiting) {
          panel.waiting = false;
          panel.base = training(panel);
          panel.level = "info";
        }
        setBrief(panel, message, level, replaying);
      } else {
        panel.base = message;
        panel.level = level;
      }
      break;
    }
    case "progress":
      if (event.phase === "train") {
        panel.phase = "train";
        panel.train = { step: event.step, total: event.total ?? panel.total };
        panel.total = panel.train.total;
        if (!ended) { panel.base = training(panel); panel.level = "info"; }
      } else {
        panel.phase = event.phase ?? "working";
        panel.phaseStep = event.step ?? 0;
        panel.phaseTotal = event.total ?? 0;
      }
      break;
    case "metrics": {
      const step = Number(event.step);
      panel.total = event.total ?? panel.total;
      panel.train = { step, total: panel.total };
      panel.phase = "train";
      if (!ended) { panel.base = training(panel); panel.level = "info"; }
      const loss = Number(event.loss);
      if (Number.isFinite(loss)) addLoss(panel, step, loss);
      const ms = Number(event.ms_per_step);
      const time = Number(event.time);
      if (ms > 0) panel.rate = 1000 / ms;
      else if (Number.isFinite(time) && panel.lastTiming && time > panel.lastTiming.time && step > panel.lastTiming.step)
        panel.rate = (step - panel.lastTiming.step) / (time - panel.lastTiming.time);
      if (Number.isFinite(time)) panel.lastTiming = { step, time };
      panel.eta = event.eta_s !== undefined ? Number(event.eta_s) : null;
      panel.vram = event.vram_peak_gb !== undefined ? Number(event.vram_peak_gb) : null;
      break;
    }
    case "loss_history": {
      // The curve up to the checkpoint a run resumed from; this run's own points come after it.
      const own = panel.losses;
      const points = (event.points ?? []).filter((p) => Number.isFinite(Number(p[1]))).map((p) => [Number(p[0]), Number(p[1])]);
      const last = points.length ? points[points.length - 1][0] : -Infinity;
      panel.losses = [...points, ...own.filter((p) => p[0] > last)];
      break;
    }
    case "sample":
      addSample(panel, event);
      break;
    case "checkpoint":
      if (!ended) setBrief(panel, `checkpoint saved at step ${event.step}`, "info", replaying);
      break;
    case "done":
      panel.final = null;
      if (event.status === "stopped")
        finish(panel, "stopped", Number(event.step) > 0 ? `stopped at step ${event.step} (checkpoint kept)`
                                                        : "stopped before training started (nothing to save)");
      else finish(panel, "finished", `done: ${event.step} steps`);
      break;
    case "error":
      if (panel.final?.level !== "error") panel.final = null;
      finish(panel, "error", `error: ${event.message ?? "see the trainer log"}`, "error");
      break;
    default:
      break;
  }
}

function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const pad = (n) => String(n).padStart(2, "0");
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function stepText(panel) {
  if (panel.phase && panel.phase !== "train") {
    const label = PHASES[panel.phase] ?? String(panel.phase).replace(/_/g, " ");
    return panel.phaseTotal ? `${label} ${panel.phaseStep} / ${panel.phaseTotal}` : label;
  }
  if (!panel.train) return "";
  const parts = [`step ${panel.train.step} / ${panel.train.total || "?"}`];
  if (panel.rate > 0) parts.push(`${panel.rate.toFixed(panel.rate >= 1 ? 1 : 2)} it/s`);
  if (panel.eta !== null && Number.isFinite(panel.eta) && panel.run?.state === "running") parts.push(`eta ${clock(panel.eta)}`);
  if (panel.vram !== null && Number.isFinite(panel.vram)) parts.push(`VRAM ${panel.vram.toFixed(1)} GB`);
  return parts.join(" · ");
}

function render(panel) {
  const shown = panel.final ?? panel.brief ?? { text: panel.base, level: panel.level };
  panel.status.textContent = shown.text;
  panel.status.dataset.level = shown.level;
  if (!panel.final) panel.status.title = shown.text;
  panel.step.textContent = stepText(panel);
  const running = panel.run?.state === "running";
  panel.stop.disabled = !running || panel.stopping;
  panel.stop.textContent = panel.stopping ? "stopping…" : "Stop";
  panel.canvas.dataset.points = String(panel.losses.length);
  panel.gallery.hidden = panel.samples.length === 0;
  drawLoss(panel);
  panel.node.setDirtyCanvas?.(true, false);
}

// ------------------------------------------------------------------------------------ loss chart

function smooth(values, strength = 0.9) {
  let avg = 0;
  return values.map((v, i) => {
    avg = strength * avg + (1 - strength) * v;
    return avg / (1 - strength ** (i + 1));
  });
}

function fmt(v) {
  return Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(1);
}

function chartGeometry(panel) {
  const points = panel.losses;
  const width = Math.max(50, panel.canvas.clientWidth || 200);
  const height = Math.max(24, panel.canvas.clientHeight || 64);
  if (points.length < 1) return { width, height, points };
  const steps = points.map((p) => p[0]);
  const raw = points.map((p) => p[1]);
  const avg = smooth(raw);
  const x0 = steps[0];
  const x1 = Math.max(steps[steps.length - 1], panel.total || 0, x0 + 1);
  const sorted = [...raw].sort((a, b) => a - b);
  // The top 2% of raw values are clipped: one early spike would flatten the rest of the curve.
  const lo = Math.min(sorted[0], ...avg);
  const hi = Math.max(sorted[Math.floor(0.98 * (sorted.length - 1))], ...avg);
  const span = hi - lo || 1;
  const top = 12, bottom = 12; // room for the axis labels
  const x = (s) => 2 + ((width - 4) * (s - x0)) / (x1 - x0);
  const y = (v) => height - bottom - ((height - top - bottom) * (Math.min(Math.max(v, lo), hi) - lo)) / span;
  return { width, height, points, steps, raw, avg, x0, x1, lo, hi, x, y };
}

function drawLoss(panel) {
  const canvas = panel.canvas;
  const g = chartGeometry(panel);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(g.width * ratio);
  canvas.height = Math.round(g.height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, g.width, g.height);
  if (g.points.length < 1) return;
  const line = (values, style, lineWidth) => {
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(g.x(g.steps[i]), g.y(v)) : ctx.moveTo(g.x(g.steps[i]), g.y(v))));
    if (values.length === 1) ctx.lineTo(g.x(g.steps[0]) + 1, g.y(values[0]));
    ctx.strokeStyle = style;
    ctx.lineWidth = lineWidth;
    ctx.stroke();
  };
  line(g.raw, "rgba(140, 170, 220, 0.45)", 1);
  line(g.avg, "rgb(90, 160, 255)", 2);
  ctx.font = "9px sans-serif";
  ctx.fillStyle = "rgba(220, 220, 220, 0.7)";
  ctx.textBaseline = "top";
  ctx.fillText(`loss max ${fmt(g.hi)}`, 3, 1);
  ctx.textBaseline = "bottom";
  ctx.fillText(`min ${fmt(g.lo)}`, 3, g.height - 1);
  ctx.textAlign = "right";
  ctx.fillText(`step ${g.x0} – ${g.x1}`, g.width - 3, g.height - 1);
  if (panel.hoverIndex !== null && panel.hoverIndex < g.points.length) {
    const hx = g.x(g.steps[panel.hoverIndex]);
    ctx.strokeStyle = "rgba(255, 255, 255, 0.35)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(hx, 0);
    ctx.lineTo(hx, g.height);
    ctx.stroke();
  }
}

function hover(panel, event) {
  const g = chartGeometry(panel);
  if (!event || g.points.length < 1) {
    panel.tooltip.hidden = true;
    panel.hoverIndex = null;
    drawLoss(panel);
    return;
  }
  const rect = panel.canvas.getBoundingClientRect();
  // The node may be drawn scaled (canvas zoom): pointer offsets are in screen pixels.
  const px = ((event.clientX - rect.left) / (rect.width || 1)) * g.width;
  const target = g.x0 + ((px - 2) / (g.width - 4)) * (g.x1 - g.x0);
  let best = 0;
  for (let i = 1; i < g.steps.length; i++) if (Math.abs(g.steps[i] - target) < Math.abs(g.steps[best] - target)) best = i;
  panel.hoverIndex = best;
  panel.tooltip.textContent = `step ${g.steps[best]} · loss ${fmt(g.raw[best])} · smoothed ${fmt(g.avg[best])}`;
  panel.tooltip.hidden = false;
  const left = (g.x(g.steps[best]) / g.width) * 100;
  panel.tooltip.style.left = `${Math.min(Math.max(left, 0), 100)}%`;
  panel.tooltip.classList.toggle("flip", left > 50);
  drawLoss(panel);
}

// ------------------------------------------------------------------------------------ stop

async function requestStop(panel) {
  const run = panel.run;
  if (!run || run.state !== "running" || panel.stopping) return;
  panel.stopping = true;
  render(panel);
  let message = null;
  try {
    const res = await api.fetchApi("/dreambooth/stop", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ node: run.node, run_name: run.run_name }),
    });
    if (!res.ok) message = (await res.json().catch(() => ({}))).error ?? `HTTP ${res.status}`;
  } catch (err) {
    message = String(err);
  }
  if (message !== null) {
    panel.stopping = false;
    setBrief(panel, `stop failed: ${message}`, "warning", false);
    restoreHistory(); // it may have ended while the tab was not listening
  }
  render(panel);
}

// ------------------------------------------------------------------------------------ live and history

let arrivedWhileRestoring = null;

function onLive(detail) {
  arrivedWhileRestoring?.push(detail);
  applyLive(detail);
}

function applyLive(detail) {
  const node = findNode(detail?.node);
  if (!node || !detail.event || !isThisNodesRun(node, detail.run_name)) return;
  const panel = ensurePanel(node);
  const run = panel.run;
  if (!run || run.prompt_id !== (detail.prompt_id ?? null) || run.run_name !== (detail.run_name ?? null)) startRun(panel, detail);
  apply(panel, detail.event);
  render(panel);
}

function replay(panel, run) {
  startRun(panel, run);
  for (const event of run.events ?? []) apply(panel, event, true);
  // A run the server saw end without a done or error event (e.g. the trainer never started).
  if (run.state !== "running" && panel.final === null) {
    const text = { stopped: "stopped", finished: "done", error: "error: see the server log" }[run.state] ?? run.state;
    finish(panel, run.state, text, run.state === "error" ? "error" : "info");
  }
  panel.run.state = run.state;
  render(panel);
}

let restoring = null;

// Replays, for each DreamBoothTrain node of the open workflow, its newest run the server still has.
function restoreHistory() {
  restoring ??= (async () => {
    arrivedWhileRestoring = [];
    try {
      const res = await api.fetchApi("/dreambooth/runs");
      if (!res.ok) return;
      const { runs = [] } = await res.json();
      const done = new Set();
      for (const run of runs) { // newest first
        const node = findNode(run.node);
        if (!node || done.has(node) || !isThisNodesRun(node, run.run_name)) continue;
        done.add(node);
        replay(ensurePanel(node), run);
      }
      // Live messages that crossed the request: the replay above may predate them (applying one
      // twice is harmless: loss points and samples are keyed by step and URL).
      for (const detail of arrivedWhileRestoring) applyLive(detail);
    } catch (err) {
      console.warn("DreamBooth: could not read the training history", err);
    } finally {
      arrivedWhileRestoring = null;
      restoring = null;
    }
  })();
  return restoring;
}

let restoreTimer = null;
function restoreSoon() {
  clearTimeout(restoreTimer);
  restoreTimer = setTimeout(restoreHistory, 300);
}

// Another LoRA name is another run: the panel forgets the one it shows and looks for the new name's.
function watchLoraName(node) {
  const widget = node.widgets?.find((w) => w.name === "lora_name");
  if (!widget || widget.__dreamboothWatched) return;
  widget.__dreamboothWatched = true;
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    const panel = node.__dreambooth;
    if (panel?.run && !isThisNodesRun(node, panel.run.run_name)) {
      reset(panel);
      render(panel);
      restoreSoon();
    }
    return result;
  };
}

// ------------------------------------------------------------------------------------ trainer pre-start

function prestartWanted() {
  const value = app.extensionManager?.setting?.get?.(PRESTART_SETTING) ?? app.ui?.settings?.getSettingValue?.(PRESTART_SETTING);
  return value !== false;
}

async function postPrestart(on) {
  try {
    await api.fetchApi("/dreambooth/settings", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prestart_trainer: on }),
    });
  } catch (err) {
    console.warn("DreamBooth: could not change the trainer pre-start setting", err);
  }
}

// Opening a workflow that trains starts a trainer process on the server ahead of the run (it imports
// torch and diffusers while the user picks photos and settings); the server ends it when unused.
const PREWARM_EVERY_MS = 60_000;
let lastPrewarm = 0;

function prewarmTrainer() {
  const now = Date.now();
  if (!prestartWanted() || now - lastPrewarm < PREWARM_EVERY_MS) return;
  lastPrewarm = now;
  api.fetchApi("/dreambooth/prewarm", { method: "POST" }).catch(() => {});
}

// Listening from the moment this file loads, not from setup(): the server sends these messages to every
// tab, and the frontend logs an error for a message type nobody has registered yet (a tab reloaded
// mid-run). Messages before the graph exists find no node and are covered by the history replay.
api.addEventListener(EVENT, ({ detail }) => onLive(detail));

app.registerExtension({
  name: "dreambooth_lora.train_progress",
  settings: [
    {
      id: PRESTART_SETTING,
      category: ["DreamBooth", "Trainer", "Prestart"],
      name: "Start a trainer process in advance when a training workflow is open",
      tooltip: "The trainer imports its libraries (tens of seconds) while you set up the run, so training starts " +
               "sooner. It holds some RAM and no GPU memory until it is given a run. Applies to the whole server.",
      type: "boolean",
      defaultValue: true,
      onChange(value, oldValue) {
        // At start-up (no old value) only an explicit "off" is sent: the server's own default
        // (DREAMBOOTH_WARM_TRAINER_IDLE_S) stands until the user changes this setting.
        if (oldValue === undefined && value !== false) return;
        postPrestart(value !== false).then(() => {
          if (value !== false && (app.rootGraph ?? app.graph)?.nodes?.some((n) => n.comfyClass === NODE_TYPE)) {
            lastPrewarm = 0;
            prewarmTrainer();
          }
        });
      },
    },
  ],
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    ensurePanel(node);
    prewarmTrainer();
  },
  async afterConfigureGraph() {
    restoreSoon();
  },
  setup() {
    api.addEventListener("reconnected", () => restoreHistory());
    // ComfyUI's own end of a prompt, for a run that ended without the trainer saying so.
    for (const [type, state] of [["execution_error", "error"], ["execution_interrupted", "stopped"]]) {
      api.addEventListener(type, ({ detail }) => {
        for (const node of (app.rootGraph ?? app.graph)?.nodes ?? []) {
          const panel = node.__dreambooth;
          if (panel?.run?.state === "running" && panel.run.prompt_id === detail?.prompt_id) {
            finish(panel, state, state === "error" ? "error: the prompt failed (see the node's error)" : "stopped");
            render(panel);
          }
        }
      });
    }
    restoreSoon();
  },
});
