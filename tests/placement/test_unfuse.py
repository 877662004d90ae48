import copy

import pytest
import torch

from mmlora.models.unfuse import UnfusedAttention, fuse_state_dict, unfuse_attention


def test_unfused_clip_gives_the_fused_outputs(tiny_clip_dir):
    from mmlora.models.loading import load_clip

    model, _, tokenizer = load_clip(tiny_clip_dir)
    unfused = copy.deepcopy(model)
    names = unfuse_attention(unfused)
    assert len(names) == 4 and all(isinstance(unfused.get_submodule(n), UnfusedAttention) for n in names)
    images = torch.randn(3, 3, 64, 64)
    text = tokenizer(["a large red circle in the top left.", "a small blue star.", "x"])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), unfused.encode_image(images), atol=1e-6)
        assert torch.allclose(model.encode_text(text), unfused.encode_text(text), atol=1e-6)
    # q, k, v, out are separate linear layers that plain PEFT can target one by one.
    attn = unfused.get_submodule(names[0])
    assert all(isinstance(getattr(attn, p), torch.nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    # Fusing the state dict back gives open_clip's own keys and values.
    fused = fuse_state_dict(unfused.state_dict())
    original = model.state_dict()
    assert fused.keys() == original.keys()
    assert all(torch.equal(fused[k], original[k]) for k in original)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unfused_matches_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    attn = UnfusedAttention.from_fused(mha.in_proj_weight, mha.in_proj_bias, mha.out_proj, 4, batch_first)
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    per_head = torch.randn(2 * 4, 5, 5)
    bool_mask = torch.rand(5, 5) > 0.7
    bool_mask.fill_diagonal_(False)
    for mask in (None, causal, per_head, bool_mask):
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        out = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert torch.allclose(ref, out, atol=1e-5)


def test_open_clip_own_fused_attention_class_is_unfused_too():
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    holder = torch.nn.Sequential(Attention(16, 4))
    x = torch.randn(2, 5, 16)
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    with torch.no_grad():
        ref = holder[0](x, attn_mask=mask)
        assert unfuse_attention(holder) == ["0"]
        out = holder[0](x, attn_mask=mask)
    assert isinstance(holder[0], UnfusedAttention) and torch.allclose(ref, out, atol=1e-6)
