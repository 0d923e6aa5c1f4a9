"""Weight-only int8 quantisation (`llama.quantize`), checked against independent references.

References: the absmax rule written out per row in float64; float64 matrix products with the dequantised weight
diag(s)·Q; and a float `Transformer` whose weights were overwritten by diag(s)·Q (so "quantised model" and
"float model with rounded weights" must be the same function). The fused kernel is compared with the float64
product within a tolerance derived from its two bfloat16 roundings.
"""

import copy

import pytest
import torch
from torch import nn

from llama import ModelArgs, Transformer
from llama.generate import generate
from tests.reference.tolerance import relative_error, tolerance
from llama.quantize import (Int8Embedding, Int8Linear, has_int8pack_kernel, int8_weight_bytes, quantize_int8,
                            quantize_weight)

TINY = ["tiny-llama-1", "tiny-llama-2-gqa", "tiny-llama-3", "tiny-llama-3.2"]
PROMPTS = [[5, 17, 3], [9, 250, 7, 1, 30, 2, 44, 8], [77]]
needs_kernel = pytest.mark.skipif(not has_int8pack_kernel(), reason="torch.ops.aten._weight_int8pack_mm missing")
BF16_EPS = 2.0 ** -8  # spacing of bfloat16 just above 1: relative rounding error ≤ BF16_EPS / 2


def tiny_model(name: str, dtype=torch.float32, seed: int = 0, std: float = 0.2) -> Transformer:
    """A tiny preset with larger-than-default random weights, so that the logits are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name))
    model.reset_parameters(std=std)
    return model.to(dtype).eval()


def with_rounded_weights(model: Transformer) -> Transformer:
    """The float reference: a copy whose every linear weight is replaced by its int8 approximation diag(s)·Q."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                q, s = quantize_weight(m.weight)
                m.weight.copy_(q.double() * s.double()[:, None])  # a tied embedding changes with it
    return ref


# -- the quantiser ----------------------------------------------------------------------------------------------


def test_quantize_weight_follows_the_absmax_rule_row_by_row():
    torch.manual_seed(0)
    w = torch.randn(37, 50, dtype=torch.float64) * torch.logspace(-3, 2, 37, dtype=torch.float64)[:, None]
    w[5] = 0.0  # an all-zero row
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == w.shape and s.shape == (37,)
    for n in range(37):
        absmax = max(abs(float(v)) for v in w[n])
        expected_scale = float(torch.tensor(absmax / 127.0).to(torch.bfloat16))
        assert float(s[n]) == expected_scale
        if absmax == 0.0:
            assert q[n].abs().max() == 0
            continue
        assert int(q[n].abs().max()) in (126, 127)  # the largest weight uses (nearly) the whole int8 range
        err = (w[n] - q[n].double() * expected_scale).abs().max()
        # round-off (half a step, plus the float64 product's rounding), and clipping at ±127
        assert err <= expected_scale / 2 * (1 + tolerance(torch.float64, 2)) + absmax * 2.0 ** -8
    assert q.abs().max() <= 127  # symmetric: -128 is never used


def test_quantize_weight_error_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 96)
    q, s = quantize_weight(w)
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert (err <= s.double()[:, None] * 0.5 + w.abs().amax(1, keepdim=True).double() * 2.0 ** -8).all()


# -- Int8Linear ---------------------------------------------------------------------------------------------------


def test_dequant_path_equals_the_float64_product_with_the_dequantised_weight():
    torch.manual_seed(2)
    linear = nn.Linear(48, 40, bias=True).double()
    q8 = Int8Linear.from_linear(linear, implementation="dequant")
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    q, s = quantize_weight(linear.weight)
    expected = torch.einsum("btk,nk->btn", x, q.double() * s.double()[:, None]) + linear.bias
    torch.testing.assert_close(q8(x), expected, rtol=1e-12, atol=1e-12)
    # and it approximates the float layer within the weight error bound: |Δy| ≤ Σ_k |x_k| s_n / 2
    bound = x.abs() @ torch.ones(48, 40, dtype=torch.float64) * (s.double() / 2 * 1.001 + 1e-12)
    assert ((q8(x) - linear(x)).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (1, 96, 192), (7, 33, 48), (16, 256, 64)])
