"""What a run records about itself: ``run_info.json`` (library versions, commit, processes, global
batch, steps, optimizer groups, speed switches) and the fingerprint every checkpoint carries and a
resume must match (``mmlora.runs.checkpoint.fingerprint_changes``).

Layer: train. Imports data, placement, config and the foundation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlora import __version__
from mmlora.config.schema import Recipe, TrainSpec
from mmlora.data.image_budget import image_budget
from mmlora.placement.plan import PlacementPlan

#: Libraries whose versions a run records; the second group are optional extras.
LIBRARIES = ("torch", "transformers", "peft", "accelerate")
EXTRAS = ("bitsandbytes", "datasets", "open_clip_torch")


def _commit() -> str | None:
    """The commit of the installed mmlora, when it runs from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(processes: int, global_batch: int | str, total_steps: int, groups: Sequence[Any],
             speedups: Any) -> dict[str, Any]:
    """``run_info.json``: versions and the run's shape (``groups``: the optimizer's ``GroupInfo``\\ s)."""
    versions = {p: md.version(p) for p in LIBRARIES}
    for p in EXTRAS:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[p] = md.version(p)
    return {"mmlora": __version__, "git_commit": _commit(), "versions": versions, "python": sys.version.split()[0],
            "processes": processes, "global_batch": global_batch, "total_steps": total_steps,
            "groups": [g.__dict__ for g in groups], "speedups": speedups}


def batching_line(train: TrainSpec, processes: int, total_steps: int, packing: dict[str, Any] | None) -> str:
    """What each step trains on, in one line for the console before training: the global batch (per
    process, micro-steps, processes) and, when packed, the row length and the attention."""
    per = f"{train.batch_tokens} token cells" if train.batch_tokens else f"{train.batch_size} samples"
    unit = "token cells" if train.batch_tokens else "samples"
    size = (train.batch_tokens or train.batch_size) * train.grad_accum * processes
    line = (f"batches: {total_steps} steps of {size} {unit} ({per} per process x {train.grad_accum} micro-step"
            f"{'s' if train.grad_accum != 1 else ''} x {processes} process{'es' if processes != 1 else ''})")
    if packing is not None:
        line += f"; packed in rows of {packing['max_tokens']} tokens, attention {packing['attention']}"
    return line


def fingerprint(recipe: Recipe, plan: PlacementPlan, samples: int, processes: int, global_batch: int | str,
                continual: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint of this run records and a resume must match: the base, the placement (a hash
    of what it adapts, and a summary to name the change), the data, processes, global batch, seed."""
    as_dict = plan.to_dict()
    keys = ("mode", "precision", "layers", "modules", "full_params", "group_size")
    placed = {"kind": as_dict["kind"], "adapters": as_dict["adapters"],
              "modalities": {n: {k: m[k] for k in keys} for n, m in as_dict["modalities"].items()}}
    summary = {n: {"mode": m.mode, "ranks": sorted({tg.rank for tg in m.targets}), "modules": len(m.targets),
                   "layers": m.layers, "full_params": len(m.full_params)} for n, m in plan.modalities.items()}
    data = recipe.data
    budget = image_budget(data)
    return {
        "base_model": recipe.model.name,
        "plan": {"sha256": hashlib.sha256(json.dumps(placed, sort_keys=True, default=str).encode()).hexdigest(),
                 "modalities": summary},
        # The image budget only when set: checkpoints written before it existed still resume.
        "data": {"train": [d.model_dump(mode="json") for d in data.train], "samples": samples,
                 "group_by_length": data.group_by_length, **({"image": budget} if budget else {})},
        "processes": processes, "global_batch": global_batch, "seed": recipe.train.seed,
        **({"continual": continual} if continual is not None else {}),
    }
