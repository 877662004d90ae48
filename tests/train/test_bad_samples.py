"""``data.on_bad_sample: skip``: the run folder's ``bad_samples.jsonl``, a ``skipped`` count in every
metrics row and in the summary, and one clear line when every sample is bad."""

import json
import shutil

import pytest

from mmlora.errors import MmloraError
from tests.train.conftest import read_metrics, run_training


def _llava_item(sid: str, image: str, caption: str = "top center holds a large red star.") -> dict:
    return {"id": sid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nProvide a one-sentence caption for the provided image."},
        {"from": "gpt", "value": caption}]}


def _bad_data(folder, good_image=None) -> tuple:
    """``extra.json``: one sample whose image is not an image (found when it is encoded) and one that is
    broken in structure (found when the file is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.png").write_bytes(b"this is not a png")
    items = [_llava_item("bad_image", "broken.png"), {"id": "bad_turns", "image": "broken.png", "conversations": "nope"}]
    path = folder / "extra.json"
    path.write_text(json.dumps(items))
    return path


def test_skipped_samples_are_reported_and_counted(make_recipe, shapes_small, tmp_path):
    extra = _bad_data(tmp_path / "extra")
    train = [{"format": "llava", "path": str(shapes_small / "world_B" / "llava_train.json")},
             {"format": "llava", "path": str(extra)}]
    # 25 good + 1 bad-image sample in batches of 8: the 4 steps see every sample once.
    trainer, result = run_training(make_recipe("skip", **{"data.train": train, "data.on_bad_sample": "skip",
                                                          "train.batch_size": 8, "train.eval_every": None}))
    report = trainer.out / "bad_samples.jsonl"
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["bad_image", "bad_turns"]
    assert all(r["split"] == "train" and str(extra) in r["where"] for r in rows)
    problems = {r["id"]: r["problem"] for r in rows}
    assert "cannot be decoded" in problems["bad_image"] and "conversations" in problems["bad_turns"]
    metrics = read_metrics(trainer.out)
    counts = [m["skipped"] for m in metrics]
    assert counts[0] >= 1 and counts == sorted(counts) and counts[-1] == 2  # cumulative
    assert result["skipped"] == 2 and result["bad_samples"] == report


@pytest.mark.parametrize("found", ["when encoded", "when read"])
def test_a_run_whose_samples_are_all_bad_says_so(make_recipe, tmp_path, shapes_small, found):
    folder = tmp_path / "all_bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"this is not a png")
    shutil.copy(next((shapes_small / "world_B" / "images" / "train").glob("*.png")), folder / "good.png")
    if found == "when encoded":
        items = [_llava_item(f"s{i}", "broken.png") for i in range(3)]
    else:
        items = [{"id": f"s{i}", "image": "good.png", "conversations": [{"from": "robot", "value": "x"}]} for i in range(3)]
    (folder / "data.json").write_text(json.dumps(items))
    path = make_recipe("allbad", **{"data.train": [{"format": "llava", "path": str(folder / "data.json")}],
                                    "data.val": [], "data.on_bad_sample": "skip", "train.eval_every": None})
    with pytest.raises(MmloraError) as err:
        run_training(path)
    run = tmp_path / "allbad"
    assert str(err.value) == (f"every sample of the training data was skipped as bad (3); see {run / 'bad_samples.jsonl'}")
    rows = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["s0", "s1", "s2"]


def test_a_global_batch_of_bad_samples_is_passed_over(make_recipe, tmp_path, shapes_small, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"this is not a png")
    for i, image in enumerate(sorted((shapes_small / "world_B" / "images" / "train").glob("*.png"))[:3]):
        shutil.copy(image, folder / f"good{i}.png")
    items = [_llava_item(f"good{i}", f"good{i}.png") for i in range(3)] + [_llava_item("bad", "broken.png")]
    (folder / "data.json").write_text(json.dumps(items))
    trainer, result = run_training(make_recipe("passover", **{
        "data.train": [{"format": "llava", "path": str(folder / "data.json")}], "data.val": [],
        "data.on_bad_sample": "skip", "train.batch_size": 1, "train.eval_every": None}))
    assert "every sample of the global batch was skipped as bad; training on the next one" in capsys.readouterr().out
    metrics = read_metrics(trainer.out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["skipped"] == 1
    assert result["steps"] == 4 and result["skipped"] == 1


def test_a_resumed_run_goes_on_counting_from_the_report(make_recipe, shapes_small, tmp_path):
    extra = _bad_data(tmp_path / "extra")
    changes = {"data.train": [{"format": "llava", "path": str(shapes_small / "world_B" / "llava_train.json")},
                              {"format": "llava", "path": str(extra)}],
               "data.on_bad_sample": "skip", "train.batch_size": 8, "train.eval_every": None, "train.save_every": 2}
    path = make_recipe("skip_resume", **changes)
    trainer, _ = run_training(path)  # 4 steps: one epoch, both bad samples met
    assert read_metrics(trainer.out)[-1]["skipped"] == 2
    resumed, result = run_training(path, "train.max_steps=5")
    assert resumed.out == trainer.out and result["steps"] == 5
    assert [m["skipped"] for m in read_metrics(trainer.out)][-1] == 2 and result["skipped"] == 2
    rows = [json.loads(line) for line in (trainer.out / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["bad_image", "bad_turns"]
