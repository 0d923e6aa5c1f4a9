"""NF4 format (kernels.nf4) checked from first principles, without bitsandbytes (parity: test_nf4_bnb_parity.py).

The code book against the normal quantiles it is built from, nearest-code choice by brute force, packing order,
partial blocks, all-zero blocks, double quantisation, bits per parameter, and every bad-input error.
"""

import math

import pytest
import torch

from kernels import NF4Weight, nf4_quantize, storage_bits_per_param
from kernels.nf4 import NF4_VALUES, dynamic_code, nf4_code
from kernels.nf4_dequant import absmax_float32, nf4_dequantize_reference


def unpack(q: NF4Weight) -> torch.Tensor:
    """Indices [n] from the packed bytes, high nibble first (written independently of the kernels)."""
    b = q.packed.reshape(-1).long()
    return torch.stack([b // 16, b % 16], dim=1).reshape(-1)[: q.numel]


def test_nf4_code_is_the_normal_quantile_construction():
    """QLoRA App. E: 8 positive and 7 negative N(0,1) quantiles at linspace(delta, 0.5, .), scaled to [-1, 1]."""
    delta = 0.9677083
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    expected = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values / pos.max()
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.allclose(code.double(), expected, atol=1e-6)
    assert code[0] == -1 and code[15] == 1 and code[7] == 0 and NF4_VALUES[7] == 0.0


def test_dynamic_code_shape_and_symmetry():
    code = dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert bool((code[1:] > code[:-1]).all()), "sorted, no duplicates"
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    positive = code[code > 0][:-1]                        # all but 1.0
    assert torch.equal(positive.flip(0), -code[code < 0])  # +-10^(i-6) * m pairs
    assert positive.min() == pytest.approx(0.55e-6) and code.min() == pytest.approx(-0.99297, abs=1e-5)


def test_packing_order_high_nibble_first_and_zero_code():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0, -1.0
    q = nf4_quantize(w, double_quant=False)
    assert q.packed.shape == (32, 1) and q.packed.dtype == torch.uint8
    assert q.packed[0, 0].item() == 0xF0                   # element 0 -> index 15 (high), element 1 -> 0 (low)
    assert (q.packed[1:] == 0x77).all()                    # 0.0 is index 7 in both nibbles


def test_nearest_code_by_brute_force_and_blocks_straddle_rows():
    """Shape [7, 50]: 350 values, blocks of 64 cross rows, the 6th block is partial (30 values)."""
    w = torch.randn(7, 50) * torch.rand(7, 1) * 3
    q = nf4_quantize(w, double_quant=False)
    flat = w.reshape(-1).double()
    absmax = torch.stack([flat[i:i + 64].abs().max() for i in range(0, 350, 64)])
    assert torch.equal(q.absmax, absmax.float())
    normed = flat / absmax.repeat_interleave(64)[:350]
    dist = (normed[:, None] - nf4_code().double()[None, :]).abs()   # [350, 16]
    nearest = dist.argmin(dim=1)
    top2 = dist.sort(dim=1).values[:, :2]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-6                           # ignore exact midpoint ties
    assert torch.equal(unpack(q)[clear], nearest[clear])


def test_odd_size_padding_nibble_is_the_zero_code():
    q = nf4_quantize(torch.randn(3, 5))                                 # 15 values: 8 bytes, last low nibble pad
    assert q.packed.numel() == 8 and q.packed[-1, 0].item() & 0xF == 7
    assert nf4_dequantize_reference(q).shape == (3, 5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_dequantise_to_exact_zero(double_quant):
    w = torch.randn(10, 64)
    w[2] = 0.0
    w[7] = 0.0
    q = nf4_quantize(w, double_quant=double_quant)
    out = nf4_dequantize_reference(q, torch.float32)
    assert torch.equal(out[2], torch.zeros(64)) and torch.equal(out[7], torch.zeros(64))
    assert torch.equal(nf4_dequantize_reference(nf4_quantize(torch.zeros(5, 13), double_quant=double_quant)),
                       torch.zeros(5, 13))


def test_double_quantisation_restores_absmax_closely():
    w = torch.randn(300, 64) * torch.linspace(0.1, 3, 300)[:, None]   # 300 blocks: 2 second-level blocks
    plain, nested = nf4_quantize(w, double_quant=False), nf4_quantize(w, double_quant=True)
    assert nested.absmax.dtype == torch.uint8 and nested.absmax2.shape == (2,)
    assert nested.offset.item() == pytest.approx(plain.absmax.mean().item(), rel=1e-6)
    # Each centred absmax lands within half a code step of its value: steps of the dynamic code are <= 0.0141
    # (largest near +-1), in units of the group's absmax2; the 65536-bin lookup adds at most one bin (3e-5).
    err = (absmax_float32(nested) - plain.absmax).abs()
    bound = (0.0141 / 2 + 2 / 65535) * nested.absmax2.repeat_interleave(256)[:300] + 1e-6
    assert bool((err <= bound).all())
    assert torch.equal(unpack(nested), unpack(plain))                  # DQ touches only the absmax


def test_round_trip_error_matches_the_paper_figure():
    """Our own numpy estimate: Gaussian weights, blocks of 64: relative MSE ~0.0085 for NF4."""
    w = torch.randn(512, 512) * 0.02
    rel_mse = ((nf4_dequantize_reference(nf4_quantize(w), torch.float32) - w).pow(2).mean() / w.pow(2).mean()).item()
    assert 0.0075 < rel_mse < 0.0095


def test_storage_bits_per_parameter():
    """§3: 4 + 8/64 + 32/(64*256) = 4.127 bits with double quantisation, 4.5 without; measured on 4096 x 4096."""
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    with_dq = storage_bits_per_param(nf4_quantize(w, double_quant=True))
    assert with_dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel(), abs=1e-9)
    assert round(with_dq, 3) == 4.127
    assert storage_bits_per_param(nf4_quantize(w[:1024], double_quant=False)) == 4.5
    with_tables = storage_bits_per_param(nf4_quantize(w[:1024]), include_code_tables=True)
    assert with_tables == pytest.approx(4.127 + (16 + 256) * 32 / (1024 * 4096), abs=1e-3)


def test_to_device_round_trip_keeps_every_field():
    q = nf4_quantize(torch.randn(20, 30))
    r = q.to("cpu")
    assert r is not q and r.shape == q.shape and r.dtype == q.dtype and torch.equal(r.packed, q.packed)
    assert torch.equal(nf4_dequantize_reference(r), nf4_dequantize_reference(q))


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, where", [(float("nan"), "[2, 5]"), (float("inf"), "[0, 0]"), (-float("inf"), "[3, 1]")])
def test_non_finite_weight_is_refused_with_its_position(bad, where):
    w = torch.randn(4, 6)
    i, j = (int(v) for v in where.strip("[]").split(", "))
    w[i, j] = bad
    with pytest.raises(ValueError, match=rf"weight\[{i}, {j}\] is {bad}.*torch.nan_to_num"):
        nf4_quantize(w)


@pytest.mark.parametrize("call, error, match", [
    (lambda: nf4_quantize(torch.empty(0, 4)), ValueError, "empty"),
    (lambda: nf4_quantize(torch.arange(64)), TypeError, "cast it"),
    (lambda: nf4_quantize(torch.randn(64).double()), TypeError, "cast it"),
    (lambda: nf4_quantize([1.0, 2.0]), TypeError, "torch.Tensor"),
    (lambda: nf4_quantize(torch.randn(64), blocksize=48), ValueError, "use one of"),
])
def test_bad_quantise_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _fields(**overrides):
    q = nf4_quantize(torch.randn(8, 40))
    fields = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, code=q.code,
                  absmax2=q.absmax2, code2=q.code2, offset=q.offset)
    fields.update(overrides)
    return fields


@pytest.mark.parametrize("overrides, error, match", [
    (dict(packed=torch.zeros(160, 1, dtype=torch.int8)), TypeError, r"view\(torch.uint8\)"),
    (dict(packed=torch.zeros(161, 1, dtype=torch.uint8)), ValueError, "needs 160"),
    (dict(packed=torch.zeros(1, 320, dtype=torch.uint8)[:, ::2]), ValueError, "contiguous"),
    (dict(absmax=torch.zeros(4, dtype=torch.uint8)), ValueError, "need 5"),
    (dict(absmax=torch.zeros(5)), TypeError, "uint8 codes"),
    (dict(absmax2=None), ValueError, "all three or none"),
    (dict(absmax2=torch.zeros(2)), ValueError, "1 entries"),
    (dict(code2=torch.zeros(255)), ValueError, "dynamic code book"),
    (dict(code=torch.zeros(16, dtype=torch.float16)), ValueError, "NF4 table"),
    (dict(blocksize=100), ValueError, "use one of"),
    (dict(dtype=torch.int32), TypeError, "NF4Weight.dtype"),
    (dict(absmax2=None, code2=None, offset=None, absmax=torch.zeros(5, dtype=torch.uint8)), TypeError, "float32"),
    (dict(offset=torch.zeros((), device="meta")), ValueError, "NF4Weight.to"),
])
def test_inconsistent_state_is_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        NF4Weight(**_fields(**overrides))


def test_math_of_bits_constant():
    assert math.isclose(4 + 8 / 64 + 32 / (64 * 256), 4.126953125)
