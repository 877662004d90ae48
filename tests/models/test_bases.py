"""The shipped pretrained bases load offline and reproduce the scores in their model cards."""

import json

import pytest

from mmlora.models.presets import PRESETS, preset_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worlds():
    from mmlora.showcase.shapes import cached_worlds

    return cached_worlds()  # the default worlds the bases were scored on


def test_bases_load_through_from_pretrained_paths():
    import open_clip
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    llava_dir, clip_dir = preset_path("shapes-llava-base"), preset_path("shapes-clip-base")
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    assert sum(p.numel() for p in model.parameters()) > 4_000_000
    assert AutoProcessor.from_pretrained(llava_dir).tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    assert clip.visual.grid_size == (16, 16)
    size = sum(p.stat().st_size for name in ("shapes-llava-base", "shapes-clip-base")
               for p in preset_path(name).rglob("*") if p.is_file())
    assert size < 20 * 2**20  # the shipped bases stay under 20 MB together
    assert PRESETS["shapes-llava-base"].shipped and PRESETS["shapes-clip-base"].shipped


def test_recorded_scores_reproduce(worlds, tmp_path):
    """Tolerance: 0.01 absolute on every recorded score (greedy decoding on CPU is deterministic;
    the margin covers BLAS differences between machines)."""
    from mmlora.eval.caption import CaptionSet, evaluate_models
    from mmlora.showcase.slots import slot_scores

    recorded = json.loads((preset_path("shapes-llava-base") / "scores.json").read_text())
    for world in ("A", "B"):
        coco = worlds / f"world_{world}" / "annotations" / "captions_test.json"
        report = evaluate_models({"base": "shapes-llava-base"}, CaptionSet.from_coco(coco), tmp_path / world,
                                 extra=slot_scores)
        scores = report["models"]["base"]["scores"]
        for key in ("CIDEr", "BLEU-4", "slot_all"):
            assert scores[key] == pytest.approx(recorded[world][key], abs=0.01), (world, key)
    # the shift is real: world B is clearly harder for the base
    assert recorded["B"]["CIDEr"] < 0.7 * recorded["A"]["CIDEr"]
    assert recorded["B"]["slot_all"] < recorded["A"]["slot_all"]


def test_clip_retrieval_reproduces(worlds):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pretrain_bases", Path(__file__).resolve().parents[2] / "scripts" / "pretrain_bases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recorded = json.loads((preset_path("shapes-clip-base") / "scores.json").read_text())
    r1 = script.clip_retrieval(preset_path("shapes-clip-base"), worlds / "world_A" / "annotations" / "captions_test.json")
    assert r1 == pytest.approx(recorded["A"]["retrieval_R@1"], abs=0.01)
    assert r1 > 10 / 200  # far above chance
