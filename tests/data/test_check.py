import json

import pytest

from mmlora.cli import main
from mmlora.data.check import Batching, CheckReport, padding_line, padding_shares


def test_check_a_llava_file(shapes_small, capsys):
    path = shapes_small / "world_B" / "llava_val.json"
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5 records, 5 good, 0 bad" in out and "tokens: min" in out and "images: 5, width 128..128" in out


def test_check_lists_every_bad_sample_and_fails(tmp_path, shapes_small, capsys):
    good = json.loads((shapes_small / "world_A" / "llava_val.json").read_text())[:2]
    for g in good:
        g["image"] = str((shapes_small / "world_A" / g["image"]).relative_to(shapes_small))
    bad = [{"id": "no-image", "image": "world_A/missing.png", "conversations": good[0]["conversations"]},
           {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]}]
    path = shapes_small / "check_fixture.json"
    path.write_text(json.dumps(good + bad))
    try:
        assert main(["data", "check", str(path)]) == 1
    finally:
        path.unlink()
    out = capsys.readouterr().out
    assert "4 records, 2 good, 2 bad" in out
    assert "(id no-image): image file not found" in out and "(id no-answer): no assistant answer" in out


def test_check_a_segmentation_folder(shapes_small, capsys):
    assert main(["data", "check", str(shapes_small / "world_A")]) == 0
    out = capsys.readouterr().out
    assert "[val]: 10 records, 10 good, 0 bad" in out


def test_check_recipes_for_clip_pairs_and_seg_data(shapes_small, tmp_path, capsys, monkeypatch):
    import yaml

    world = shapes_small / "world_A"
    monkeypatch.chdir(shapes_small)  # recipe data paths resolve against the working directory, as in train
    for name, data in {
        "pairs": {"train": [{"format": "coco", "path": "world_A/annotations/captions_val.json"}]},
        "seg": {"train": [{"format": "seg", "path": "world_A", "split": "train"}],
                "val": [{"format": "seg", "path": "world_A", "split": "val"}]},
    }.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"name": "tiny-clip"}, "placement": {"vision": {"mode": "lora"}},
                                          "data": data}))
        assert main(["data", "check", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "train: world_A/annotations/captions_val.json (coco): 50 records, 50 good, 0 bad" in out
    assert "tokens: min" in out and "padding in" not in out  # contrastive batches: nothing to pad or pack
    assert out.count(f"{world.name} [val]: 10 records, 10 good") == 1  # each seg folder checked once


@pytest.mark.parametrize(("batching", "shares"), [
    # one batch of 4: padded 4 x 10 cells for 32 tokens; packed into rows of 20: [10, 10] and [10, 2],
    # two rows of 20 cells; into rows of 40: one row, no padding
    (Batching(4, max_tokens=20), (0.2, 0.2)),
    (Batching(4, max_tokens=40), (0.2, 0.0)),
    # 20 token cells a batch, longest first: padded [10, 10] and [10, 2] (2 x 10 each); packed the same
    # batches, each one row of its sum
    (Batching(batch_tokens=20, max_tokens=40), (0.2, 0.0)),
    (Batching(1, max_tokens=40), (0.0, 0.0)),
])
def test_padding_shares_by_hand(batching, shares):
    assert padding_shares([10, 2, 10, 10], [True] * 4, batching) == pytest.approx(shares)


def test_the_padding_line_mixes_the_files_by_weight_and_names_a_sample_longer_than_the_rows():
    one = CheckReport("a", token_lengths=[10, 10, 10], has_image=[True] * 3)
    two = CheckReport("b", token_lengths=[2], has_image=[True])
    # one batch of 4 from the mix [10, 10, 10, 2]: padded 4 x 10 cells for 32 tokens; packed into rows of 40
    assert padding_line([(one, 1.0), (two, 1.0)], Batching(4, max_tokens=40), "mix") == (
        "mix: padding in batches of 4 samples (length-grouped, seed 0): 20.0% of token cells; "
        "packed in rows of 40 (train.packing): 0.0%")
    # weight 0 leaves b out: three samples of 10, no padding either way
    assert "0.0% of token cells" in padding_line([(one, 1.0), (two, 0.0)], Batching(4, max_tokens=40), "mix")
    long = padding_line([(CheckReport("c", token_lengths=[10, 300], has_image=[True, False]), 1.0)],
                        Batching(4, max_tokens=256), "data")
    assert long.startswith("data: padding in batches of 4 samples") and "a sample of 300 tokens is longer" in long


def test_check_reports_the_padding_of_the_recipes_batches(shapes_small, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(shapes_small)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tiny-llava"}, "placement": {"language": {"mode": "lora"}},
        "data": {"train": [{"format": "llava", "path": "world_B/llava_val.json"},
                           {"format": "llava", "path": "world_A/llava_val.json", "weight": 2.0}],
                 "val": [{"format": "llava", "path": "world_B/llava_val.json"}], "max_length": 256},
        "train": {"batch_tokens": 200, "packing": {"enabled": True}, "seed": 3}}))
    assert main(["data", "check", str(recipe)]) == 0
    out = capsys.readouterr().out
    # one line for the training data as the trainer mixes it (world A twice), none for validation
    assert out.count("the training mix: padding in batches of 200 token cells (length-grouped, seed 3): ") == 1
    assert "packed in rows of 256 (train.packing): 0.0%" in out  # each packed budget fits one row
    assert main(["data", "check", "world_B/llava_val.json", "--batch-size", "0"]) == 2
    assert "--batch-size 0: use 1 or more" in capsys.readouterr().err
