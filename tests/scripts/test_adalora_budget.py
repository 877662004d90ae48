"""The AdaLoRA budget report end to end on the tiny LLaVA: runs, scores, the per-modality budget and
its agreement with each run's own rank_allocation.json."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL_SCALE

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("adalora_budget", ROOT / "scripts" / "adalora_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_budget_report_end_to_end_on_a_tiny_recipe(shapes_small, tiny_llava_dir, tmp_path):
    ada = _script()
    recipes = []
    for shift in ("B", "C"):
        recipe = yaml.safe_load(ada.RECIPES[shift].read_text())
        recipe["model"]["name"] = "tiny-llava"
        recipe["placement"]["vision"]["layers"] = [0]
        recipe["train"]["batch_size"] = 4
        path = tmp_path / f"tiny-{shift}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        recipes += ["--recipe", f"{shift}={path}"]
    out = tmp_path / "ada"
    args = ["--out", str(out), "--data", str(shapes_small), *recipes, "--seeds", "1", "--steps", "4", "--limit", "2",
            "--scale", str(SMALL_SCALE), "--budget", "init_r=4,target_r=2,tinit=1,tfinal=1,delta_t=1",
            "--ablation", str(tmp_path / "none.json")]
    assert ada.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["B", "C"]
    for shift in ("B", "C"):
        budget = results[shift]["budgets"][0]
        record = json.loads((out / shift / "runs" / "adalora-s0" / "rank_allocation.json").read_text())
        assert set(budget["modalities"]) == {"vision", "projector", "language"}
        for name, m in budget["modalities"].items():
            assert m["final"] == record["totals"][name][-1] and m["initial"] == 4 * m["modules"]
            assert m["retained"] == pytest.approx(m["final"] / m["initial"])
        assert sum(m["share"] for m in budget["modalities"].values()) == pytest.approx(1.0)
        assert results[shift]["protocol"]["budget"]["init_r"] == 4
    assert "novel_shape" in results["B"]["seeds"][0] and "novel_shape" not in results["C"]["seeds"][0]
    table = (out / "table.md").read_text()
    assert "### World B" in table and "### World C" in table and "| AdaLoRA (one budget) |" in table
    assert (out / "budget.png").read_bytes()[:4] == b"\x89PNG" and (out / "B" / "rank_heatmap.png").is_file()
