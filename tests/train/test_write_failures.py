"""A full disk, or an output path that cannot be a folder, ends in one line that says what failed,
where, and which checkpoint is the last good one; that checkpoint stays intact."""

import errno

import pytest
from safetensors import SafetensorError

import mmlora.runs.checkpoint as ckpt
from mmlora.config.loading import load_recipe
from mmlora.errors import MmloraError
from mmlora.train.loop import Trainer

FAILURES = {
    "oserror": lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)),
    "torch.save": lambda path: RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                            "writing file data/3: file write failed"),
    "safetensors": lambda path: SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                                'message: "No space left on device" })'),
}


@pytest.mark.parametrize("shape", sorted(FAILURES))
def test_a_full_disk_while_checkpointing_names_the_last_good_checkpoint(make_recipe, monkeypatch, shape):
    trainer = Trainer(load_recipe(make_recipe("full", **{"train.save_every": 2, "train.eval_every": None})),
                      recipe_name="full")
    trainer.setup()
    target = "save_trainable" if shape == "safetensors" else "save_trainer_state"
    real = getattr(ckpt, target)

    def full_disk(folder, *args):
        if trainer.step == 4:
            raise FAILURES[shape](folder / "x")
        return real(folder, *args)

    monkeypatch.setattr(ckpt, target, full_disk)
    with pytest.raises(MmloraError) as err:
        trainer.train()
    root = trainer.out / "checkpoints"
    msg = str(err.value)
    assert msg.startswith("cannot write checkpoint step-000004: ") and "\n" not in msg
    assert "no space left on device" in msg
    assert f"the last good checkpoint is {root / 'step-000002'} (intact)" in msg
    assert "train.resume=auto continues from that checkpoint" in msg
    # The last good checkpoint is intact and still the latest; nothing half-written is left behind.
    assert ckpt.latest(root) == root / "step-000002" and ckpt.is_complete(root / "step-000002")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    state = ckpt.load_trainer_state(root / "step-000002")
    assert state["step"] == 2
    ckpt.load_trainable(root / "step-000002", trainer.accelerator.unwrap_model(trainer.model))


def test_an_output_dir_under_a_file_is_one_line(make_recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path = make_recipe("blocked", **{"train.output_dir": str(blocker / "run")})
    trainer = Trainer(load_recipe(path), recipe_name="blocked")
    with pytest.raises(MmloraError) as err:
        trainer.setup()
    msg = str(err.value)
    assert msg.startswith(f"cannot write the run folder: a part of the path is a file, not a folder ({blocker / 'run'})")
    assert "no checkpoint was written yet" in msg and "set train.output_dir to a folder you can write to" in msg


def test_a_full_disk_while_logging_metrics(make_recipe, monkeypatch):
    trainer = Trainer(load_recipe(make_recipe("metrics", **{"train.save_every": 1, "train.eval_every": None})),
                      recipe_name="metrics")
    trainer.setup()
    real = trainer._append_metrics

    def append(row):
        if row["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(trainer.run.metrics_file))
        real(row)

    monkeypatch.setattr(trainer, "_append_metrics", append)
    with pytest.raises(MmloraError, match=r"^cannot write metrics.jsonl: no space left on device \(.*metrics.jsonl\); "
                                          r"the last good checkpoint is .*step-000002 \(intact\)"):
        trainer.train()


def test_other_runtime_errors_are_not_taken_for_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="shape mismatch"), ckpt.writing("checkpoint step-000001", tmp_path, tmp_path):
        raise RuntimeError("shape mismatch")
