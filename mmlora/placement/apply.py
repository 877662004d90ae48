"""Apply a placement plan: PEFT adapters where the plan says, ``full`` parameters trainable in place.

All adapters of a plan are attached to one ``PeftModel`` and active together, so they train in one
step. Everything else is frozen. PiSSA/OLoRA adapters keep their initial state so that saving can
convert them into plain LoRA adapters that load on the original base weights.
"""

from __future__ import annotations

import tempfile

from torch import nn

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.placement.plan import AdapterPlan, PlacementPlan


def _peft_config(adapter: AdapterPlan, spec: PlacementSpec, task_type: str | None):
    from peft import AdaLoraConfig, LoraConfig

    cfg = dict(adapter.config)
    if adapter.variant == "adalora":
        ada = spec.adalora
        if ada.total_step is None:
            raise MmloraError("placement.adalora.total_step: AdaLoRA needs the number of training steps")
        for key in ("use_dora", "rank_pattern", "alpha_pattern", "r"):
            cfg.pop(key)
        init = cfg.pop("init_lora_weights")
        return AdaLoraConfig(
            init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit, tfinal=ada.tfinal, deltaT=ada.delta_t,
            total_step=ada.total_step, task_type=task_type, init_lora_weights=init, **cfg,
        )
    return LoraConfig(task_type=task_type, **cfg)


def apply_placement(model: nn.Module, plan: PlacementPlan, spec: PlacementSpec) -> nn.Module:
    """Freeze ``model``, attach the plan's adapters, unfreeze its ``full`` parameters.

    Returns a ``PeftModel`` when the plan has adapters, else ``model`` itself.
    """
    model.requires_grad_(False)
    out: nn.Module = model
    if plan.adapters:
        from peft import get_peft_model

        task_type = "CAUSAL_LM" if plan.kind == "vlm" else None
        first, *rest = plan.adapters
        out = get_peft_model(model, _peft_config(first, spec, task_type), adapter_name=first.name)
        for adapter in rest:
            out.add_adapter(adapter.name, _peft_config(adapter, spec, task_type))
        if rest:
            out.base_model.set_adapter([a.name for a in plan.adapters])
        out._mmlora_init_dirs = _keep_initial_state(out, plan)
    base = out.get_base_model() if plan.adapters else out
    _apply_qalora(base, plan, spec)
    params = dict(base.named_parameters())
    missing = [p for p in plan.full_params if p not in params]
    if missing:
        raise MmloraError(f"full parameters not found after applying adapters: {missing[:3]}")
    for name in plan.full_params:
        params[name].requires_grad_(True)
    return out


def _apply_qalora(base: nn.Module, plan: PlacementPlan, spec: PlacementSpec) -> None:
    """QA-LoRA modalities: mmlora's own layer (PEFT's QA-LoRA needs GPTQ checkpoints), applied after
    PEFT so that PEFT never sees these layers."""
    from mmlora.adapters.qalora import apply_qalora

    specs = dict(spec.items())
    for m in plan.qalora:
        s = specs[m.name]
        apply_qalora(base, [(t.name, t.rank, t.alpha) for t in m.targets], m.group_size, s.dropout, s.rslora)


def _keep_initial_state(peft_model: nn.Module, plan: PlacementPlan) -> dict[str, str]:
    """Save PiSSA/OLoRA adapters as initialised (PEFT's recipe for converting them at save time)."""
    dirs = {}
    for adapter in plan.adapters:
        init = adapter.config["init_lora_weights"]
        if init in ("pissa", "olora"):
            path = tempfile.mkdtemp(prefix=f"mmlora-init-{adapter.name}-")
            cfg = peft_model.peft_config[adapter.name]
            cfg.init_lora_weights = True  # mark the saved copy as plain LoRA init, as PEFT documents
            peft_model.save_pretrained(path, selected_adapters=[adapter.name])
            cfg.init_lora_weights = init
            dirs[adapter.name] = path if adapter.name == "default" else f"{path}/{adapter.name}"
    return dirs


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing, non-reentrant: with reentrant checkpointing, a block whose
    inputs do not require grad (a frozen tower's output) gives its adapters no gradient at all."""
    from mmlora.models.modality import is_open_clip, unwrap

    base = unwrap(model)
    if is_open_clip(base):
        base.set_grad_checkpointing(True)  # open_clip checkpoints with use_reentrant=False
        return
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
