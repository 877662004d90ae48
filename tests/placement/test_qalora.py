"""QA-LoRA: the layer against its formula, the merge into zero points, placement, save and reload."""

import pytest
import torch
from torch import nn

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.adapters.int4 import Int4Linear, quantize_int4
from mmlora.adapters.qalora import QALoraLinear, merge_qalora, qalora_layers
from tests.placement.conftest import llava_batch

SPEC = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
        "language": {"mode": "qalora", "rank": 4, "group_size": 16}}


def _nonzero(layer: QALoraLinear, seed: int = 0) -> QALoraLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.qalora_A.weight.copy_(torch.randn(layer.qalora_A.weight.shape, generator=g))
        layer.qalora_B.weight.copy_(torch.randn(layer.qalora_B.weight.shape, generator=g) * 0.1)
    return layer


def test_forward_is_int4_base_plus_group_constant_update():
    torch.manual_seed(0)
    linear = nn.Linear(32, 5)
    layer = _nonzero(QALoraLinear.from_linear(linear, group_size=8, rank=3, alpha=6.0))
    assert layer.qalora_A.weight.shape == (3, 4)  # [r, in / group_size]
    codes, scales, zeros = quantize_int4(linear.weight, 8)
    w = scales.repeat_interleave(8, 1) * (codes.float() - zeros.repeat_interleave(8, 1))
    delta = (6.0 / 3) * layer.qalora_B.weight @ layer.qalora_A.weight  # [out, G]: a LoRA with A tied per group
    x = torch.randn(2, 7, 32)
    reference = x @ (w + delta.repeat_interleave(8, 1)).T + linear.bias
    assert torch.allclose(layer(x), reference, atol=1e-5)


def test_merge_moves_only_the_zero_points():
    torch.manual_seed(1)
    layer = _nonzero(QALoraLinear.from_linear(nn.Linear(64, 16), group_size=16, rank=4, alpha=8.0))
    merged = layer.merged()
    assert type(merged) is Int4Linear
    assert torch.equal(merged.qweight, layer.qweight) and torch.equal(merged.scales, layer.scales)
    assert not torch.equal(merged.zeros, layer.zeros)
    x = torch.randn(4, 64)
    # The stated tolerance: fp32 rounding of z' = z - delta / s, well below 1e-5 at these sizes.
    assert (merged(x) - layer(x)).abs().max() < 1e-5


def test_schema_refuses_contradictions():
    with pytest.raises(ValueError, match="applies to qalora only"):
        PlacementSpec.model_validate({"language": {"mode": "lora", "group_size": 32}})
    with pytest.raises(ValueError, match="quantizes its layers to INT4 itself"):
        PlacementSpec.model_validate({"language": {"mode": "qalora", "precision": "4bit"}})


def test_plan_refuses_a_group_size_that_does_not_divide(tiny_llava):
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.plan import plan_placement

    model, _ = tiny_llava
    spec = PlacementSpec.model_validate({"language": {"mode": "qalora", "group_size": 48}})
    with pytest.raises(MmloraError, match="not a multiple of group_size 48"):
        plan_placement(model, discover_modalities(model), spec)


def test_placed_trained_saved_reloaded_and_merged(tiny_llava, tiny_llava_dir, shapes_small, tmp_path):
    from mmlora.models.loading import load_llava
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.apply import apply_placement
    from mmlora.placement.audit import audit_gradients
    from mmlora.placement.plan import plan_placement
    from mmlora.placement.report import format_plan
    from mmlora.runs.save import load_placement, save_placement

    model, processor = tiny_llava
    spec = PlacementSpec.model_validate(SPEC)
    plan = plan_placement(model, discover_modalities(model), spec)
    table = format_plan(plan)
    assert "qalora" in table and "int4 g16" in table and "qalora on language: 14 linear layers" in table
    placed = apply_placement(model, plan)
    layers = qalora_layers(placed.get_base_model())
    assert len(layers) == 14
    trainable = {n for n, p in placed.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable) and any(".qalora_B." in n for n in trainable)
    batch = llava_batch(processor, shapes_small)
    placed(**batch).loss.backward()
    assert audit_gradients(placed).ok  # qalora_B gets gradient at step 1, the INT4 base none
    for layer in layers.values():
        _nonzero(layer, seed=len(layer.qalora_A.weight))
    placed.eval()
    batch.pop("labels")
    with torch.no_grad():
        expected = placed(**batch).logits
    save_placement(placed, plan, tmp_path / "run", str(tiny_llava_dir))
    assert (tmp_path / "run" / "qalora.safetensors").is_file()
    reloaded = load_placement(load_llava(tiny_llava_dir)[0], tmp_path / "run").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-6)
        merged = reloaded.merge_and_unload()
        codes_before = {n: l.qweight.clone() for n, l in qalora_layers(merged).items()}
        assert len(merge_qalora(merged)) == 14
        after = merged(**batch).logits
    assert not qalora_layers(merged)
    for name, codes in codes_before.items():
        assert type(merged.get_submodule(name)) is Int4Linear
        assert torch.equal(merged.get_submodule(name).qweight, codes)  # the codes stay INT4 as they were
    assert (after - expected).abs().max() < 1e-4
