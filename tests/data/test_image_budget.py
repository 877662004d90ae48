"""``data.image_min_pixels`` / ``image_max_pixels`` / ``image_max_tiles``: the processor's own budget, checked
against the processors' arithmetic (Qwen's ``smart_resize``, Idefics3's k x k splitting, InternVL's crop
grid), refused in one line where a processor has no such setting, and the same in training, in the run's
saved processor, in a run reloaded for evaluation and in ``mmlora data check``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from mmlora.config.loading import load_recipe, validate_recipe
from mmlora.config.schema import DataSpec
from mmlora.data.image_budget import apply_image_budget, image_budget
from mmlora.data.processing import ConversationEncoder
from mmlora.data.samples import Sample
from mmlora.errors import MmloraError

ROOT = Path(__file__).resolve().parents[2]
QWEN_PATCH, QWEN_MERGE = 14, 2  # the tiny qwen2_vl's vision tower


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from mmlora.models.families import save_family

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = tmp_path_factory.mktemp(model_type) / "model"
            save_family(model_type, built[model_type])
        return built[model_type]

    return get


def _processor(folder: Path, **budget):
    from transformers import AutoProcessor

    return apply_image_budget(AutoProcessor.from_pretrained(folder), DataSpec(train=[], **budget))


def _encode(processor, tmp_path: Path, side: int = 128) -> dict:
    path = tmp_path / f"img{side}.png"
    Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square."}]}]
    return ConversationEncoder(processor, max_length=1024).encode(Sample("s", "t", messages, [path]))


def _image_tokens(processor, out: dict) -> int:
    return int((out["input_ids"] == processor.image_token_id).sum())


def _qwen_tokens(side: int, min_pixels: int, max_pixels: int) -> int:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(side, side, factor=QWEN_PATCH * QWEN_MERGE, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // QWEN_PATCH) * (w // QWEN_PATCH) // QWEN_MERGE**2


# ------------------------------------------------------------------ the recipe keys


def test_the_keys_are_validated_in_the_recipe():
    base = {"model": {"name": "tiny-llava"}, "data": {"train": []}}
    ok = validate_recipe({**base, "data": {"train": [], "image_min_pixels": 3136, "image_max_pixels": 3136}})
    assert image_budget(ok.data) == {"image_min_pixels": 3136, "image_max_pixels": 3136}
    assert image_budget(validate_recipe(base).data) == {}
    for bad, words in [({"image_min_pixels": 5000, "image_max_pixels": 4000}, "image_min_pixels 5000 is over image_max_pixels 4000"),
                       ({"image_max_pixels": 0}, "data.image_max_pixels"), ({"image_max_tiles": -1}, "data.image_max_tiles"),
                       ({"image_max_tiles": 2.5}, "data.image_max_tiles")]:
        with pytest.raises(MmloraError) as err:
            validate_recipe({**base, "data": {"train": [], **bad}})
        assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ pixel budgets (Qwen2-VL)


def test_qwen_pixel_budget_sets_the_image_token_count(family_dir, tmp_path):
    folder = family_dir("qwen2_vl")
    default = _processor(folder)
    side_px = default.image_processor.size["longest_edge"]  # the tiny processor: min = max = 112 x 112
    assert _image_tokens(default, _encode(default, tmp_path)) == _qwen_tokens(128, side_px, side_px) == 16

    small = _processor(folder, image_max_pixels=56 * 56)  # below the old minimum: the minimum follows
    out = _encode(small, tmp_path)
    assert _image_tokens(small, out) == _qwen_tokens(128, 56 * 56, 56 * 56) == 4
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]

    large = _processor(folder, image_min_pixels=224 * 224)  # above the old maximum: the maximum follows
    assert _image_tokens(large, _encode(large, tmp_path)) == _qwen_tokens(128, 224 * 224, 224 * 224) == 64

    both = _processor(folder, image_min_pixels=28 * 28, image_max_pixels=84 * 84)  # 128 px rounds to 140 > 84
    assert _image_tokens(both, _encode(both, tmp_path)) == _qwen_tokens(128, 28 * 28, 84 * 84) == 9


def test_the_budget_survives_save_and_applies_once(family_dir, tmp_path):
    from transformers import AutoProcessor

    budget = DataSpec(train=[], image_max_pixels=56 * 56)
    processor = _processor(family_dir("qwen2_vl"), image_max_pixels=56 * 56)
    size = dict(processor.image_processor.size)
    apply_image_budget(processor, budget)
    assert dict(processor.image_processor.size) == size == {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert dict(reloaded.image_processor.size) == size
    assert _image_tokens(reloaded, _encode(reloaded, tmp_path)) == 4


# ------------------------------------------------------------------ tile counts


def test_idefics3_tiles_split_the_image_into_k_by_k_crops(family_dir, tmp_path):
    folder = family_dir("idefics3")
    per_view = 16  # 64 px views, 8 px patches, pixel shuffle 2: 16 image tokens each
    for tiles, views in [(None, 1), (1, 1), (4, 4 + 1), (9, 9 + 1)]:  # crops + the global image
        processor = _processor(folder, **({} if tiles is None else {"image_max_tiles": tiles}))
        out = _encode(processor, tmp_path)
        assert out["pixel_values"].shape[1] == views
        assert _image_tokens(processor, out) == per_view * views
        text = processor.tokenizer.decode(out["input_ids"])
        assert text.count("<global-img>") == 1 and text.count("<row_") == (views - 1)
    with pytest.raises(MmloraError) as err:
        _processor(folder, image_max_tiles=6)
    assert str(err.value).startswith("data.image_max_tiles: Idefics3Processor (Idefics3ImageProcessor) splits")
    assert "give a square" in str(err.value)


def test_internvl_tiles_cap_the_crop_grid(family_dir, tmp_path):
    folder = family_dir("internvl")
    per_patch = 16  # 64 px crops, 8 px patches, pixel shuffle 0.5
    # InternVL's grid: the aspect ratio closest to the image's among grids of at most max_patches crops, the
    # larger grid on a tie when the image covers over half of it; a thumbnail is added to more than one crop.
    for side, tiles, patches in [(128, 1, 1), (128, 4, 4 + 1), (128, 9, 4 + 1), (192, 9, 9 + 1), (192, 4, 4 + 1)]:
        processor = _processor(folder, image_max_tiles=tiles)
        out = _encode(processor, tmp_path, side)
        assert out["pixel_values"].shape[0] == patches, (side, tiles)
        assert _image_tokens(processor, out) == per_patch * patches
    assert _processor(folder, image_max_tiles=1).image_processor.min_patches == 1


# ------------------------------------------------------------------ refusals


class MllamaProcessor:  # the dispatch reads the image processor's class; no tokenizer needed
    def __init__(self):
        from transformers import MllamaImageProcessor

        self.image_processor = MllamaImageProcessor()


@pytest.mark.parametrize("family,key,words", [
    ("paligemma", "image_max_pixels", "PaliGemmaProcessor (SiglipImageProcessor) has no pixel budget"),
    ("tiny-llava", "image_max_pixels", "LlavaProcessor (CLIPImageProcessor) has no pixel budget"),
    ("qwen2_vl", "image_max_tiles", "Qwen2VLProcessor (Qwen2VLImageProcessor) does not tile images"),
    ("idefics3", "image_min_pixels", "Idefics3Processor (Idefics3ImageProcessor) has no pixel budget"),
    ("llava_next", "image_max_tiles", "LlavaNextProcessor (LlavaNextImageProcessor) picks each image's grid"),
    ("mllama", "image_max_tiles", "MllamaProcessor (MllamaImageProcessor) tiles up to the model's vision_config"),
    ("clip", "image_max_pixels", "open_clip CLIP"),
])
def test_a_key_the_processor_has_no_setting_for_is_refused_in_one_line(family, key, words, family_dir, tiny_llava_dir):
    from transformers import AutoProcessor

    processor = {"tiny-llava": lambda: AutoProcessor.from_pretrained(tiny_llava_dir), "mllama": MllamaProcessor,
                 "clip": lambda: None}.get(family, lambda: AutoProcessor.from_pretrained(family_dir(family)))()
    with pytest.raises(MmloraError) as err:
        apply_image_budget(processor, DataSpec(train=[], **{key: 4}))
    message = str(err.value)
    assert message.startswith(f"data.{key}: ") and words in message and "remove the key" in message
    assert "\n" not in message


def test_a_clip_recipe_with_a_budget_is_refused_at_setup(tiny_clip_dir):
    from mmlora.models.loading import load_clip
    from mmlora.objectives.select import objective_for

    model, _, _ = load_clip(tiny_clip_dir)
    with pytest.raises(MmloraError, match=r"^data\.image_max_pixels: open_clip CLIP"):
        objective_for(model, tiny_clip_dir, DataSpec(train=[], image_max_pixels=4096))


# ------------------------------------------------------------------ training, reload, data check


def _qwen_recipe(family_dir, world: Path, out: Path, *extra: str):
    overrides = [f"model.name={family_dir('qwen2_vl')}", f"train.output_dir={out}", "train.max_steps=2",
                 "train.batch_size=2", "train.eval_every=null", "train.save_every=null", "train.warmup_steps=0",
                 f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]", "data.val=[]", *extra]
    return load_recipe(ROOT / "recipes" / "families" / "qwen2_vl.yaml", overrides)


def test_training_and_the_reloaded_run_see_the_reduced_tokens(family_dir, shapes_small, tmp_path):
    import torch

    from mmlora.runs.checkpoint import fingerprint_changes
    from mmlora.runs.reference import load_reference
    from mmlora.train.loop import Trainer

    out = tmp_path / "run"
    trainer = Trainer(_qwen_recipe(family_dir, shapes_small / "world_B", out, "data.image_max_pixels=3136"), "qwen2_vl")
    trainer.setup()
    processor = trainer.objective.processor
    seen = []
    real = trainer.objective.loss_sum

    def recording(model, batch):
        rows = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
        loss, units = real(model, batch)
        seen.append((rows.tolist(), batch["image_grid_thw"].tolist(), float(loss.detach())))
        return loss, units

    trainer.objective.loss_sum = recording
    assert trainer.train()["steps"] == 2
    assert len(seen) == 2 and all(math.isfinite(loss) for *_, loss in seen)
    expected = _qwen_tokens(128, 3136, 3136)  # shapes images are 128 px: 4 tokens, not the default 16
    assert all(rows == [expected] * len(rows) and grids == [[1, 4, 4]] * len(grids) for rows, grids, _ in seen)
    fingerprint = trainer.fingerprint
    assert fingerprint["data"]["image"] == {"image_max_pixels": 3136}
    unbudgeted = {**fingerprint, "data": {k: v for k, v in fingerprint["data"].items() if k != "image"}}
    assert [c.split(":")[0] for c in fingerprint_changes(fingerprint, unbudgeted)] == ["data.image.image_max_pixels"]

    loaded = load_reference(out)
    assert loaded.recipe.data.image_max_pixels == 3136
    assert dict(loaded.processor.image_processor.size) == {"shortest_edge": 3136, "longest_edge": 3136}
    batch = loaded.processor(images=[Image.new("RGB", (128, 128))], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                             return_tensors="pt")
    assert int((batch["input_ids"] == loaded.processor.image_token_id).sum()) == expected
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()


def test_data_check_of_a_recipe_counts_with_its_budget(family_dir, shapes_small, tmp_path, capsys):
    import yaml

    from mmlora.cli import main

    def check(**budget) -> str:
        recipe = {"model": {"name": str(family_dir("qwen2_vl"))},
                  "data": {"train": [{"format": "llava", "path": str(shapes_small / "world_B" / "llava_val.json")}],
                           **budget}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["data", "check", str(path)]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "tokens: min" in line)

    def shortest(line: str) -> int:
        return int(line.split("min ")[1].split(",")[0])

    assert shortest(check()) - shortest(check(image_max_pixels=3136)) == 16 - 4
