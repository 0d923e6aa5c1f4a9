"""The 4-bit formats of scripts/ablate_quant.py: level tables from their definitions, round trips, and the
quantisation errors on N(0, 1) against numbers computed independently (numpy, /work/shared/research/peft.md §2.10:
relative MSE 0.0085 NF4, 0.0116 Int4 (±7 levels), 0.0149 bitsandbytes FP4, blocks of 64 with absmax scaling)."""

import pytest
import torch

from scripts.ablate_quant import (BLOCK_LINEARS, FORMATS, LEVELS, int4_absmax, minifloat_levels, nearest_level,
                                  quantized_copy, relative_error)


def _signed(magnitudes, top):
    return sorted({s * m / top for m in magnitudes for s in (1, -1)})


def test_level_tables_from_the_bit_definitions():
    # E2M1 (OCP MX FP4), written out by hand: 0, subnormal 0.5, then 1, 1.5, 2, 3, 4, 6
    assert list(minifloat_levels(2, 1)) == _signed([0, 0.5, 1, 1.5, 2, 3, 4, 6], 6)
    # E3M0: zero and the powers of two 2^-2 … 2^4 (bias 3)
    assert list(minifloat_levels(3, 0)) == _signed([0, 0.25, 0.5, 1, 2, 4, 8, 16], 16)
    assert list(LEVELS["int4"]) == [k / 7 for k in range(-7, 8)]
    for levels in LEVELS.values():
        assert len(levels) in (15, 16) and levels[0] == -1 and levels[-1] == 1 and 0.0 in levels


def test_bitsandbytes_fp4_table_matches_the_library():
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = sorted(set(functional.get_4bit_type("fp4", device="cpu").tolist()))
    assert theirs == pytest.approx(list(LEVELS["fp4_bnb"]), abs=1e-7)


def test_representable_blocks_round_trip_exactly_and_others_go_to_the_nearest_level():
    # a block whose values are levels × its absmax comes back unchanged, for every format
    for name, (quantize, _, _) in FORMATS.items():
        levels = torch.tensor(LEVELS[name.removesuffix("_dq")])
        block = (levels[torch.arange(64) % len(levels)] * 3.0)  # absmax 3 (the ±1 levels are present)
        restored = quantize(block.view(2, 32))
        tol = 1e-2 if name == "nf4_dq" else 1e-6  # double quantisation rounds the absmax constant itself
        torch.testing.assert_close(restored.view(-1), block, rtol=tol, atol=tol * 3)
    # int4 by its equation: round(7 · w / c) / 7 · c
    w = torch.tensor([[1.0, 0.5, -0.2, 0.07] + [0.0] * 60])
    assert int4_absmax(w)[0, :4].tolist() == pytest.approx([1.0, 4 / 7, -1 / 7, 0.0])
    # nearest level: the E2M1 levels around 0.3 are 1.5/6 = 0.25 and 2/6 = 0.333 (midpoint 0.2917)
    q = nearest_level(LEVELS["fp4_e2m1"])(torch.tensor([[1.0, 0.3, -0.28] + [0.0] * 61]))
    assert q[0, :3].tolist() == pytest.approx([1.0, 2 / 6, -1.5 / 6])


@pytest.mark.parametrize("name, expected", [("nf4", 0.0085), ("int4", 0.0116), ("fp4_bnb", 0.0149)])
def test_gaussian_errors_match_an_independent_computation(name, expected):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    assert relative_error([w], FORMATS[name][0]) == pytest.approx(expected, rel=0.03)


def test_nf4_is_the_best_format_on_normal_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    errors = {name: relative_error([w], q) for name, (q, _, _) in FORMATS.items()}
    assert min(errors, key=errors.get) in ("nf4", "nf4_dq")
    assert errors["nf4_dq"] == pytest.approx(errors["nf4"], rel=0.01)  # DQ costs almost nothing


def test_quantized_copy_touches_block_linears_only():
    import llama

    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs.from_name("tiny-llama-2-gqa", vocab_size=64))
    copy = quantized_copy(model, int4_absmax)
    for (name, p), (_, q) in zip(model.named_parameters(), copy.named_parameters()):
        if name.split(".")[-2] in BLOCK_LINEARS:
            assert not torch.equal(p, q) and torch.equal(q, int4_absmax(p))
        else:
            assert torch.equal(p, q), name
