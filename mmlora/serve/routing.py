"""A router run served beside the adapters (``mmlora serve --router NAME=RUN``; a run trained with
``continual.method: router``): its experts are registered as adapters ``<name>-<expert>`` (an expert
that is the base itself as the base), and each caption request naming the router goes to the expert
its router weighs most for that request — hard routing, one expert per request, computed from the
base's features — and says so (``routed_to``).

Layer: serve. Imports generate, runs and the foundation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmlora.errors import MmloraError
from mmlora.generate import encode_requests
from mmlora.runs.compose import BASE
from mmlora.runs.layout import require_weights
from mmlora.runs.save import read_router
from mmlora.serve.pool import ServedRun, register_adapter


class ServedRouter:
    """The router run at ``run`` under ``name``; its experts are added to ``runs`` (the engine's). Only
    captions in ``--mode gathered`` route (``mode``, ``kind``: the engine's)."""

    def __init__(self, name: str, run: str | Path, runs: dict[str, ServedRun], mode: str, kind: str):
        weights = require_weights(run, "--router")
        manifest = weights.manifest()
        if not manifest.get("router"):
            raise MmloraError(f"--router {run}: not a router run (train one with continual.method: router)")
        if mode != "gathered" or kind != "caption":
            raise MmloraError("--router routes captions among its experts in --mode gathered; use that mode")
        if name in runs or name == BASE:
            raise MmloraError(f"--router {name}: the name is taken by an adapter")
        self.name, self.mixture = name, read_router(weights.folder)
        self.expert_of: dict[str, str] = {}  # the router's expert → the adapter it is served as
        for expert in manifest["router"]["experts"]:
            if expert["path"] is None:  # the base itself
                self.expert_of[expert["name"]] = BASE
                continue
            served = f"{name}-{expert['name']}"
            runs[served] = register_adapter(served, weights.path(expert["path"]))
            self.expert_of[expert["name"]] = served

    def route(self, items: list[Any], processor: Any, base: torch.nn.Module) -> None:
        """Give each item naming the router the expert its router picks (in place; ``routed_from`` kept)."""
        todo = [i for i in items if i.adapter == self.name]
        if not todo:
            return
        batch = encode_requests(processor, [i.image for i in todo], [i.prompt for i in todo])
        with torch.no_grad():
            chosen = self.mixture.choose(base, dict(batch))
        for item, expert in zip(todo, chosen):
            item.routed_from, item.adapter = item.adapter, self.expert_of[expert]
