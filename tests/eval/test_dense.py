"""Each dense mode against a hand-written reference of its formula (from the fused open_clip
weights), and invariant to what it removes."""

import copy

import pytest
import torch

from mmlora.models.dense import MODES, dense_features, dense_tokens
from mmlora.models.unfuse import unfuse_attention


@pytest.fixture(scope="module")
def clips(tiny_clip_dir):
    from mmlora.models.loading import load_clip

    fused, _, _ = load_clip(tiny_clip_dir)
    unfused = copy.deepcopy(fused)
    unfuse_attention(unfused)
    return fused, unfused


def _reference(fused, images, mode):
    """Written from the papers' formulas with the fused in_proj weights (independent of dense.py)."""
    v = fused.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    blk = v.transformer.resblocks[-1]
    y = blk.ln_1(x)
    W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    q, k, val = torch.nn.functional.linear(y, W, bias).chunk(3, dim=-1)
    h = blk.attn.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    q, k, val = split(q), split(k), split(val)
    s = q.shape[-1] ** -0.5
    out_proj = blk.attn.out_proj
    merge = lambda t: out_proj(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1))  # noqa: E731
    if mode == "vanilla":
        x = blk(x)
    elif mode == "maskclip":
        x = merge(val)
    elif mode == "sclip":
        a = (q @ q.transpose(-1, -2) * s).softmax(-1) + (k @ k.transpose(-1, -2) * s).softmax(-1)
        x = x + merge(a @ val)
        x = x + blk.mlp(blk.ln_2(x))
    elif mode == "clearclip":
        x = merge((q @ q.transpose(-1, -2) * s).softmax(-1) @ val)
    elif mode == "naclip":
        g = int((x.shape[1] - 1) ** 0.5)
        pos = torch.tensor([(r, c) for r in range(g) for c in range(g)], dtype=torch.float)
        prior = torch.zeros(g * g + 1, g * g + 1)
        prior[1:, 1:] = -((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * 5.0**2)
        x = merge((k @ k.transpose(-1, -2) * s + prior).softmax(-1) @ val)
    return v.ln_post(x) @ v.proj


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_its_formula(clips, mode):
    fused, unfused = clips
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dense_tokens(unfused, images, mode), _reference(fused, images, mode), atol=1e-5)
    feats = dense_features(unfused, images, mode)
    assert feats.shape == (2, 8, 8, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(2, 8, 8), atol=1e-5)


def test_vanilla_class_token_is_the_image_embedding(clips):
    fused, unfused = clips
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dense_tokens(unfused, images)[:, 0], fused.encode_image(images), atol=1e-5)


@pytest.mark.parametrize("mode, changes", [("vanilla", True), ("sclip", True), ("clearclip", False),
                                           ("naclip", False), ("maskclip", False)])
def test_modes_ignore_the_feed_forward_they_remove(clips, mode, changes):
    _, unfused = clips
    images = torch.randn(1, 3, 64, 64)
    before = dense_tokens(unfused, images, mode)
    other = copy.deepcopy(unfused)
    with torch.no_grad():
        for p in other.visual.transformer.resblocks[-1].mlp.parameters():
            p.add_(torch.randn_like(p))
    after = dense_tokens(other, images, mode)
    assert (not torch.allclose(before, after, atol=1e-6)) == changes


def test_needs_unfused_attention_and_known_mode(clips):
    fused, unfused = clips
    with pytest.raises(ValueError, match="unfused attention"):
        dense_tokens(fused, torch.randn(1, 3, 64, 64), "clearclip")
    with pytest.raises(ValueError, match="unknown dense mode"):
        dense_tokens(unfused, torch.randn(1, 3, 64, 64), "nope")


def test_sliding_window_equals_whole_image_when_one_crop_covers_it(clips):
    from mmlora.models.dense import segment_logits, window_starts

    _, unfused = clips
    image = torch.randn(3, 64, 64)
    text = torch.randn(4, 32)
    whole = segment_logits(unfused, image, text, "clearclip")
    one_crop = segment_logits(unfused, image, text, "clearclip", crop=64, stride=32)
    assert whole.shape == (4, 64, 64) and torch.allclose(whole, one_crop, atol=1e-6)
    slid = segment_logits(unfused, torch.randn(3, 96, 80), text, "naclip", crop=64, stride=32, out_size=(48, 40))
    assert slid.shape == (4, 48, 40)
    assert window_starts(96, 64, 32) == [0, 32] and window_starts(80, 64, 32) == [0, 16] and window_starts(50, 64, 32) == [0]
