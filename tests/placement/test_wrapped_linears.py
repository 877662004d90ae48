"""Linear layers inside wrappers (Gemma 4's ``Gemma4ClippableLinear``: clamps around one ``nn.Linear``)
are planned by the wrapper's name and adapted inside it, so the wrapper's clamps still hold."""

from __future__ import annotations

import re

import pytest
import torch

from mmlora.config.schema import PlacementSpec
from mmlora.models.layers import linear_wrappers
from mmlora.models.modality import discover_modalities
from mmlora.models.tiny_any import build_tiny, tiny_config
from mmlora.placement.apply import apply_placement
from mmlora.placement.plan import plan_placement

VISION_ATTENTION = re.compile(r"model\.vision_tower\.encoder\.layers\.\d\.self_attn\.[qkvo]_proj\.linear")


def _targets(model, spec: dict, modality: str = "vision") -> list[str]:
    plan = plan_placement(model, discover_modalities(model), PlacementSpec.model_validate(spec))
    return [t.name for t in plan.modalities[modality].targets]


@pytest.fixture(scope="module")
def gemma4_meta():
    return build_tiny("gemma4", device="meta")


def test_vision_attention_targets_are_the_linears_inside_the_wrappers(gemma4_meta):
    wrappers = linear_wrappers(gemma4_meta)
    attention = _targets(gemma4_meta, {"vision": {"mode": "lora", "targets": "attention"}})
    assert len(attention) == 2 * 4 and all(VISION_ATTENTION.fullmatch(n) for n in attention), attention
    assert all(type(gemma4_meta.get_submodule(wrappers[n])).__name__ == "Gemma4ClippableLinear" for n in attention)
    assert _targets(gemma4_meta, {"vision": {"mode": "lora", "targets": "q", "layers": [1]}}) == [
        "model.vision_tower.encoder.layers.1.self_attn.q_proj.linear"]
    # a pattern naming the wrapper reaches the linear inside it (PEFT cannot wrap the wrapper)
    assert _targets(gemma4_meta, {"vision": {"mode": "lora", "targets": "encoder.layers.*.mlp.down_proj"}}) == [
        f"model.vision_tower.encoder.layers.{i}.mlp.down_proj.linear" for i in range(2)]
    every = _targets(gemma4_meta, {"vision": {"mode": "lora", "targets": "all-linear"}})
    assert set(attention) < set(every) and not set(every) & set(wrappers.values())
    # the language model's plain linears are found as before; the audio tower's wrapped ones stay out
    language = _targets(gemma4_meta, {"language": {"mode": "lora", "targets": "attention"}}, "language")
    assert len(language) == 2 * 4 and all(n.startswith("model.language_model.") and n.endswith("_proj") for n in language)
    assert any(n.startswith("model.audio_tower.") for n in wrappers)
    assert not any("audio" in n for n in every)


def test_a_module_with_its_own_weight_is_no_wrapper():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.linear = torch.nn.Linear(4, 4)

    class Clamped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bound", torch.tensor(1.0))
            self.linear = torch.nn.Linear(4, 4)

    model = torch.nn.ModuleDict({"scaled": Scaled(), "clamped": Clamped(), "plain": torch.nn.Linear(4, 4),
                                 "pair": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))})
    assert linear_wrappers(model) == {"clamped.linear": "clamped"}


def test_lora_inside_a_clippable_linear_stays_clamped():
    config = tiny_config("gemma4")
    config.vision_config.use_clipped_linears = True
    text = config.get_text_config()
    text.vocab_size = text.vocab_size_per_layer_input = 64  # the embeddings are not under test
    torch.manual_seed(0)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config).eval()
    plan = plan_placement(model, discover_modalities(model),
                          PlacementSpec.model_validate({"vision": {"mode": "lora", "targets": "q", "layers": [0]}}))
    peft = apply_placement(model, plan)
    wrapper = peft.get_base_model().get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    lora = wrapper.linear
    assert type(lora).__module__.startswith("peft.") and isinstance(lora.base_layer, torch.nn.Linear)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # PEFT starts B at zero: make the adapter change the output
        wrapper.input_min.fill_(-0.5), wrapper.input_max.fill_(0.5)
        wrapper.output_min.fill_(-0.2), wrapper.output_max.fill_(0.2)
        x = torch.randn(2, 5, lora.in_features)
        clipped = x.clamp(-0.5, 0.5)
        unclamped = lora(clipped)
        out = wrapper(x)
        assert not torch.allclose(unclamped, lora.base_layer(clipped))  # the adapter is live
        assert (unclamped.abs() > 0.2).any()  # and the output bounds bite
        torch.testing.assert_close(out, unclamped.clamp(-0.2, 0.2))
