"""Checkpoints: self-contained, written atomically, the last K kept, found again on resume.

A checkpoint folder ``checkpoints/step-NNNNNN/`` holds the adapters in PEFT format, the fully
trained modules and ``manifest.json`` (as ``final/`` does), the processor, the resolved recipe, and
``trainer_state.pt`` (optimizer, scheduler, sampler position, RNG states, step) plus
``trainable.safetensors`` (every trainable tensor by name, for an exact resume). It is written under
a temporary name and renamed into place only when complete, then ``checkpoints/latest`` is replaced
atomically: a crash or SIGKILL during a save never leaves a half-written checkpoint as the latest.

``fingerprint.json`` records what a resume must match (base model, placement plan, training data,
processes, global batch, seed): :func:`fingerprint_changes` names what differs. A write that fails
(a full disk, a read-only folder, a path under a file) ends in :func:`writing`'s one-line error that
names the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from mmlora.errors import MmloraError

LATEST = "latest"
COMPLETE = ".complete"
TRAINABLE = "trainable.safetensors"
TRAINER_STATE = "trainer_state.pt"
FINGERPRINT = "fingerprint.json"


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


def resumable(resume: str, root: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The checkpoint ``train.resume`` names (``auto``: the latest under ``root``; ``never``; a path),
    or None; refused in one line when it is incomplete or its fingerprint differs from ``fingerprint``
    (a checkpoint from before fingerprints is taken as it is)."""
    if resume == "never":
        return None
    found = latest(root) if resume == "auto" else Path(resume)
    if found is None:
        return None
    if not is_complete(found):
        raise MmloraError(f"train.resume: {found} is not a complete checkpoint")
    recorded = load_fingerprint(found)
    changes = fingerprint_changes(recorded, fingerprint) if recorded is not None else []
    if changes:
        raise MmloraError(f"train.resume: checkpoint {found} was written by a different setup ({'; '.join(changes)}); "
                          "resume with the recipe it was made with, or start over with train.resume=never "
                          "or a new train.output_dir")
    return found


def step_name(step: int) -> str:
    """The checkpoint folder's name: ``step-NNNNNN``."""
    return f"step-{step:06d}"


def tmp_folder(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is published."""
    return root / f".tmp-{step_name(step)}"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step``."""
    tmp = tmp_folder(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Publish ``tmp`` as ``step-NNNNNN``, point ``latest`` at it, drop checkpoints beyond ``keep_last``."""
    _fsync_tree(tmp)
    (tmp / COMPLETE).write_text(str(step))
    final = root / step_name(step)
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
    """Copy the checkpoint's trainable tensors into ``model``; a tensor this model lacks, or has in
    another shape, or a trainable parameter the checkpoint lacks, is a one-line error naming it."""
    from safetensors.torch import load_file

    path = folder / TRAINABLE
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise MmloraError(f"{path}: cannot read the checkpoint's trainable tensors ({err}); "
                          f"resume from another checkpoint (train.resume=PATH) or start over (train.resume=never)") from None
    params = dict(model.named_parameters())
    fix = ("the checkpoint was made with another model or placement: resume with the recipe it was made with, "
           "or start over with train.resume=never or a new train.output_dir")
    for k, v in saved.items():
        if k not in params:
            raise MmloraError(f"{path}: tensor {k} is not a parameter of this model; {fix}")
        if tuple(params[k].shape) != tuple(v.shape):
            raise MmloraError(f"{path}: tensor {k} has shape {list(v.shape)} in the checkpoint but "
                              f"{list(params[k].shape)} in this model; {fix}")
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MmloraError(f"{path}: this model trains {missing[0]}{more}, which the checkpoint does not hold; {fix}")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Optimizer, scheduler, sampler position, RNG states and step."""
    torch.save(state, folder / TRAINER_STATE)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / TRAINER_STATE, weights_only=True)


# ---------------------------------------------------------------- what a resume must match


def save_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """``fingerprint.json``: what the run that wrote this checkpoint was (see the module docstring)."""
    (folder / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def load_fingerprint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's fingerprint; None for a checkpoint written before fingerprints existed."""
    path = folder / FINGERPRINT
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MmloraError(f"{path}: cannot read the checkpoint's fingerprint ({err}); "
                          "start over with train.resume=never or a new train.output_dir") from None
    if not isinstance(data, dict):
        raise MmloraError(f"{path}: not a checkpoint fingerprint (expected a JSON object)")
    return data


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts) → ``{"a.b.0.c": leaf}``."""
    if isinstance(value, dict) and value:
        items = list(value.items())
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = list(enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(value: Any, limit: int = 80) -> str:
    if value is _ABSENT:
        return "none"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_ABSENT = object()


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["field: old -> new", ...]`` for each recorded field that differs. Top-level fields the old
    fingerprint lacks are not compared (it predates them); ``plan.sha256`` is named only when the plan
    summary shows no difference (then settings such as alpha, dropout or init changed)."""
    a, b = _flatten(old), _flatten(new)
    sections = set(old) & set(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if k.split(".", 1)[0] in sections]
    changed = [k for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    shown = [k for k in changed if k != "plan.sha256"]
    out = [f"{k}: {_short(a.get(k, _ABSENT))} -> {_short(b.get(k, _ABSENT))}" for k in shown]
    if "plan.sha256" in changed and not any(k.startswith("plan.") for k in shown):
        out.append("plan: the adapter settings differ (alpha, dropout, init, targets or modes)")
    return out


# ---------------------------------------------------------------- failed writes

_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "the path exists and is not a folder",
    errno.EISDIR: "the path is a folder",
    errno.EIO: "an input/output error (a failing disk or network file system)",
}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_failure(err: BaseException) -> tuple[str, int | None] | None:
    """``(what happened, errno)`` when ``err`` is a failed write of a run file: an ``OSError``, a
    ``SafetensorError`` (its message carries the OS error code), or torch.save's ``RuntimeError`` from
    its stream writer (``inline_container`` / ``PytorchStreamWriter``). None for anything else."""
    if isinstance(err, OSError):
        return _ERRNO_WORDS.get(err.errno, err.strerror or str(err)), err.errno
    text = str(err)
    if isinstance(err, SafetensorError):
        found = re.search(r"(?:code: |os error )(\d+)", text)  # Debug and Display forms of the OS error
        code = int(found.group(1)) if found else None
        words = _ERRNO_WORDS.get(code) if code is not None else None
        return words or f"safetensors could not write the file ({text.splitlines()[0] if text else 'no detail'})", code
    if isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "torch.save could not write the file (most likely no space left on device)", errno.ENOSPC
    return None


@contextlib.contextmanager
def writing(what: str, where: Path, checkpoints: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into one line: what failed (``what``: "checkpoint
    step-000004", "metrics.jsonl"), where, the last good checkpoint under ``checkpoints`` and what to
    do. ``cleanup``: a folder to remove on failure (a half-written checkpoint)."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as err:
        failure = write_failure(err)
        if failure is None:
            raise
        reason, code = failure
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        path = getattr(err, "filename", None) or where
        try:
            last = latest(checkpoints)
        except OSError:
            last = None
        good = f"the last good checkpoint is {last} (intact)" if last else "no checkpoint was written yet"
        if code in _NO_SPACE:
            todo = ("free space there (or set train.output_dir to another disk) and run again"
                    + ("; train.resume=auto continues from that checkpoint" if last else ""))
        else:
            todo = "set train.output_dir to a folder you can write to, or fix that folder, and run again"
        raise MmloraError(f"cannot write {what}: {reason} ({path}); {good}; {todo}") from None
