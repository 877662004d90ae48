import json
from pathlib import Path

import pytest

from mmlora.eval.caption import CaptionSet, score_captions
from mmlora.generate import generate_answers
from mmlora.showcase.slots import parse_objects, slot_accuracy

GOLDEN = Path(__file__).parent / "golden"


def _golden(name: str) -> dict[int, object]:
    return {int(k): v for k, v in json.loads((GOLDEN / name).read_text()).items()}


@pytest.mark.slow
def test_scores_are_pinned_by_golden_files():
    """A fixed results file and its references give fixed scores: this pins the protocol (PTB
    tokenization, pycocoevalcap's BLEU/METEOR/ROUGE-L/CIDEr) against silent changes."""
    scores = score_captions(_golden("results.json"), _golden("references.json"))
    expected = json.loads((GOLDEN / "scores.json").read_text())
    for key, value in expected.items():
        if isinstance(value, float):
            assert scores[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert scores[key] == value
    assert isinstance(scores["SPICE"], str) and "unavailable" in scores["SPICE"]  # never reported as zero
    # a perfect caption set scores BLEU-1 = 1 on its own references
    refs = _golden("references.json")
    perfect = score_captions({i: r[0] for i, r in refs.items()}, refs)
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["CIDEr"] > scores["CIDEr"]


@pytest.mark.parametrize("caption, expected", [
    ("a large red circle in the top left and a small blue star in the center.",
     [("circle", "red", "top left"), ("star", "blue", "center")]),
    ("top left holds a large red circle; center: small purple cross.",
     [("circle", "red", "top left"), ("cross", "purple", "center")]),
    ("from top to bottom, top right holds a small green square; bottom left shows a large yellow triangle.",
     [("square", "green", "top right"), ("triangle", "yellow", "bottom left")]),
    ("there is a large red circle at the top center, a small blue square in the middle right and a large green cross in the bottom center.",
     [("circle", "red", "top center"), ("square", "blue", "middle right"), ("cross", "green", "bottom center")]),
])
def test_captions_of_both_styles_parse_into_objects(caption, expected):
    assert [(o["shape"], o["colour"], o["position"]) for o in parse_objects(caption)] == expected


def test_slot_accuracy_counts_each_slot():
    truth = [{"shape": "circle", "colour": "red", "position": "top left"},
             {"shape": "star", "colour": "purple", "position": "center"}]
    assert slot_accuracy("a large red circle in the top left and a small purple star in the center.", truth)["all"] == 1.0
    acc = slot_accuracy("a large red square in the top left.", truth)
    assert acc == {"shape": 0.0, "colour": 0.5, "position": 0.5, "all": pytest.approx(1 / 3)}


def test_batched_and_one_by_one_greedy_give_the_same_captions(tiny_llava_dir, shapes_small):
    from mmlora.eval.caption import load_captioner

    model, processor, _ = load_captioner(tiny_llava_dir)
    data = CaptionSet.from_coco(shapes_small / "world_B" / "annotations" / "captions_test.json", limit=6)
    from mmlora.data.samples import load_image

    images = [load_image(data.files[i], "", None) for i in data.image_ids]
    batched = generate_answers(model, processor, images, batch_size=6, max_new_tokens=12)
    single = [generate_answers(model, processor, [im], batch_size=1, max_new_tokens=12)[0] for im in images]
    assert batched == single and any(batched)


@pytest.mark.slow
def test_eval_caption_writes_results_metrics_and_table(tiny_llava_dir, shapes_small, tmp_path, capsys):
    from mmlora.cli import main

    coco = shapes_small / "world_B" / "annotations" / "captions_test.json"
    assert main(["eval", "caption", "--coco", str(coco), "--model", "a=tiny-llava", "--model", f"b={tiny_llava_dir}",
                 "--out", str(tmp_path), "--limit", "3", "--max-new-tokens", "8"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"] == {"prompt": "Provide a one-sentence caption for the provided image.", "decoding": "greedy",
                                   "max_new_tokens": 8, "split": "test", "num_images": 3, "tokenization": "PTB (pycocoevalcap)"}
    assert metrics["models"]["a"]["scores"] == metrics["models"]["b"]["scores"]  # same model, same numbers
    assert {"CIDEr", "BLEU-4", "slot_all", "mean_length"} <= set(metrics["models"]["a"]["scores"])
    results = json.loads((tmp_path / "results_a.json").read_text())
    assert [r["image_id"] for r in results] == [0, 1, 2] and all(isinstance(r["caption"], str) for r in results)
    assert len((tmp_path / "captions_b.jsonl").read_text().splitlines()) == 3
    assert "| a |" in (tmp_path / "table.md").read_text() and "| b |" in capsys.readouterr().out


@pytest.mark.slow
def test_in_training_hook_logs_caption_metrics(make_recipe_for_eval):
    from tests.train.conftest import read_metrics, run_training

    trainer, _ = run_training(make_recipe_for_eval)
    rows = read_metrics(trainer.out)
    assert "caption/CIDEr" in rows[1] and "caption/slot_all" in rows[1] and "caption/CIDEr" not in rows[0]


@pytest.fixture
def make_recipe_for_eval(shapes_small, tmp_path):
    import yaml

    from tests.train.conftest import BASE

    data = json.loads(json.dumps(BASE))
    world = shapes_small / "world_B"
    data["data"]["train"] = [{"format": "llava", "path": str(world / "llava_train.json")}]
    data["data"]["val"] = []
    data["train"].update({"output_dir": str(tmp_path / "run"), "max_steps": 2, "eval_every": None,
                          "caption_eval": {"coco": str(world / "annotations" / "captions_val.json"), "every": 2,
                                           "limit": 3, "max_new_tokens": 8}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
