import json

import pytest
import torch
from PIL import Image

from mmlora.models.loading import load_clip
from mmlora.models.clip import model_config, save_clip


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


def _images(shapes_small, n=3):
    return [Image.open(shapes_small / "world_A" / "images" / "val" / f"A_val_{i:05d}.png") for i in range(n)]


def test_folder_is_open_clip_format(tiny_clip_dir):
    cfg = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == model_config("mmlora-clip-tiny")
    assert (tiny_clip_dir / "open_clip_model.safetensors").is_file()
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_saved_and_reloaded_clip_gives_identical_embeddings(clip, shapes_small, tmp_path):
    model, preprocess, tokenizer = clip
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tokenizer.tokenizer.name_or_path)
    save_clip(model, hf_tok, model_config("mmlora-clip-tiny"), tmp_path / "copy")
    model2, preprocess2, tokenizer2 = load_clip(tmp_path / "copy")
    pixels = torch.stack([preprocess(i) for i in _images(shapes_small)])
    assert torch.equal(pixels, torch.stack([preprocess2(i) for i in _images(shapes_small)]))
    assert pixels.shape[-2:] == (64, 64)
    texts = ["a large red circle in the top left.", "a small blue star."]
    assert torch.equal(tokenizer(texts), tokenizer2(texts))
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), model2.encode_image(pixels))
        assert torch.equal(model.encode_text(tokenizer(texts)), model2.encode_text(tokenizer2(texts)))


def test_text_is_pooled_at_the_end_of_text_token(clip):
    """Tokens after <end_of_text> (padding) must not change the text embedding."""
    model, _, tokenizer = clip
    ids = tokenizer(["a red circle"])
    changed = ids.clone()
    eos = int((ids[0] == 3).nonzero()[0])
    changed[0, eos + 1:] = 7  # garbage after the end token
    with torch.no_grad():
        # causal attention: positions after EOS cannot influence the EOS position
        assert torch.allclose(model.encode_text(ids), model.encode_text(changed), atol=1e-6)
        other = tokenizer(["a blue star"])
        assert not torch.allclose(model.encode_text(ids), model.encode_text(other))
    assert ids.shape == (1, 32) and int(ids.max()) < model_config("mmlora-clip-tiny")["text_cfg"]["vocab_size"]
