"""``python -m tests.train.kill_run RECIPE [WHERE@STEP]``: ``mmlora train`` with a fault injected:
SIGKILL this process when the trainer reports event WHERE at STEP (``mmlora.train.hooks.EventHook``)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from mmlora.config.loading import load_recipe
from mmlora.train.loop import Trainer


def main(recipe_path: str, kill: str | None = None) -> int:
    def on_event(where: str, step: int) -> None:
        if kill == f"{where}@{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(load_recipe(recipe_path), recipe_name=Path(recipe_path).stem, on_event=on_event)
    trainer.setup()
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
