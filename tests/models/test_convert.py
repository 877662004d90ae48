import torch

from mmlora.models.convert import hf_vision_from_open_clip


def test_open_clip_tower_becomes_an_equal_clip_vision_model(tiny_clip_dir):
    from safetensors.torch import load_file

    from mmlora.models.loading import load_clip

    clip, _, _ = load_clip(tiny_clip_dir)
    hf = hf_vision_from_open_clip(tiny_clip_dir)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = hf(pixel_values=pixels).pooler_output  # post-layernorm CLS
        projected = pooled @ load_file(str(tiny_clip_dir / "open_clip_model.safetensors"))["visual.proj"]
        assert torch.allclose(projected, clip.encode_image(pixels), atol=1e-5)


def test_another_image_size_interpolates_positions(tiny_clip_dir):
    hf = hf_vision_from_open_clip(tiny_clip_dir, image_size=32)
    assert hf.config.image_size == 32
    assert hf.get_input_embeddings() is not None and hf.config.image_size // hf.config.patch_size == 4
    with torch.no_grad():
        assert hf(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 17, 32)
