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
    assert script.main(["--out", str(out), "--work", str(tmp_path / "work"), "--clip-steps", "3",
                        "--stage1-steps", "2", "--stage2-steps", "2", "--eval-limit", "4"]) == 0
    from transformers import LlavaForConditionalGeneration

    from mmlora.models.loading import load_clip

    llava = LlavaForConditionalGeneration.from_pretrained(out / "shapes-llava-base")
    assert llava.config.vision_config.image_size == 64 and llava.config.vision_config.hidden_act == "gelu"
    load_clip(out / "shapes-clip-base")
    scores = json.loads((out / "shapes-llava-base" / "scores.json").read_text())
    assert set(scores) == {"A", "B"} and {"CIDEr", "BLEU-4", "slot_all"} <= set(scores["A"])
    assert "retrieval_R@1" in json.loads((out / "shapes-clip-base" / "scores.json").read_text())["A"]
    card = (out / "shapes-llava-base" / "README.md").read_text()
    assert "| A |" in card and "python scripts/pretrain_bases.py" in card
