"""The PEFT backend: the one module that knows PEFT's config keyword names.

``peft_config`` turns a plan's typed adapter settings into a ``LoraConfig`` (``AdaLoraConfig`` for
AdaLoRA); ``attach_adapters`` puts configs on a model as one ``PeftModel``, all adapters active
together; ``save_initial_adapters`` keeps PiSSA/OLoRA adapters as initialised (PEFT's recipe for
converting them into plain LoRA adapters at save time).
"""

from __future__ import annotations

import re
import tempfile

from torch import nn

from mmlora.errors import MmloraError
from mmlora.placement.settings import AdaLoraSettings, LoraSettings

#: mmlora's ``init`` → PEFT's ``init_lora_weights`` ("default" is PEFT's ``True``).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_kwargs(lora: LoraSettings) -> dict:
    """``LoraConfig`` keyword arguments of ``lora`` (module names escaped: PEFT matches patterns as regexes)."""
    return {
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": list(lora.targets),
        "rank_pattern": {re.escape(name): rank for name, rank in lora.rank_overrides.items()},
        "alpha_pattern": {re.escape(name): alpha for name, alpha in lora.alpha_overrides.items()},
        "lora_dropout": lora.dropout,
        "use_dora": lora.dora,
        "use_rslora": lora.rslora,
        "init_lora_weights": _INIT[lora.init],
        "bias": "none",
    }


def peft_config(lora: LoraSettings, adalora: AdaLoraSettings | None = None, causal_lm: bool = False):
    """PEFT's config for one adapter: ``LoraConfig``, or ``AdaLoraConfig`` when ``adalora`` is given
    (AdaLoRA has one budget, so ``lora``'s rank and per-module overrides do not apply)."""
    from peft import AdaLoraConfig, LoraConfig

    task_type = "CAUSAL_LM" if causal_lm else None
    if adalora is None:
        return LoraConfig(task_type=task_type, **lora_kwargs(lora))
    if adalora.total_step is None:
        raise MmloraError("placement.adalora.total_step: AdaLoRA needs the number of training steps")
    if adalora.tinit >= adalora.total_step - adalora.tfinal:
        raise MmloraError(f"placement.adalora: tinit {adalora.tinit} + tfinal {adalora.tfinal} leave no step of the "
                          f"{adalora.total_step}-step run for allocating the budget; lower tinit/tfinal or train "
                          "longer (train.max_steps)")
    return AdaLoraConfig(
        init_r=adalora.init_r, target_r=adalora.target_r, tinit=adalora.tinit, tfinal=adalora.tfinal,
        deltaT=adalora.delta_t, total_step=adalora.total_step, orth_reg_weight=adalora.orth_reg_weight, task_type=task_type,
        init_lora_weights=_INIT[lora.init], lora_alpha=lora.alpha, target_modules=list(lora.targets),
        lora_dropout=lora.dropout, use_rslora=lora.rslora, bias="none",
    )


def attach_adapters(model: nn.Module, configs: dict[str, object]) -> nn.Module:
    """Wrap ``model`` in one ``PeftModel`` carrying ``configs`` (adapter name → PEFT config, in order),
    every adapter active."""
    from peft import get_peft_model

    (first, config), *rest = configs.items()
    out = get_peft_model(model, config, adapter_name=first)
    for name, cfg in rest:
        out.add_adapter(name, cfg)
    if rest:
        out.base_model.set_adapter(list(configs))
    return out


def save_initial_adapters(peft_model: nn.Module, names: list[str]) -> dict[str, str]:
    """Save adapters ``names`` of ``peft_model`` as they are now, marked as plain LoRA init (as PEFT
    documents for PiSSA/OLoRA conversion). Returns adapter name → the folder it was saved to."""
    dirs = {}
    for name in names:
        path = tempfile.mkdtemp(prefix=f"mmlora-init-{name}-")
        cfg = peft_model.peft_config[name]
        init = cfg.init_lora_weights
        cfg.init_lora_weights = True
        peft_model.save_pretrained(path, selected_adapters=[name])
        cfg.init_lora_weights = init
        dirs[name] = path if name == "default" else f"{path}/{name}"
    return dirs
