"""What the processes of a run do together: sum numbers, unite their entries, let the main process
write while every process hears whether it could, and end the process group. In a single process
each is the plain local operation.

Layer: train. Imports runs (checkpoint writing) and the foundation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmlora.errors import MmloraError
from mmlora.runs import checkpoint as ckpt


class Processes:
    """The collectives of a run on ``accelerator``; ``checkpoints`` is the folder a failed write's
    message names the last good checkpoint in."""

    def __init__(self, accelerator: Any, checkpoints: Path):
        self.accelerator, self.checkpoints = accelerator, checkpoints
        self.many = accelerator.num_processes > 1
        self.is_main = accelerator.is_main_process

    def all_sums(self, *values: float) -> list[float]:
        """Each value summed over the processes (one all-reduce)."""
        if not self.many:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.reduce(t, reduction="sum")]

    def unite(self, entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The union of every process's ``entries`` (keyed, so one entry seen by two processes is one)."""
        if not self.many:
            return dict(entries)
        from accelerate.utils import gather_object

        out: dict[str, dict[str, Any]] = {}
        for part in gather_object([entries]):
            out.update(part)
        return out

    def on_main(self, what: str, where: Path, write: Callable[[], Any], cleanup: Path | None = None) -> Any:
        """``write()`` on the main process; a failed write (``ckpt.writing``) is a one-line error on every
        process, so that the others do not wait for a main process that stopped. Returns what
        ``write`` returned (None on the other processes)."""
        result, error = None, None
        if self.is_main:
            try:
                with ckpt.writing(what, where, self.checkpoints, cleanup):
                    result = write()
            except MmloraError as err:
                error = err
        if self.many and self.all_sums(float(error is not None))[0] and error is None:
            error = MmloraError(f"the main process could not write {what} ({where}); see its message")
        if error is not None:
            raise error
        return result

    def end(self) -> None:
        """Trackers finished and the process group destroyed while Python still runs, as
        torch.distributed asks of a process before it exits.

        The caller drops the DDP wrapper first (keeping the unwrapped model): its reducer holds the
        process group and the gloo work of the last all-reduce, tensors included, and left to the
        interpreter's exit gloo destroys that work after Python is gone and the process aborts
        ("terminate called without an active exception"). Accelerate lets go of its references
        here (under DeepSpeed that destroys the engine: no optimizer step after this)."""
        if self.many:
            self.accelerator.free_memory()  # drops Accelerate's model/optimizer lists; collects garbage
        self.accelerator.end_training()
