"""``mmlora.train.staged_audit``: each modality is audited at the first step whose batch reaches it
(the vision tower and the projector wait for a batch with images), a dead adapter there is refused
naming the step, and what still waits is carried over a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlora.errors import MmloraError
from mmlora.models.modality import Modality, ModalityMap
from mmlora.train.staged_audit import StagedAudit

MMAP = ModalityMap("vlm", {"vision": Modality("vision", ["vision"]), "projector": Modality("projector", ["projector"]),
                           "language": Modality("language", ["language"])})


def _model() -> nn.Module:
    """A LoRA pair (default init: B is what must be live at step 1) under each modality."""
    model = nn.Module()
    for name in MMAP.modalities:
        part = nn.Module()
        part.lora_A = nn.ModuleDict({"default": nn.Linear(2, 1, bias=False)})
        part.lora_B = nn.ModuleDict({"default": nn.Linear(1, 2, bias=False)})
        setattr(model, name, part)
    return model


def _grads(model: nn.Module, *modalities: str) -> None:
    for name in modalities:
        for p in getattr(model, name).parameters():
            p.grad = torch.ones_like(p)


def test_image_side_waits_for_the_first_batch_with_images():
    said: list[str] = []
    audit, model = StagedAudit(MMAP, (), said.append), _model()
    _grads(model, "language")  # a text-only first step: nothing reaches the vision side
    audit.after_backward(model, 0, has_images=False)
    assert said == ["gradient audit: step 1 has no images; vision, projector will be checked at the first batch with images"]
    audit.after_backward(model, 1, has_images=False)  # still none: nothing due
    with pytest.raises(MmloraError, match=r"step 3 \(the first batch with images\)") as err:
        audit.after_backward(model, 2, has_images=True)  # images, but the vision side got no gradient
    assert "4 trainable tensor(s) got no gradient: projector" in str(err.value)  # vision's and the projector's
    _grads(model, "vision", "projector")
    audit.after_backward(model, 3, has_images=True)
    assert said[-1] == "gradient audit: vision, projector checked at step 4 (the first batch with images)"
    for p in model.parameters():  # every modality checked: later steps audit nothing
        p.grad = None
    audit.after_backward(model, 4, has_images=True)


def test_step_one_with_images_checks_everything():
    model = _model()
    _grads(model, "vision", "language")
    with pytest.raises(MmloraError, match="the first step") as err:
        StagedAudit(MMAP, (), print).after_backward(model, 0, has_images=True)
    assert "2 trainable tensor(s) got no gradient: projector.lora_A" in str(err.value)  # the projector's alone


def test_what_still_waits_survives_a_resume():
    said: list[str] = []
    first, model = StagedAudit(MMAP, (), said.append), _model()
    _grads(model, "language")
    first.after_backward(model, 0, has_images=False)
    state = first.state_dict()
    assert state == {"waiting": ["projector", "vision"]}
    resumed = StagedAudit(MMAP, (), said.append)
    resumed.load_state_dict(state)
    resumed.after_backward(model, 4, has_images=False)  # still no images: nothing due
    with pytest.raises(MmloraError, match=r"step 6 \(the first batch with images\)"):
        resumed.after_backward(model, 5, has_images=True)
    done = StagedAudit(MMAP, (), said.append)
    done.load_state_dict({"waiting": []})  # everything was checked before the checkpoint
    done.after_backward(model, 5, has_images=True)
    older = StagedAudit(MMAP, (), said.append)
    older.load_state_dict(None)  # a checkpoint from before the audit's state was saved: nothing waits
    older.after_backward(model, 5, has_images=True)
    assert len(said) == 1 and older.state_dict() == {"waiting": []}
