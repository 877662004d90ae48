import pytest
import torch

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.models.modality import discover_modalities
from mmlora.placement.apply import apply_placement
from mmlora.placement.audit import audit_gradients
from mmlora.placement.plan import plan_placement
from tests.placement.conftest import clip_batch, clip_loss, llava_batch


def _place(model, spec: dict):
    spec = PlacementSpec.model_validate(spec)
    plan = plan_placement(model, discover_modalities(model), spec)
    return apply_placement(model, plan), plan


def test_healthy_default_init_passes(tiny_llava, shapes_small):
    model, processor = tiny_llava
    placed, _ = _place(model, {
        "vision": {"mode": "dora", "targets": ["q", "v"], "layers": [0], "rank": 4},
        "projector": {"mode": "full"},
        "language": {"mode": "lora", "rank": 4},
    })
    # Default init: lora_B is zero, so lora_A's first gradient is exactly zero — and that is healthy.
    placed(**llava_batch(processor, shapes_small)).loss.backward()
    a_grads = [p.grad for n, p in placed.named_parameters() if ".lora_A." in n]
    assert a_grads and all(g is not None and g.abs().sum() == 0 for g in a_grads)
    report = audit_gradients(placed)
    assert report.ok and report.checked == sum(1 for p in placed.parameters() if p.requires_grad)


def test_adapter_on_an_unread_vision_layer_is_caught(tiny_llava, shapes_small):
    model, processor = tiny_llava
    placed, plan = _place(model, {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4},
                                  "language": {"mode": "lora", "rank": 4}})
    assert any("never read" in w for w in plan.warnings)  # the plan said so before training
    placed(**llava_batch(processor, shapes_small)).loss.backward()
    with pytest.raises(MmloraError) as err:
        audit_gradients(placed)
    msg = str(err.value)
    assert "encoder.layers.1.self_attn.q_proj" in msg and "encoder.layers.0" not in msg
    assert "no gradient" in msg and "never reaches the loss" in msg


def test_tower_run_without_autograd_is_caught(tiny_clip, shapes_small):
    model, preprocess, tokenizer = tiny_clip
    placed, _ = _place(model, {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4},
                               "text": {"mode": "lora", "targets": ["q", "v"], "rank": 4}})
    visual = placed.get_base_model().visual
    forward = visual.forward
    visual.forward = lambda *a, **k: forward(*a, **k).detach()  # what a no_grad tower does to its adapters
    clip_loss(placed, clip_batch(preprocess, tokenizer, shapes_small)).backward()
    report = audit_gradients(placed, raise_on_error=False)
    assert report.no_grad and all(n.startswith("base_model.model.visual.") for n in report.no_grad)
    assert not any(n.startswith("base_model.model.transformer.") for n in report.no_grad)


def test_all_zero_gradient_on_a_live_tensor_is_caught(tiny_clip, shapes_small):
    model, preprocess, tokenizer = tiny_clip
    placed, _ = _place(model, {"text": {"mode": "lora", "targets": ["v"], "rank": 2}})
    # Scale the adapter's contribution by zero: lora_B gets a gradient, but it is all zero.
    for name, module in placed.named_modules():
        if name.endswith("resblocks.0.attn.v_proj"):
            module.scaling["default"] = 0.0
    clip_loss(placed, clip_batch(preprocess, tokenizer, shapes_small)).backward()
    with pytest.raises(MmloraError, match="all-zero gradient: .*resblocks.0.attn.v_proj"):
        audit_gradients(placed)


def test_non_reentrant_checkpointing_keeps_every_gradient(tiny_llava_dir, shapes_small):
    from mmlora.models.loading import load_llava
    from mmlora.placement.apply import enable_gradient_checkpointing

    spec = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
            "language": {"mode": "lora", "rank": 4}}
    grads = []
    for checkpointing in (False, True):
        model, processor = load_llava(tiny_llava_dir)
        torch.manual_seed(0)  # the same random lora_A in both runs
        placed, _ = _place(model, spec)
        if checkpointing:
            enable_gradient_checkpointing(placed)
        placed.train()
        placed(**llava_batch(processor, shapes_small)).loss.backward()
        audit_gradients(placed)
        grads.append({n: p.grad for n, p in placed.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_adalora_is_a_whole_model_variant(tiny_llava, shapes_small):
    model, processor = tiny_llava
    spec = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0]}, "language": {"mode": "lora"},
            "adalora": {"init_r": 6, "target_r": 2, "total_step": 10, "tfinal": 2}}
    placed, plan = _place(model, spec)
    assert [a.variant for a in plan.adapters] == ["adalora"]
    assert type(placed.peft_config["default"]).__name__ == "AdaLoraConfig"
    assert any(".lora_E." in n for n, _ in placed.named_parameters())  # AdaLoRA's SVD-style layers
    placed(**llava_batch(processor, shapes_small)).loss.backward()
    with pytest.raises(MmloraError, match="per-modality ranks"):
        _place(model.__class__.from_pretrained(model.name_or_path), {**spec, "language": {"mode": "lora", "rank": 4}})
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot mix with dora"):
        _place(model, {**spec, "vision": {"mode": "dora"}})


@pytest.mark.parametrize("init", ["default", "pissa", "olora"])
def test_lora_on_the_token_embedding_passes_at_its_init(tiny_llava, shapes_small, init):
    """PEFT starts an embedding's LoRA the other way round (A zero, B random), whatever the init (its
    PiSSA/OLoRA are for linear layers): B's first gradient is exactly zero and A's is not, so A is the
    factor that must be live."""
    from mmlora.placement.apply import save_initial_state

    model, processor = tiny_llava
    placed, plan = _place(model, {"language": {"mode": "lora", "targets": ["q", "v", "embed_tokens"], "rank": 4,
                                               "init": init}})
    initial = save_initial_state(placed, plan)
    assert bool(initial) == (init != "default")
    placed(**llava_batch(processor, shapes_small)).loss.backward()
    grads = {n: p.grad for n, p in placed.named_parameters() if ".lora_embedding_" in n}
    assert len(grads) == 2
    assert all(g.abs().sum() == 0 for n, g in grads.items() if ".lora_embedding_B." in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_embedding_A." in n)
    assert audit_gradients(placed, initial_adapters=initial).ok
    # an embedding LoRA whose A gets nothing is still caught
    next(p for n, p in placed.named_parameters() if ".lora_embedding_A." in n).grad.zero_()
    with pytest.raises(MmloraError, match="all-zero gradient: .*embed_tokens"):
        audit_gradients(placed, initial_adapters=initial)
