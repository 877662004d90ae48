"""The ``mmlora`` command line: one entry point, a registry of subcommands.

Each subcommand lives in ``mmlora/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; command modules import heavy libraries (torch, transformers) inside ``run``,
so ``mmlora --help`` answers at once.

One error path (:func:`main`): a failure the user can cause (``MmloraError``) prints one line
``mmlora: error: ...`` and exits 2; Ctrl-C prints ``mmlora: interrupted`` and exits 130; a reader
that goes away (``mmlora plan R --json | head``) ends the command quietly (141, as SIGPIPE would);
anything else is a bug in mmlora: its traceback, then one line asking for a report, exit 1.
``mmlora --debug COMMAND`` or ``MMLORA_DEBUG=1`` re-raises every one of them with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from mmlora import __version__
from mmlora.errors import MmloraError
from mmlora.optional import quiet_known_noise

BUG_REPORT = "this is a bug in mmlora; please report it with the command and the traceback above"
#: Exit status of a command whose output pipe closed (128 + SIGPIPE, what a shell reports for it).
EXIT_BROKEN_PIPE = 141


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    #: Module under ``mmlora.commands`` that implements it; None while the command is still planned.
    module: str | None


COMMANDS: tuple[Command, ...] = (
    Command("plan", "show where adapters go, per modality, before anything trains", "plan"),
    Command("train", "train a recipe with the Accelerate trainer", "train"),
    Command("predict", "answer one image from a run or an export", "predict"),
    Command("eval", "evaluate models and runs: caption, seg, fewshot", "eval"),
    Command("export", "export adapters or a merged model", "export"),
    Command("serve", "serve many adapters on one base over HTTP (captions, segmentation)", "serve"),
    Command("demo", "run the embedded default end to end on the shapes world", "demo"),
    Command("data", "generate the shapes world; check and convert datasets", "data"),
    Command("models", "list, build and inspect model presets", "models"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlora",
        description="Multi-modal LoRA: place adapters per modality, train, evaluate.",
        epilog="Run 'mmlora COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mmlora {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error, re-raised (also: MMLORA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        help_text = cmd.help if cmd.module else f"{cmd.help} (not available in this version yet)"
        p = sub.add_parser(cmd.name, help=help_text, description=help_text)
        if cmd.module:
            module = importlib.import_module(f"mmlora.commands.{cmd.module}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` or ``MMLORA_DEBUG`` set to anything but empty, 0, false, no or off."""
    env = os.environ.get("MMLORA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    return env or bool(getattr(args, "debug", False))


def _stdout_to_devnull() -> None:
    """After EPIPE: point stdout at devnull so that Python's flush at exit does not fail again (the
    recipe in the Python docs' notes on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is not a file (captured, replaced)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    run = getattr(args, "_run", None)
    if run is None:
        print(f"mmlora: error: 'mmlora {args.command}' is not available in this version yet", file=sys.stderr)
        return 2
    debug = debug_enabled(args)
    try:
        status = int(run(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the error path, not at interpreter exit
        return status
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except MmloraError as err:
        if debug:
            raise
        print(f"mmlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("mmlora: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if debug:
            raise
        traceback.print_exc()
        print(f"mmlora: internal error: {BUG_REPORT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
