"""``python -m trainer --config run.json``: the engine's command line.

stdout carries only protocol events (JSON lines); logs go to stderr. The exit code says how the
run ended (see ``protocol.EXIT_*``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

if __package__ in (None, ""):  # pragma: no cover - run as a file, not as a module
    sys.exit("run the trainer as a module: python -m trainer --config run.json")

from . import ENGINE_NAME, __version__
from .config import ConfigError, TrainConfig
from .protocol import (
    ERROR_KINDS,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_STOPPED,
    Commands,
    EventWriter,
    claim_stdout_for_protocol,
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
    parser.add_argument("--config", required=True, help="JSON file with the run's settings")
    parser.add_argument("--stop-when-stdin-closes", action="store_true",
                        help="treat end of stdin as a stop command (for launchers: an orphaned trainer "
                        "whose parent died stops, saving a checkpoint, instead of training on unseen)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"{ENGINE_NAME} {__version__}")
    return parser


def _error_kind(exc: BaseException) -> tuple[str, str, str]:
    """(kind, message, advice) for an exception that ended the run."""
    from .data import DataError
    from .runtime import OOM_ADVICE, is_out_of_memory

    if isinstance(exc, ConfigError):
        return "config", str(exc), ""
    if isinstance(exc, DataError):
        return "data", str(exc), ""
    if is_out_of_memory(exc):
        return "oom", str(exc).splitlines()[0], OOM_ADVICE
    if isinstance(exc, FileExistsError):
        return "config", f"refusing to overwrite {exc.filename}: set overwrite or choose another name", ""
    return "internal", f"{exc.__class__.__name__}: {exc}", "see the trainer log (stderr) for the traceback"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    is_main_process = os.environ.get("RANK", "0") == "0"
    events = EventWriter(claim_stdout_for_protocol(), enabled=is_main_process)
    events.emit("hello", engine=ENGINE_NAME, version=__version__, pid=os.getpid(),
                package_dir=os.path.dirname(os.path.abspath(__file__)), protocol_commands=["stop", "sample", "save"])
    try:
        config = TrainConfig.from_json_file(args.config)
    except ConfigError as exc:
        events.emit("error", kind="config", key=exc.key, message=str(exc), advice="")
        logger.error("%s", exc)
        return EXIT_CONFIG
    commands = Commands()
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
        events.emit("error", kind=kind, message=message, advice=advice,
                    key=getattr(exc, "key", None), path=str(getattr(exc, "path", "") or ""))
        return ERROR_KINDS[kind]
    events.emit("done", status=result.status, step=result.step,
                lora_path=str(result.lora_path) if result.lora_path else None,
                config=json.loads(json.dumps(config.to_dict())))
    return EXIT_STOPPED if result.status == "stopped" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
