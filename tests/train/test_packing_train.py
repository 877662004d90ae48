"""``train.packing`` in the trainer: a packed run takes the same steps as the unpacked one (the same
losses, token counts and gradients: the loss stays normalised by the global batch's supervised
tokens, the chunked head/loss runs on packed rows), resumes mid-epoch exactly, and refuses what it
cannot pack in one line."""

from __future__ import annotations

import pytest
import torch

from mmlora.config.loading import load_recipe
from mmlora.errors import MmloraError
from mmlora.models.varlen import PACKS, packing_refusal
from mmlora.train.loop import Trainer
from tests.train.conftest import capture_gradients, interrupt_then_resume, read_metrics

FIXED = {"train.max_steps": 3, "train.eval_every": None, "train.max_grad_norm": None}


def _train(make_recipe, name: str, **changes):
    trainer = Trainer(load_recipe(make_recipe(name, **(FIXED | changes))), recipe_name=name)
    trainer.setup()
    grads = capture_gradients(trainer)
    trainer.train()
    return trainer, grads, read_metrics(trainer.out)


def test_a_packed_run_takes_the_steps_of_the_padded_run(make_recipe):
    packed_rows = []
    _, g_pad, m_pad = _train(make_recipe, "padded", **{"train.batch_size": 6})
    trainer, g_pack, m_pack = _train(make_recipe, "packed", **{"train.batch_size": 6, "train.packing.enabled": True,
                                                                 "train.packing.max_tokens": 300})
    batch = trainer.collate([trainer.train_set[i] for i in range(6)])
    packed_rows.append(batch["input_ids"].shape[0])
    assert packed_rows[0] < 6 and "position_ids" in batch  # the rows really are packed
    assert [r["tokens"] for r in m_pack] == [r["tokens"] for r in m_pad]
    assert [r["loss"] for r in m_pack] == pytest.approx([r["loss"] for r in m_pad], rel=1e-5)
    # each metrics row's padding share, by hand from the step's sample lengths: padded cells are
    # samples x longest; packed cells are rows x the fullest row (first-fit-decreasing into 300)
    from mmlora.data.packing import first_fit_decreasing

    for row_pad, row_pack, indices in zip(m_pad, m_pack, trainer.sampler.batches(0)):
        lengths = [len(trainer.train_set[i]["input_ids"]) for i in indices]
        rows = [sum(lengths[i] for i in r) for r in first_fit_decreasing(lengths, 300)]
        assert row_pad["padding"] == round(1 - sum(lengths) / (len(lengths) * max(lengths)), 4)
        assert row_pack["padding"] == round(1 - sum(lengths) / (len(rows) * max(rows)), 4) <= row_pad["padding"]
        assert row_pack["seq_tokens_per_s"] > 0 and row_pad["seq_tokens_per_s"] > 0
    assert sum(r["padding"] for r in m_pack) < sum(r["padding"] for r in m_pad)
    for a, b in zip(g_pack, g_pad):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("setting", ["qlora", "checkpointing"])
