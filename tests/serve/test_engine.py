"""The serving engine: lazy LRU adapters, and mixed / switch / merged batches that all give each
sample its own adapter's answer (checked against the adapter run alone with plain PEFT)."""

import pytest
import torch

from mmlora.errors import MmloraError
from mmlora.serve.engine import Engine, Item
from tests.adapter_runs import CLIP_PLACEMENT, LLAVA_PLACEMENT, caption_alone, make_run


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory, tiny_llava_dir):
    tmp = tmp_path_factory.mktemp("serve-llava")
    return {n: make_run(tmp / n, "tiny-llava", LLAVA_PLACEMENT, s) for n, s in (("red", 1), ("blue", 2))}


@pytest.fixture(scope="module")
def images(shapes_small):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((shapes_small / "world_B/images/test").glob("*.png"))[:3]]


def test_every_mode_answers_each_sample_with_its_adapter(llava_runs, images):
    from mmlora.data.samples import CAPTION_PROMPT

    expected = [caption_alone(llava_runs["red"], images[0]), caption_alone(llava_runs["blue"], images[1])]
    items = [Item("caption", "red", images[0], CAPTION_PROMPT), Item("caption", "blue", images[1], CAPTION_PROMPT),
             Item("caption", "__base__", images[2], CAPTION_PROMPT)]
    engine = Engine("tiny-llava", llava_runs, mode="mixed", max_loaded=2, max_new_tokens=5)
    mixed = [r["caption"] for r in engine.run(items)]
    assert mixed[:2] == expected
    for mode in ("switch", "merged"):
        engine = Engine("tiny-llava", llava_runs, mode=mode, max_loaded=1, max_new_tokens=5)
        assert engine.batch_key(items[0]) != engine.batch_key(items[1])  # one adapter per batch
        assert [engine.run([item])[0]["caption"] for item in items] == mixed
        assert list(engine.loaded) == ["blue"] and engine.loads == 2  # lazily loaded, red evicted


def test_lru_keeps_at_most_max_loaded(llava_runs, images):
    engine = Engine("tiny-llava", llava_runs, mode="mixed", max_loaded=1, max_new_tokens=2)
    assert engine.loaded == [] and engine.peft is None
    engine.run([Item("caption", "red", images[0], "Describe.")])
    engine.run([Item("caption", "blue", images[0], "Describe.")])
    assert list(engine.loaded) == ["blue"] and set(engine.peft.peft_config) == {"blue"}
    engine.run([Item("caption", "red", images[0], "Describe.")])
    assert engine.loads == 3
    with pytest.raises(MmloraError, match="at most 1 adapters may be loaded"):
        engine.run([Item("caption", "red", images[0], "x"), Item("caption", "blue", images[0], "x")])
    with pytest.raises(MmloraError, match="does caption, not segment"):
        engine.run([Item("segment", "red", images[0], classes=["a", "b"])])


def test_engine_refuses_runs_it_cannot_serve(llava_runs, tmp_path):
    with pytest.raises(MmloraError, match="not the served base"):
        Engine("tiny-clip", {"red": llava_runs["red"]})
    with pytest.raises(MmloraError, match="use letters"):
        Engine("tiny-llava", {"a b": llava_runs["red"]})
    with pytest.raises(MmloraError, match="not a run"):
        Engine("tiny-llava", {"x": tmp_path})


def test_segment_mixed_batch_equals_each_adapter_alone(tmp_path, images, tiny_clip_dir):
    runs = {n: make_run(tmp_path / n, "tiny-clip", CLIP_PLACEMENT, s) for n, s in (("c1", 3), ("c2", 4))}
    classes = ["background", "circle", "square"]
    items = [Item("segment", "c1", images[0], classes=classes), Item("segment", "c2", images[1], classes=classes)]
    mixed = Engine("tiny-clip", runs, mode="mixed", max_loaded=2).run(items)
    gathered = Engine("tiny-clip", runs, mode="gathered", max_loaded=2).run(items)
    merged = Engine("tiny-clip", runs, mode="merged", max_loaded=2)
    for item, out, g in zip(items, mixed, gathered):
        assert out["mask"].shape == (128, 128) and out["mask"].dtype == torch.uint8
        assert torch.equal(merged.run([item])[0]["mask"], out["mask"])
        assert torch.equal(g["mask"], out["mask"])  # image and text towers routed per adapter


def test_reserved_strings_hold_the_image_placeholder_and_special_tokens(tiny_llava_dir):
    from mmlora.models.loading import load_llava
    from mmlora.serve.engine import reserved_strings

    _, processor = load_llava(tiny_llava_dir)
    reserved = reserved_strings(processor)
    assert processor.image_token in reserved and processor.tokenizer.eos_token in reserved
    assert not any(t in "Provide a one-sentence caption for the provided image." for t in reserved)


def test_a_fixed_batch_stops_when_its_clients_are_gone(llava_runs, images):
    """Fixed batches (switch, merged, mixed without continuous batching) stop a request whose client
    went away at its next token: a batch of such requests stops after the prefill."""
    from mmlora.data.samples import CAPTION_PROMPT

    for mode in ("switch", "merged"):
        engine = Engine("tiny-llava", llava_runs, mode=mode, max_loaded=1, max_new_tokens=8)
        item = Item("caption", "red", images[0], CAPTION_PROMPT)
        model = engine._model_for(["red"])[0]
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # what generate() calls
        calls = []
        hook = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            full = engine.run([item])[0]["caption"]
            steps, calls[:] = len(calls), []
            item.cancelled = True
            engine.run([item])
        finally:
            hook.remove()
        assert steps == 8 and len(full) > 0 and len(calls) == 1, mode  # 8 tokens, then 1 (the prefill)
