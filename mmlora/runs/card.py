"""What a run leaves for people: a loss-curve PNG and a model card (README.md) for the final folder."""

from __future__ import annotations

import warnings
from pathlib import Path

from mmlora.config.schema import Recipe
from mmlora.errors import MmloraError
from mmlora.optional import require
from mmlora.placement.plan import PlacementPlan


def loss_curve(rows: list[dict], path: Path, unit: str = "token") -> Path | None:
    """Training loss per step (and validation loss where measured) as a PNG; None (with a one-line
    warning) without the ``plot`` extra: a run is complete without its curve."""
    if not rows:
        return None
    try:
        matplotlib = require("matplotlib", "plot", "the loss-curve plot")
    except MmloraError as exc:
        warnings.warn(f"no {path.name}: {exc}", stacklevel=2)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", linewidth=1.2)
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token" if unit == "token" else f"loss per {unit}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def model_card(recipe: Recipe, plan: PlacementPlan, rows: list[dict], metrics: dict | None = None) -> str:
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {recipe.model.name}",
        "tags: [mmlora, lora, vision-language]",
        "---",
        "",
        f"# Adapters for {recipe.model.name}",
        "",
        "Trained with mmlora. Reassemble with plain transformers + PEFT as `manifest.json` describes.",
        "",
        "## Placement",
        "",
        "| modality | mode | modules | trainable parameters |",
        "|---|---|---|---|",
    ]
    for m in plan.modalities.values():
        count = len(m.targets) or (f"{len(m.full_params)} tensors" if m.full_params else "-")
        lines.append(f"| {m.name} | {m.mode} | {count} | {m.trainable_params:,} |")
    data = recipe.data
    if data is not None:
        lines += ["", "## Data", ""] + [f"- train: {d.format} `{d.path}` (weight {d.weight})" for d in data.train]
        lines += [f"- val: {d.format} `{d.path}`" for d in data.val]
    if rows:
        last = rows[-1]
        val = [r for r in rows if r.get("val_loss") is not None]
        lines += ["", "## Metrics", "", f"- steps: {last['step']}", f"- final training loss: {last['loss']:.4f}"]
        if val:
            lines.append(f"- validation loss: {val[0]['val_loss']:.4f} (step {val[0]['step']}) → "
                         f"{val[-1]['val_loss']:.4f} (step {val[-1]['step']})")
    for k, v in (metrics or {}).items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def append_to_card(card: str, facts: dict) -> str:
    """Add an ``## Export`` section of facts to a model card."""
    return card.rstrip() + "\n\n## Export\n\n" + "".join(f"- {k}: {v}\n" for k, v in facts.items())
