"""Samples with several images, in every VLM family (``mmlora.models.families``), on the tiny folder
``save_family`` writes: the encoder gives one image-token run per image and labels on the answer only;
a batch of a two-image and a one-image sample gives each sample the loss it has alone (the images'
tensors stay with their sample, padding changes nothing); the gradient reaches the vision tower. A
processor that takes one image per sample is refused in one line naming the sample. Every family here
takes several (PaliGemma's processor puts all of a prompt's image tokens before its ``<bos>``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlora.data.batching import Collator
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import BadSample, Sample
from mmlora.models.families import FAMILIES
from mmlora.models.modality import discover_modalities

ANSWER = "a red circle and a green square."
#: Two images of different sizes (width x height) and one, so the batch mixes image counts and shapes.
TWO, ONE = [(128, 128), (96, 128)], [(128, 128)]


def _sample(tmp_path, sizes, sid: str, interleaved: bool = False, answer: str = ANSWER) -> Sample:
    """One user turn with ``len(sizes)`` image parts (side by side, or each after its own caption)."""
    paths, content = [], []
    for k, size in enumerate(sizes):
        paths.append(tmp_path / f"{sid}{k}.png")
        Image.new("RGB", size, (200 - 150 * k, 30 + 150 * k, 30)).save(paths[-1])
        content += ([{"type": "text", "text": f"Image {k + 1}:"}] if interleaved else []) + [{"type": "image"}]
    prompt = "Compare the two images." if len(sizes) > 1 else "Describe."
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return Sample(sid, f"multi.jsonl:{sid}", messages, paths)


def _labelled_runs(tokenizer, labels: torch.Tensor) -> list[str]:
    runs, cur = [], []
    for t in labels.tolist() + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


def _runs(mask: torch.Tensor) -> int:
    """Maximal runs of ``True`` in a 1-D mask."""
    m = mask.int()
    return int(m[0]) + int((m[1:] - m[:-1] == 1).sum())


def _row_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: each row's sum of next-token cross-entropy over its labels."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()[:, :-1]
    targets = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return ce.sum(dim=1)


@pytest.mark.parametrize("interleaved", [False, True], ids=["side-by-side", "interleaved"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_two_images_encode_with_one_run_each_and_answer_only_labels(model_type, interleaved, family, tmp_path):
    model, processor = family(model_type)
    encoder = ConversationEncoder(processor, max_length=1024)
    sample = _sample(tmp_path, TWO, "two", interleaved)
    out = encoder.encode(sample)
    ids, labels = out["input_ids"], out["labels"]
    tok = processor.tokenizer
    image_id = model.config.image_token_id  # the token whose positions take the image features
    image = ids == image_id
    if interleaved:  # text between the images: each is its own run (side by side, LLaVA's runs touch)
        assert _runs(image) == len(TWO)
    # As many image tokens as the processor gives this text with its images as one sample.
    want = processor(text=[encoder.render(sample.messages)], images=[[Image.open(p).convert("RGB") for p in sample.images]],
                     return_tensors="pt")["input_ids"]
    assert int(image.sum()) == int((want == image_id).sum()) >= len(TWO)
    assert [run.strip() for run in _labelled_runs(tok, labels)] == [ANSWER + tok.eos_token]
    supervised = labels != IGNORE
    assert torch.equal(labels[supervised], ids[supervised])
    assert not supervised[torch.isin(ids, torch.tensor(sorted(encoder.image_token_ids)))].any()


@pytest.fixture
def mixed_batch(family, tmp_path):
    """``(model, encoder, items, batch)``: a two-image and a one-image sample, encoded and collated."""

    def make(model_type: str):
        model, processor = family(model_type)
        encoder = ConversationEncoder(processor, max_length=1024)
        samples = [_sample(tmp_path, TWO, "two"), _sample(tmp_path, ONE, "one", answer="a red circle.")]
        items = [encoder.encode(s) for s in samples]
        assert len(items[0]["input_ids"]) != len(items[1]["input_ids"])  # the shorter one is padded
        return model, encoder, samples, Collator(processor.tokenizer.pad_token_id)(items)

    return make


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_sample_has_the_loss_it_has_alone(model_type, mixed_batch):
    torch.manual_seed(0)
    model, encoder, samples, batch = mixed_batch(model_type)
    collate = Collator(encoder.tokenizer.pad_token_id)
    with torch.no_grad():
        together = _row_losses(model, batch)
        alone = torch.cat([_row_losses(model, collate([encoder.encode(s)])) for s in samples])
    assert (together > 0).all()
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_the_mixed_batch_trains_the_vision_towers_first_layer(model_type, mixed_batch):
    torch.manual_seed(0)
    model, _, _, batch = mixed_batch(model_type)
    vision = discover_modalities(model).modalities["vision"]
    first = f"{vision.layer_stack}.0."
    params = [p for n, p in model.named_parameters() if n.startswith(first)]
    assert params, f"no parameters under {first}"
    model.zero_grad(set_to_none=True)
    try:
        _row_losses(model, batch).sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    finally:
        model.zero_grad(set_to_none=True)


class _OneImagePerSample:
    """A processor that takes one image per sample (as ShieldGemma 2's does) and says so with a ValueError."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, images=None, **kwargs):
        if images and any(len(per_text) > 1 for per_text in images):
            raise ValueError(f"this model processes at most one image per sample,\nbut got {len(images[0])} images")
        return self.inner(images=images, **kwargs)


def test_a_processor_taking_one_image_per_sample_refuses_two_in_one_line(family, tmp_path):
    _, processor = family("llava")
    encoder = ConversationEncoder(_OneImagePerSample(processor), max_length=1024)
    assert (encoder.encode(_sample(tmp_path, ONE, "one"))["labels"] != IGNORE).any()
    with pytest.raises(BadSample) as refused:
        encoder.encode(_sample(tmp_path, TWO, "two"))
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and refused.value.sample_id == "two"
    assert message.startswith("multi.jsonl:two (id two): ") and "2 image(s)" in message
    assert "at most one image per sample, but got 2 images" in message
