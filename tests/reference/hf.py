"""Tiny random Hugging Face `LlamaForCausalLM` models: the independent reference for parity tests.

The translation ModelArgs -> LlamaConfig below is written separately from `llama.formats.hf` (which reads and
writes config.json for `llama.load` / `llama.save`), so a test that builds its reference here and loads it with
`llama.load` checks our converter against Hugging Face's own reading of the config.

    args = GENERATIONS["llama-3.1-scaled-rope"]
    hf = random_hf_model(args, dtype=torch.float64)      # LlamaForCausalLM with O(1) random weights
    hf.save_pretrained(folder)                           # config.json + model.safetensors
    relative_error(ours(tokens), hf_logits(hf, tokens))
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama import ModelArgs, RopeScaling

_TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=256)

# One tiny config per feature that distinguishes the dense generations (Meta's papers and `params.json` files).
GENERATIONS: dict[str, ModelArgs] = {
    # LLaMA 1: multi-head attention, RMSNorm eps 1e-6, theta 1e4.
    "llama-1-mha": ModelArgs(norm_eps=1e-6, **_TINY),
    # Llama 2 70B: grouped-query attention (2 query heads per KV head), eps 1e-5.
    "llama-2-gqa": ModelArgs(n_kv_heads=2, **_TINY),
    # Code Llama: theta 1e6, a vocabulary that is not a power of two.
    "code-llama-theta": ModelArgs(rope_theta=1e6, **{**_TINY, "vocab_size": 260}),
    # Llama 3.1: theta 5e5 and "llama3" RoPE scaling; L0 = 64 puts dimensions in all three bands at head_dim 16.
    "llama-3.1-scaled-rope": ModelArgs(
        n_kv_heads=2, rope_theta=500000.0, ffn_dim_multiplier=1.3,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64), **_TINY),
    # Llama 3.2 1B/3B: tied input/output embeddings, factor 32, a single KV head.
    "llama-3.2-tied": ModelArgs(
        n_kv_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64), **_TINY),
    # head_dim != dim / n_heads (HF `head_dim`; no released dense LLaMA does this, Llama 4 params.json allows it).
    "head-dim-32": ModelArgs(n_kv_heads=2, head_dim=32, **_TINY),
}


def rope_parameters(args: ModelArgs) -> dict:
    """HF's `rope_parameters` for `args` (transformers 5: theta inside; the reference builds llama3 scaling only)."""
    if args.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    s = args.rope_scaling
    assert s.rope_type == "llama3", "the reference only builds llama3 scaling"
    return {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def hf_config(args: ModelArgs, **overrides) -> LlamaConfig:
    """The LlamaConfig HF would hold for `args` (transformers 5 layout: theta inside rope_parameters)."""
    rope = rope_parameters(args)
    fields = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_word_embeddings, rope_parameters=rope, hidden_act="silu",
        attention_bias=False, mlp_bias=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


@torch.no_grad()
def random_hf_model(args: ModelArgs, *, dtype: torch.dtype = torch.float64, seed: int = 0,
                    attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """LlamaForCausalLM for `args` with weights large enough to make every term matter.

    HF's default init (std 0.02, unit norm gains) gives near-uniform logits that hide mistakes, so projections get
    std 1/sqrt(in_features) and the norm gains 1 + 0.1·N(0, 1) (a transposed or skipped gain then shows).
    """
    config = hf_config(args)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied lm_head is listed once, as embed_tokens
        if p.ndim == 1:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[1]))
    return model.eval()


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, computed in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_tokens(args: ModelArgs, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, length), generator=gen)


# The `hf_models` fixture of test_checkpoint.py and test_checkpoint_errors.py: random float64 HF models, built once
# per test module and per `ModelArgs`.
@pytest.fixture(scope="module")
def hf_models():
    cache = {}

    def get(args: ModelArgs):
        key = repr(args)
        if key not in cache:
            cache[key] = random_hf_model(args, dtype=torch.float64)
        return cache[key]

    return get
