"""Affine group-wise INT4: the quantizer against the formula written out, packing, the layer."""

import numpy as np
import pytest
import torch
from torch import nn

from mmlora.errors import MmloraError
from mmlora.adapters.int4 import Int4Linear, pack_int4, quantize_int4, quantize_linears, unpack_int4


def test_quantizer_matches_the_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    w[1, 4:] = 0.0  # an all-zero group
    codes, scales, zeros = quantize_int4(w, group_size=4)
    f32 = np.float32  # the same arithmetic precision as the layer, so ties round the same way
    for o in range(3):
        for g in range(2):
            group = w[o, 4 * g:4 * g + 4].numpy()
            lo, hi = min(group.min(), f32(0)), max(group.max(), f32(0))
            if lo == hi:
                lo, hi = f32(-1), f32(1)
            s = f32(hi - lo) / f32(15)
            z = np.clip(np.rint(-lo / s), 0, 15)
            q = [int(np.clip(np.rint(v / s) + z, 0, 15)) for v in group]
            assert scales[o, g].item() == pytest.approx(float(s), rel=1e-6)
            assert zeros[o, g].item() == z
            assert codes[o, 4 * g:4 * g + 4].tolist() == q
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    deq = (scales.repeat_interleave(4, 1) * (codes.float() - zeros.repeat_interleave(4, 1)))
    assert ((deq - w).abs() <= scales.repeat_interleave(4, 1) / 2 + 1e-6).all()  # round to nearest
    assert (deq[1, 4:] == 0).all()


def test_packing_round_trips_and_halves_the_bytes():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_linear_computes_with_the_dequantized_weight():
    torch.manual_seed(1)
    linear = nn.Linear(16, 6)
    layer = Int4Linear.from_linear(linear, group_size=8)
    codes, scales, zeros = quantize_int4(linear.weight, 8)
    w = scales.repeat_interleave(8, 1) * (codes.float() - zeros.repeat_interleave(8, 1))
    x = torch.randn(2, 3, 16)
    assert torch.allclose(layer(x), x @ w.T + linear.bias, atol=1e-6)
    assert (layer(x) - linear(x)).abs().max() < 0.1  # close to the float layer: 4 bits per weight
    with pytest.raises(MmloraError, match="multiple of group_size"):
        Int4Linear.from_linear(nn.Linear(12, 4), group_size=8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    quantize_linears(model, ["0"], 4)
    assert isinstance(model[0], Int4Linear)
    with pytest.raises(MmloraError, match="plain nn.Linear"):
        quantize_linears(model, ["1"], 4)
