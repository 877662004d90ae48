"""A checkpoint records what resuming it needs (base model, plan, data, processes, global batch, seed);
a resume that differs is refused with one line naming the fields, before any tensor is loaded."""

import json

import pytest
from safetensors.torch import load_file, save_file

import mmlora.runs.checkpoint as ckpt
from mmlora.config.loading import load_recipe
from mmlora.errors import MmloraError
from mmlora.train.loop import Trainer
from tests.train.conftest import run_training

CHANGES = {"train.max_steps": 2, "train.save_every": 1, "train.eval_every": None}


@pytest.fixture
def trained(make_recipe):
    path = make_recipe("resumable", **CHANGES)
    trainer, _ = run_training(path)
    step = trainer.out / "checkpoints" / "step-000002"
    assert ckpt.is_complete(step)
    return path, step


def _setup(path, *overrides):
    trainer = Trainer(load_recipe(path, overrides), recipe_name=path.stem)
    trainer.setup()
    return trainer


def test_the_checkpoint_records_its_fingerprint(trained):
    _, step = trained
    recorded = json.loads((step / ckpt.FINGERPRINT).read_text())
    assert recorded["base_model"] == "tiny-llava" and recorded["processes"] == 1 and recorded["global_batch"] == 4
    assert recorded["plan"]["modalities"]["language"]["ranks"] == [4] and len(recorded["plan"]["sha256"]) == 64
    assert recorded["data"]["samples"] == 25 and recorded["data"]["train"][0]["format"] == "llava"


def test_a_different_rank_is_refused_naming_the_plan(trained):
    path, step = trained
    with pytest.raises(MmloraError) as err:
        _setup(path, "train.max_steps=4", "placement.language.rank=8")
    msg = str(err.value)
    assert msg.startswith(f"train.resume: checkpoint {step} was written by a different setup (")
    assert "plan.modalities.language.ranks: [4] -> [8]" in msg
    assert "train.resume=never" in msg and "train.output_dir" in msg and "\n" not in msg


def test_other_settings_are_named_too(trained):
    path, step = trained
    with pytest.raises(MmloraError, match=r"seed: 0 -> 1"):
        _setup(path, "train.max_steps=4", "train.seed=1")
    with pytest.raises(MmloraError, match=r"plan: the adapter settings differ"):
        _setup(path, "train.max_steps=4", "placement.language.alpha=32")
    recorded = json.loads((step / ckpt.FINGERPRINT).read_text())
    recorded["processes"], recorded["global_batch"] = 2, 8  # as if written by a 2-process run
    (step / ckpt.FINGERPRINT).write_text(json.dumps(recorded))
    with pytest.raises(MmloraError) as err:
        _setup(path, "train.max_steps=4")
    assert "processes: 2 -> 1" in str(err.value) and "global_batch: 8 -> 4" in str(err.value)


def test_a_checkpoint_without_a_fingerprint_resumes_as_before(trained):
    path, step = trained
    (step / ckpt.FINGERPRINT).unlink()  # a checkpoint of an older run
    trainer = _setup(path, "train.max_steps=3")
    assert trainer.step == 2
    assert trainer.train()["steps"] == 3


def test_the_same_setup_resumes(trained):
    path, _ = trained
    assert _setup(path, "train.max_steps=3").step == 2


def test_load_trainable_names_the_tensor(trained):
    path, step = trained
    other = _setup(path, "train.resume=never", "placement.language.rank=8")
    model = other.accelerator.unwrap_model(other.model)
    with pytest.raises(MmloraError, match=r"tensor \S+lora_A\S+ has shape \[4, \d+\] in the checkpoint but \[8, \d+\] "
                                          r"in this model; the checkpoint was made with another model or placement"):
        ckpt.load_trainable(step, model)
    tensors = load_file(step / ckpt.TRAINABLE)
    name = next(iter(tensors))
    tensors["model.not_a_layer.weight"] = tensors.pop(name)
    save_file(tensors, step / ckpt.TRAINABLE)
    same = _setup(path, "train.resume=never")
    with pytest.raises(MmloraError, match=r"tensor model\.not_a_layer\.weight is not a parameter of this model"):
        ckpt.load_trainable(step, same.accelerator.unwrap_model(same.model))
