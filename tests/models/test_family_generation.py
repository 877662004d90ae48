"""Generation per family through the one path (``mmlora.generate.generate_answers``): answers of a
left-padded batch equal the answers of each image alone (Qwen's multimodal RoPE deltas, any-resolution
tiles, PaliGemma's prefix types all survive padding). Images of two sizes make the prompts differ in
length where the family's image token count depends on the size."""

from __future__ import annotations

import pytest
from PIL import Image

from mmlora.generate import generate_answers
from tests.train.test_families_train import TRAINED, record


@pytest.mark.parametrize("model_type", TRAINED)
def test_batched_answers_equal_one_by_one(model_type, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.families import save_family

    save_family(model_type, tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    images = [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 64), (20, 160, 40)),
              Image.new("RGB", (96, 128), (30, 30, 200))]
    prompts = ["Describe the image.", "What is there?", "Describe the image."]
    batched = generate_answers(model, processor, images, prompts, batch_size=3, max_new_tokens=6)
    alone = [generate_answers(model, processor, [img], [p], batch_size=1, max_new_tokens=6)[0]
             for img, p in zip(images, prompts)]
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert batched == alone
    record(model_type, "generate", "✓")


def test_gemma4_mixed_adapters_route_per_image_and_refuse_its_projector():
    """Gemma 4 gives one pixel row per image, so mixed-adapter batches route its vision tower and
    language model per sample (answers equal to each adapter alone); its projector reads the tokens of
    all images as one sequence, so an adapter there is refused in one line, not left to PEFT's error."""
    import copy

    from peft import LoraConfig, get_peft_model

    from mmlora.errors import MmloraError
    from mmlora.models.families import build_family

    model, processor = build_family("gemma4")
    images = [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 96), (20, 160, 40))]
    for targets, routable in ((["q_proj.linear", "language_model.layers.0.self_attn.q_proj"], True),
                              (["embedding_projection", "q_proj.linear"], False)):
        config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        peft = get_peft_model(copy.deepcopy(model), config, adapter_name="one")
        peft.add_adapter("two", LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        peft.eval()
        if not routable:
            with pytest.raises(MmloraError, match=r"embed_vision\.embedding_projection reads \d+ rows for 2 samples.*--mode switch"):
                generate_answers(peft, processor, images, "Describe.", adapter_names=["one", "two"], max_new_tokens=4)
            continue
        mixed = generate_answers(peft, processor, images, "Describe.", adapter_names=["one", "two"], max_new_tokens=4)
        alone = []
        for name, image in zip(("one", "two"), images):
            peft.set_adapter(name)
            alone += generate_answers(peft, processor, [image], "Describe.", max_new_tokens=4)
        assert mixed == alone
