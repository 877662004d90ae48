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
    assert clip.visual.grid_size == (8, 8)  # 64 px, 8 px patches: the LLaVA base's tower grid
    size = sum(p.stat().st_size for name in ("shapes-llava-base", "shapes-clip-base")
               for p in preset_path(name).rglob("*") if p.is_file())
    assert size < 20 * 2**20  # the shipped bases stay under 20 MB together
    assert PRESETS["shapes-llava-base"].shipped and PRESETS["shapes-clip-base"].shipped


def _script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pretrain_bases", Path(__file__).resolve().parents[2] / "scripts" / "pretrain_bases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_recorded_scores_reproduce(worlds, tmp_path):
    """The LLaVA base's scores on the first SUBSET world-A test images, as the card's script measured
    them. Tolerance: 0.01 absolute (greedy decoding on CPU is deterministic; the margin covers BLAS
    differences between machines)."""
    script = _script()
    recorded = json.loads((preset_path("shapes-llava-base") / "scores.json").read_text())
    coco = worlds / "world_A" / "annotations" / "captions_test.json"
    scores = script.caption_scores(preset_path("shapes-llava-base"), coco, tmp_path, "subset", script.SUBSET)
    for key in ("CIDEr", "BLEU-4", "slot_shape", "slot_colour", "slot_position", "distinct"):
        assert scores[key] == pytest.approx(recorded["A_subset"][key], abs=0.01), key
    # the shifts are real: worlds B and C are clearly harder for the base than A
    for world in ("B", "C"):
        assert recorded[world]["slot_all"] < recorded["A"]["slot_all"]
    assert recorded["B"]["CIDEr"] < 0.7 * recorded["A"]["CIDEr"]


def test_clip_retrieval_reproduces(worlds):
    script = _script()
    recorded = json.loads((preset_path("shapes-clip-base") / "scores.json").read_text())
    r1 = script.clip_retrieval(preset_path("shapes-clip-base"), worlds / "world_A" / "annotations" / "captions_test.json",
                               script.SUBSET)
    assert r1 == pytest.approx(recorded["A_subset"]["retrieval_R@1"], abs=0.01)
    assert r1 > 10 / script.SUBSET  # far above chance


def test_the_bases_see():
    """The shipped bases' recorded scores (reproduced on a subset above) meet what they are for: the
    LLaVA base names each object's shape, colour and position on world A and tells distinct images
    apart; the CLIP base retrieves world-A captions; both shifts are hard for them."""
    llava = json.loads((preset_path("shapes-llava-base") / "scores.json").read_text())
    clip = json.loads((preset_path("shapes-clip-base") / "scores.json").read_text())
    assert llava["A"]["num_images"] == 200
    for slot in ("slot_shape", "slot_colour", "slot_position"):
        assert llava["A"][slot] >= 0.90, slot
    assert llava["A"]["distinct"] >= 0.90
    assert clip["A"]["retrieval_R@1"] >= 0.70
    assert llava["C"]["slot_all"] < 0.5 * llava["A"]["slot_all"]  # world C's pixels alone defeat the frozen base
    assert clip["C"]["retrieval_R@1"] < 0.5 * clip["A"]["retrieval_R@1"]
