"""Gradient-flow audit: after the first backward pass, every trainable tensor must have a gradient,
and the tensors that the initialisation makes live must have a non-zero one.

Which tensors are live: with PEFT's default (and gaussian) init ``lora_B`` is zero, so ``lora_A``
receives a zero gradient at step 1 and only ``lora_B`` must be non-zero; PiSSA/OLoRA start both
non-zero. A token embedding's LoRA the other way round, whatever the init: PEFT zeroes
``lora_embedding_A`` and draws ``lora_embedding_B`` (its PiSSA/OLoRA are for linear layers), so only
A must be live; AdaLoRA starts its singular values ``lora_E`` at zero, so only they must be; DoRA
magnitudes and ``full`` parameters always receive gradient.

``include`` narrows the audit to the parameters a batch could reach: a text-only batch never runs the
vision tower or the projector, so the trainer checks those at the first batch with images.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from torch import nn

from mmlora.errors import MmloraError


@dataclass
class AuditReport:
    checked: int
    no_grad: list[str]
    zero_grad: list[str]

    @property
    def ok(self) -> bool:
        return not self.no_grad and not self.zero_grad


def _must_be_live(name: str, both_factors_live: bool, adalora: bool) -> bool:
    if adalora:  # AdaLoRA starts its singular values E at zero: only E gets gradient at step 1
        return ".lora_E." in name
    if ".lora_A." in name or ".qalora_A." in name:  # QA-LoRA's B starts at zero too
        return both_factors_live
    # embeddings the other way round, every init: A starts at zero and B random, so B's gradient is
    # zero at step 1; lora_B, lora_embedding_A, magnitudes and full parameters must be live
    return ".lora_embedding_B." not in name


def audit_gradients(model: nn.Module, raise_on_error: bool = True, *,
                    initial_adapters: Collection[str] = (), include: Callable[[str], bool] | None = None,
                    when: str = "the first step") -> AuditReport:
    """Check gradients of all trainable parameters of ``model`` (call after backward, before step).

    ``initial_adapters``: the adapters whose init makes both factors live (PiSSA/OLoRA), e.g. what
    ``save_initial_state`` returned (its keys are the names). ``include(name)``: check only the
    parameters it accepts (default: all). ``when`` names the step in the error ("step 3").
    """
    init_dirs = list(initial_adapters)
    no_grad, zero_grad, checked = [], [], 0
    adalora_modules = {n.split(".lora_E.")[0] for n, _ in model.named_parameters() if ".lora_E." in n}
    for name, p in model.named_parameters():
        if not p.requires_grad or (include is not None and not include(name)):
            continue
        checked += 1
        if p.grad is None:
            no_grad.append(name)
            continue
        adapter = next((a for a in init_dirs if f".{a}." in name or name.endswith(f".{a}")), None)
        adalora = ".lora_" in name and name.split(".lora_")[0] in adalora_modules
        if _must_be_live(name, adapter is not None, adalora) and not p.grad.abs().sum().item() > 0:
            zero_grad.append(name)
    report = AuditReport(checked, no_grad, zero_grad)
    if raise_on_error and not report.ok:
        def modules(names: list[str]) -> str:
            mods = sorted({n.rsplit(".", 2)[0] if ".lora_" in n else n for n in names})
            return ", ".join(mods[:6]) + (f" and {len(mods) - 6} more" if len(mods) > 6 else "")

        parts = []
        if no_grad:
            parts.append(f"{len(no_grad)} trainable tensor(s) got no gradient: {modules(no_grad)}")
        if zero_grad:
            parts.append(f"{len(zero_grad)} got an all-zero gradient: {modules(zero_grad)}")
        raise MmloraError(
            f"gradient-flow audit failed at {when}: " + "; ".join(parts) + ". Likely causes: their output "
            "never reaches the loss (e.g. vision layers after the layer the projector reads, an unused head), the "
            "forward ran under torch.no_grad, or reentrant gradient checkpointing on frozen inputs "
            "(use use_reentrant=False)."
        )
    return report
