"""Tiny random Hugging Face `LlamaForCausalLM` models: the independent reference for parity tests.

The translation ModelArgs -> LlamaConfig below is written separately from `llama.formats.hf` (which reads and
writes config.json for `llama.load` / `llama.save`), so a test that builds its reference here and loads it with
`llama.load` checks our converter against Hugging Face's own reading of the config. The HF side runs in the
reference process (`tests/reference/isolation.py`, code in `outside/hf_llama.py`); models stay there, folders and
logits come back.

    args = GENERATIONS["llama-3.1-scaled-rope"]
    save_hf_model(args, folder)                          # config.json + model.safetensors, by save_pretrained
    relative_error(llama.load(folder)(tokens), hf_logits(folder, tokens))
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from llama import ModelArgs, RopeScaling
from tests.reference.isolation import reference
from tests.reference.tolerance import relative_error  # noqa: F401  (re-exported for the parity tests)

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


def hf_config(args: ModelArgs, **overrides) -> dict:
    """The LlamaConfig fields HF would hold for `args` (transformers 5 layout: theta inside rope_parameters)."""
    rope = rope_parameters(args)
    fields = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_word_embeddings, rope_parameters=rope, hidden_act="silu",
        attention_bias=False, mlp_bias=False)
    fields.update(overrides)
    return fields


def save_hf_model(args: ModelArgs, folder: Path, *, dtype: torch.dtype = torch.float64, seed: int = 0,
                  max_shard_size: Optional[str] = None) -> Path:
    """A random LlamaForCausalLM for `args` (O(1) weights), written by HF's `save_pretrained` into `folder`."""
    reference().call("hf_llama.save_random", "llama", hf_config(args), str(folder), dtype=dtype, seed=seed,
                     max_shard_size=max_shard_size)
    return Path(folder)


def hf_logits(folder: Path, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float64, attn: str = "sdpa",
              arch: str = "llama") -> torch.Tensor:
    """Logits of HF's `from_pretrained(folder)` on `tokens`."""
    return reference().call("hf_llama.logits", str(folder), tokens, arch=arch, dtype=dtype, attn=attn)


def random_tokens(args: ModelArgs, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, length), generator=gen)


# The `hf_folders` fixture: float64 HF checkpoints written by save_pretrained, once per test module and ModelArgs.
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    cache = {}

    def get(args: ModelArgs, dtype: torch.dtype = torch.float64) -> Path:
        key = (repr(args), dtype)
        if key not in cache:
            cache[key] = save_hf_model(args, tmp_path_factory.mktemp("hf"), dtype=dtype)
        return cache[key]

    return get


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The HF-named tensors of a save_pretrained folder (a tied lm_head, stored once, listed under both names)."""
    sd = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(path))
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd
