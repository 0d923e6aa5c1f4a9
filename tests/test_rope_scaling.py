"""RoPE scaling family (llama3, linear PI, dynamic NTK, YaRN) against Hugging Face's rope-init functions.

Reference: transformers 5.24 `modeling_rope_utils.ROPE_INIT_FUNCTIONS` and `LlamaRotaryEmbedding` (whose
`dynamic_rope_update` decorator recomputes dynamic-NTK frequencies during the forward pass), run in the reference
process (tests/reference/outside/hf_llama.py). Frequencies must be bit-identical; whole-model logits must match HF's
`LlamaForCausalLM` in float64 beyond the original context.

Mapping of the one convention that differs: for dynamic NTK, HF scales past `config.max_position_embeddings`; our
`RopeScaling.original_max_position_embeddings` (L0) plays that role, and `ModelArgs.max_seq_len` is the longest
input the model accepts.
"""

import json
import math

import pytest
import torch

from llama import ModelArgs, RopeScaling, Transformer
from llama.formats.checkpoint import load, save
from llama.rope import RotaryEmbedding, base_frequencies, scaled_frequencies
from tests.reference.hf import hf_logits, relative_error
from tests.reference.isolation import reference
from tests.reference.tolerance import tolerance

HEAD_DIM, THETA = 64, 10000.0


def hf_config(scaling: dict, max_pos: int, head_dim: int = HEAD_DIM, theta: float = THETA) -> dict:
    """LlamaConfig fields of a model whose RoPE is `scaling` (only the RoPE-related ones matter)."""
    return dict(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=max_pos,
                rope_parameters={**scaling, "rope_theta": theta})


SCALINGS = {
    "linear-4": dict(rope_type="linear", factor=4.0),
    "llama3-8": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=512),
    "llama3-scout": dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                         original_max_position_embeddings=512),
    "yarn-4": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512),
    "yarn-16-betas": dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=256, beta_fast=16.0,
                          beta_slow=2.0),
    "yarn-no-truncate": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, truncate=False),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, mscale=0.707,
                        mscale_all_dim=0.707 * 0.5),
    "yarn-explicit-factor": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=512,
                                 attention_factor=1.25),
}


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("head_dim, theta", [(64, 1e4), (128, 5e5), (16, 1e4)])
def test_static_frequencies_equal_hf(name, head_dim, theta):
    params = SCALINGS[name]
    ours, factor = scaled_frequencies(head_dim, theta, RopeScaling.from_hf(params))
    ref, ref_factor = reference().call("hf_llama.rope_init", hf_config(params, 4096, head_dim, theta))
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    assert factor == ref_factor


@pytest.mark.parametrize("seq_len", [1, 100, 512, 513, 777, 1024, 2048, 4096 + 3])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_dynamic_ntk_frequencies_equal_hf_at_every_length(seq_len, factor):
    """HF's forward-time update calls the init function with seq_len = max(position_ids) + 1 as a tensor."""
    L0 = 512
    params = dict(rope_type="dynamic", factor=factor)
    ours, _ = scaled_frequencies(HEAD_DIM, THETA, RopeScaling("dynamic", factor=factor,
                                                               original_max_position_embeddings=L0), seq_len)
    if seq_len <= L0:  # HF never recomputes at or below max_position_embeddings: original frequencies
        ref = reference().call("hf_llama.rope_init", hf_config(params, L0))[0]
        assert torch.equal(ref, base_frequencies(HEAD_DIM, THETA))
    else:
        ref = reference().call("hf_llama.rope_init", hf_config(params, L0), seq_len=seq_len)[0]
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_dynamic_ntk_rule_by_hand():
    """base' = base·(s·ℓ/L0 − (s−1))^(D/(D−2)); at ℓ = 2·L0 with s = 4: base·5^(64/62)."""
    ours, _ = scaled_frequencies(HEAD_DIM, THETA, RopeScaling("dynamic", factor=4.0,
                                                               original_max_position_embeddings=512), 1024)
    base = THETA * 5 ** (64 / 62)
    by_hand = torch.tensor([base ** (-2 * j / 64) for j in range(32)], dtype=torch.float64)
    # float32 θ_j: the exponent's rounding amplified by ln(base') <= 16, then pow and a division
    assert torch.allclose(ours.double(), by_hand, rtol=tolerance(torch.float32, 20), atol=0)


