"""Dense (per-patch) CLIP features for open-vocabulary segmentation, training-free methods included.

Each mode changes only the last block of the image tower (open_clip ViT with unfused attention,
``mmlora.models.unfuse``), as its paper describes; ``x`` is the block's input, ``y = ln_1(x)``:

* ``vanilla``   — the block as trained: ``x + attn(y)``, then ``+ mlp(ln_2(.))``.
* ``maskclip``  — the value-embedding path, no query-key attention, no residual, no feed-forward:
  ``out_proj(v_proj(y))`` (MaskCLIP, Zhou et al. 2022).
* ``sclip``     — correlative self-attention: weights ``softmax(q qᵀ) + softmax(k kᵀ)`` in place of
  ``softmax(q kᵀ)``; residual and feed-forward kept (SCLIP, Wang et al. 2024).
* ``clearclip`` — ``softmax(q qᵀ)`` attention, without the residual and the feed-forward
  (ClearCLIP, Lan et al. 2024).
* ``naclip``    — ``softmax(k kᵀ + Gaussian neighbourhood prior)`` attention, without the residual and
  the feed-forward (NACLIP, Hajimiri et al. 2025; prior std 5 patches).

The tokens then go through ``ln_post`` and the projection into the joint image-text space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("vanilla", "maskclip", "sclip", "clearclip", "naclip")


def _input_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch + class tokens with (interpolated) position embeddings, after ``ln_pre``: ``[B, 1+N, D]``."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding.to(x.dtype)
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    if (gh, gw) != (g, g):  # another resolution than trained: resize the patch-grid positions
        grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, d)])
    return visual.ln_pre(x + pos), (gh, gw)


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, length, d = t.shape
    return t.view(b, length, n, d // n).transpose(1, 2)  # [B, H, L, Dh]


def _gaussian_prior(gh: int, gw: int, std: float, device) -> torch.Tensor:
    """``[1+N, 1+N]`` log-prior: -d²/(2σ²) between patch positions; 0 for the class token."""
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pts = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    dist2 = torch.cdist(pts, pts) ** 2
    prior = torch.zeros(gh * gw + 1, gh * gw + 1, device=device)
    prior[1:, 1:] = -dist2 / (2 * std**2)
    return prior


def _last_block(block, x: torch.Tensor, mode: str, grid: tuple[int, int]) -> torch.Tensor:
    if mode == "vanilla":
        return block(x)
    attn = block.attn
    if not hasattr(attn, "q_proj"):
        raise ValueError("dense modes need unfused attention: call mmlora.models.unfuse.unfuse_attention(model) first")
    y = block.ln_1(x)
    if mode == "maskclip":
        return attn.out_proj(attn.v_proj(y))
    n = attn.num_heads
    q, k, v = _heads(attn.q_proj(y), n), _heads(attn.k_proj(y), n), _heads(attn.v_proj(y), n)
    scale = attn.head_dim ** -0.5
    if mode == "sclip":
        w = torch.softmax(q @ q.transpose(-1, -2) * scale, -1) + torch.softmax(k @ k.transpose(-1, -2) * scale, -1)
    elif mode == "clearclip":
        w = torch.softmax(q @ q.transpose(-1, -2) * scale, -1)
    elif mode == "naclip":
        prior = _gaussian_prior(*grid, std=5.0, device=x.device).to(q.dtype)
        w = torch.softmax(k @ k.transpose(-1, -2) * scale + prior, -1)
    else:
        raise ValueError(f"unknown dense mode {mode!r}; known: {', '.join(MODES)}")
    b, _, length, _ = q.shape
    out = attn.out_proj((w @ v).transpose(1, 2).reshape(b, length, attn.embed_dim))
    if mode == "sclip":
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    return out


@torch.no_grad()
def dense_tokens(model, images: torch.Tensor, mode: str = "vanilla") -> torch.Tensor:
    """All output tokens in the joint space, ``[B, 1+N, E]`` (class token first), not normalised."""
    if mode not in MODES:
        raise ValueError(f"unknown dense mode {mode!r}; known: {', '.join(MODES)}")
    visual = model.visual
    x, grid = _input_tokens(visual, images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = _last_block(blocks[-1], x, mode, grid)
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def dense_features(model, images: torch.Tensor, mode: str = "vanilla") -> torch.Tensor:
    """L2-normalised patch features on the patch grid: ``[B, gh, gw, E]``."""
    tokens = dense_tokens(model, images, mode)
    b = tokens.shape[0]
    gh = images.shape[-2] // model.visual.conv1.stride[0]
    gw = images.shape[-1] // model.visual.conv1.stride[1]
    return F.normalize(tokens[:, 1:].reshape(b, gh, gw, -1), dim=-1)