def test_kernel_path_matches_the_float64_product_within_bfloat16_rounding(dtype, M, N, K):
    torch.manual_seed(3)
    linear = nn.Linear(K, N, bias=False)
    q8 = Int8Linear.from_linear(linear, implementation="int8pack")
    x = torch.randn(M, K).to(dtype)
    assert q8.uses_kernel(x)
    w_dq = q8.dequantized_weight(torch.float64)  # [N, K]
    expected = x.double() @ w_dq.T  # [M, N]
    # x is rounded to bfloat16 (≤ eps/2 relative per element), y is returned in bfloat16 (≤ eps/2 relative),
    # float32 accumulation adds ≪ eps; a factor 2 of headroom
    tol = BF16_EPS * (x.double().abs() @ w_dq.abs().T) + BF16_EPS * expected.abs()
    y = q8(x)
    assert y.dtype == dtype and y.shape == (M, N)
    assert ((y.double() - expected).abs() <= tol).all()


@needs_kernel
def test_auto_uses_the_reference_where_the_kernel_is_unsafe():
    """in_features not divisible by 16 (the AVX-512 kernel returns garbage there) and float64 use 'dequant'."""
    torch.manual_seed(4)
    linear = nn.Linear(40, 64, bias=False)
    q8 = Int8Linear.from_linear(linear)
    x = torch.randn(1, 40)
    assert not q8.uses_kernel(x) and not q8.uses_kernel(x.double())
    expected = x.double() @ q8.dequantized_weight(torch.float64).T
    assert relative_error(q8(x), expected) <= tolerance(torch.float32, linear.in_features)
    assert Int8Linear.from_linear(nn.Linear(64, 8)).uses_kernel(torch.randn(1, 64))


def test_int8_weights_take_a_quarter_of_the_float32_bytes():
    model = quantize_int8(tiny_model("tiny-llama-2-gqa"))
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    n_rows = sum(m.out_features for m in model.modules() if isinstance(m, Int8Linear))
    assert int8_weight_bytes(model) == n * 1 + n_rows * 2  # int8 codes + bfloat16 scales
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert all(not b.requires_grad for b in model.buffers())


# -- whole models -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_quantised_model_is_the_float_model_with_rounded_weights(name):
    """float64, reference path: exactly the float Transformer whose weights are diag(s)·Q (tied ones included)."""
    model = tiny_model(name, torch.float64)
    expected_model = with_rounded_weights(model)
    quantised = quantize_int8(copy.deepcopy(model))
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(quantised(tokens), expected_model(tokens), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TINY)
def test_quantised_logits_are_close_to_float32(name):
    model = tiny_model(name)
    quantised = quantize_int8(copy.deepcopy(model))
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]])
    with torch.no_grad():
        ref, out = model(tokens), quantised(tokens)
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    # ~0.5% rms error per weight (a uniform step of absmax/127 on Gaussian rows of 64) through 2 layers + output;
    # random std-0.2 networks amplify it: measured 0.024-0.033 on these presets
    assert rel < 0.05, rel
    # the top token may only change where float32's top-two margin is within the logit error
    top2 = ref.topk(2, dim=-1).values  # [B, T, 2]
    margin, err = top2[..., 0] - top2[..., 1], (out - ref).abs().amax(-1)  # [B, T]
    changed = out.argmax(-1) != ref.argmax(-1)
    assert not (changed & (margin > 2 * err)).any()


