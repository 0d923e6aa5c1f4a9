"""The dense `Transformer` against independent references: a hand-written Meta-style forward with a per-head loop
and complex-number RoPE, the llama3 frequency rule by hand and from Hugging Face, and numerics per dtype.
"""

import math

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.model import RMSNorm, attend, repeat_kv
from llama.rope import apply_rotary, scaled_frequencies
from tests.reference.meta_forward import llama3_frequencies_by_hand, reference_forward
from tests.reference.isolation import reference
from tests.reference.tolerance import forward_tolerance, relative_error, tolerance

# θ_j = θ^(-2j/D) in float32: the exponent's rounding is amplified by ln θ (<= 13.2 for θ = 5e5), then pow, the
# llama3 blend and the division add a few roundings each.
FREQUENCY_RTOL = tolerance(torch.float32, 16)

TINY = ["tiny-llama-1", "tiny-llama-2-gqa", "tiny-llama-3", "tiny-llama-3.2"]


def tiny_model(name: str, dtype=torch.float64, seed: int = 0, std: float = 0.2) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name))
    model.reset_parameters(std=std)  # O(1) activations, so mistakes show up as O(1) differences
    return model.to(dtype).eval()


def random_tokens(model, B=2, T=40, seed=1):
    return torch.randint(0, model.args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_forward_equals_hand_written_reference(name):
    model = tiny_model(name)
    tokens = random_tokens(model, T=70)  # beyond L0 = 64 of the tiny llama3 presets: all frequency bands matter
    with torch.no_grad():
        got = model(tokens)
    want = reference_forward(model, tokens)
    # float32 angles m·θ and cos/sin tables (ours, as Meta/HF) vs float64 ones (reference): the angle's rounding
    # grows with the position m < T, so each layer's q and k carry up to (T + 2) float32 roundings; a wrong head
    # grouping, pair convention or frequency gives O(1) differences
    T = tokens.shape[1]
    assert relative_error(got, want) <= tolerance(torch.float32, model.args.n_layers * 2 * (T + 2))


def test_reference_detects_wrong_head_grouping():
    """The per-head loop is sensitive to the GQA order: interleaved grouping (h % Hkv) must not pass."""
    model = tiny_model("tiny-llama-2-gqa")
    tokens = random_tokens(model)
    with torch.no_grad():
        got = model(tokens)
        for layer in model.layers:  # swap the two KV heads: consecutive grouping now maps heads to the wrong KV
            for w in (layer.attention.wk.weight, layer.attention.wv.weight):
                w.copy_(torch.cat(w.chunk(2, dim=0)[::-1]))
    assert (got - reference_forward(model, tokens)).abs().max() > 1e-2


def test_repeat_kv_groups_consecutive_query_heads():
    kv = torch.randn(2, 3, 5, 4)  # [B, Hkv, S, D]
    out = repeat_kv(kv, 4)  # [B, 12, S, D]
    for h in range(12):
        assert torch.equal(out[:, h], kv[:, h // 4])


# -- RoPE ----------------------------------------------------------------------------------------------------------


def test_rope_is_meta_complex_multiplication_in_float64():
    torch.manual_seed(0)
    B, T, H, D = 2, 9, 3, 16
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :]  # [T, D/2]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # Meta's precompute_freqs_cis, in complex128
    want = torch.view_as_real(torch.view_as_complex(x.reshape(B, T, H, D // 2, 2)) * freqs_cis[None, :, None])
    got = apply_rotary(x, angles.cos(), angles.sin())
    torch.testing.assert_close(got, want.reshape(B, T, H, D), rtol=1e-14, atol=1e-14)


def test_rope_rotates_adjacent_pairs_not_halves():
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., 0] = 1.0  # only the first element of pair 0
    angle = torch.full((1, 4), 0.5, dtype=torch.float64)
    y = apply_rotary(x, angle.cos(), angle.sin())[0, 0, 0]
    assert y[0] == pytest.approx(math.cos(0.5)) and y[1] == pytest.approx(math.sin(0.5))  # partner is index 1
    assert torch.all(y[2:] == 0)  # HF's half-split convention would have moved it to index 4


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "tiny-llama-3"])
def test_llama3_scaled_frequencies_by_hand_and_from_hf(name):
    a = ModelArgs.from_name(name)
    r = a.rope_scaling
    got, attention_factor = scaled_frequencies(a.head_dim, a.rope_theta, r)
    assert attention_factor == 1.0
    hand = torch.tensor(llama3_frequencies_by_hand(a.head_dim, a.rope_theta, r.factor, r.low_freq_factor,
                                                   r.high_freq_factor, r.original_max_position_embeddings),
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), hand, rtol=FREQUENCY_RTOL, atol=0)  # float32 vs Python floats

    config = dict(
        hidden_size=a.dim, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        max_position_embeddings=a.max_seq_len,
        rope_parameters={"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": r.factor,
                         "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                         "original_max_position_embeddings": r.original_max_position_embeddings})
    hf, hf_factor = reference().call("hf_llama.rope_init", config)  # transformers, in the reference process
    assert hf_factor == 1.0
    torch.testing.assert_close(got, hf.float(), rtol=0, atol=0)


def test_llama31_band_boundaries():
    """Bands from `apply_scaling`: hd=128, base 5e5, s=8 -> j 0-28 unchanged, 29-34 blended, 35-63 divided by 8."""
    a = ModelArgs.from_name("llama-3.1-8b")
    base = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ratio = base / scaled_frequencies(128, 500000.0, a.rope_scaling)[0].double()
    assert torch.allclose(ratio[:29], torch.ones(29, dtype=torch.float64), rtol=FREQUENCY_RTOL, atol=0)
    assert torch.all((ratio[29:35] > 1.0001) & (ratio[29:35] < 7.999))
    assert torch.allclose(ratio[35:], torch.full((29,), 8.0, dtype=torch.float64), rtol=FREQUENCY_RTOL, atol=0)


# -- attention implementations and dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_and_math_attention_agree(name, dtype):
    model = tiny_model(name, dtype=dtype)
    tokens = random_tokens(model)
    segments = torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    with torch.no_grad():
        sdpa = model(tokens), model(tokens, segment_ids=segments)
        model.setup_cache(2, 40)
        sdpa_cache = torch.cat([model(tokens[:, :30], start_pos=0), model(tokens[:, 30:], start_pos=30)], 1)
        model.set_attention_implementation("math")
        math_ = model(tokens), model(tokens, segment_ids=segments)
        math_cache = torch.cat([model(tokens[:, :30], start_pos=0), model(tokens[:, 30:], start_pos=30)], 1)
        model.clear_cache()
    bound = 1e-12 if dtype == torch.float64 else forward_tolerance(model.args, tokens.shape[1], dtype)
    for a, b in zip(sdpa + (sdpa_cache,), math_ + (math_cache,)):
        assert relative_error(a, b) <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_and_stay_close_to_float32(dtype):
    model = tiny_model("tiny-llama-3", dtype=torch.float32, std=0.05)
    tokens = random_tokens(model, T=200)  # long enough that imprecise RoPE angles would show
    with torch.no_grad():
        want = model(tokens)
        model.to(dtype)
        assert model.layers[0].attention.wq.weight.dtype == dtype
        got = model(tokens)
        model.setup_cache(2, 200)
        cached = torch.cat([model(tokens[:, :150], start_pos=0), model(tokens[:, 150:], start_pos=150)], 1)
        model.clear_cache()
    assert got.dtype == torch.float32, "logits are returned in float32 like Meta's reference"
    for out in (got, cached):
        assert torch.isfinite(out).all()
        # every layer stores about 10 results (q, k, v, scores, attention, wo, norm, w1/w3, gate, w2) in `dtype`
        assert relative_error(out, want) <= forward_tolerance(model.args, tokens.shape[1], dtype,
                                                              roundings_per_layer=10)


def test_rope_frequencies_stay_float32_under_half_precision():
    """model.to(bfloat16) must not round θ_j to 8 bits: the angle m·θ_j would drift by ~m·θ_j/256."""
    model = tiny_model("tiny-llama-2-gqa", dtype=torch.float32)
    positions = torch.arange(200)
    cos32, sin32 = model.rope(positions)
    model.to(torch.bfloat16)
    cos16, sin16 = model.rope(positions)
    assert cos16.dtype == sin16.dtype == torch.float32  # the same float32 computation as before the cast
    assert torch.equal(cos16, cos32) and torch.equal(sin16, sin32)
    with torch.device("meta"):  # built without memory, then materialised (how large checkpoints are loaded)
        lazy = Transformer(model.args)
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.rope(positions)[0], cos32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_normalises_in_float32(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm.to(dtype)
    x = (torch.randn(3, 7, 64) * 30).to(dtype)  # large values: x² overflows float16's precision budget
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), want)
    naive = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # all in half precision
    assert not torch.equal(norm(x), naive)


def test_math_attention_softmax_runs_in_float32_for_bfloat16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8).to(torch.bfloat16) for _ in range(3))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)  # bf16 matmul as the model does it
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(scores.float(), dim=-1).to(torch.bfloat16) @ v
    assert torch.equal(attend(q, k, v, None, True, "math"), want)