@pytest.mark.parametrize("name", ["linear-4", "llama3-8", "yarn-4", "yarn-mscale", "dynamic"])
def test_cos_sin_equal_hf_rotary_module_over_growing_lengths(name):
    """The module path, including HF's dynamic update as the sequence grows past L0 (prefill then decode)."""
    L0 = 512
    params = dict(rope_type="dynamic", factor=4.0) if name == "dynamic" else SCALINGS[name]
    steps = [(0, 300), (0, 600), (600, 1), (601, 1), (602, 200), (802, 1)]
    refs = reference().call("hf_llama.rotary", hf_config(params, L0), steps)  # one module, called step by step
    scaling = RopeScaling("dynamic", factor=4.0, original_max_position_embeddings=L0) if name == "dynamic" \
        else RopeScaling.from_hf(params)
    ours = RotaryEmbedding(HEAD_DIM, THETA, scaling)
    for (start, length), (ref_cos, ref_sin) in zip(steps, refs):
        cos, sin = ours(torch.arange(start, start + length))
        half = HEAD_DIM // 2  # HF repeats the D/2 angles for its rotate_half layout
        assert torch.equal(cos, ref_cos[:, :half]) and torch.equal(sin, ref_sin[:, :half]), (start, length)


def test_yarn_attention_factor_values():
    assert scaled_frequencies(64, 1e4, RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64))[1] == \
        pytest.approx(0.1 * math.log(4) + 1)
    assert scaled_frequencies(64, 1e4, RopeScaling("yarn", factor=1.0, original_max_position_embeddings=64))[1] == 1.0


# -- whole model, beyond the original context -------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [
    RopeScaling("linear", factor=4.0),
    RopeScaling("dynamic", factor=4.0, original_max_position_embeddings=32),
    RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32),
    RopeScaling("llama3", factor=8.0, original_max_position_embeddings=32),
], ids=lambda s: s.rope_type)
def test_model_logits_equal_hf_beyond_the_original_context(tmp_path, scaling):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256,
                     rope_scaling=scaling)
    ours = Transformer(args).double().eval()
    ours.reset_parameters(std=0.2)
    save(ours, tmp_path / "hf", format="hf")   # dynamic: writes L0 as max_position_embeddings (HF's convention)
    back = load(tmp_path / "hf").args        # reads back the same scaling and longest input
    assert (back.rope_scaling, back.max_seq_len) == (args.rope_scaling, args.max_seq_len)
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))  # ~3x the original 32
    with torch.no_grad():
        assert relative_error(ours(x), hf_logits(tmp_path / "hf", x)) <= 1e-10


def test_set_rope_scaling_on_a_built_model_equals_building_with_it():
    torch.manual_seed(0)
    scaling = RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64)
    model = Transformer(args).double().eval()
    model.set_rope_scaling(scaling, max_seq_len=256)
    built = Transformer(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling, "max_seq_len": 256})).double().eval()
    built.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
    assert model.args.rope_scaling == scaling and model.args.max_seq_len == 256


# -- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(rope_type="ntk", factor=2.0, original_max_position_embeddings=8), "unknown rope scaling type 'ntk'"),
    (dict(rope_type="yarn", original_max_position_embeddings=8), "needs `factor`"),
    (dict(rope_type="yarn", factor=4.0), "needs `original_max_position_embeddings`"),
    (dict(rope_type="dynamic", factor=4.0), "needs `original_max_position_embeddings`"),
    (dict(rope_type="llama3", factor=8.0), "needs `original_max_position_embeddings`"),
    (dict(rope_type="linear", factor=0.5), "factor must be >= 1"),
    (dict(rope_type="yarn", factor=0.9, original_max_position_embeddings=8), "factor must be >= 1"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=8, low_freq_factor=4.0,
          high_freq_factor=1.0), "high_freq_factor >= low_freq_factor"),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=1.0, beta_slow=2.0),
     "beta_fast > beta_slow"),
    (dict(rope_type="linear", factor=2.0, original_max_position_embeddings=0),
     "original_max_position_embeddings must be a positive integer"),
])
def test_bad_scaling(kw, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling(**kw)


def test_from_hf_and_to_hf():
    assert RopeScaling.from_hf(None) is None
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}) is None
    legacy = RopeScaling.from_hf({"type": "linear", "factor": 2.0})  # transformers 4.x spelling
    assert legacy == RopeScaling("linear", factor=2.0)
    for params in SCALINGS.values():
        assert RopeScaling.from_hf(RopeScaling.from_hf(params).to_hf()) == RopeScaling.from_hf(params)
    with pytest.raises(ValueError, match=r"unsupported rope scaling keys \['short_factor'\]"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                             "short_factor": [1.0]})


def test_hf_dynamic_config_reads_max_position_embeddings_as_l0():
    """A config written by HF for dynamic NTK: L0 is max_position_embeddings (HF ignores any other value there);
    with no longest input recorded, ours accepts the design length s · L0."""
    from pathlib import Path

    from llama.formats.hf import args_from_config

    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
                  max_position_embeddings=32, rope_scaling=dict(rope_type="dynamic", factor=4.0,
                                                                original_max_position_embeddings=999))
    args = args_from_config(config, path=Path("config.json"))
    assert args.rope_scaling.original_max_position_embeddings == 32 and args.max_seq_len == 128
