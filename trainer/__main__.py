"""``python -m trainer --config run.json``: the engine's command line.

stdout carries only protocol events (JSON lines); logs go to stderr. The exit code says how the
run ended (see ``protocol.EXIT_*``). ``--config -`` starts a warm trainer that imports its libraries
first and then waits for the config's path on stdin (see ``protocol``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # pragma: no cover - run as a file, not as a module
    sys.exit("run the trainer as a module: python -m trainer --config run.json")

from . import ENGINE_NAME, __version__
from .config import ConfigError, TrainConfig
from .fileio import DISK_FULL_ADVICE, DiskFullError, is_disk_full
from .protocol import (
    ERROR_KINDS,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_STOPPED,
    Commands,
    EventWriter,
    claim_stdout_for_protocol,
    install_interrupt_handler,
    read_config_command,
)

logger = logging.getLogger("trainer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="DreamBooth-LoRA training for Stable Diffusion 1.x/2.x. Events are JSON lines on "
        "stdout; send {\"command\": \"stop\"|\"sample\"|\"save\"} lines on stdin.",
        epilog="config keys:\n" + TrainConfig.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True,
                        help="JSON file with the run's settings, or '-' for a warm start: import the libraries, "
                        "emit 'ready', then read {\"command\": \"config\", \"path\": FILE} from stdin")
    parser.add_argument("--stop-when-stdin-closes", action="store_true",
                        help="treat end of stdin as a stop command (for launchers: an orphaned trainer "
                        "whose parent died stops, saving a checkpoint, instead of training on unseen)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"{ENGINE_NAME} {__version__}")
    return parser


def _error_kind(exc: BaseException) -> tuple[str, str, str]:
    """(kind, message, advice) for an exception that ended the run."""
    from .data import DataError
    from .runtime import is_out_of_memory, oom_advice

    if isinstance(exc, ConfigError):
        return "config", str(exc), ""
    if isinstance(exc, DataError):
        return "data", str(exc), ""
    if is_out_of_memory(exc):
        return "oom", str(exc).splitlines()[0], oom_advice()
    if isinstance(exc, FileExistsError):
        return "config", f"refusing to overwrite {exc.filename}: set overwrite or choose another name", ""
    if isinstance(exc, DiskFullError):
        return "disk", str(exc), ""  # the message already says what to do
    if is_disk_full(exc):
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return "disk", f"the disk is full{where} ({exc.__class__.__name__}: {exc})", DISK_FULL_ADVICE
    return "internal", f"{exc.__class__.__name__}: {exc}", "see the trainer log (stderr) for the traceback"


def _wait_for_config(events: EventWriter) -> str | None:
    """Warm start: pay for the imports now, while nobody waits, then take the run's config path."""
    started = time.monotonic()
    try:
        from . import run  # noqa: F401 - torch and accelerate
        from .models import import_model_libraries

        import_model_libraries()
    except Exception:  # noqa: BLE001 - the run imports them again and reports the failure with its context
        logger.warning("could not import the model libraries ahead of the run", exc_info=True)
    import_s = time.monotonic() - started
    logger.info("warm start: libraries imported in %.1f s; waiting for the run's config on stdin", import_s)
    events.emit("ready", import_s=round(import_s, 3))
    try:
        path = read_config_command(sys.stdin)
    except ValueError as exc:
        raise ConfigError("--config", str(exc)) from exc
    if path is None:
        logger.info("stdin closed before a config arrived: nothing to train")
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    is_main_process = os.environ.get("RANK", "0") == "0"
    events = EventWriter(claim_stdout_for_protocol(), enabled=is_main_process)
    events.emit("hello", engine=ENGINE_NAME, version=__version__, pid=os.getpid(),
                package_dir=os.path.dirname(os.path.abspath(__file__)), protocol_commands=["stop", "sample", "save"])
    config_path: str | None = args.config
    commands = Commands()
    install_interrupt_handler(commands)  # first Ctrl-C: stop and save a checkpoint; second: abort
    try:
        if config_path == "-":
            if os.environ.get("WORLD_SIZE", "1") != "1":
                raise ConfigError("--config", "'-' (warm start) is for one process reading stdin; "
                                  "under accelerate launch pass the config file")
            config_path = _wait_for_config(events)
            if config_path is None:
                return EXIT_OK
        config = TrainConfig.from_json_file(config_path)
    except ConfigError as exc:
        events.emit("error", kind="config", key=exc.key, message=str(exc), advice="")
        logger.error("%s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # the second Ctrl-C while a warm trainer waits for its run
        return EXIT_STOPPED
    if is_main_process:
        commands.listen(sys.stdin, stop_at_eof=args.stop_when_stdin_closes)
    try:
        from .run import train

        result = train(config, events, commands)
    except BaseException as exc:  # noqa: BLE001 - every ending is reported, then mapped to an exit code
        if isinstance(exc, KeyboardInterrupt):
            events.emit("error", kind="internal", message="interrupted (Ctrl-C)", advice="")
            return EXIT_STOPPED
        kind, message, advice = _error_kind(exc)
        if kind == "internal":
            logger.error("training failed:\n%s", traceback.format_exc())
        else:
            logger.error("%s", message)
        settings: list[str] = []
        if kind == "oom":  # the config keys the advice names, in its order, so a launcher can point at them
            from .runtime import OOM_SETTINGS

            settings = list(OOM_SETTINGS)
        events.emit("error", kind=kind, message=message, advice=advice, settings=settings,
                    key=getattr(exc, "key", None), path=str(getattr(exc, "path", "") or ""))
        return ERROR_KINDS[kind]
    events.emit("done", status=result.status, step=result.step,
                lora_path=str(result.lora_path) if result.lora_path else None,
                checkpoint_path=str(result.checkpoint_path) if result.checkpoint_path else None,
                config=json.loads(json.dumps(config.to_dict())))
    return EXIT_STOPPED if result.status == "stopped" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
