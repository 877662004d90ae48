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


@pytest.mark.slow
def test_ablation_end_to_end_on_a_tiny_recipe(shapes_small, tiny_llava_dir, tmp_path):
    ab = _script()
    recipes = []
    for shift in ("B", "C"):
        recipe = yaml.safe_load(ab.RECIPES[shift].read_text())
        recipe["model"]["name"] = "tiny-llava"
        recipe["placement"]["vision"]["layers"] = [0]  # the layer the tiny LLaVA's projector reads
        recipe["train"]["batch_size"] = 4
        path = tmp_path / f"tiny-{shift}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        recipes += ["--recipe", f"{shift}={path}"]
    out = tmp_path / "abl"
    args = ["--out", str(out), "--data", str(shapes_small), *recipes, "--rows", "language,full,all-dora",
            "--seeds", "1", "--steps", "1", "--limit", "2", "--scale", str(SMALL_SCALE)]
    assert ab.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["B", "C"]
    assert list(results["B"]["rows"]) == ["language", "all-dora", "full"]  # in the table's order
    assert list(results["C"]["rows"]) == ["language", "full"]  # the variant rows are world B's only
    rows = results["B"]["rows"]
    assert len(rows["full"]["seeds"]) == 1
    assert rows["full"]["trainable"] > rows["language"]["trainable"] > 0
    assert results["C"]["protocol"]["recipe"].endswith("tiny-C.yaml")
    assert "novel_shape" in rows["language"]["seeds"][0] and "novel_shape" not in results["C"]["rows"]["language"]["seeds"][0]
    table = (out / "table.md").read_text()
    assert "### World B" in table and "### World C" in table and "| base (no training) | 0 |" in table
    assert "star recall" in table.split("### World C")[0] and "star recall" not in table.split("### World C")[1]
    assert (out / "ablation.png").stat().st_size > 1000
    # Finished runs and evaluations are reused.
    stamp = (out / "C" / "runs" / "full-s0" / "final" / "manifest.json").stat().st_mtime
    assert ab.main(args) == 0
    assert (out / "C" / "runs" / "full-s0" / "final" / "manifest.json").stat().st_mtime == stamp


def test_a_recipe_must_name_its_shift(tmp_path, capsys):
    ab = _script()
    with pytest.raises(SystemExit):
        ab.main(["--out", str(tmp_path), "--recipe", "recipes/shapes/llava-lora-b.yaml"])
    assert "give SHIFT=PATH" in capsys.readouterr().err


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
    # each row's share of full fine-tuning's gain, in CIDEr and slot accuracy
    for row, slots in (("all", (0.5, 0.6)), ("full", (0.8, 0.8))):
        for s, v in zip(results["rows"][row]["seeds"], slots):
            s["slot_all"] = v
    results["base"]["slot_all"] = 0.4
    table = ab.summarise(results)
    assert table.splitlines()[3].endswith("| 90% / 38% |")  # (0.55 - 0.4) / (0.8 - 0.4)
    assert table.splitlines()[4].endswith("| 100% / 100% |")
    assert "purple recall" in table and "star recall" not in table  # a column without any value is left out
