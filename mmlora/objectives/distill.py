"""Knowledge distillation into adapters (``continual.method: distill``): the student — the recipe's
model and placement — learns a teacher run's output distributions at the answer tokens of its data.

    loss = T² · Σ_answer tokens KL( softmax(z_teacher / T) ‖ softmax(z_student / T) )

normalised, like the captioning loss, by the supervised tokens of the global batch. The data are the
usual conversations; for distillation on unlabelled images they hold the teacher's own answers (what
``scripts/continual.py`` writes), so no ground-truth caption is used. The teacher runs in eval mode
without gradient on the same batch (a router teacher routes each sample itself).

Layer: objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlora.data.processing import IGNORE
from mmlora.objectives.caption import CaptionLM


def distill_loss_sum(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor],
                     temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """``(T² · Σ KL(teacher ‖ student), supervised tokens)`` at the positions whose next token is
    supervised, logits computed only there (``logits_to_keep``)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = teacher(**inputs, logits_to_keep=positions).logits.float()
    student_logits = student(**inputs, logits_to_keep=positions).logits.float()
    valid = targets[:, positions] != IGNORE  # [B, P]
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # [B, P]
    return (kl * valid).sum() * temperature**2, int(valid.sum())


class Distill(CaptionLM):
    """:class:`CaptionLM`'s data and batches, :func:`distill_loss_sum` as the loss (no chunked head:
    the teacher's distribution is needed whole at every supervised position)."""

    def __init__(self, teacher: nn.Module, temperature: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature = teacher.eval(), temperature
        self.teacher.requires_grad_(False)

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        return False

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return distill_loss_sum(model, self.teacher, batch, self.temperature)
