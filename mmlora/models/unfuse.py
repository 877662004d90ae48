"""Unfuse open_clip attention into separate q/k/v/out linear layers.

open_clip's blocks use ``nn.MultiheadAttention`` (one fused ``in_proj_weight`` for q, k and v); its
own ``Attention`` class fuses them the same way. PEFT's LoRA for ``nn.MultiheadAttention`` adapts q, k
and v together and has no DoRA, and the dense segmentation methods need q and k separately. So, as
CLIP-LoRA does, mmlora replaces each fused attention by :class:`UnfusedAttention`, whose
``q_proj``/``k_proj``/``v_proj``/``out_proj`` are plain ``nn.Linear`` layers holding slices of the
fused weights. Outputs equal the fused module's to float rounding (tested to 1e-6).

:func:`fuse_state_dict` maps an unfused state dict back to open_clip's own keys, so a model trained
here (merged) can be saved in open_clip's original format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UnfusedAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections; a drop-in for open_clip's use of
    ``nn.MultiheadAttention(q, k, v, need_weights=False, attn_mask=...)`` (batch-first or not)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, return_tuple: bool = True):
        super().__init__()
        # nn.MultiheadAttention returns (output, weights); open_clip's own Attention returns the output.
        self.return_tuple = return_tuple
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_fused(cls, in_weight: torch.Tensor, in_bias: torch.Tensor | None, out_proj: nn.Linear,
                   num_heads: int, batch_first: bool, dropout: float = 0.0, return_tuple: bool = True) -> UnfusedAttention:
        dim = in_weight.shape[1]
        new = cls(dim, num_heads, bias=in_bias is not None, batch_first=batch_first, dropout=dropout,
                  return_tuple=return_tuple)
        new.to(device=in_weight.device, dtype=in_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(in_weight[i * dim : (i + 1) * dim])
                if in_bias is not None:
                    proj.bias.copy_(in_bias[i * dim : (i + 1) * dim])
            new.out_proj.weight.copy_(out_proj.weight)
            if out_proj.bias is not None:
                new.out_proj.bias.copy_(out_proj.bias)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, Dh]
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, None] | torch.Tensor:
        """Inputs ``[B, L, D]`` (``[L, B, D]`` if not batch-first); ``attn_mask`` ``[L, S]`` or
        ``[B*H, L, S]``, additive or boolean (True = masked) as for ``nn.MultiheadAttention``."""
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, length, _ = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(b, self.num_heads, length, -1)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))
        out = out if self.batch_first else out.transpose(0, 1)
        return (out, None) if self.return_tuple else out


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _fused_parts(module: nn.Module) -> tuple | None:
    """(in_weight, in_bias, out_proj, heads, batch_first, dropout, return_tuple) of a fused attention."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        return (module.in_proj_weight, module.in_proj_bias, module.out_proj, module.num_heads, module.batch_first,
                module.dropout, True)
    # open_clip's own Attention class (fused in_proj_weight), in its plain configuration only.
    in_w = getattr(module, "in_proj_weight", None)
    out = getattr(module, "out_proj", None)
    if isinstance(in_w, torch.Tensor) and isinstance(out, nn.Linear) and hasattr(module, "num_heads"):
        plain = not getattr(module, "scaled_cosine", False) and getattr(module, "head_scale", None) is None
        plain = plain and all(type(getattr(module, n, nn.Identity())) is nn.Identity for n in ("ln_inner", "ln_q", "ln_k"))
        if plain:
            return in_w, getattr(module, "in_proj_bias", None), out, module.num_heads, True, 0.0, False
    return None


def unfuse_attention(model: nn.Module) -> list[str]:
    """Replace every fused attention in ``model`` in place; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        parts = _fused_parts(module)
        if parts is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UnfusedAttention.from_fused(*parts))
        replaced.append(name)
    return replaced


def fuse_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map unfused keys (``*.q_proj.weight`` ...) back to ``*.in_proj_weight`` / ``*.in_proj_bias``."""
    out = dict(state)
    prefixes = {k[: -len(".q_proj.weight")] for k in state if k.endswith(".q_proj.weight")}
    for p in prefixes:
        out[f"{p}.in_proj_weight"] = torch.cat([out.pop(f"{p}.{x}_proj.weight") for x in "qkv"])
        if f"{p}.q_proj.bias" in out:
            out[f"{p}.in_proj_bias"] = torch.cat([out.pop(f"{p}.{x}_proj.bias") for x in "qkv"])
    return out
