"""Data mixing image and text-only samples: batches are grouped by modality, so the first batch may be
text-only; the gradient audit then judges the vision tower and the projector at the first batch with
images instead of stopping the run at step 1, also when the run is resumed before that batch."""

import json
import re

import pytest

from mmlora.config.loading import load_recipe
from mmlora.errors import MmloraError
from mmlora.train.loop import Trainer
from tests.train.conftest import interrupt_then_resume

CAPTIONS = ["top center holds a large red star.", "bottom left holds a small blue cross.",
            "a large green circle sits in the middle.", "top right holds a small red square.",
            "bottom center holds a large blue star.", "a small green cross sits at the top.",
            "middle left holds a large red circle.", "bottom right holds a small green square."]


def mixed_train_data(shapes_small, tmp_path) -> list[dict]:
    """``data.train``: world B's image samples plus text-only conversations (``messages`` JSONL)."""
    text_only = tmp_path / "text_only.jsonl"
    text_only.write_text("".join(json.dumps({"id": f"text{i}", "messages": [
        {"role": "user", "content": "Describe a picture of shapes."},
        {"role": "assistant", "content": caption}]}) + "\n" for i, caption in enumerate(CAPTIONS)))
    return [{"format": "llava", "path": str(shapes_small / "world_B" / "llava_train.json")},
            {"format": "messages", "path": str(text_only)}]


def seed_with_text_only_first_batch(train: list[dict], global_batch: int) -> int:
    """A seed whose first global batch is text-only (the batches' modality order depends on the seed
    and the samples' modalities only, not on their lengths)."""
    from mmlora.config.schema import DatasetSpec
    from mmlora.data.batching import GroupedBatchSampler
    from mmlora.data.build import mix, read_dataset

    for seed in range(200):
        records = mix([(read_dataset(DatasetSpec.model_validate(d)), 1.0) for d in train], seed)
        has_image = [r.has_image for r in records]
        first = GroupedBatchSampler([0] * len(records), has_image, global_batch, seed=seed).batches(0)[0]
        if not any(has_image[i] for i in first):
            return seed
    raise AssertionError("no seed gives a text-only first batch")


def _mixed_recipe(make_recipe, shapes_small, tmp_path, name, **changes):
    train = mixed_train_data(shapes_small, tmp_path)
    return make_recipe(name, **{"data.train": train, "data.val": [], "train.eval_every": None, **changes})


def _trainer_whose_first_batch_is_text_only(path, name):
    """A trainer whose sampler starts with a text-only batch followed by one with images (the
    sampler's seed is chosen for it: the recipe's seed would do, we just find one)."""
    trainer = Trainer(load_recipe(path), recipe_name=name)
    trainer.setup()
    has_image = trainer.train_set.has_image()
    assert any(has_image) and not all(has_image)
    for seed in range(200):
        trainer.sampler.seed = seed
        first, second = trainer.sampler.batches(0)[:2]
        if not any(has_image[i] for i in first) and all(has_image[i] for i in second):
            break
    else:
        pytest.fail("no seed gives a text-only first batch")
    seen = []
    real = trainer.objective.loss_sum

    def recording(model, batch):
        seen.append("pixel_values" in batch)
        return real(model, batch)

    trainer.objective.loss_sum = recording
    return trainer, seen


def test_text_only_first_batch_audits_vision_at_the_first_image_batch(make_recipe, shapes_small, tmp_path, capsys):
    trainer, seen = _trainer_whose_first_batch_is_text_only(_mixed_recipe(make_recipe, shapes_small, tmp_path, "mixed"), "mixed")
    grads_at_step_1 = {}
    step = trainer.optimizer.step

    def capture(*args, _step=step, **kwargs):
        if trainer.step == 0:
            model = trainer.accelerator.unwrap_model(trainer.model)
            grads_at_step_1.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        return _step(*args, **kwargs)

    trainer.optimizer.step = capture
    result = trainer.train()
    assert result["steps"] == 4
    assert seen[:2] == [False, True]  # batch 1 had no pixel_values, batch 2 had them
    vision = [n for n in grads_at_step_1 if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(grads_at_step_1[n] is None for n in vision)  # what the old audit stopped on
    assert all(grads_at_step_1[n] is not None for n in grads_at_step_1 if "language_model" in n)
    out = capsys.readouterr().out
    assert "gradient audit: step 1 has no images; vision, projector will be checked at the first batch with images" in out
    assert "gradient audit: vision, projector checked at step 2 (the first batch with images)" in out
    assert (trainer.out / "final" / "manifest.json").is_file()


def test_a_vision_adapter_that_never_gets_gradient_still_fails_at_the_image_batch(make_recipe, shapes_small, tmp_path):
    # Layer 1 of the tiny vision tower is after the one the projector reads: its adapter is never reached.
    path = _mixed_recipe(make_recipe, shapes_small, tmp_path, "unread", **{"placement.vision.layers": [1]})
    trainer, seen = _trainer_whose_first_batch_is_text_only(path, "unread")
    assert any("never read" in w for w in trainer.plan.warnings)
    with pytest.raises(MmloraError) as err:
        trainer.train()
    msg = str(err.value)
    assert "gradient-flow audit failed at step 2 (the first batch with images)" in msg
    assert "encoder.layers.1.self_attn.q_proj" in msg and "no gradient" in msg
    assert "language_model" not in msg
    assert trainer.step == 1 and seen == [False, True]


def test_a_run_resumed_before_its_first_image_batch_still_audits_vision(make_recipe, shapes_small, tmp_path, capsys):
    train = mixed_train_data(shapes_small, tmp_path)
    path = make_recipe("resumed_mixed", **{"data.train": train, "data.val": [], "train.eval_every": None,
                                           "train.seed": seed_with_text_only_first_batch(train, 4),
                                           "train.save_every": 1, "train.max_steps": 4})
    second = interrupt_then_resume(path, stop_after=2)  # stops before step 2's checkpoint: resumes at step 1
    assert "gradient audit: step 1 has no images; vision, projector will be checked" in capsys.readouterr().out
    assert second.step == 1 and second.audit.waiting == {"vision", "projector"}  # from the checkpoint
    second.train()
    out = capsys.readouterr().out
    assert re.search(r"gradient audit: vision, projector checked at step [234] \(the first batch with images\)", out)
