"""Continuous batching (``mmlora.generate.iteration``): requests that join a running batch at different
steps, with different prompts, images and token budgets, get exactly the answer ``generate_answers``
gives each alone; streamed pieces add up to the answer; finished rows leave and the cache shrinks to
what the live rows use. Per family: exact where supported, refused with the reason otherwise."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlora.generate import generate_answers
from mmlora.generate.iteration import Request, RunningBatch, iteration_unsupported
from tests.train.test_families_train import TRAINED, record


@pytest.fixture(scope="module")
def shapes_llava():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmlora.models.presets import preset_path

    path = preset_path("shapes-llava-base")
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def _images(shapes_small, n):
    paths = sorted((shapes_small / "world_A/images/test").glob("*.png"))[:n]
    return [Image.open(p).convert("RGB") for p in paths]


def _drive(batch: RunningBatch, schedule: dict[int, list[Request]]) -> dict[int, object]:
    """Join ``schedule[k]`` before decoding step ``k``; step until every sequence is done. Returns
    ``{id(request): its finished sequence}`` and checks on the way that the cache never holds a
    column no live row uses."""
    finished = {}
    step = 0
    while step <= max(schedule) or len(batch):
        for seq in batch.join(schedule.get(step, [])):
            if seq.done:
                finished[id(seq.request)] = seq
        if len(batch):
            # the cache holds each row's prompt and answer but its newest token (fed at the next step):
            # as wide as the longest live row, no wider
            assert batch.mask.shape[1] == max(s.prompt_tokens + len(s.tokens) - 1 for s in batch.rows)
            assert batch.mask.sum(1).tolist() == [s.prompt_tokens + len(s.tokens) - 1 for s in batch.rows]
            assert batch.cache.layers[0].keys.shape[2] == batch.mask.shape[1] and batch.cache.layers[0].keys.shape[0] == len(batch)
        for seq in batch.step():
            finished[id(seq.request)] = seq
        step += 1
    return finished


def test_staggered_requests_get_their_one_by_one_answers(shapes_llava, shapes_small):
    model, processor = shapes_llava
    images = _images(shapes_small, 6)
    prompts = ["Provide a one-sentence caption for the provided image.", "Describe the image.",
               "Provide a one-sentence caption for the provided image."]
    pieces: dict[int, list[str]] = {}
    requests = []
    for k, image in enumerate(images):
        budget = (3, 24, 9)[k % 3]
        r = Request(image, prompts[k % 3], max_new_tokens=budget)
        r.on_text = lambda text, k=k: pieces.setdefault(k, []).append(text)
        requests.append(r)
    batch = RunningBatch(model, processor)
    done = _drive(batch, {0: requests[:3], 2: requests[3:5], 7: requests[5:]})
    assert batch.prefills == 3 and len(batch) == 0 and batch.cache is None
    for k, r in enumerate(requests):
        alone = generate_answers(model, processor, [r.image], r.prompt, max_new_tokens=r.max_new_tokens)[0]
        seq = done[id(r)]
        text = processor.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip()
        assert text == alone, k
        assert "".join(pieces.get(k, [])) == alone  # streamed pieces add up to the answer
        assert seq.finish_reason == ("length" if len(seq.tokens) == r.max_new_tokens else "stop")
    reasons = {done[id(r)].finish_reason for r in requests}
    assert reasons == {"stop", "length"}  # some end their turn, some run out of budget


def test_every_row_runs_in_its_route(shapes_llava, shapes_small):
    """The batch calls ``route`` with each row's adapter, in row order, at every forward."""
    from contextlib import contextmanager

    model, processor = shapes_llava
    seen = []

    @contextmanager
    def route(adapters):
        seen.append(list(adapters))
        yield

    batch = RunningBatch(model, processor, route)
    images = _images(shapes_small, 3)
    batch.join([Request(images[0], "Describe.", "a", 4), Request(images[1], "Describe.", "b", 2)])
    batch.step()
    batch.join([Request(images[2], "Describe.", "c", 4)])
    batch.step()
    assert seen[0] == ["a", "b"] and seen[1] == ["a", "b"] and seen[2] == ["c"]
    assert seen[3] == [s.request.adapter for s in batch.rows] or seen[3][-1] == "c"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TRAINED)
def test_families_decode_continuously_or_say_why_not(model_type, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.families import save_family

    save_family(model_type, tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    reason = iteration_unsupported(model)
    if reason is not None:
        assert any(k in reason for k in ("mRoPE", "sliding", "cross-attention")), reason
        record(model_type, "continuous", "refused: " + reason)
        return
    images = [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (128, 64), (20, 160, 40)),
              Image.new("RGB", (96, 128), (30, 30, 200))]
    requests = [Request(im, p, max_new_tokens=n) for im, p, n in
                zip(images, ["Describe the image.", "What is there?", "Describe the image."], (6, 3, 5))]
    done = _drive(RunningBatch(model, processor), {0: requests[:2], 2: requests[2:]})
    for r in requests:
        alone = generate_answers(model, processor, [r.image], r.prompt, max_new_tokens=r.max_new_tokens)[0]
        assert processor.tokenizer.decode(done[id(r)].tokens, skip_special_tokens=True).strip() == alone
    assert sum(len(done[id(r)].tokens) for r in requests) >= 6  # real answers, not all empty
    record(model_type, "continuous", "✓")
