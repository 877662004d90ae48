"""The gradient-flow audit of a training run (``mmlora.placement.audit``), each modality at the first
step whose batch reaches it: at step 1 everything a batch of its kind reaches; a text-only batch never
runs the vision tower or the projector, so those wait for the first batch with images. What still
waits is part of a checkpoint, so a run resumed before its first batch with images still checks them.

Layer: train. Imports placement, models and the foundation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import nn

from mmlora.models.modality import ModalityMap
from mmlora.placement.audit import audit_gradients
from mmlora.train.optim import base_name

#: Batch keys that carry images (VLM processors; open_clip batches). A batch without them never runs
#: the vision tower or the projector, so those are audited at the first batch with images.
IMAGE_KEYS = ("pixel_values", "image")
IMAGE_SIDE = ("vision", "projector")


class StagedAudit:
    """Call :meth:`after_backward` at every step, after backward and before the optimizer step (it is
    free once every modality is checked); ``say`` prints on the main process. ``initial_adapters`` as
    for ``audit_gradients``. A resumed run loads what still waits (:meth:`load_state_dict`)."""

    def __init__(self, mmap: ModalityMap, initial_adapters: Collection[str], say: Callable[[str], None]):
        self.mmap, self.initial_adapters, self.say = mmap, initial_adapters, say
        self.modality: dict[str, str] = {}  # trainable parameter → its modality, read when first needed
        self.waiting: set[str] | None = None  # modalities not audited yet; None: the run has not started

    def state_dict(self) -> dict[str, list[str]]:
        return {"waiting": sorted(self.waiting or ())}

    def load_state_dict(self, state: dict[str, list[str]] | None) -> None:
        """What a checkpoint says still waits; a checkpoint from before this was recorded (None): nothing."""
        self.waiting = set(state["waiting"]) if state else set()

    def after_backward(self, model: nn.Module, step: int, has_images: bool) -> None:
        """Audit the modalities due at ``step`` (0-based: the step being taken) of ``model`` (unwrapped)."""
        if self.waiting is None:  # the run's first step
            self.modality = self._modalities(model)
            self.waiting = set(self.modality.values())
        if not self.waiting:
            return
        if not self.modality:  # a resumed run with modalities still waiting
            self.modality = self._modalities(model)
        due = self.waiting if has_images else self.waiting - set(IMAGE_SIDE)
        if not due:
            return
        later = self.waiting - due
        when = "the first step" if step == 0 else f"step {step + 1} (the first batch with images)"
        audit_gradients(model, initial_adapters=self.initial_adapters, when=when,
                        include=lambda n: self.modality.get(n) in due)
        self.waiting = later
        if step > 0:
            self.say(f"gradient audit: {_names(due)} checked at step {step + 1} (the first batch with images)")
        elif later:
            self.say(f"gradient audit: step 1 has no images; {_names(later)} will be checked at the first batch with images")

    def _modalities(self, model: nn.Module) -> dict[str, str]:
        return {n: self.mmap.modality_of(base_name(n)) or "other" for n, p in model.named_parameters() if p.requires_grad}


def _names(modalities: set[str]) -> str:
    """vision, projector first, then the rest by name."""
    return ", ".join([m for m in IMAGE_SIDE if m in modalities] + sorted(modalities - set(IMAGE_SIDE)))