def test_packed_steps_equal_padded_ones_on_4bit_and_with_checkpointing(make_recipe, setting):
    """The language model in 4-bit NF4 (bitsandbytes, run for real on CPU), or every layer recomputed in
    backward (the varlen attention reads the same segments again): packed rows still give every sample
    the loss and gradients it gets in a padded batch."""
    changes = {"train.batch_size": 6} | ({"placement.language.precision": "4bit"} if setting == "qlora"
                                          else {"train.gradient_checkpointing": True})
    trainer, g_pad, m_pad = _train(make_recipe, "padded", **changes)
    layer = trainer.accelerator.unwrap_model(trainer.model).base_model.model.model.language_model.layers[0]
    if setting == "qlora":
        assert type(layer.self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    else:
        assert layer.gradient_checkpointing
    _, g_pack, m_pack = _train(make_recipe, "packed", **changes,
                               **{"train.packing.enabled": True, "train.packing.max_tokens": 300})
    assert [r["tokens"] for r in m_pack] == [r["tokens"] for r in m_pad]
    assert [r["loss"] for r in m_pack] == pytest.approx([r["loss"] for r in m_pad], rel=1e-5)
    assert [r["padding"] for r in m_pack] == [0.0] * 3 and sum(r["padding"] for r in m_pad) > 0  # one row a step
    for a, b in zip(g_pack, g_pad):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.slow
def test_a_packed_run_resumes_mid_epoch_exactly(make_recipe):
    changes = {"train.packing.enabled": True, "train.max_steps": 5, "train.save_every": 2, "train.eval_every": None}
    reference = Trainer(load_recipe(make_recipe("whole", **changes)), recipe_name="whole")
    reference.setup()
    reference.train()
    second = interrupt_then_resume(make_recipe("resumed", **changes), stop_after=3)
    assert second.step == 2 and second.sampler.position > 0  # mid-epoch
    second.train()
    assert [r["loss"] for r in read_metrics(second.out)] == [r["loss"] for r in read_metrics(reference.out)]


def test_budgets_above_the_row_length_are_warned_about(make_recipe):
    recipe = load_recipe(make_recipe("over", **{"train.packing.enabled": True, "train.batch_tokens": 600}))
    with pytest.warns(UserWarning, match=r"train.batch_tokens=600 is above the packed rows' 256 tokens"):
        Trainer(recipe, recipe_name="over").setup()


def test_packing_refuses_rows_shorter_than_a_sample(make_recipe):
    recipe = load_recipe(make_recipe("short", **{"train.packing.enabled": True, "train.packing.max_tokens": 100}))
    with pytest.raises(MmloraError, match=r"max_tokens=100 is below data.max_length=256: a sample could not fit"):
        Trainer(recipe, recipe_name="short").setup()


@pytest.mark.parametrize("model_type, reason", [("mllama", "cross-attention"), ("paligemma", "bidirectionally"),
                                                ("gemma4", "bidirectionally"), ("some_new_vlm", "not been checked")])
def test_families_that_cannot_pack_say_why(model_type, reason):
    assert reason in packing_refusal(model_type)
    assert packing_refusal("llava") is None and packing_refusal("qwen2_vl") is None


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from mmlora.models.families import save_family

    built = {}

    def get(model_type: str):
        if model_type not in built:
            built[model_type] = tmp_path_factory.mktemp(model_type) / "model"
            save_family(model_type, built[model_type])
        return built[model_type]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model_type", PACKS)
def test_each_packing_family_trains_the_same_steps_packed(model_type, family_dir, shapes_small, tmp_path):
    """The family's own recipe (recipes/families/), 2 steps of 4 samples, padded and packed: the same
    token counts and losses — the per-sample mRoPE positions included for the Qwen-VL families."""
    from pathlib import Path

    world = shapes_small / "world_B"
    losses = {}
    for packed in (False, True):
        overrides = [f"model.name={family_dir(model_type)}", f"train.output_dir={tmp_path / str(packed)}",
                     "train.max_steps=2", "train.batch_size=4", "train.eval_every=null", "train.save_every=null",
                     "train.warmup_steps=0", f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]",
                     "data.val=[]", f"train.packing.enabled={str(packed).lower()}"]
        recipe = Path(__file__).resolve().parents[2] / "recipes" / "families" / f"{model_type}.yaml"
        trainer = Trainer(load_recipe(recipe, overrides), recipe_name=model_type)
        trainer.setup()
        trainer.train()
        losses[packed] = read_metrics(trainer.out)
    assert [r["tokens"] for r in losses[True]] == [r["tokens"] for r in losses[False]]
    assert [r["loss"] for r in losses[True]] == pytest.approx([r["loss"] for r in losses[False]], rel=1e-5)


def test_token_budget_batches_train_and_resume(make_recipe):
    """``train.batch_tokens`` with packing: micro-batches within the budget, global batches of varying
    sizes, the same losses after an interrupted run resumes."""
    changes = {"train.batch_tokens": 150, "train.packing.enabled": True, "train.packing.max_tokens": 300,
               "train.grad_accum": 2, "train.max_steps": 4, "train.save_every": 2, "train.eval_every": None}
    reference = Trainer(load_recipe(make_recipe("budget", **changes)), recipe_name="budget")
    reference.setup()
    sizes = [len(b) for e in range(4) for b in reference.sampler.batches(e)]
    seen = []
    real = reference.collate

    def recording(items):
        batch = real(items)
        seen.append((len(items), sum(len(it["input_ids"]) for it in items if it is not None)))
        return batch

    reference.collate = recording
    reference.train()
    assert all(tokens <= 150 or n == 1 for n, tokens in seen) and len(seen) > 4  # micro-batches, cut by tokens
    assert sum(n for n, _ in seen) == sum(sizes[:4]) and len(set(sizes)) > 1
    second = interrupt_then_resume(make_recipe("budget-resumed", **changes), stop_after=3)
    second.train()
    assert [r["loss"] for r in read_metrics(second.out)] == [r["loss"] for r in read_metrics(reference.out)]


@pytest.mark.parametrize("key", ["train.batch_tokens=200", "train.packing.enabled=true"])
def test_clip_recipes_refuse_token_batching_in_one_line(key, shapes_small, tmp_path):
    """A CLIP (contrastive) recipe has image-text pairs, not token sequences: packing and token budgets
    are refused before training, not a KeyError mid-step."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "clip-lora.yaml"
    world = shapes_small / "world_A" / "annotations"
    overrides = [key, f"train.output_dir={tmp_path / 'run'}", "data.val=[]",
                 f"data.train=[{{format: coco, path: {world / 'captions_train.json'}}}]"]
    with pytest.raises(MmloraError, match=r"^train\.(batch_tokens|packing): sample-level objectives have no"):
        Trainer(load_recipe(recipe, overrides), recipe_name="clip").setup()
