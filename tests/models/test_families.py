"""``mmlora models tiny TYPE``: complete offline folders per family, and the data pipeline on them
(labels on answers only, image runs however the family wraps them, per-token outputs padded)."""

from __future__ import annotations

import sys
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmlora.cli import main
from mmlora.data.batching import Collator
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import BadSample, Sample
from mmlora.models.families import build_family

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_command_writes_a_loadable_folder_and_refuses_to_overwrite(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "qwen"
    assert main(["models", "tiny", "qwen2_vl", "--out", str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    tok = processor.tokenizer
    assert type(processor).__name__ == "Qwen2VLProcessor" and type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert model.config.get_text_config().vocab_size == len(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    capsys.readouterr()
    assert main(["models", "tiny", "qwen2_vl", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert main(["models", "tiny", "qwen2_vl", "--out", str(out), "--force"]) == 0


def test_smolvlm_without_its_extra_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "num2words", None)  # as if the smolvlm extra were not installed
    assert main(["models", "tiny", "smolvlm", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmlora: error: SmolVLM's processor needs num2words (pip install 'mmlora[smolvlm]')"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "idefics3", "smolvlm", "paligemma", "internvl", "mllama", "gemma4"])
def test_shipped_recipe_config_is_what_the_build_writes(model_type):
    model, _ = build_family(model_type)
    shipped = json.loads((ROOT / "recipes" / "families" / "configs" / model_type / "config.json").read_text())
    built = json.loads(model.config.to_json_string())
    drop = {"transformers_version", "architectures"}
    assert {k: v for k, v in built.items() if k not in drop} == {k: v for k, v in shipped.items() if k not in drop}


def _sample(tmp_path, size=(128, 128), answer="a red circle.", sid="s"):
    path = tmp_path / f"{sid}.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return Sample(sid, "t", messages, [path])


def _answers(processor, out) -> list[str]:
    labels = out["labels"].tolist()
    runs, cur = [], []
    for t in labels + [IGNORE]:
        if t == IGNORE:
            if cur:
                runs.append(processor.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    return runs


@pytest.mark.parametrize("model_type,eot,wrap", [
    ("idefics3", "<end_of_utterance>", ("<fake_token_around_image>", "<fake_token_around_image>")),
    ("internvl", "<|im_end|>", ("<img>", "</img>")),
    ("gemma3", "<end_of_turn>", ("<start_of_image>", "<end_of_image>")),
    ("gemma4", "<turn|>", ("<|image>", "<image|>")),
    ("paligemma", "<eos>", None),
])
def test_wrapped_image_runs_are_found_and_labels_are_the_answer(model_type, eot, wrap, tmp_path):
    _, processor = build_family(model_type)
    encoder = ConversationEncoder(processor, max_length=512)
    out = encoder.encode(_sample(tmp_path))
    answers = [a.strip() for a in _answers(processor, out)]
    assert answers in (["a red circle." + eot], ["\na red circle." + eot])
    ids = out["input_ids"]
    tok = processor.tokenizer
    if wrap:  # the run the processor inserted, wrappers included, is unlabelled
        first, last = (ids == tok.convert_tokens_to_ids(wrap[0])).nonzero(), (ids == tok.convert_tokens_to_ids(wrap[1])).nonzero()
        assert len(first) and len(last)
        assert (out["labels"][int(first[0]): int(last[-1]) + 1] == IGNORE).all()
    if model_type == "paligemma":  # the answer is the causal suffix, the prompt the bidirectional prefix
        types = out["token_type_ids"]
        start = int((out["labels"] != IGNORE).nonzero()[0])
        assert not types[:start].any() and types[start:].all()
    # Truncation inside the image's run is refused; after it, the text is cut.
    image_end = int(torch.isin(ids, torch.tensor(sorted(encoder.image_token_ids))).nonzero()[-1]) + 1
    with pytest.raises(BadSample, match="image tokens are never cut"):
        ConversationEncoder(processor, max_length=image_end - 2).encode(_sample(tmp_path))
    cut = ConversationEncoder(processor, max_length=len(ids) - 1).encode(_sample(tmp_path))
    assert torch.equal(cut["input_ids"], ids[:-1]) and all(len(v) == len(ids) - 1 for k, v in cut.items()
                                                           if k in ("labels", "token_type_ids", "attention_mask"))


def test_collator_pads_per_token_outputs_and_concatenates_patches(tmp_path):
    model, processor = build_family("qwen2_vl")
    encoder = ConversationEncoder(processor, max_length=512)
    items = [encoder.encode(_sample(tmp_path, (128, 128), sid="a")),
             encoder.encode(_sample(tmp_path, (128, 64), "a small blue star at the top left.", sid="b"))]
    assert len(items[0]["input_ids"]) != len(items[1]["input_ids"])
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    n = batch["input_ids"].shape[1]
    assert batch["mm_token_type_ids"].shape == (2, n)
    for row, it in enumerate(items):
        k = len(it["input_ids"])
        assert torch.equal(batch["mm_token_type_ids"][row, :k], it["mm_token_type_ids"]) and not batch["mm_token_type_ids"][row, k:].any()
    assert batch["pixel_values"].shape[0] == sum(len(it["pixel_values"]) for it in items)
    assert batch["image_grid_thw"].shape == (2, 3)
    loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_collator_zero_pads_any_resolution_tiles(tmp_path):
    model, processor = build_family("llava_next")
    encoder = ConversationEncoder(processor, max_length=512)
    items = [encoder.encode(_sample(tmp_path, (128, 128), sid="a")), encoder.encode(_sample(tmp_path, (128, 64), sid="b"))]
    tiles = [it["pixel_values"].shape[1] for it in items]
    assert tiles[0] != tiles[1]
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape[:2] == (2, max(tiles)) and batch["image_sizes"].shape == (2, 2)
    assert not batch["pixel_values"][tiles.index(min(tiles)), min(tiles):].any()
    loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def _images_sample(tmp_path, sizes, sid, prompt="Describe."):
    paths = []
    for k, size in enumerate(sizes):
        paths.append(tmp_path / f"{sid}{k}.png")
        Image.new("RGB", size, (40 * k + 20, 160, 40)).save(paths[-1])
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "a star."}]}]
    return Sample(sid, "t", messages, paths)


def test_mllama_one_image_token_per_image_and_the_cross_attention_mask_follows_the_text(tmp_path):
    """mllama puts one ``<|image|>`` per image in the text (the features enter through cross-attention):
    it is unlabelled, never cut, and ``cross_attention_mask [1, L, images, tiles]`` is cut with the text."""
    model, processor = build_family("mllama")
    assert model.model.language_model.cross_attention_layers == [1]  # the tiny LM has its cross-attention layer
    encoder = ConversationEncoder(processor, max_length=512)
    out = encoder.encode(_sample(tmp_path, (128, 64)))
    ids, image_id = out["input_ids"], processor.image_token_id
    assert [a.strip() for a in _answers(processor, out)] == ["a red circle.<|eot_id|>"]
    assert int((ids == image_id).sum()) == 1 and int(out["labels"][ids == image_id]) == IGNORE
    assert out["cross_attention_mask"].shape == (1, len(ids), 1, 2) and out["pixel_values"].shape[:3] == (1, 1, 2)
    at = int((ids == image_id).nonzero()[0])
    assert not out["cross_attention_mask"][0, :at].any() and out["cross_attention_mask"][0, at:].all()  # 2 tiles
    with pytest.raises(BadSample, match="image tokens are never cut"):
        ConversationEncoder(processor, max_length=at).encode(_sample(tmp_path, (128, 64)))
    cut = ConversationEncoder(processor, max_length=len(ids) - 1).encode(_sample(tmp_path, (128, 64)))
    assert cut["cross_attention_mask"].shape[1] == len(cut["input_ids"]) == len(ids) - 1
    assert torch.equal(cut["cross_attention_mask"], out["cross_attention_mask"][:, :-1])


@pytest.mark.parametrize("side", ["right", "left"])
def test_mllama_collation_equals_the_processors_batch(side, tmp_path):
    """Samples with different text lengths, image counts (2 and 1) and tile counts collate to what the
    processor gives for the same batch in one call: the cross-attention mask padded along the text on
    its padding side and along images with zeros, pixel values and aspect ratio ids zero-padded. Two
    differences, both in padding: the processor lets right-padding positions attend to the last image (its
    ranges run to the padded length; the collator leaves padding rows zero, and they are masked anyway),
    and for a padded image it marks the first tile in ``aspect_ratio_mask`` (a leftover of the original
    code, its comment says; the collator leaves it all zero, as the pixels)."""
    model, processor = build_family("mllama")
    encoder = ConversationEncoder(processor, max_length=512)
    samples = [_images_sample(tmp_path, [(128, 64), (64, 64)], "two", "Describe both of these images, please."),
               _images_sample(tmp_path, [(64, 64)], "one")]
    items = [encoder.encode(s) for s in samples]
    batch = Collator(processor.tokenizer.pad_token_id, padding_side=side)(items)
    texts = [encoder.render(s.messages) for s in samples]
    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, side
    try:
        want = processor(text=texts, images=[[Image.open(p).convert("RGB") for p in s.images] for s in samples],
                         add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old
    assert want["cross_attention_mask"].shape == (2, batch["input_ids"].shape[1], 2, 2)
    for key in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids"):
        assert torch.equal(batch[key], want[key].to(batch[key].dtype)), key
    text = batch["attention_mask"][:, :, None, None].bool()
    assert torch.equal(batch["cross_attention_mask"], want["cross_attention_mask"] * text)
    assert torch.equal(batch["aspect_ratio_mask"][0], want["aspect_ratio_mask"][0])
    assert torch.equal(batch["aspect_ratio_mask"][1, 0], want["aspect_ratio_mask"][1, 0]) and not batch["aspect_ratio_mask"][1, 1].any()
    loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
    assert torch.isfinite(loss)
