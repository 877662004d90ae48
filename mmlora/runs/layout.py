"""The run folder: every file name and folder of a run, read and written only through here.

::

    runs/NAME/                     Run
      recipe.yaml                  the resolved recipe
      run_info.json                versions, commit, processes, optimizer groups, speed switches
      metrics.jsonl                one row per logged step
      bad_samples.jsonl            the samples skipped as bad (data.on_bad_sample: skip), one per line
      loss_curve.png
      rank_allocation.json         AdaLoRA runs: effective rank per module after each allocation step
      rank_heatmap.png, rank_shares.png   (mmlora.runs.allocation)
      checkpoints/step-NNNNNN/     Weights (+ trainer state and fingerprint.json, see mmlora.runs.checkpoint)
      checkpoints/latest
      final/                       Weights
        manifest.json              base model, kind, adapters, full modules, QA-LoRA layers
        adapters/NAME/             plain PEFT adapter folders
        full_modules.safetensors   parameters trained in place (mode full)
        qalora.safetensors         QA-LoRA layers (mmlora.adapters.qalora)
        recipe.yaml, README.md     the recipe and the model card
        processor files            what AutoProcessor (or open_clip, for CLIP) needs

A *weights folder* is ``final/`` or one checkpoint: both hold the same manifest and files, so every
loader takes either (or the run root, which means its ``final/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlora.config.loading import load_recipe, recipe_to_yaml
from mmlora.config.schema import Recipe
from mmlora.errors import MmloraError

MANIFEST = "manifest.json"
FULL_MODULES = "full_modules.safetensors"
QALORA_FILE = "qalora.safetensors"
ROUTER_FILE = "router.safetensors"
ROUTER_CONFIG = "router.json"
RECIPE = "recipe.yaml"
CARD = "README.md"
FINAL = "final"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Run:
    """A run's root folder (``train.output_dir``)."""

    root: Path

    @property
    def final(self) -> Weights:
        return Weights(self.root / FINAL)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def recipe_file(self) -> Path:
        return self.root / RECIPE

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def run_info_file(self) -> Path:
        return self.root / "run_info.json"

    @property
    def bad_samples_file(self) -> Path:
        return self.root / "bad_samples.jsonl"

    @property
    def loss_curve_file(self) -> Path:
        return self.root / "loss_curve.png"

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def keep_metrics(self, upto_step: int) -> None:
        """Drop the metrics rows after ``upto_step`` (a run resumed there writes them again)."""
        text = self.metrics_file.read_text() if self.metrics_file.is_file() else ""
        rows = [line for line in text.splitlines() if line and json.loads(line)["step"] <= upto_step]
        self.metrics_file.write_text("".join(row + "\n" for row in rows))


@dataclass(frozen=True)
class Weights:
    """A weights folder: a run's ``final/`` or one of its checkpoints."""

    folder: Path

    @property
    def manifest_file(self) -> Path:
        return self.folder / MANIFEST

    def exists(self) -> bool:
        return self.manifest_file.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MmloraError(f"{self.manifest_file}: cannot read the run's manifest ({err}); "
                              "pass a complete run folder") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")

    def recipe(self) -> Recipe:
        return load_recipe(self.folder / RECIPE)

    def write_recipe(self, recipe: Recipe) -> None:
        (self.folder / RECIPE).write_text(recipe_to_yaml(recipe))

    @property
    def card_file(self) -> Path:
        return self.folder / CARD

    @property
    def has_processor(self) -> bool:
        """An image-text-to-text run saved its processor here (CLIP runs save open_clip files)."""
        return (self.folder / "processor_config.json").is_file()

    @property
    def name(self) -> str:
        """The run's name: its root folder's name (``runs/x/final`` → ``x``)."""
        return self.folder.parent.name if self.folder.name == FINAL else self.folder.name

    def path(self, relative: str) -> Path:
        """A file the manifest names (``adapters/default``, ``full_modules.safetensors``, ...)."""
        return self.folder / relative


def find_weights(ref: str | Path) -> Weights | None:
    """The weights folder a path means: a run root (its ``final/``), a ``final/`` or a checkpoint
    folder itself; None when the path holds no run."""
    path = Path(ref)
    for candidate in (path, path / FINAL):
        if (candidate / MANIFEST).is_file():
            return Weights(candidate)
    return None


def require_weights(ref: str | Path, what: str = "") -> Weights:
    """:func:`find_weights`, or a one-line error naming the path."""
    found = find_weights(ref)
    if found is None:
        where = f"{what}: " if what else ""
        raise MmloraError(f"{where}{ref}: not a run (no {FINAL}/{MANIFEST}); pass a run folder or one of its checkpoints")
    return found
