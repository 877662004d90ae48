import pytest
import torch

from mmlora.data.batching import Collator, ConversationDataset, GroupedBatchSampler
from mmlora.data.build import mix
from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.readers import read_llava
from mmlora.data.samples import Sample


def _sampler(n=40, batch=4, seed=0, **kw):
    lengths = [(i * 7) % 23 + 5 for i in range(n)]
    has_image = [i % 3 != 0 for i in range(n)]
    return GroupedBatchSampler(lengths, has_image, batch, seed=seed, group=2, **kw), lengths, has_image


def test_batches_are_one_modality_cover_everything_and_are_seeded():
    s, lengths, has_image = _sampler()
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len({has_image[i] for i in b}) == 1 for b in batches)
    assert batches == _sampler()[0].batches(0) and batches != _sampler(seed=1)[0].batches(0)
    assert s.epoch == 1 and list(s) != batches  # a new order each epoch


def test_length_grouping_cuts_padding():
    grouped, lengths, _ = _sampler(n=200, batch=8)
    plain, _, _ = _sampler(n=200, batch=8, group_by_length=False)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped.batches(0)) < 0.6 * padding(plain.batches(0))


def test_sampler_resumes_mid_epoch():
    s, _, _ = _sampler()
    it = iter(s)
    first = [next(it) for _ in range(3)]
    state = s.state_dict()
    rest = list(it)
    resumed, _, _ = _sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == rest and first + rest == s.batches(0)
    with pytest.raises(ValueError, match="seed"):
        _sampler(seed=5)[0].load_state_dict(state)


def test_collator_pads_and_keeps_image_order(tiny_llava_dir, shapes_small):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    records = read_llava(shapes_small / "world_A" / "llava_val.json")[:3]
    text_only = Sample("t", "x", [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "hello there, friend."}]}])
    ds = ConversationDataset(records + [text_only], ConversationEncoder(processor))
    items = [ds[i] for i in range(4)]
    batch = Collator(processor.tokenizer.pad_token_id)(items + [None])
    longest = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == (4, longest)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all() and (batch["attention_mask"][row, n:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items[:3]]))


def test_mix_weights_repeat_and_subsample():
    a, b = list(range(10)), list(range(100, 120))
    mixed = mix([(a, 2.0), (b, 0.5)], seed=3)
    assert mixed[:20] == a + a and len(mixed) == 30 and set(mixed[20:]) <= set(b) and len(set(mixed[20:])) == 10
    assert mix([(a, 2.0), (b, 0.5)], seed=3) == mixed
