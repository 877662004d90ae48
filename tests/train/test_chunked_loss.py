"""``train.chunked_loss``: the head and cross-entropy in chunks give the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmlora.objectives.chunked_loss import chunked_supervised_loss_sum, linear_cross_entropy_sum
from mmlora.objectives.caption import supervised_loss_sum
from tests.placement.conftest import llava_batch
from tests.train.speed_helpers import assert_same_grads, grads_of, placed_llava


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_plain(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, requires_grad=True)
    bias = torch.randn(101, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 101, (37,), generator=g)
    targets[::5] = -100
    targets[7:14] = -100  # a chunk (size 7) with nothing to learn
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100, reduction="sum")
    chunked = linear_cross_entropy_sum(hidden, weight, bias, targets, chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(3 * chunked, inputs), torch.autograd.grad(3 * plain, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    targets = torch.tensor([1, 2, -100, 4, 5])
    loss = linear_cross_entropy_sum(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert grad.abs().sum() > 0 and weight.grad is None
    with torch.no_grad():
        assert not linear_cross_entropy_sum(hidden, weight, None, targets).requires_grad


def test_tiny_llava_loss_and_gradients_equal_the_plain_path(shapes_small, tiny_llava_dir):
    from transformers import AutoProcessor

    model, _ = placed_llava({"vision": {"mode": "frozen"}, "projector": {"mode": "full"},
                             "language": {"mode": "lora", "rank": 4}})
    batch = llava_batch(AutoProcessor.from_pretrained(tiny_llava_dir), shapes_small, n=3)
    torch.manual_seed(0)
    plain, n_plain = supervised_loss_sum(model, batch)
    grads_plain = grads_of(model, plain)
    torch.manual_seed(0)
    chunked, n_chunked = chunked_supervised_loss_sum(model, batch, chunk_size=5)
    assert n_chunked == n_plain > 5
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_of(model, chunked), grads_plain)


def test_models_whose_logits_are_not_the_head_output_use_the_plain_loss(shapes_small, tiny_llava_dir):
    """A model that scales its logits after the head (as Cohere does; Gemma soft-caps them) is found
    out by the probe, and the objective falls back to the plain path."""
    from transformers import AutoProcessor

    from mmlora.objectives.caption import CaptionLM

    model, _ = placed_llava({"language": {"mode": "lora", "rank": 4}})
    base = model.get_base_model()
    forward = base.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    base.forward = scaled
    batch = llava_batch(AutoProcessor.from_pretrained(tiny_llava_dir), shapes_small, n=2)
    with pytest.warns(UserWarning, match="not just its LM head's output"):
        assert chunked_supervised_loss_sum(model, batch) is None
    objective = CaptionLM(tiny_llava_dir, 256)
    objective.use_chunked_loss()
    torch.testing.assert_close(objective.loss_sum(model, batch)[0], supervised_loss_sum(model, batch)[0])


def test_under_bf16_autocast_equals_the_plain_path():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = linear_cross_entropy_sum(hidden, weight, None, targets, 7)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(chunked, [hidden, weight]), torch.autograd.grad(plain, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * float(b.abs().max()))  # bf16 matmuls
