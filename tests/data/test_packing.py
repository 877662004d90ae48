"""Exact packing (``mmlora.data.packing``): a packed batch gives every sample the loss and the
gradients it gets in an ordinary padded batch — per sample, in total, for every trainable parameter
(fp32, 1e-5) — with samples of very different lengths, a text-only one and several images, in each
family that packs, through mmlora's varlen attention. First-fit-decreasing is checked against a hand-worked case, and a sample longer than a row
is refused, never split."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlora.data.batching import Collator
from mmlora.data.packing import PackedCollator, first_fit_decreasing, segment_lengths
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import Sample
from mmlora.errors import MmloraError
from mmlora.models import varlen


def test_first_fit_decreasing_by_hand():
    # longest first: 7 opens row 0 (room 3), 5 opens row 1 (room 5), 3 fills row 0, then 2, 2, 1 fill row 1
    assert first_fit_decreasing([3, 7, 2, 5, 2, 1], 10) == [[1, 0], [3, 2, 4, 5]]
    assert first_fit_decreasing([4, 4, 4], 8) == [[0, 1], [2]]  # ties keep their order
    with pytest.raises(MmloraError, match="longer than train.packing.max_tokens=5"):
        first_fit_decreasing([3, 6], 5)


def _sample(tmp_path, sid: str, images: int, answer: str, turns: int = 1) -> Sample:
    paths, messages = [], []
    for t in range(turns):
        content = []
        if t == 0:
            for k in range(images):
                paths.append(tmp_path / f"{sid}{k}.png")
                Image.new("RGB", (96 + 32 * k, 128), (200 - 90 * k, 40 + 70 * k, 60)).save(paths[-1])
                content.append({"type": "image"})
        content.append({"type": "text", "text": "Describe." if t == 0 else "And then?"})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return Sample(sid, f"pack.jsonl:{sid}", messages, paths)


def _token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy at every position ``[B, L-1]`` (0 where unlabelled)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    losses = _token_losses(model, batch)
    losses.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def _packed_and_padded(family, model_type, tmp_path):
    """Per-sample losses, total losses and gradients of a packed batch and of the padded batch."""
    model, processor = family(model_type)
    assert varlen.enable(model) == varlen.NAME
    model.train()  # dropout is 0 in the tiny configs: train mode, as in training
    encoder = ConversationEncoder(processor, max_length=4096)
    samples = [_sample(tmp_path, "two", 2, "a red circle and a green square, side by side."),
               _sample(tmp_path, "text", 0, "no image here.", turns=3),
               _sample(tmp_path, "one", 1, "a star."),
               _sample(tmp_path, "long", 1, " ".join(["a small blue cross at the top left"] * 12), turns=2)]
    items = [encoder.encode(s) for s in samples]
    lengths = [len(it["input_ids"]) for it in items]
    assert max(lengths) > 3 * min(lengths)
    pad_id = processor.tokenizer.pad_token_id
    capacity = max(lengths) + min(lengths) + 5
    padded = Collator(pad_id)([dict(it) for it in items])
    packed = PackedCollator(pad_id, capacity, positions=varlen.sample_positions(model))([dict(it) for it in items])
    assert packed["input_ids"].shape[0] < len(items) and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] <= capacity

    ref_losses, ref_grads = _loss_and_grads(model, padded)
    losses, grads = _loss_and_grads(model, packed)
    model.set_attn_implementation({"text_config": "sdpa"})
    # per sample: the packed rows' segments, in first-fit-decreasing order, against the padded rows
    rows = first_fit_decreasing(lengths, capacity)
    per_sample = {}
    for r, (row, segs) in enumerate(zip(rows, segment_lengths(packed["position_ids"]))):
        start = 0
        for i, n in zip(row, segs):
            per_sample[i] = losses[r, start:start + n - 1].sum()  # a segment's last position predicts the next segment: unlabelled
            assert start + n - 1 >= losses.shape[1] or losses[r, start + n - 1] == 0
            start += n
    mine = {samples[i].id: float(per_sample[i]) for i in range(len(items))}
    ref = {samples[i].id: float(ref_losses[i].sum()) for i in range(len(items))}
    return mine, ref, (float(losses.sum()), float(ref_losses.sum())), (grads, ref_grads)


@pytest.mark.parametrize("model_type", varlen.PACKS)
def test_packed_batch_equals_padded_batch(family, model_type, tmp_path):
    mine, ref, (total, ref_total), (grads, ref_grads) = _packed_and_padded(family, model_type, tmp_path)
    for sid, value in ref.items():
        assert mine[sid] == pytest.approx(value, rel=1e-5, abs=1e-5), sid
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert set(grads) == set(ref_grads) and any("vision" in n or "visual" in n for n in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "gemma3"])
def test_naive_packing_is_not_exact(family, model_type, tmp_path, monkeypatch):
    """Why positions are computed per sample, and why Gemma 3 is refused: packed without the per-sample
    mRoPE positions, Qwen2-VL's losses change; Gemma 3's bidirectional image attention (built by the
    model from the row) changes them too."""
    monkeypatch.setattr(varlen, "sample_positions", lambda model: None)
    mine, ref, _, _ = _packed_and_padded(family, model_type, tmp_path)
    assert any(abs(mine[sid] - value) > 1e-3 for sid, value in ref.items())
    assert (varlen.packing_refusal(model_type) is None) == (model_type in varlen.MROPE)


def test_token_budget_cuts_by_padded_cells_or_by_tokens():
    from mmlora.data.batching import batch_cost, cut_by_tokens

    lengths = [50, 40, 40, 10, 10, 10, 10, 200]
    assert batch_cost([50, 40], packed=False) == 100 and batch_cost([50, 40], packed=True) == 90
    # padded: 50+40 pads to 100, +40 to 150 > 120; packed: 50+40 = 90, +40 = 130 > 120
    assert cut_by_tokens(lengths, 120, packed=False) == [[0, 1], [2, 3, 4], [5, 6], [7]]
    assert cut_by_tokens(lengths, 120, packed=True) == [[0, 1], [2, 3, 4, 5, 6], [7]]


def test_token_budget_batches_are_seeded_resumable_and_within_budget():
    from mmlora.data.batching import TokenBudgetBatchSampler, batch_cost

    lengths = [(7 * i) % 90 + 5 for i in range(200)]
    has_image = [i % 7 != 0 for i in range(200)]  # text-only samples too: batches of one modality each
    a = TokenBudgetBatchSampler(lengths, has_image, 400, packed=True, seed=3)
    batches = a.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(batch_cost([lengths[i] for i in b], True) <= 400 or len(b) == 1 for b in batches)
    assert all(len({has_image[i] for i in b}) == 1 for b in batches)
    assert max(len(b) for b in batches) > 2 * min(len(b) for b in batches)  # short samples, big batches
    assert TokenBudgetBatchSampler(lengths, has_image, 400, packed=True, seed=3).batches(0) == batches
    assert TokenBudgetBatchSampler(lengths, has_image, 400, packed=True, seed=4).batches(0) != batches
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    b = TokenBudgetBatchSampler(lengths, has_image, 400, packed=True, seed=3)
    b.load_state_dict(state)
    assert first + list(b) == batches
