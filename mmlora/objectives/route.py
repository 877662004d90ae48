"""The router's own objective (``continual.router.objective: best-expert``): learn, per sample, which
expert explains it best — the expert under which the sample's answer has the lowest language-model
loss (each expert alone, no gradient) — by cross-entropy on the router's weights.

Why not only the mixture's own LM loss, end to end (``objective: mixture``)? When the router cannot yet
tell two worlds apart, the LM loss pulls it towards the expert whose mistakes cost most on the other
world (a base that cannot write world B's captions costs far more on B than B's adapter costs on A),
the softmax saturates there, and its gradient for the other world's samples vanishes: on the shapes
worlds every world-A image ended up routed to B's adapter. The best expert per sample is a
label-free target with no such asymmetry, and training it back-propagates through the router alone
(the experts' forwards run without gradient), which is also cheaper.

Layer: objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlora.data.processing import IGNORE
from mmlora.objectives.caption import CaptionLM


def per_sample_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean next-token cross-entropy over each sample's supervised tokens (logits only there)."""
    targets = labels[:, 1:]
    positions = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=positions).logits.float()  # [B, P, V]
    picked = targets[:, positions]
    ce = F.cross_entropy(logits.transpose(1, 2), picked, ignore_index=IGNORE, reduction="none")  # [B, P]
    valid = (picked != IGNORE).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


class BestExpert(CaptionLM):
    """:class:`CaptionLM`'s data; the loss is the router's cross-entropy towards each sample's best expert,
    normalised per sample. The model carries a ``mmlora_mixture`` (``mmlora.adapters.mixture``)."""

    unit = "sample"

    def use_chunked_loss(self, chunk_size: int | None = None) -> bool:
        return False

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mixture = model.mmlora_mixture
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        rows, experts = labels.shape[0], len(mixture.names)
        losses = []
        with torch.no_grad():
            for k in range(experts):  # each expert alone: the weights set by hand, the router not asked
                mixture.weights = torch.zeros(rows, experts, device=labels.device)
                mixture.weights[:, k] = 1.0
                mixture._preset = True
                try:
                    losses.append(per_sample_loss(model, inputs, labels))
                finally:
                    mixture._preset = False
        best = torch.stack(losses, dim=1).argmin(dim=1)  # [B]
        mixture.text_mask = labels == IGNORE  # the router reads the prompt, not the answer
        try:
            image, text = mixture.features(model, inputs.get("pixel_values"), inputs["input_ids"],
                                           inputs.get("attention_mask"))
        finally:
            mixture.text_mask = None
        weights = mixture.router(image, text)
        mixture.weights = None
        return F.nll_loss(torch.log(weights.clamp(min=1e-9)), best, reduction="sum"), rows
