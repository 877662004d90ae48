"""Every tiny recipe in recipes/tiny trains end to end (a few steps, on the small shapes world)."""

import json
from pathlib import Path

import pytest

from tests.train.conftest import read_metrics, run_training

ROOT = Path(__file__).resolve().parents[2]
TINY = sorted((ROOT / "recipes" / "tiny").glob("*.yaml"))


@pytest.mark.parametrize("recipe", TINY, ids=[p.stem for p in TINY])
def test_tiny_recipe_trains(recipe, shapes_small, tmp_path):
    import yaml

    data = yaml.safe_load(recipe.read_text())
    assert data.get("data") and data.get("train"), f"{recipe.name} has no data/train sections"

    def local(spec: dict) -> dict:  # data/shapes/world_X/... → the test's small shapes world
        return {**spec, "path": str(shapes_small / Path(spec["path"]).relative_to("data/shapes"))}

    overrides = [
        f"data.train={json.dumps([local(s) for s in data['data']['train']])}",
        f"data.val={json.dumps([local(s) for s in data['data'].get('val', [])])}",
        f"train.output_dir={tmp_path / recipe.stem}", "train.max_steps=3", "train.eval_every=3", "train.save_every=2",
    ]
    if data["placement"].get("adalora"):  # a schedule that fits 3 steps: hold 1, allocate at step 1, hold 1
        overrides += ["placement.adalora.tinit=0", "placement.adalora.tfinal=1", "placement.adalora.delta_t=1"]
    trainer, result = run_training(recipe, *overrides)
    rows = read_metrics(trainer.out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["val_loss"] is not None
    manifest = json.loads((trainer.out / "final" / "manifest.json").read_text())
    assert manifest["adapters"] or manifest.get("full_modules")