@pytest.mark.parametrize("name", TINY)
def test_greedy_generation_equals_argmax_of_full_forwards(name):
    """The KV-cache invariant of llama.generate holds for the quantised model too (kernel path in float32)."""
    quantised = quantize_int8(tiny_model(name))
    out = generate(quantised, PROMPTS, max_new_tokens=8)
    for prompt, new in zip(PROMPTS, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(quantised(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt):]


def test_tied_embeddings_share_one_int8_table():
    model = tiny_model("tiny-llama-3.2")
    assert model.output.weight is model.tok_embeddings.weight
    quantised = quantize_int8(copy.deepcopy(model))
    assert isinstance(quantised.output, Int8Linear) and isinstance(quantised.tok_embeddings, Int8Embedding)
    assert quantised.output.weight is quantised.tok_embeddings.weight
    tokens = torch.tensor([[0, 5, 255, 17]])
    q, s = quantize_weight(model.tok_embeddings.weight)
    expected_rows = q[tokens].float() * s.float()[tokens].unsqueeze(-1)  # E[v] = s_v·Q_v
    torch.testing.assert_close(quantised.tok_embeddings(tokens), expected_rows, rtol=0, atol=0)
    assert quantised.tok_embeddings(tokens).dtype == torch.float32
    assert len(generate(quantised, [[1, 2, 3]], 5)[0]) == 5


def test_include_output_false_keeps_the_output_layer_and_a_tied_embedding_in_float():
    model = quantize_int8(tiny_model("tiny-llama-3.2"), include_output=False)
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    assert model.output.weight is model.tok_embeddings.weight
    assert isinstance(model.layers[0].attention.wq, Int8Linear)


def test_llama4_moe_model_quantises_its_linears_and_runs():
    model = tiny_model("tiny-llama-4-scout")
    quantised = quantize_int8(copy.deepcopy(model))
    assert isinstance(quantised.layers[0].attention.wq, Int8Linear)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ref, out = model(tokens), quantised(tokens)
    assert float((out - ref).norm() / ref.norm()) < 0.06  # measured 0.035 (the experts stay float)
    assert not any(isinstance(m, nn.Linear) for m in quantised.modules())


def test_model_to_float64_after_quantising_uses_the_exact_reference():
    model = tiny_model("tiny-llama-2-gqa", torch.float64)
    quantised = quantize_int8(tiny_model("tiny-llama-2-gqa")).to(torch.float64)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(quantised(tokens), with_rounded_weights(model)(tokens), rtol=1e-10, atol=1e-10)


# -- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_raises_with_the_fix_in_the_message():
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        Int8Linear.from_linear(nn.Embedding(4, 16))
    with pytest.raises(TypeError, match="floating-point weight"):
        quantize_weight(torch.ones(4, 16, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_weight(torch.ones(4, 4, 16))
    with pytest.raises(ValueError, match="meta device"):
        quantize_weight(torch.empty(4, 16, device="meta"))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="int8 tensor"):
        Int8Linear(torch.ones(4, 16), torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one per output row"):
        Int8Linear(torch.ones(4, 16, dtype=torch.int8), torch.ones(5, dtype=torch.bfloat16))
    q8 = Int8Linear.from_linear(nn.Linear(16, 4))
    with pytest.raises(TypeError, match="must be floating point"):
        q8(torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown Int8Linear implementation"):
        q8.implementation = "fast"
    if has_int8pack_kernel():
        with pytest.raises(ValueError, match="divisible by 16"):
            Int8Linear.from_linear(nn.Linear(40, 4), implementation="int8pack")
    with pytest.raises(TypeError, match="needs an nn.Module"):
        quantize_int8({"wq": torch.ones(2, 2)})
    model = quantize_int8(tiny_model("tiny-llama-1"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(model)  # already quantised


def test_quantised_decode_step_traces_into_one_graph():
    """torch.compile sees one graph (no breaks) for a KV-cache step: Int8Linear and the model's checks are traceable."""
    model = quantize_int8(tiny_model("tiny-llama-3.2"))
    model.setup_cache(1, 16)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), start_pos=0)
            explanation = torch._dynamo.explain(model)(torch.tensor([[4]]), start_pos=3)
    finally:
        model.clear_cache()
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
