"""Summary, markdown tables, machine description and RESULTS.md update for ``bench_train.py``."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_train:begin -->", "<!-- bench_train:end -->"

# The goals and the reference figures recorded in FACTS on the same work.
TARGET_SPEEDUP = 1.5
TARGET_LAUNCH_S = 6.0
REF_NATIVE_MS = 304.0
REF_DIFFUSERS_TE_MS = 835.0
REF_DIFFUSERS_RSS = 1.7e9
QUIET_LOAD = 0.3  # cores used by other processes above which a run counts as disturbed

# In run order: each of ours next to the peer that trains the same layers.
PEERS = {
    "ours-unet-all": "ours, every UNet layer (unet_target full)",
    "native": "ComfyUI TrainLoraNode (every UNet layer)",
    "ours-unet": "ours, UNet attention",
    "diffusers-unet": "diffusers loop, UNet attention",
    "ours-te": "ours, UNet + text-encoder attention",
    "diffusers-te": "diffusers loop, UNet + text-encoder attention",
    "ours-unet-warm": "ours, UNet attention, warm trainer",
    "ours-te-warm": "ours, UNet + text-encoder attention, warm trainer",
    "ours-unet-all-warm": "ours, every UNet layer, warm trainer",
}
# (ours, peer, what both train): the same-work pairs the targets compare.
SAME_WORK = (
    ("ours-unet-all", "native", "every UNet layer, UNet only"),
    ("ours-unet", "diffusers-unet", "UNet attention q/k/v/out"),
    ("ours-te", "diffusers-te", "UNet + CLIP-L attention"),
)


def markers(scale: str, resolution: int) -> tuple[str, str]:
    """RESULTS.md markers of one recorded configuration (the tiny 64 px run keeps the original ones)."""
    if (scale, resolution) == ("tiny", 64):
        return BEGIN, END
    return f"<!-- bench_train:{scale}-{resolution}px:begin -->", f"<!-- bench_train:{scale}-{resolution}px:end -->"


def heading(scale: str, resolution: int) -> str:
    model = {"full": "SD1.5-shaped random weights (860M-parameter UNet, 2.1 GB checkpoint)",
             "sdxl-tiny": "the tiny SDXL test checkpoint (SDXL blocks at 320 channels, full-size CLIP-L and "
                          "OpenCLIP bigG, 2.4 GB)"}.get(scale, "the tiny test checkpoint")
    return f"Training, {model}, {resolution} px, CPU"


@dataclass
class Sample:
    """One run of one peer."""

    peer: str
    steps: int
    repeat: int
    wall_s: float
    first_step_s: float
    peak_rss: int
    rss_method: str
    step_times: list[float] = field(default_factory=list)  # arrival s of step events 1..N
    reported_ms: float | None = None
    other_load: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _num(x: Any) -> float | None:
    return None if x is None or x != x else float(x)


def summarize(samples: list[Sample], short: int, long: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        mine = [s for s in samples if s.peer == peer]
        if not mine:
            continue
        differenced, in_run = [], []
        for r in sorted({s.repeat for s in mine}):
            a = next((s for s in mine if s.repeat == r and s.steps == short), None)
            b = next((s for s in mine if s.repeat == r and s.steps == long), None)
            if a and b:
                differenced.append(1000 * (b.wall_s - a.wall_s) / (long - short))
            if b and len(b.step_times) >= long:
                # Steps short+1..long of the long run: the same steps the difference counts, timed
                # inside one process, so load-time noise cannot leak in.
                in_run.append(1000 * (b.step_times[long - 1] - b.step_times[short - 1]) / (long - short))
        loads = [s.other_load for s in mine if s.other_load is not None]
        out[peer] = {
            "ms_per_step": median(differenced), "ms_per_step_all": [round(x, 1) for x in differenced],
            "in_run_ms": median(in_run), "in_run_all": [round(x, 1) for x in in_run],
            "reported_ms": median([s.reported_ms for s in mine if s.steps == long and s.reported_ms is not None]),
            "first_step_s": median([s.first_step_s for s in mine]),
            "first_step_all": [round(s.first_step_s, 2) for s in mine],
            "peak_rss": median([float(s.peak_rss) for s in mine]), "rss_method": mine[0].rss_method,
            "rss_increase": median([float(s.extra["rss_increase"]) for s in mine if "rss_increase" in s.extra]),
            "model_load_s": median([float(s.extra["model_load_s"]) for s in mine if "model_load_s" in s.extra]),
            "other_load": median(loads), "other_load_max": max(loads, default=float("nan")),
            "phases": {name: median([s.phases[name] for s in mine if name in s.phases]) for name in mine[0].phases},
        }
    return out


def gb(n: float | None) -> str:
    return "n/a" if n is None or n != n else f"{n / 1e9:.2f} GB"


def ms(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.0f} ms"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def render(summary: dict[str, dict[str, Any]], short: int, long: int, repeats: int, *, scale: str = "tiny",
           resolution: int = 64, in_run_only: bool = False) -> str:
    # The recorded reference figures (FACTS) are for the tiny checkpoint at 64 px only.
    reference = (scale, resolution) == ("tiny", 64)
    basis = "in-run" if in_run_only else "differenced"
    lines = [
        "- **differenced**: " + ("not measured (`--in-run-only`: one run per peer and repeat, no short runs). "
                                 if in_run_only else
                                 f"(wall of the {long}-step run - wall of the {short}-step run) / {long - short}, "
                                 f"median of {repeats} interleaved repeat(s), each repeat in brackets. ")
        + f"The targets use the {basis} figure.",
        f"- **in-run**: steps {short + 1}-{long} of the {long}-step run, timed by this script from the "
        "peer's step events (the same steps, without any load or save inside)"
        + (f", median of {repeats} interleaved repeat(s), each in brackets" if in_run_only else "")
        + "; **own**: the peer's own report.",
        "- launch -> first step and peak RSS: median of all runs; **model load**: ours, the trainer's model-load "
        "phase (read the checkpoint, build the UNet/VAE/CLIP; a cold trainer's includes importing the "
        "diffusers/transformers model code); native, CheckpointLoaderSimple's node time. **other load**: cores "
        f"kept busy by processes outside the benchmark while it ran (median / max); above ~{QUIET_LOAD} the "
        "numbers are disturbed.",
        "",
        "| peer | ms/step differenced | ms/step in-run | own ms/step | launch -> first step | model load | peak RSS "
        "| other load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for peer, s in summary.items():
        rss = gb(s["peak_rss"])
        if _num(s["rss_increase"]) is not None:
            rss += f" (+{gb(s['rss_increase'])} during the prompt)"
        each = ", ".join(f"{x:.0f}" for x in s["ms_per_step_all"])
        each = f" ({each})" if each else ""
        each_in = ", ".join(f"{x:.0f}" for x in s["in_run_all"]) if in_run_only and len(s["in_run_all"]) > 1 else ""
        each_in = f" ({each_in})" if each_in else ""
        load = "n/a" if _num(s["model_load_s"]) is None else f"{s['model_load_s']:.2f} s"
        lines.append(f"| {PEERS[peer]} | {ms(s['ms_per_step'])}{each} | {ms(s['in_run_ms'])}{each_in} "
                     f"| {ms(s['reported_ms'])} | {s['first_step_s']:.2f} s | {load} | {rss} "
                     f"| {s['other_load']:.2f} / {s['other_load_max']:.2f} |")
    lines += ["", "| target (same work) | measured | goal | result |", "|---|---|---|---|"]

    def get(peer: str, key: str) -> float | None:
        return _num(summary.get(peer, {}).get(key))

    references = {"native": REF_NATIVE_MS, "diffusers-te": REF_DIFFUSERS_TE_MS}
    for ours, peer, work in SAME_WORK:
        if ours not in summary or peer not in summary:
            continue
        key = "in_run_ms" if in_run_only else "ms_per_step"
        mine, theirs = get(ours, key), get(peer, key)
        label = f"{PEERS[ours]} vs {PEERS[peer]}, per step ({work})"
        if not mine or not theirs:
            lines.append(f"| {label} | {basis} ms/step not usable ({ms(mine)} vs {ms(theirs)}) "
                         f"| >= {TARGET_SPEEDUP}x | n/a |")
            continue
        measured = [f"{theirs / mine:.2f}x ({mine:.0f} vs {theirs:.0f} ms)"]
        mine_in, theirs_in = get(ours, "in_run_ms"), get(peer, "in_run_ms")
        if not in_run_only and mine_in and theirs_in:
            measured.append(f"in-run {theirs_in / mine_in:.2f}x")
        if reference and peer in references:
            measured.append(f"{references[peer] / mine:.2f}x vs the recorded {references[peer]:.0f} ms")
        lines.append(f"| {label} | {'; '.join(measured)} | >= {TARGET_SPEEDUP}x "
                     f"| {verdict(theirs / mine >= TARGET_SPEEDUP)} |")
    for ours, peer, work in SAME_WORK:
        mine, theirs = get(ours, "peak_rss"), get(peer, "peak_rss")
        if mine is None or theirs is None:
            continue
        ok = mine <= theirs and (not reference or peer == "native" or mine <= REF_DIFFUSERS_RSS)
        goal = "<= the peer's" + (f" and <= {gb(REF_DIFFUSERS_RSS)} (recorded diffusers script)"
                                  if reference and peer != "native" else "")
        what = " (ComfyUI server process)" if peer == "native" else ""
        lines.append(f"| peak RSS, {work}: ours vs {PEERS[peer]}{what} | {gb(mine)} vs {gb(theirs)} | {goal} "
                     f"| {verdict(ok)} |")
    # The goal is the issue's: loading the 2 GB checkpoint; the tiny file's figures are in the table only.
    native_load = get("native", "model_load_s") if scale == "full" else None
    for ours in ("ours-unet-warm", "ours-unet-all", "ours-unet"):
        mine = get(ours, "model_load_s")
        if mine is not None and native_load is not None:
            lines.append(f"| model load: {PEERS[ours]} vs CheckpointLoaderSimple | {mine:.2f} s vs {native_load:.2f} s "
                         f"| <= native | {verdict(mine <= native_load)} |")
            break
    if reference:
        for ours in ("ours-unet", "ours-te", "ours-unet-warm", "ours-te-warm"):
            first = get(ours, "first_step_s")
            if first is not None:
                what = "config handed over -> first step" if ours.endswith("-warm") else "launch -> first step"
                lines.append(f"| {PEERS[ours]}: {what} | {first:.2f} s | <= {TARGET_LAUNCH_S:.0f} s "
                             f"| {verdict(first <= TARGET_LAUNCH_S)} |")
    lines += ["", "Launch phases (median seconds):", ""]
    for peer, s in summary.items():
        lines.append(f"- {PEERS[peer]}: " + ", ".join(f"{k} {v:.2f}" for k, v in s["phases"].items()))
    return "\n".join(lines)


def code_version(watched: tuple[str, ...] = ("trainer",)) -> str:
    """The commit and a hash of the measured code: the files and folders (their *.py) in ``watched``,
    relative to the repository, and which of them have uncommitted edits (read-only git calls)."""
    files: list[Path] = []
    for name in watched:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--", *watched],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    state = f"uncommitted changes in {', '.join(line[3:] for line in dirty.splitlines())}" if dirty else "as committed"
    label = ", ".join(f"{name}/" if (REPO / name).is_dir() else name for name in watched)
    return f"commit {head} ({label} {state}; sha256 {digest})"


def code_changed(before: str, now: str) -> bool:
    """Whether the measured files changed between two code_version() strings; the commit alone may move
    (a results-only commit during a run)."""
    return before.rsplit("sha256", 1)[-1] != now.rsplit("sha256", 1)[-1]


def machine_info() -> dict[str, str]:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text(encoding="utf-8").split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu + (f" ({flags})" if flags else ""),
        "cores": f"{os.cpu_count()} ({usable} usable); every process runs with OMP_NUM_THREADS=1",
        "memory": mem, "os": platform.platform(), "python": platform.python_version(),
        "packages": ", ".join(f"{d} {version(d)}" for d in ("torch", "diffusers", "transformers", "peft",
                                                           "accelerate")),
        "comfyui": "0.3.75 (native peer)",
        "code": code_version(),
    }


def write_results(path: Path, body: str, info: dict[str, str], command: str, total_s: float, *,
                  markers: tuple[str, str] = (BEGIN, END), heading: str = "") -> None:
    """Replace the generated section of ``path`` between ``markers``, keeping everything else; a file
    without them gets the section appended (under ``heading`` when one is given)."""
    begin, end = markers
    section = "\n".join([
        begin, "", f"Recorded {info['date']} with `{command}` (took {total_s / 60:.1f} min).", "",
        *(f"- {k}: {v}" for k, v in info.items() if k != "date"), "", body, "", end])
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Training benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"## {heading}\n\n" if heading else "") + section + "\n"
    path.write_text(text, encoding="utf-8")
