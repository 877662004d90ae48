"""The trainer with its speed switches on (the default) and off trains the same: equal losses."""

from __future__ import annotations

import pytest

from mmlora.config.loading import load_recipe
from mmlora.train.loop import Trainer


def test_switches_on_and_off_give_the_same_losses(make_recipe):
    common = {"placement.vision": {"mode": "frozen"}, "placement.language.mode": "dora",
              "train.gradient_checkpointing": True}
    off = {"train.chunked_loss": {"enabled": False}, "train.frozen_no_grad": False, "train.lean_dora": False}
    losses, trainers = {}, {}
    for name, changes in (("on", {}), ("off", off)):
        trainer = Trainer(load_recipe(make_recipe(name, **common, **changes)), recipe_name=name)
        trainer.setup()
        batches = iter(trainer.sampler)
        losses[name] = [trainer.train_step(next(batches))[0] for _ in range(2)] + [trainer.evaluate()]
        trainers[name] = trainer
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    assert trainers["on"].speedups == {"chunked_loss": "auto", "no_grad_modules": ["model.vision_tower"],
                                       "lean_dora_layers": 14}
    assert trainers["off"].speedups == {}
