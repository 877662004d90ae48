"""A lean forward for PEFT's DoRA layers: the same parameters, values and merge, less work per call.

PEFT's DoRA forward (``peft.tuners.lora.dora``) rebuilds the full ``[out, in]`` weight ``W + s·B·A``
on every call (through ``lora_B(lora_A(eye(in)))``) to take its row norms, then combines the outputs
in five passes over ``[tokens, out]``. Here:

* the row norms come from the rank-r factors, without the full matrix:
  ``||W_i + s·(BA)_i||² = ||W_i||² + 2s·B_i·(W Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ`` — ``||W_i||²`` of the
  frozen base weight once, then one ``[r, in] x [in, out]`` product per call;
* the output is ``m / ||W + sBA|| · (xWᵀ + B(s·Ax)) + bias``: one add and one multiply over
  ``[tokens, out]`` (PEFT's ``result + (scale - 1)·base + scale·s·lora`` written out; the scalar ``s``
  applied on the rank-r side, where it costs nothing). With dropout on
  the adapter input, PEFT's DoRA applies the scale to the base output *of the dropped input*, which
  needs a second base product; that case keeps PEFT's formula.

As in PEFT (and the DoRA paper's section 4.3) the norm is treated as a constant in backward.
Installed by the trainer (``train.lean_dora``) on plain DoRA linear layers, bitsandbytes 4-bit and
8-bit ones included; layers it does not cover (``fan_in_fan_out`` Conv1D, sharded weights) keep PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from torch import nn


class LeanDoraLinearVariant(DoraLinearVariant):
    """PEFT's :class:`DoraLinearVariant` with the lean forward (init, merge and unmerge are PEFT's)."""

    def __init__(self) -> None:
        self._w_sq: torch.Tensor | None = None  # [out] squared row norms of the frozen base weight, fp32
        self._w_key: tuple | None = None

    def _base_sq_norms(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.device, weight.shape)
        if self._w_key != key:  # computed once: the base weight is frozen
            self._w_sq = weight.float().square().sum(dim=1)
            self._w_key = key
        return self._w_sq

    @torch.no_grad()
    def weight_norm(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``||W + scaling·B·A||`` per output row ``[out]`` (fp32), without forming the ``[out, in]`` matrix:
        ``||W_i||² + B_i·(2s·(W Aᵀ)_i + s²·(B A Aᵀ)_i)``."""
        raw = base.weight
        weight = dequantize_module_weight(base) if type(raw) is not nn.Parameter else raw
        w_sq = self._base_sq_norms(raw if type(raw) is nn.Parameter else weight)
        a, b = lora_A.float(), lora_B.float()  # [r, in], [out, r]
        wa = (lora_A.to(weight.dtype) @ weight.T).T.float()  # [out, r] = W Aᵀ, in the weight's precision
        m = torch.addmm(wa, b, a @ a.T, beta=2 * scaling, alpha=scaling**2)  # [out, r]
        return (w_sq + torch.einsum("or,or->o", b, m)).clamp_min_(0).sqrt_()

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        base = module.get_base_layer()
        if getattr(module, "fan_in_fan_out", False) or not isinstance(base.weight, torch.Tensor) \
                or base.weight.__class__.__module__.startswith("torch.distributed"):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        magnitude = module.lora_magnitude_vector[active_adapter].weight  # [out]
        norm = self.weight_norm(base, lora_A.weight, lora_B.weight, scaling).to(x.dtype)
        scale = magnitude / norm  # [out]; gradient to the magnitude only
        bias = base.bias
        if isinstance(dropout, nn.Identity) or not module.training:
            plain = result - bias if bias is not None else result  # x Wᵀ
            out = (plain + lora_B(lora_A(x) * scaling)) * scale
            return out + bias if bias is not None else out
        x = dropout(x)
        weight = dequantize_module_weight(base) if type(base.weight) is not nn.Parameter else base.weight
        dropped = F.linear(x, weight.to(x.dtype))  # PEFT's semantics: the scale acts on the dropped input's base output
        return result + (scale - 1) * dropped + scale * scaling * lora_B(lora_A(x))


def use_lean_dora(model: nn.Module) -> int:
    """Give every DoRA linear layer of ``model`` (a PEFT model) the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict):
            continue
        for name, variant in list(variants.items()):
            if type(variant) is DoraLinearVariant:
                variants[name] = LeanDoraLinearVariant()
                count += 1
    return count
