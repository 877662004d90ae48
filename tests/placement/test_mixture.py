"""The mixture of LoRA experts (``mmlora.adapters.mixture``) and O-LoRA's penalty: a one-hot gate gives
exactly that expert alone in plain PEFT (row by row, in one batch); gradients reach only the router
and the experts it mixes; the penalty is zero for orthogonal subspaces and the hand-computed sum
otherwise."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlora.adapters.mixture import BASE_EXPERT, LoraMixture, Router
from mmlora.adapters.parts import read_adapter
from mmlora.errors import MmloraError
from mmlora.train.continual import orthogonality
from tests.adapter_runs import make_run, plain_peft

PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
             "projector": {"mode": "lora", "rank": 4}, "language": {"mode": "lora", "rank": 8}}


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tiny_llava_dir):
    tmp = tmp_path_factory.mktemp("mixture")
    return {"b": make_run(tmp / "b", "tiny-llava", PLACEMENT, 31),
            "c": make_run(tmp / "c", "tiny-llava", {"language": {"mode": "lora", "rank": 4}}, 32)}


def _batch(shapes_small, n=3):
    from transformers import AutoProcessor

    from mmlora.generate import encode_requests
    from mmlora.models.presets import preset_path

    processor = AutoProcessor.from_pretrained(preset_path("tiny-llava"))
    images = [Image.open(p).convert("RGB") for p in sorted((shapes_small / "world_B/images/test").glob("*.png"))[:n]]
    return dict(encode_requests(processor, images, ["Describe the image."] * n))


def _mixture(experts, model, train_experts=False):
    parts = {BASE_EXPERT: {}} | {n: read_adapter(run / "final/adapters/default", model) for n, run in experts.items()}
    width = model.get_input_embeddings().weight.shape[1]
    return LoraMixture(parts, Router(2 * width, width, list(parts)), train_experts=train_experts).attach(model)


def test_a_one_hot_gate_is_that_expert_alone_in_plain_peft(experts, shapes_small):
    batch = _batch(shapes_small)
    model = plain_peft(None)
    mixture = _mixture(experts, model)
    rows = ["c", BASE_EXPERT, "b"]
    one_hot = torch.eye(3)[[mixture.names.index(n) for n in rows]]
    mixture.router.forward = lambda image, text: one_hot  # the gate picks row b's expert alone
    with torch.no_grad():
        mixed = model(**batch).logits
    for row, name in enumerate(rows):
        alone = plain_peft(experts.get(name) if name != BASE_EXPERT else None)
        with torch.no_grad():
            ref = alone(**{k: v[row:row + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(mixed[row:row + 1], ref, atol=5e-5, rtol=1e-4)  # fp32 sums in another order
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the experts really differ


def test_gradients_reach_only_the_router_and_the_experts_it_mixes(experts, shapes_small):
    batch = _batch(shapes_small, 2)
    for train_experts in (False, True):
        model = plain_peft(None)
        model.requires_grad_(False)
        mixture = _mixture(experts, model, train_experts)
        out = model(**batch)
        out.logits[:, -1].logsumexp(-1).sum().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        router = {f"mmlora_mixture.router.{n}" for n, _ in mixture.router.named_parameters()}
        assert router <= got  # the gate learns from the start (zero-initialised, every expert alike)
        mixed = {f"mmlora_mixture.{n}" for n, _ in mixture.named_parameters() if not n.startswith("router.")}
        assert got - router == (mixed & got) and (bool(mixed & got) == train_experts)
        assert all(n.startswith("mmlora_mixture.") for n in got)  # nothing of the base


def test_the_gate_starts_even_and_routes_per_sample(experts, shapes_small):
    model = plain_peft(None)
    mixture = _mixture(experts, model)
    batch = _batch(shapes_small)
    with torch.no_grad():
        model(**batch)
    torch.testing.assert_close(mixture.weights, torch.full((3, 3), 1 / 3))
    with torch.no_grad():
        mixture.router.linear.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    assert mixture.choose(model, batch) == ["b", "b", "b"]
    mixture.detach(model)
    assert not hasattr(model, "mmlora_mixture") and all("forward" not in m.__dict__ for m in model.modules())


def test_dora_experts_are_refused(tmp_path, tiny_llava_dir):
    run = make_run(tmp_path / "d", "tiny-llava", {"language": {"mode": "dora", "rank": 4}}, 3)
    model = plain_peft(None)
    parts = {"d": read_adapter(run / "final/adapters/default", model)}
    with pytest.raises(MmloraError, match="DoRA adapters: a DoRA layer's norm does not mix linearly"):
        LoraMixture(parts, Router(64, 64, ["d"]))


def test_orthogonality_is_zero_for_orthogonal_subspaces_and_the_hand_sum_otherwise():
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    model = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["a", "b"]), adapter_name="old")
    model.add_adapter("new", LoraConfig(r=2, target_modules=["a"]))
    eye = torch.eye(6)
    with torch.no_grad():
        model.base_model.model.a.lora_A["old"].weight.copy_(eye[:2])  # span e0, e1
        model.base_model.model.a.lora_A["new"].weight.copy_(eye[2:4] * 3)  # span e2, e3
    assert float(orthogonality(model, ["new"], ["old"])) == 0.0
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    with torch.no_grad():
        model.base_model.model.a.lora_A["old"].weight.copy_(old)
        model.base_model.model.a.lora_A["new"].weight.copy_(new)
    hand = sum(float(old[i] @ new[j]) ** 2 for i in range(2) for j in range(2))  # layer b has no "new"
    assert abs(float(orthogonality(model, ["new"], ["old"])) - hand) < 1e-5
    model.base_model.model.a.lora_A["new"].weight.requires_grad_(True)  # the new adapter trains
    model.base_model.model.a.lora_A["old"].weight.requires_grad_(True)  # even if the earlier one could, it gets none
    term = orthogonality(model, ["new"], ["old"])
    term.backward()
    assert model.base_model.model.a.lora_A["new"].weight.grad is not None
    assert model.base_model.model.a.lora_A["old"].weight.grad is None  # the earlier subspace stays put


def test_generation_routes_each_sample_in_every_batch(experts, shapes_small):
    """``generate`` encodes the images before its first forward: the weights are set from the whole
    request before that, per batch (a last, smaller batch included), and each caption is its expert's."""
    from transformers import AutoProcessor

    from mmlora.generate import generate_answers
    from mmlora.models.presets import preset_path
    from tests.adapter_runs import caption_alone

    processor = AutoProcessor.from_pretrained(preset_path("tiny-llava"))
    images = [Image.open(p).convert("RGB") for p in sorted((shapes_small / "world_B/images/test").glob("*.png"))[:3]]
    model = plain_peft(None)
    mixture = _mixture(experts, model)
    picks = {"b": 1, "c": 2}
    colours = {}

    def one_hot(image, text):  # the expert by the image: features differ per image, so does the pick
        keys = [tuple(round(float(v), 3) for v in row[:4]) for row in image]
        for k in keys:
            colours.setdefault(k, ["b", "c", "b"][len(colours) % 3])
        return torch.eye(3)[[picks[colours[k]] for k in keys]]

    mixture.router.forward = one_hot
    got = generate_answers(model, processor, images, batch_size=2, max_new_tokens=5)
    order = [colours[k] for k in colours]
    want = [caption_alone(experts[name], im) for name, im in zip(order, images)]
    assert got == want and len(set(want)) > 1
