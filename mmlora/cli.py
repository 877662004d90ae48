"""The ``mmlora`` command line: one entry point, a registry of subcommands.

Each subcommand lives in ``mmlora/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; command modules import heavy libraries (torch, transformers) inside ``run``,
so ``mmlora --help`` answers at once. Errors meant for the user (``MmloraError``) print one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mmlora import __version__
from mmlora.errors import MmloraError


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        help_text = cmd.help if cmd.module else f"{cmd.help} (not available in this version yet)"
        p = sub.add_parser(cmd.name, help=help_text, description=help_text)
        if cmd.module:
            module = importlib.import_module(f"mmlora.commands.{cmd.module}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    run = getattr(args, "_run", None)
    if run is None:
        print(f"mmlora: error: 'mmlora {args.command}' is not available in this version yet", file=sys.stderr)
        return 2
    try:
        return int(run(args) or 0)
    except MmloraError as err:
        print(f"mmlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
