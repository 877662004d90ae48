"""Recipes for trainer tests: the tiny LLaVA on the small shapes world B."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

BASE = {
    "model": {"name": "tiny-llava"},
    "placement": {
        "vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
        "projector": {"mode": "full", "lr_multiplier": 0.5},
        "language": {"mode": "lora", "rank": 4},
    },
    "data": {"train": [], "val": [], "max_length": 256},
    "train": {"max_steps": 4, "batch_size": 4, "lr": 5.0e-3, "eval_every": 2, "seed": 0, "scheduler": "constant"},
}


@pytest.fixture
def make_recipe(shapes_small, tmp_path):
    """``make_recipe(**{dotted.key: value})`` → path of a recipe YAML with those changes."""

    def make(name: str = "recipe", **changes) -> Path:
        data = copy.deepcopy(BASE)
        world = shapes_small / "world_B"
        data["data"]["train"] = [{"format": "llava", "path": str(world / "llava_train.json")}]
        data["data"]["val"] = [{"format": "llava", "path": str(world / "llava_val.json")}]
        data["train"]["output_dir"] = str(tmp_path / name)
        for key, value in changes.items():
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if value is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def run_training(recipe_path: Path, *overrides: str):
    from mmlora.config.loading import load_recipe
    from mmlora.eval.hooks import training_evaluators
    from mmlora.showcase.slots import slot_scores
    from mmlora.train.loop import Trainer

    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, recipe_name=recipe_path.stem, evaluators=training_evaluators(recipe, extra=slot_scores))
    trainer.setup()
    result = trainer.train()
    return trainer, result


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


class Stop(Exception):
    """Raised by :func:`interrupt_then_resume`'s event hook to cut a run short."""


def interrupt_then_resume(recipe_path: Path, stop_after: int):
    """Train ``recipe_path`` until step ``stop_after`` ends (then stop, as a crash would), start a new
    trainer on the same recipe (it resumes from the latest checkpoint) and return it set up, not yet
    trained on."""
    import pytest

    from mmlora.config.loading import load_recipe
    from mmlora.train.loop import Trainer

    first = Trainer(load_recipe(recipe_path), recipe_name=recipe_path.stem)

    def stop(where, step):
        if where == "after-step" and step == stop_after:
            raise Stop

    first.on_event = stop
    first.setup()
    with pytest.raises(Stop):
        first.train()
    second = Trainer(load_recipe(recipe_path), recipe_name=recipe_path.stem)
    second.setup()
    return second


def capture_gradients(trainer) -> list[dict]:
    """The trainable parameters' gradients at every optimizer step of ``trainer`` (appended as it trains)."""
    grads: list[dict] = []
    step = trainer.optimizer.step

    def capture(*args, _step=step, **kwargs):
        model = trainer.accelerator.unwrap_model(trainer.model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return _step(*args, **kwargs)

    trainer.optimizer.step = capture
    return grads
