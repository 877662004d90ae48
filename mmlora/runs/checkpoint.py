"""Checkpoints: self-contained, written atomically, the last K kept, found again on resume.

A checkpoint folder ``checkpoints/step-NNNNNN/`` holds the adapters in PEFT format, the fully
trained modules and ``manifest.json`` (as ``final/`` does), the processor, the resolved recipe, and
``trainer_state.pt`` (optimizer, scheduler, sampler position, RNG states, step) plus
``trainable.safetensors`` (every trainable tensor by name, for an exact resume). It is written under
a temporary name and renamed into place only when complete, then ``checkpoints/latest`` is replaced
atomically: a crash or SIGKILL during a save never leaves a half-written checkpoint as the latest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
COMPLETE = ".complete"
TRAINABLE = "trainable.safetensors"
TRAINER_STATE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step``."""
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Publish ``tmp`` as ``step-NNNNNN``, point ``latest`` at it, drop checkpoints beyond ``keep_last``."""
    _fsync_tree(tmp)
    (tmp / COMPLETE).write_text(str(step))
    final = root / f"step-{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name)
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` if it is valid, else a scan)."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def save_trainable(folder: Path, model: torch.nn.Module) -> None:
    """Every trainable tensor of ``model`` by name (for an exact resume)."""
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(folder / TRAINABLE))


def load_trainable(folder: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(folder / TRAINABLE)).items():
            params[k].copy_(v)


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Optimizer, scheduler, sampler position, RNG states and step."""
    torch.save(state, folder / TRAINER_STATE)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / TRAINER_STATE, weights_only=True)