# -- packing, tied embeddings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama-2-gqa", "tiny-llama-3"])
def test_packed_logits_equal_unpacked_per_example_logits(name):
    model = tiny_model(name)
    lengths = [[7, 20, 13], [40]]
    tokens = random_tokens(model, B=2, T=40)
    segments = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    with torch.no_grad():
        packed = model(tokens, segment_ids=segments)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(tokens[b:b + 1, start:start + n])[0]
                torch.testing.assert_close(packed[b, start:start + n], alone, rtol=1e-12, atol=1e-12)
                start += n


def test_tied_embeddings_share_storage_through_training_and_casts():
    model = tiny_model("tiny-llama-3.2", dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in set(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(random_tokens(model)).sum().backward()
    opt.step()
    model.to(torch.bfloat16)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    untied = tiny_model("tiny-llama-2-gqa", dtype=torch.float32)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,error,words", [
    (torch.tensor([[1, 256]]), ValueError, ["256", "out of range", "vocab_size"]),
    (torch.tensor([[-1, 3]]), ValueError, ["-1", "out of range", "tokenizer"]),
    (torch.zeros(1, 257, dtype=torch.long), ValueError, ["257", "max_seq_len", "shorten"]),
    (torch.tensor([[1.0, 2.0]]), TypeError, ["integer tensor", "torch.float32"]),
    ([[1, 2]], TypeError, ["integer tensor", "list"]),
    (torch.tensor([1, 2, 3]), ValueError, ["[batch, seq_len]", "tokens[None]"]),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, ["[batch, seq_len]"]),
])
def test_bad_tokens_name_problem_and_fix(tokens, error, words):
    model = tiny_model("tiny-llama-1", dtype=torch.float32)
    with pytest.raises(error) as info:
        model(tokens)
    for word in words:
        assert word in str(info.value)


def test_decoding_past_the_context_and_without_a_cache_is_refused():
    model = tiny_model("tiny-llama-1", dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds the model context"):
        model(torch.ones(1, 2, dtype=torch.long), start_pos=255)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.ones(1, 2, dtype=torch.long), start_pos=0)
    with pytest.raises(ValueError, match="sdpa"):
        model.set_attention_implementation("flash")
