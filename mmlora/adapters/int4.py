"""Affine group-wise INT4 weights: the quantizer, a linear layer that computes with them, and a
checkpoint format for models that hold such layers.

For a weight ``W [out, in]`` and a group size ``g`` (``in % g == 0``, ``G = in / g`` groups per row),
each row's ``g`` consecutive input columns share a scale ``s [out, G]`` and a zero point
``z [out, G]``; the 4-bit codes are ``q = clamp(round(W / s) + z, 0, 15)`` and the layer computes with
``W_deq = s * (q - z)``. The range of each group is widened to include 0 (as GPTQ's quantizer does), so
the initial zero point is an integer in ``[0, 15]``. Zero points are *stored as floats*: QA-LoRA's merge
(``mmlora.adapters.qalora``) moves them off the integer grid while the codes stay 4-bit.

Storage: codes packed two per byte (``qweight`` uint8 ``[out, in / 2]``, low nibble = even column),
``scales`` and ``zeros`` fp32 ``[out, G]``, the bias as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmlora.errors import MmloraError

#: The file beside ``config.json`` that marks a folder as an mmlora INT4 model and lists its layers.
INT4_MANIFEST = "mmlora_int4.json"
#: Its tensors, under the model's own (in-memory) parameter and buffer names.
INT4_WEIGHTS = "model_int4.safetensors"


def check_group_size(in_features: int, group_size: int, where: str) -> None:
    if group_size < 2 or group_size % 2:
        raise MmloraError(f"{where}: group_size {group_size} must be an even number >= 2 (codes are packed in pairs)")
    if in_features % group_size:
        raise MmloraError(f"{where}: in_features {in_features} is not a multiple of group_size {group_size}")


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest affine INT4 of ``weight [out, in]``.

    Returns ``(codes uint8 [out, in] in 0..15, scales fp32 [out, G], zeros fp32 [out, G])``.
    """
    out_f, in_f = weight.shape
    check_group_size(in_f, group_size, "quantize_int4")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    flat = hi == lo  # an all-zero group: any scale represents it; pick one that keeps the maths finite
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scales = (hi - lo) / 15.0
    zeros = torch.round(-lo / scales).clamp(0, 15)
    codes = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return codes.reshape(out_f, in_f).to(torch.uint8), scales, zeros


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [out, in]`` codes in 0..15 → ``uint8 [out, in / 2]`` (two codes per byte)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [out, in / 2]`` → ``uint8 [out, in]``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """``y = x @ W_deq.T + b`` with ``W_deq = s * (q - z)`` per group of input columns.

    ``x [..., in]`` → ``[..., out]``. Buffers: ``qweight`` uint8 ``[out, in/2]``, ``scales`` and
    ``zeros`` fp32 ``[out, G]``; ``bias`` (if any) is a frozen parameter ``[out]``. The weight is
    dequantized on each forward: these are small models, and it keeps the layer exact and simple.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True):
        super().__init__()
        check_group_size(in_features, group_size, "Int4Linear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        layer.load_quantized(linear.weight, linear.bias)
        return layer.to(linear.weight.device)

    def load_quantized(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        codes, scales, zeros = quantize_int4(weight, self.group_size)
        with torch.no_grad():
            self.qweight.copy_(pack_int4(codes))
            self.scales.copy_(scales)
            self.zeros.copy_(zeros)
            if bias is not None:
                self.bias.copy_(bias.detach().float())

    @property
    def codes(self) -> torch.Tensor:
        """The 4-bit codes, unpacked: uint8 ``[out, in]``."""
        return unpack_int4(self.qweight)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[out, in]``."""
        g = self.group_size
        q = self.codes.float().reshape(self.out_features, -1, g)
        return (self.scales[..., None] * (q - self.zeros[..., None])).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, int4"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_linears(model: nn.Module, names: list[str], group_size: int) -> list[str]:
    """Replace the ``nn.Linear`` layers ``names`` of ``model`` by :class:`Int4Linear` (round to nearest)."""
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise MmloraError(f"{name} is {type(module).__name__}; INT4 quantization takes plain nn.Linear layers")
        replace_module(model, name, Int4Linear.from_linear(module, group_size))
    return names


def int4_layers(model: nn.Module) -> dict[str, int]:
    """``{module name: group size}`` of every :class:`Int4Linear` in ``model``."""
    return {n: m.group_size for n, m in model.named_modules() if isinstance(m, Int4Linear)}


def save_int4_model(model: nn.Module, out: str | Path, note: dict | None = None) -> Path:
    """Save a transformers model holding :class:`Int4Linear` layers: ``config.json``,
    :data:`INT4_WEIGHTS` (codes, scales, zeros and every other tensor) and :data:`INT4_MANIFEST`.

    Not ``save_pretrained``'s weights: it renames keys to the architecture's checkpoint layout, which
    knows nothing of these buffers; the names here are the model's own, so loading is one
    ``load_state_dict``."""
    from safetensors.torch import save_file

    layers = int4_layers(model)
    if not layers:
        raise MmloraError("save_int4_model: the model has no Int4Linear layer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are stored once and re-tied at load
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().cpu().contiguous()
    save_file(state, str(out / INT4_WEIGHTS))
    manifest = {"format": "mmlora-int4", "layers": layers,
                "storage": "qweight uint8 [out, in/2] (two 4-bit codes per byte), scales and zeros fp32 [out, in/group_size]",
                "dequantize": "W = scales * (codes - zeros), per group of group_size input columns"} | (note or {})
    (out / INT4_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_int4_model(folder: str | Path) -> nn.Module:
    """Inverse of :func:`save_int4_model`: the model with its :class:`Int4Linear` layers, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = Path(folder)
    manifest = json.loads((folder / INT4_MANIFEST).read_text())
    config = AutoConfig.from_pretrained(folder)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) are computed
    # at construction and are not in the checkpoint.
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    for name, group_size in manifest["layers"].items():
        old = model.get_submodule(name)
        replace_module(model, name, Int4Linear(old.in_features, old.out_features, group_size, old.bias is not None))
    state = load_file(str(folder / INT4_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise MmloraError(f"{folder}: INT4 checkpoint does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()
