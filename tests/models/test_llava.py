import pytest
import torch
from PIL import Image

from mmlora.data.samples import CAPTION_PROMPT
from mmlora.models.llava import TinyLlavaSpec, build_tiny_llava, save_llava
from mmlora.models.loading import assemble_llava, load_llava


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_llava(tiny_llava_dir)


def _batch(processor, shapes_small, n=2):
    root = shapes_small / "world_A"
    images = [Image.open(root / "images" / "val" / f"A_val_{i:05d}.png") for i in range(n)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    return processor(images=images, text=[text] * n, return_tensors="pt")


def test_processor_expands_image_token_to_the_number_of_image_features(llava, shapes_small):
    model, processor = llava
    batch = _batch(processor, shapes_small)
    n_image_tokens = (batch["input_ids"] == model.config.image_token_index).sum(dim=1)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=batch["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    per_image = feats[0].shape[0] if isinstance(feats, (list, tuple)) else feats.shape[1]
    assert per_image == TinyLlavaSpec().num_image_tokens == 16
    assert n_image_tokens.tolist() == [per_image, per_image]
    assert batch["pixel_values"].shape[-2:] == (32, 32)  # 128 px images resized to the tower's size


def test_saved_and_reloaded_llava_gives_identical_logits(llava, shapes_small, tmp_path):
    model, processor = llava
    batch = _batch(processor, shapes_small)
    save_llava(model, processor, tmp_path / "copy")
    model2, processor2 = load_llava(tmp_path / "copy")
    batch2 = _batch(processor2, shapes_small)
    assert torch.equal(batch["input_ids"], batch2["input_ids"]) and torch.equal(batch["pixel_values"], batch2["pixel_values"])
    with torch.no_grad():
        a, b = model(**batch).logits, model2(**batch2).logits
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_build_is_deterministic_from_seed():
    spec = TinyLlavaSpec()
    m1, _ = build_tiny_llava(spec, seed=3)
    m2, _ = build_tiny_llava(spec, seed=3)
    m3, _ = build_tiny_llava(spec, seed=4)
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not all(torch.equal(p1[k], p3[k]) for k in p1)


def test_generate_produces_tokens(llava, shapes_small):
    model, processor = llava
    batch = _batch(processor, shapes_small, n=1)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 5 or processor.tokenizer.eos_token_id in out[0].tolist()


def test_assemble_llava_from_vision_encoder_and_language_model(tmp_path, llava, shapes_small):
    """A user's own VLM: a CLIP vision encoder + a causal LM + a new projector."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tok = llava[1].tokenizer
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(tmp_path / "vision")
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 2, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    lm.save_pretrained(tmp_path / "lm")
    # The LM's own tokenizer has no <image> or <pad>: assembling adds them and resizes the embeddings.
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(llava[0].name_or_path)
    base_tok.save_pretrained(tmp_path / "lm")

    model, processor = assemble_llava(tmp_path / "vision", tmp_path / "lm")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in vision.state_dict().items())
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert model.model.multi_modal_projector.linear_1.in_features == 32
    assert model.model.multi_modal_projector.linear_2.out_features == 64
    save_llava(model, processor, tmp_path / "assembled")
    model2, processor2 = load_llava(tmp_path / "assembled")
    batch = _batch(processor2, shapes_small, n=1)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)
