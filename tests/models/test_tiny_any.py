import pytest
import torch

from mmlora.models.tiny_any import build_tiny, image_text_to_text_types, tiny_config

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "mllama", "internvl"]


def test_registry_lists_image_text_to_text_types():
    types = image_text_to_text_types()
    assert len(types) > 50 and set(FAMILIES) <= set(types)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_instance_builds_small_with_the_families_structure(model_type):
    from transformers import AutoConfig

    full = AutoConfig.for_model(model_type)
    cfg = tiny_config(model_type)
    assert cfg.model_type == full.model_type
    text = cfg.get_text_config()
    assert text.num_hidden_layers <= 2 and text.hidden_size <= 64
    model = build_tiny(model_type, device="meta")
    assert type(model).__name__ == type(build_tiny(model_type, device="meta")).__name__
    n_layers_modules = [n for n, _ in model.named_modules() if n.endswith("layers.1")]
    assert n_layers_modules and not [n for n, _ in model.named_modules() if n.endswith("layers.2")]
    # The vocabulary is kept (image-token ids index into it), everything else is toy-sized.
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert non_embedding < 5_000_000


def test_tiny_llava_instance_runs_a_forward_pass():
    model = build_tiny("llava")
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.full((1, n_img + 4), 1)
    ids[0, 1 : n_img + 1] = cfg.image_token_index
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape == (1, n_img + 4, cfg.text_config.vocab_size)
