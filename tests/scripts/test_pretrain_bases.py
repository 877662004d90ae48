"""The base-pretraining script runs end to end on a few steps and writes loadable bases with cards."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pretrain_bases_on_a_few_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_bases", ROOT / "scripts" / "pretrain_bases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bases"
    assert script.main(["--out", str(out), "--work", str(tmp_path / "work"), "--pretrain-images", "40",
                        "--tower-steps", "4", "--clip-steps", "3", "--clip-batch", "8", "--stage1-steps", "2", "--stage2-steps", "2",
                        "--eval-limit", "4"]) == 0
    from transformers import LlavaForConditionalGeneration

    from mmlora.models.loading import load_clip

    llava = LlavaForConditionalGeneration.from_pretrained(out / "shapes-llava-base")
    assert llava.config.vision_config.image_size == 64 and llava.config.vision_config.hidden_act == "gelu"
    load_clip(out / "shapes-clip-base")
    scores = json.loads((out / "shapes-llava-base" / "scores.json").read_text())
    assert set(scores) == {"A", "B", "C", "A_subset"}
    assert {"CIDEr", "BLEU-4", "slot_shape", "slot_colour", "slot_position", "distinct"} <= set(scores["A"])
    clip = json.loads((out / "shapes-clip-base" / "scores.json").read_text())
    assert {"retrieval_R@1", "mIoU_clearclip", "mIoU_naclip", "mIoU_sclip"} <= set(clip["C"])
    assert set(clip["tower"]) == {"layer -2", "last layer"}  # the tower stage's held-out head accuracy
    card = (out / "shapes-llava-base" / "README.md").read_text()
    assert "| A |" in card and "| C |" in card and "python scripts/pretrain_bases.py" in card
    assert "4 steps of 64" in (out / "shapes-clip-base" / "README.md").read_text()
    assert not (tmp_path / "work" / "tower_state.pt").exists()  # the tower's resume state goes once it is done


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_bases", ROOT / "scripts" / "pretrain_bases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_tower_labels_follow_the_objects(tmp_path):
    """Per-patch labels name the shape at each large object's centre, only an object's own shape near
    it, and background far from every object; per-cell labels are each object's shape and colour
    (checked against the objects' geometry)."""
    from mmlora.models.loading import load_clip
    from mmlora.models.presets import preset_path
    from mmlora.showcase.shapes import POSITIONS, generate_world

    world = generate_world(tmp_path, "A", {"pretrain": 12}, seed=3)
    _, preprocess, _ = load_clip(preset_path("shapes-clip"))
    script = _script()
    images, dense, cells = script.tower_labels(world, "pretrain", preprocess, grid=8)
    coco = json.loads((world / "annotations" / "captions_pretrain.json").read_text())
    assert images.shape == (12, 3, 64, 64) and dense.shape == (12, 64) and cells.shape == (12, 9, 2)
    def touched(o) -> set[tuple[int, int]]:  # patches (row, col) whose 16 px box meets the object's circle
        out = set()
        for r in range(8):
            for c in range(8):
                dx = max(c * 16 - o["cx"], 0, o["cx"] - (c + 1) * 16)
                dy = max(r * 16 - o["cy"], 0, o["cy"] - (r + 1) * 16)
                if dx * dx + dy * dy < o["radius"] ** 2:
                    out.add((r, c))
        return out

    for i, entry in enumerate(coco["images"]):
        grid = dense[i].view(8, 8)
        by_patch: dict[tuple[int, int], set[int]] = {}
        for o in entry["objects"]:
            shape = script.SHAPE_CLASSES.index(o["shape"])
            if o["size"] == "large":  # a small one may cover under a quarter of every patch it touches
                assert grid[int(o["cy"] // 16), int(o["cx"] // 16)] == shape, (i, o)
            for patch in touched(o):
                by_patch.setdefault(patch, {0}).add(shape)
            assert cells[i, POSITIONS.index(o["position"])].tolist() == [shape, script.COLOURS.index(o["colour"])]
        for r in range(8):
            for c in range(8):
                assert int(grid[r, c]) in by_patch.get((r, c), {0}), (i, r, c)  # background far from every object
        assert (cells[i, :, 0] > 0).sum() == len(entry["objects"])


def test_distinct_share_counts_captions_unique_to_their_scene():
    from types import SimpleNamespace

    script = _script()
    red, blue = [{"shape": "circle", "colour": "red"}], [{"shape": "circle", "colour": "blue"}]
    data = SimpleNamespace(objects={0: red, 1: blue, 2: red, 3: blue})
    # 0 and 2 show the same scene and may share a caption; 1 and 3 differ from 0 but copy its caption
    preds = [{"image_id": 0, "caption": "a red circle."}, {"image_id": 1, "caption": "a red circle."},
             {"image_id": 2, "caption": "a red circle."}, {"image_id": 3, "caption": "a blue circle."}]
    assert script.distinct_share(preds, data) == 0.25
    preds[1]["caption"] = "a blue circle."
    assert script.distinct_share(preds, data) == 1.0
