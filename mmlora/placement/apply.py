"""Apply a placement plan: PEFT adapters where the plan says, ``full`` parameters trainable in place.

All adapters of a plan are attached to one ``PeftModel`` and active together, so they train in one
step. Everything else is frozen. Applying needs only the plan. PiSSA/OLoRA adapters start from the
base weights, so ``save_initial_state`` keeps their initial state (call it right after applying):
saving converts them with it into plain LoRA adapters that load on the original base weights.
"""

from __future__ import annotations

from torch import nn

from mmlora.adapters.qalora import apply_qalora
from mmlora.errors import MmloraError
from mmlora.models.modality import is_open_clip, unwrap
from mmlora.placement.peft_backend import attach_adapters, peft_config, save_initial_adapters
from mmlora.placement.plan import PlacementPlan


def apply_placement(model: nn.Module, plan: PlacementPlan) -> nn.Module:
    """Freeze ``model``, attach the plan's adapters, unfreeze its ``full`` parameters.

    Returns a ``PeftModel`` when the plan has adapters, else ``model`` itself.
    """
    model.requires_grad_(False)
    out: nn.Module = model
    if plan.adapters:
        causal_lm = plan.kind == "vlm"
        out = attach_adapters(model, {a.name: peft_config(a.lora, a.adalora, causal_lm) for a in plan.adapters})
    base = out.get_base_model() if plan.adapters else out
    # QA-LoRA modalities: mmlora's own layer (PEFT's QA-LoRA needs GPTQ checkpoints), applied after
    # PEFT so that PEFT never sees these layers.
    for m in plan.qalora:
        apply_qalora(base, [(t.name, t.rank, t.alpha) for t in m.targets], m.group_size, m.dropout, m.rslora)
    params = dict(base.named_parameters())
    missing = [p for p in plan.full_params if p not in params]
    if missing:
        raise MmloraError(f"full parameters not found after applying adapters: {missing[:3]}")
    for name in plan.full_params:
        params[name].requires_grad_(True)
    return out


def save_initial_state(model: nn.Module, plan: PlacementPlan) -> dict[str, str]:
    """Save the plan's PiSSA/OLoRA adapters of ``model`` (placed by :func:`apply_placement`, not yet
    trained) as initialised. Returns adapter name → folder, for ``save_placement(initial_adapters=...)``
    (which converts them) and ``audit_gradients(initial_adapters=...)``; empty when there are none."""
    return save_initial_adapters(model, [a.name for a in plan.adapters if a.lora.converts_at_save])


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing, non-reentrant: with reentrant checkpointing, a block whose
    inputs do not require grad (a frozen tower's output) gives its adapters no gradient at all."""
    base = unwrap(model)
    if is_open_clip(base):
        base.set_grad_checkpointing(True)  # open_clip checkpoints with use_reentrant=False
        return
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
