"""Generation with a KV cache (`llama.generate`), checked against cache-free forwards and Hugging Face.

References are independent of the code under test: repeated full forwards without a cache, Hugging Face's
`LlamaForCausalLM.generate` (in the reference process, tests/reference/isolation.py), and a hand-written nucleus
rule.
"""

import math

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.generate import generate, nucleus, sample
from tests.reference.hf import hf_state_dict
from tests.reference.isolation import reference

TINY = ["tiny-llama-1", "tiny-llama-2-gqa", "tiny-llama-3", "tiny-llama-3.2"]
# Llama 4 text: MoE, NoPE layers and chunked local attention (chunk 16 in the tiny presets, crossed below)
TINY_L4 = ["tiny-llama-4-scout", "tiny-llama-4-maverick"]
PROMPTS = [[5, 17, 3], [9, 250, 7, 1, 30, 2, 44, 8], [77], [12, 13, 14, 15, 16]]  # ragged on purpose


def tiny_model(name: str, dtype=torch.float64, seed: int = 0, std: float = 0.2) -> Transformer:
    """A tiny preset with larger-than-default random weights, so that the logits are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name))
    model.reset_parameters(std=std)
    return model.to(dtype).eval()


def greedy_by_full_forwards(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: no cache, the whole sequence re-run for every new token, argmax of the last position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# -- the KV cache against full forwards ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY + TINY_L4)
def test_greedy_equals_argmax_of_full_forwards_on_a_ragged_batch(name):
    model = tiny_model(name)
    out = generate(model, PROMPTS, max_new_tokens=12)
    assert out == [greedy_by_full_forwards(model, p, 12) for p in PROMPTS]
    assert all(layer.attention.cache is None for layer in model.layers), "generate must clear the cache"


def test_greedy_equals_argmax_of_full_forwards_in_float32():
    model = tiny_model("tiny-llama-3", dtype=torch.float32)
    out = generate(model, PROMPTS, max_new_tokens=10)
    assert out == [greedy_by_full_forwards(model, p, 10) for p in PROMPTS]


def test_batched_rows_equal_rows_generated_alone():
    model = tiny_model("tiny-llama-2-gqa")
    batched = generate(model, PROMPTS, max_new_tokens=9)
    assert batched == [generate(model, [p], max_new_tokens=9)[0] for p in PROMPTS]


@pytest.mark.parametrize("name", TINY + TINY_L4)
def test_kv_cache_decode_logits_equal_full_forward_at_every_step(name):
    model = tiny_model(name)
    torch.manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)  # [B, T, V]
        model.setup_cache(2, 24)
        steps = [model(tokens[:, :5], start_pos=0)]  # prefill 5 positions, then one token at a time
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(5, 24)]
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    assert cached.dtype == torch.float64
    # LLaMA 1-3: measured ~5e-16 (RMSNorm's float32 step, as in Meta's and HF's code, could in rare cases flip one
    # rounding). Llama 4 rotates q, k in complex64 like Meta's reference, so there the agreement is float32's.
    tol = 1e-5 if model.args.rope_complex64 else 1e-10
    torch.testing.assert_close(cached, full, rtol=tol, atol=tol)


def test_chunked_prefill_with_start_pos_equals_full_forward():
    model = tiny_model("tiny-llama-3")
    torch.manual_seed(2)
    tokens = torch.randint(0, model.args.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 40)
        chunks, pos = [], 0
        for size in (7, 1, 4, 11, 7):  # chunks of several tokens appended at start_pos > 0
            chunks.append(model(tokens[:, pos:pos + size], start_pos=pos))
            pos += size
        model.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-10, atol=1e-10)


# -- Hugging Face's greedy generate with identical weights ---------------------------------------------------------


def hf_folder_and_ours(name: str, folder):
    """A random HF LlamaForCausalLM saved in `folder`, and our model with its weights (HF -> Meta q/k permutation
    here, independently of llama.formats)."""
    a = ModelArgs.from_name(name)
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        s = a.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    config = dict(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps, rope_parameters=rope, tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no token is suppressed or ends generation
    reference().call("hf_llama.save_random", "llama", config, str(folder))

    def hf_to_meta(w, n):  # [n·D, C]: HF's half-split rows -> Meta's interleaved pairs, per head
        return w.reshape(n, 2, a.head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = hf_state_dict(folder)
    ours = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        ours |= {f"layers.{i}.attention.wq.weight": hf_to_meta(sd[p + "self_attn.q_proj.weight"], a.n_heads),
                 f"layers.{i}.attention.wk.weight": hf_to_meta(sd[p + "self_attn.k_proj.weight"], a.n_kv_heads),
                 f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
                 f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                 f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
                 f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
                 f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                 f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
                 f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"]}
    model = Transformer(a).to(torch.float64)
    model.load_state_dict(ours, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_hf_generate(name, tmp_path):
    model = hf_folder_and_ours(name, tmp_path / "hf")
    n = 16
    ours = generate(model, PROMPTS, max_new_tokens=n)  # one ragged batch
    assert ours == reference().call("hf_llama.greedy", str(tmp_path / "hf"), PROMPTS, n)  # one prompt at a time


# -- sampling ------------------------------------------------------------------------------------------------------


def test_same_seed_same_samples_and_generator_equals_seed():
    model = tiny_model("tiny-llama-2-gqa", std=0.05)  # flat logits: many plausible tokens
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9)
    a = generate(model, PROMPTS, seed=123, **kw)
    assert a == generate(model, PROMPTS, seed=123, **kw)
    assert a == generate(model, PROMPTS, generator=torch.Generator().manual_seed(123), **kw)
    assert a != generate(model, PROMPTS, seed=124, **kw)
    assert a != generate(model, PROMPTS, max_new_tokens=20)  # not greedy


def test_tiny_top_p_or_temperature_is_greedy():
    model = tiny_model("tiny-llama-3")
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-9, seed=0) == greedy
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1e-6, seed=0) == greedy


def reference_nucleus(probs: list[float], p: float) -> list[float]:
    """Holtzman et al. 2019 eq. 2, by hand: the smallest top set with mass >= p, renormalised."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= p:
            break
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize("top_p", [0.3, 0.55, 0.8, 0.95, 0.999])
def test_nucleus_matches_hand_written_rule(top_p):
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(4, 50, dtype=torch.float64) * 2, dim=-1)
    got = nucleus(probs, top_p)
    want = torch.tensor([reference_nucleus(row, top_p) for row in probs.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sample_frequencies_follow_the_tempered_nucleus_distribution(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=torch.float64)
    probs = torch.softmax(logits / temperature, dim=-1).tolist()
    want = torch.tensor(reference_nucleus(probs, top_p) if top_p < 1 else probs)
    n = 40_000
    draws = sample(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=len(logits)).double() / n
    assert torch.all(freq[want == 0] == 0), "sampled a token outside the nucleus"
    # binomial standard error is at most 0.0025 here; 5 sigma
    assert (freq - want.double()).abs().max() < 0.0125


# -- stop tokens ---------------------------------------------------------------------------------------------------


def test_stop_token_ends_each_row_and_is_included():
    model = tiny_model("tiny-llama-2-gqa")
    free = generate(model, PROMPTS, max_new_tokens=12)
    stop = free[1][3]  # a token row 1 emits at its 4th step
    out = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    for row_free, row in zip(free, out):
        if stop in row_free:
            assert row == row_free[: row_free.index(stop) + 1]
        else:
            assert row == row_free


def test_all_rows_stopped_ends_early_and_prompt_tokens_never_stop():
    model = tiny_model("tiny-llama-1")
    prompt = [4, 8, 15, 16, 23, 42]
    first = generate(model, [prompt], max_new_tokens=1)[0][0]
    # the stop set also holds every prompt token: tokens inside the prompt must not end the row
    out = generate(model, [prompt], max_new_tokens=50, stop_tokens=prompt + [first])
    assert out == [[first]]


def test_zero_new_tokens():
    assert generate(tiny_model("tiny-llama-1"), PROMPTS, max_new_tokens=0) == [[], [], [], []]


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,kwargs,error,words", [
    ([[1, 2], []], {}, ValueError, ["prompt 1 is empty", "BOS"]),
    ([], {}, ValueError, ["prompts is empty"]),
    ([[1] * 250], {"max_new_tokens": 7}, ValueError, ["exceeds the model context", "lower max_new_tokens"]),
    ([[1, 2]], {"temperature": -0.5}, ValueError, ["temperature", ">= 0"]),
    ([[1, 2]], {"temperature": math.nan}, ValueError, ["temperature", "finite"]),
    ([[1, 2]], {"top_p": 0.0}, ValueError, ["top_p", "(0, 1]"]),
    ([[1, 2]], {"top_p": 1.5}, ValueError, ["top_p", "(0, 1]"]),
    ([[1, 2]], {"max_new_tokens": -1}, ValueError, ["max_new_tokens", "non-negative"]),
    ([[1, 999]], {}, ValueError, ["999", "vocab_size"]),
    ([[1, 2]], {"seed": 1, "generator": torch.Generator()}, ValueError, ["either seed or generator"]),
    (torch.tensor([[1, 2]]), {}, TypeError, ["tolist()"]),
    (["hello"], {}, TypeError, ["tokenizer"]),
    ([[1, 2.0]], {}, TypeError, ["ints"]),
])
def test_bad_input_names_problem_and_fix(prompts, kwargs, error, words):
    model = tiny_model("tiny-llama-1")
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        generate(model, prompts, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_cache_is_cleared_when_the_model_fails_mid_generation(monkeypatch):
    model = tiny_model("tiny-llama-1")
    calls = []
    original = model.forward

    def flaky(tokens, start_pos=None, segment_ids=None):
        calls.append(start_pos)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original(tokens, start_pos)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, [[1, 2, 3]], max_new_tokens=5)
    assert all(layer.attention.cache is None for layer in model.layers)
