"""Degenerate training is warned about once: a loss stuck at ln(vocabulary size) (uniform predictions)
and steps whose every trainable gradient is exactly zero."""

import math
import warnings

import pytest

from mmlora.config.loading import load_recipe
from mmlora.train import watch
from mmlora.train.loop import Trainer


def _trainer(make_recipe, name, **changes):
    trainer = Trainer(load_recipe(make_recipe(name, **{"train.eval_every": None, **changes})), recipe_name=name)
    trainer.setup()
    return trainer


def _train(trainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught]


def test_a_loss_stuck_at_ln_vocab_is_warned_once(make_recipe):
    # A learning rate of 1e-12 keeps the tiny model at its initialisation: uniform predictions.
    trainer = _trainer(make_recipe, "stuck", **{"train.lr": 1.0e-12, "train.max_steps": 8})
    assert trainer.watch.vocab_size == trainer.accelerator.unwrap_model(trainer.model).config.get_text_config().vocab_size
    assert trainer.watch.uniform_loss == pytest.approx(math.log(trainer.watch.vocab_size))
    assert watch.STUCK_STEPS == 20 and trainer.watch.stuck_steps == watch.STUCK_STEPS
    trainer.watch.stuck_steps = 5  # the default is 20 steps; 5 keeps the test short
    stuck = [m for m in _train(trainer) if "loss stuck at ln(V)" in m]
    expected = (f"loss stuck at ln(V) = {math.log(trainer.watch.vocab_size):.3f} (V = {trainer.watch.vocab_size} tokens) for 5 "
                "steps: the model predicts uniformly — check the learning rate, the labels (are answers "
                "supervised?), or whether everything is frozen")
    assert stuck == [expected]


def test_a_learning_run_is_not_warned(make_recipe):
    trainer = _trainer(make_recipe, "learns", **{"train.lr": 2.0e-2, "train.max_steps": 8})
    trainer.watch.stuck_steps = 5
    messages = _train(trainer)
    assert not [m for m in messages if "loss stuck" in m or "exactly zero" in m]


@pytest.mark.parametrize("clipping", [1.0, None])
def test_all_zero_gradients_are_warned_once(make_recipe, monkeypatch, clipping):
    trainer = _trainer(make_recipe, "zero", **{"train.max_steps": 4, "train.max_grad_norm": clipping})
    real = trainer.objective.loss_sum

    def zero_after_the_first_step(model, batch):
        s, n = real(model, batch)
        return (0 * s, n) if trainer.step >= 1 else (s, n)

    monkeypatch.setattr(trainer.objective, "loss_sum", zero_after_the_first_step)
    zero = [m for m in _train(trainer) if "exactly zero" in m]
    assert len(zero) == 1 and zero[0].startswith("step 2: every trainable gradient is exactly zero, so nothing learns")
    assert trainer.step == 4
