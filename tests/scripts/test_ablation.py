"""The ablation script: placements per row, novel-concept recall, and the table + chart end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL_SCALE

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_change_the_placement_as_named():
    ab = _script()
    base = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0, 1], "rank": 8}, "projector": {"mode": "lora", "rank": 8},
            "language": {"mode": "lora", "rank": 16}}
    assert ab.placement_for(base, ab.ROWS["language"]) == {"vision": {"mode": "frozen"}, "projector": {"mode": "frozen"},
                                                          "language": base["language"]}
    assert {s["mode"] for s in ab.placement_for(base, ab.ROWS["all-dora"]).values()} == {"dora"}
    assert [s["rank"] for s in ab.placement_for(base, ab.ROWS["all-r×4"]).values()] == [32, 32, 64]
    assert ab.placement_for(base, ab.ROWS["full"]) == {"vision": {"mode": "full", "layers": [0, 1]},
                                                      "projector": {"mode": "full"}, "language": {"mode": "full"}}
    assert base["vision"]["rank"] == 8  # the recipe's own dict is left alone


def test_novel_recall_counts_novel_objects_named_at_their_position():
    ab = _script()
    objects = {1: [{"shape": "star", "colour": "purple", "position": "top left"},
                   {"shape": "circle", "colour": "purple", "position": "bottom right"}],
               2: [{"shape": "star", "colour": "red", "position": "center"}]}
    captions = {1: "a purple star in the top left and a red circle in the bottom right.", 2: "a red square in the center."}
    assert ab.novel_recall(captions, objects) == {"novel_shape": 0.5, "novel_colour": 0.5}


@pytest.mark.slow
def test_ablation_end_to_end_on_a_tiny_recipe(shapes_small, tiny_llava_dir, tmp_path):
    ab = _script()
    recipe = yaml.safe_load(ab.RECIPE.read_text())
    recipe["model"]["name"] = "tiny-llava"
    recipe["placement"]["vision"]["layers"] = [0]  # the layer the tiny LLaVA's projector reads
    recipe["train"]["batch_size"] = 4
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "abl"
    args = ["--out", str(out), "--data", str(shapes_small), "--recipe", str(path), "--rows", "language,full",
            "--seeds", "1", "--steps", "1", "--limit", "2", "--scale", str(SMALL_SCALE)]
    assert ab.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["language", "full"] and len(results["rows"]["full"]["seeds"]) == 1
    assert results["rows"]["full"]["trainable"] > results["rows"]["language"]["trainable"] > 0
    table = (out / "table.md").read_text()
    assert "| base (no training) | 0 |" in table and "| full |" in table
    assert (out / "ablation.png").stat().st_size > 1000
    # Finished runs and evaluations are reused.
    stamp = (out / "runs" / "full-s0" / "final" / "manifest.json").stat().st_mtime
    assert ab.main(args) == 0
    assert (out / "runs" / "full-s0" / "final" / "manifest.json").stat().st_mtime == stamp


def test_summary_gives_mean_and_std_over_seeds_and_the_recovered_gain():
    ab = _script()
    scores = lambda c: {"CIDEr": c, "BLEU-4": 0.1, "slot_shape": 0.2, "slot_colour": 0.3,  # noqa: E731
                        "novel_shape": None, "novel_colour": 0.5}
    results = {"protocol": {"steps": 10, "batch_size": 4, "seeds": [0, 1], "num_images": 5}, "base": scores(1.0),
               "rows": {"all": {"trainable": 1000, "seeds": [scores(1.8), scores(2.0)]},
                        "full": {"trainable": 9000, "seeds": [scores(2.0), scores(2.0)]}}}
    table = ab.summarise(results)
    assert "| all | 1,000 | 1.900 ± 0.100 |" in table
    assert "recovers 90% of full fine-tuning's CIDEr gain (+0.900 vs +1.000" in table
