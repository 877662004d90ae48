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


def dense_tokens(model, images: torch.Tensor, mode: str = "vanilla") -> torch.Tensor:
    """All output tokens in the joint space, ``[B, 1+N, E]`` (class token first), not normalised.
    Differentiable (the dense training objective uses it); evaluation wraps it in ``no_grad``."""
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


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering ``size`` (mmsegmentation's slide: the last window ends at the border)."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


@torch.no_grad()
def segment_logits(model, image: torch.Tensor, text_embeddings: torch.Tensor, mode: str = "vanilla",
                   crop: int | None = None, stride: int | None = None,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-class cosine logits ``[C, H, W]`` for one preprocessed image ``[3, H, W]``.

    ``crop=None``: the whole image at once. Otherwise sliding windows of ``crop`` pixels every
    ``stride`` pixels; each window's patch logits are upsampled (bilinear) to the window and
    overlapping windows averaged. ``out_size`` resizes the result (e.g. to the label map's size).
    """
    text = F.normalize(text_embeddings.to(image.dtype), dim=-1)
    h, w = image.shape[-2:]

    def window_logits(win: torch.Tensor) -> torch.Tensor:
        feats = dense_features(model, win[None], mode)[0]  # [gh, gw, E]
        logits = (feats @ text.T).permute(2, 0, 1)[None]  # [1, C, gh, gw]
        return F.interpolate(logits, size=win.shape[-2:], mode="bilinear", align_corners=False)[0]

    if crop is None:
        out = window_logits(image)
    else:
        stride = stride or crop
        total = torch.zeros(text.shape[0], h, w, dtype=text.dtype)
        count = torch.zeros(1, h, w, dtype=text.dtype)
        for y in window_starts(h, crop, stride):
            for x in window_starts(w, crop, stride):
                win = image[:, y:y + crop, x:x + crop]
                total[:, y:y + win.shape[-2], x:x + win.shape[-1]] += window_logits(win)
                count[:, y:y + win.shape[-2], x:x + win.shape[-1]] += 1
        out = total / count
    if out_size is not None and tuple(out.shape[-2:]) != tuple(out_size):
        out = F.interpolate(out[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return out
