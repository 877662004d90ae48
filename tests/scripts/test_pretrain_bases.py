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
                        "--clip-steps", "3", "--clip-batch", "8", "--stage1-steps", "2", "--stage2-steps", "2",
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
    card = (out / "shapes-llava-base" / "README.md").read_text()
    assert "| A |" in card and "| C |" in card and "python scripts/pretrain_bases.py" in card


def test_distinct_share_counts_captions_unique_to_their_scene():
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("pretrain_bases", ROOT / "scripts" / "pretrain_bases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    red, blue = [{"shape": "circle", "colour": "red"}], [{"shape": "circle", "colour": "blue"}]
    data = SimpleNamespace(objects={0: red, 1: blue, 2: red, 3: blue})
    # 0 and 2 show the same scene and may share a caption; 1 and 3 differ from 0 but copy its caption
    preds = [{"image_id": 0, "caption": "a red circle."}, {"image_id": 1, "caption": "a red circle."},
             {"image_id": 2, "caption": "a red circle."}, {"image_id": 3, "caption": "a blue circle."}]
    assert script.distinct_share(preds, data) == 0.25
    preds[1]["caption"] = "a blue circle."
    assert script.distinct_share(preds, data) == 1.0
