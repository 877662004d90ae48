"""``train.frozen_no_grad``: a frozen vision tower runs outside autograd, with the same loss and
gradients; towers with something to train, and sub-models fed by trained ones, are left alone."""

from __future__ import annotations

import torch

from mmlora.placement.apply import enable_gradient_checkpointing
from mmlora.objectives.caption import supervised_loss_sum
from mmlora.train.speed import run_frozen_without_grad
from tests.placement.conftest import llava_batch, tiny_clip  # noqa: F401 (fixture)
from tests.train.speed_helpers import assert_same_grads, grads_of, placed_llava

FROZEN_VISION = {"vision": {"mode": "frozen"}, "projector": {"mode": "full"}, "language": {"mode": "lora", "rank": 4}}


def _tower_output_requires_grad(model, batch) -> bool:
    seen = []
    tower = model.get_base_model().model.vision_tower
    handle = tower.register_forward_hook(lambda m, a, out: seen.append(out.hidden_states[-2].requires_grad))
    try:
        supervised_loss_sum(model, batch)
    finally:
        handle.remove()
    return seen[0]


def test_frozen_tower_leaves_autograd_with_the_same_gradients(shapes_small, tiny_llava_dir):
    from transformers import AutoProcessor

    batch = llava_batch(AutoProcessor.from_pretrained(tiny_llava_dir), shapes_small, n=2)
    model, mmap = placed_llava(FROZEN_VISION)
    enable_gradient_checkpointing(model)
    # transformers' checkpointing makes every sub-model's input embeddings require grad: the frozen
    # tower is recorded (and later recomputed and back-propagated through) for nothing
    assert _tower_output_requires_grad(model, batch)
    plain = grads_of(model, supervised_loss_sum(model, batch)[0])
    assert run_frozen_without_grad(model, mmap) == ["model.vision_tower"]
    assert not _tower_output_requires_grad(model, batch)
    lean = grads_of(model, supervised_loss_sum(model, batch)[0])
    assert_same_grads(lean, plain, rtol=1e-5, atol=1e-7)
    assert lean["base_model.model.model.multi_modal_projector.linear_1.weight"].abs().sum() > 0


def test_towers_with_trainable_parameters_and_downstream_models_keep_autograd():
    model, mmap = placed_llava({"vision": {"mode": "lora", "targets": ["q"], "layers": [0], "rank": 2},
                                "projector": {"mode": "full"}, "language": {"mode": "frozen"}})
    assert run_frozen_without_grad(model, mmap) == []  # vision has LoRA; the frozen LM is fed by the projector
    model, mmap = placed_llava({"vision": {"mode": "frozen"}, "projector": {"mode": "frozen"},
                                "language": {"mode": "lora", "rank": 2}})
    assert run_frozen_without_grad(model, mmap) == ["model.vision_tower"]
    tower = model.get_base_model().model.vision_tower
    assert not tower(torch.randn(1, 3, 32, 32)).last_hidden_state.requires_grad
    assert torch.is_grad_enabled()  # restored after the tower's forward


def test_frozen_clip_text_tower_same_gradients(tiny_clip, shapes_small):
    """open_clip's text tower is several roots (embeddings are parameters, not modules): its module
    roots run without autograd when none of them trains, and the vision LoRA gets the same gradient."""
    from mmlora.config.schema import PlacementSpec
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.apply import apply_placement
    from mmlora.placement.plan import plan_placement
    from tests.placement.conftest import clip_batch, clip_loss

    model, preprocess, tokenizer = tiny_clip
    spec = PlacementSpec.model_validate({"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 2},
                                         "text": {"mode": "frozen"}})
    mmap = discover_modalities(model)
    model = apply_placement(model, plan_placement(model, mmap, spec)).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.1)
    batch = clip_batch(preprocess, tokenizer, shapes_small)
    plain = grads_of(model, clip_loss(model, batch))
    wrapped = run_frozen_without_grad(model, mmap)
    assert wrapped and all(not r.startswith("visual") for r in wrapped)
    assert_same_grads(grads_of(model, clip_loss(model, batch)), plain, rtol=1e-5, atol=1e-7)
