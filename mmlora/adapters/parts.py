"""A PEFT LoRA/DoRA folder read as plain per-layer parts ``(A, s·B, g)``: what the gathered server
pages in (``mmlora.serve.gathered``) and what a mixture of LoRA experts mixes (``mmlora.adapters.mixture``).

The scaling is PEFT's own (``LoraConfig``: ``lora_alpha / r``, ``/ √r`` with rsLoRA, ``alpha_pattern``
matched by PEFT's ``get_pattern_key``); a DoRA layer's ``g = m / ‖W + s B A‖`` is computed against the
base's weight. What is not a plain LoRA/DoRA of ``nn.Linear`` layers (``modules_to_save``, bias
training, QA-LoRA, trainable tokens, ...) is refused in one line, with the caller's advice.

Layer: adapters.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mmlora.errors import MmloraError

Parts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # A [r, in], s·B [out, r], g [out] or None

_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def combine(parts: list[dict[str, Parts]], what: str, advice: str = "serve it with --mode merged") -> dict[str, Parts]:
    """One adapter's parts from several PEFT adapters of a run (e.g. a DoRA vision adapter beside a LoRA
    language one). Two LoRA adapters on one layer add up exactly as one of the summed rank
    (``A`` stacked, ``s·B`` side by side); DoRA on a layer another adapter also adapts is refused."""
    out: dict[str, Parts] = {}
    for p in parts:
        for name, (a, b, g) in p.items():
            if name not in out:
                out[name] = (a, b, g)
                continue
            a0, b0, g0 = out[name]
            if g is not None or g0 is not None:
                raise MmloraError(f"{what}: two adapters of the run adapt {name}, one with DoRA: {advice}")
            out[name] = (torch.cat([a0, a]), torch.cat([b0, b], dim=1), None)
    return out


def read_adapter(folder: Path, base: nn.Module, advice: str = "serve it with --mode switch or merged") -> dict[str, Parts]:
    """``{base module name: (A, s·B, g)}`` of the PEFT LoRA/DoRA folder ``folder`` on ``base``."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(folder))
    unsupported = {"modules_to_save": cfg.modules_to_save, "bias": cfg.bias != "none", "lora_bias": cfg.lora_bias,
                   "use_qalora": getattr(cfg, "use_qalora", False), "fan_in_fan_out": cfg.fan_in_fan_out,
                   "trainable_token_indices": getattr(cfg, "trainable_token_indices", None),
                   "target_parameters": getattr(cfg, "target_parameters", None),
                   "layer_replication": cfg.layer_replication}
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise MmloraError(f"{folder}: {', '.join(used)} cannot be read as plain LoRA parts; {advice}")
    state = load_file(str(folder / "adapter_model.safetensors"))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise MmloraError(f"{folder}: weight {key!r} is not a LoRA A, B or DoRA magnitude of a linear layer; "
                              f"{advice}")
        groups.setdefault(key[len(_PREFIX):-len(suffix)], {})[suffix] = tensor
    modules = dict(base.named_modules())
    parts: dict[str, Parts] = {}
    for name, weights in groups.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise MmloraError(f"{folder}: {name!r} is not a linear layer of the base (adapter saved for another "
                              f"layout?); {advice}")
        a, b = weights[".lora_A.weight"].float(), weights[".lora_B.weight"].float()
        r = a.shape[0]
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        g = None
        if ".lora_magnitude_vector" in weights:
            with torch.no_grad():
                weight = module.weight.float()
                norm = torch.linalg.norm(weight + scaling * (b @ a).to(weight.device), dim=1).cpu()
            g = weights[".lora_magnitude_vector"].float() / norm
        parts[name] = (a, b * scaling, g)
    return parts
