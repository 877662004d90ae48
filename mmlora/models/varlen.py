"""Varlen attention for packed rows, registered with transformers' attention interface.

transformers builds a block-diagonal causal mask for a packed row (``position_ids`` restarting per
sample, no ``attention_mask``) and hands it to SDPA, which then still computes the whole
``(Σ Lᵢ)²`` score matrix and masks most of it away. FlashAttention-2's varlen kernel takes the
segments instead — but it needs CUDA and the ``flash-attn`` package. This is the same idea in plain
torch for every other device: one causal SDPA call per segment, so attention costs ``Σ Lᵢ²``. The
segments are read from ``position_ids`` exactly as transformers reads them for FlashAttention
(a segment starts wherever the position does not follow the previous one).

Registered as ``mmlora_varlen`` for attention and for masks; where a real mask arrives (a padded,
unpacked batch, e.g. validation) or the queries are not the keys (generation with a cache), it
falls back to transformers' own SDPA path, so the model stays usable for everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "mmlora_varlen"


def _segments(position_ids: torch.Tensor, batch: int) -> list[list[int]]:
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    if rows.shape[0] != batch:  # one row of positions broadcast over the batch
        rows = rows[:1].expand(batch, -1)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    out = []
    for row in starts:
        idx = row.nonzero().squeeze(1).tolist() + [rows.shape[1]]
        out.append([b - a for a, b in zip(idx, idx[1:])])
    return out


_last: tuple[torch.Tensor, int, list[list[int]], int] | None = None  # every layer of a forward gets the same positions


def _segments_of(position_ids: torch.Tensor, batch: int) -> list[list[int]]:
    """:func:`_segments`, read once per forward: the layers after the first (and checkpointing's
    recomputation) get the same ``position_ids`` tensor and skip the device-to-host copy."""
    global _last
    if torch.is_inference(position_ids):  # no version counter to check a cached reading against
        return _segments(position_ids, batch)
    if _last is None or _last[0] is not position_ids or _last[1] != batch or position_ids._version != _last[3]:
        _last = (position_ids, batch, _segments(position_ids, batch), position_ids._version)
    return _last[2]


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [B, H, L, D]``, ``key``/``value [B, H_kv, L, D]`` → ``[B, L, H, D]``, causal per segment."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or position_ids.dim() > 2 or kwargs.get("softcap") is not None or kwargs.get("sliding_window")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    pieces = []
    # split, not slices: the backward of a split is one concatenation of the pieces' gradients, where
    # each slice's backward would write into a zero tensor of the whole row
    for lengths, q, k, v in zip(_segments_of(position_ids, query.shape[0]), query.split(1), key.split(1), value.split(1)):
        for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2)):
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, scale=scaling, is_causal=True,
                                                         enable_gqa=gqa).transpose(1, 2))
    out = torch.cat(pieces, dim=1)  # [1, B·L, H, D]: the rows' pieces one after another
    return out.view(query.shape[0], query.shape[2], *out.shape[2:]), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a packed row (the segments are in ``position_ids``); SDPA's mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register ``mmlora_varlen`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def enable(model, device_type: str = "cpu") -> str:
    """Give the language model of ``model`` (a transformers model) the attention packed rows need:
    FlashAttention-2's varlen kernel on CUDA where ``flash-attn`` is installed, ``mmlora_varlen``
    otherwise (the vision tower keeps its own). Returns the implementation's name."""
    import importlib.util

    name = "flash_attention_2" if device_type == "cuda" and importlib.util.find_spec("flash_attn") else register()
    model.set_attn_implementation({"text_config": name} if hasattr(model.config, "text_config") else name)
    return name


#: Families whose packed rows are exact — positions restart per sample and every attention is causal —
#: each checked against its padded batch (tests/data/test_packing.py).
PACKS = ("llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", *("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
#: Families with multi-dimensional rotary positions, computed per sample by :func:`sample_positions`.
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Families that cannot pack exactly, and why.
REFUSED = {
    "mllama": "its image features enter by cross-attention, under a per-sample mask the model builds itself",
    "paligemma": "its image and prompt attend to each other bidirectionally, inside the model's own mask builder",
    "gemma3": "its image tokens attend to each other bidirectionally, inside the model's own mask builder",
    "gemma4": "its image tokens attend to each other bidirectionally, inside the model's own mask builder",
}


def sample_positions(model):
    """For an mRoPE family, a function: one encoded sample → the model's own 3-D rotary positions of
    that sample alone ``[3, L]`` (``get_rope_index``, which reads only the ids, the token types and the
    image grids); None for families whose positions are one count per token."""
    if getattr(model.config, "model_type", None) not in MROPE:
        return None
    inner = model.model

    @torch.no_grad()
    def positions(item: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(item["input_ids"])
        grids = {k: item[k] for k in ("image_grid_thw", "video_grid_thw") if k in item}
        if not grids:  # a text-only sample: every axis counts tokens
            return torch.arange(n).expand(3, -1)
        types = item.get("mm_token_type_ids", torch.zeros(n, dtype=torch.long))
        pos, _ = inner.get_rope_index(item["input_ids"][None], mm_token_type_ids=types[None], **grids)
        return pos[:, 0]

    return positions


def packing_refusal(model_type: str) -> str | None:
    """Why ``train.packing`` cannot be used with this family, or None when it packs exactly."""
    if model_type in PACKS:
        return None
    return REFUSED.get(model_type, "its packed rows have not been checked against padded batches")
