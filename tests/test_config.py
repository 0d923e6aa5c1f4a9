"""Presets against the published configurations and parameter counts, and ModelArgs' input checks.

The expected numbers are typed in here (papers, Meta/HF configs, HF totals, counts from the shapes), not read from
`llama.config`, so a wrong preset row fails.
"""

import pytest
import torch

from llama import ModelArgs, list_models
from llama.config import PRESETS, RopeScaling, count_parameters
from llama.registry import MULTIMODAL_PRESETS, all_presets
from llama.vision.llama4_model import module_for

# name: (exact published parameter count, SwiGLU hidden size F = HF intermediate_size)
PUBLISHED = {
    "llama-7b": (6_738_415_616, 11008),
    "llama-13b": (13_015_864_320, 13824),
    "llama-33b": (32_528_943_616, 17920),
    "llama-65b": (65_285_660_672, 22016),
    "llama-2-7b": (6_738_415_616, 11008),
    "llama-2-13b": (13_015_864_320, 13824),
    "llama-2-70b": (68_976_648_192, 28672),
    "code-llama-7b": (6_738_546_688, 11008),
    "code-llama-13b": (13_016_028_160, 13824),
    "code-llama-34b": (33_743_970_304, 22016),
    "code-llama-70b": (68_976_910_336, 28672),
    "code-llama-70b-instruct": (68_976_910_336, 28672),
    "llama-3-8b": (8_030_261_248, 14336),
    "llama-3-70b": (70_553_706_496, 28672),
    "llama-3.1-8b": (8_030_261_248, 14336),
    "llama-3.1-70b": (70_553_706_496, 28672),
    "llama-3.1-405b": (405_853_388_800, 53248),
    "llama-3.2-1b": (1_235_814_400, 8192),
    "llama-3.2-3b": (3_212_749_824, 8192),
    "llama-3.3-70b": (70_553_706_496, 28672),
    # Llama 4 text models (text part of the HF totals; vision encoder and projector not included)
    "llama-4-scout": (107_769_861_120, None),
    "llama-4-maverick": (400_711_848_960, None),
    # Llama 4 as released: HF safetensors totals of Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E
    "llama-4-scout-vision": (108_641_793_536, None),
    "llama-4-maverick-vision": (401_583_781_376, None),
}

# name: (n_kv_heads, norm_eps, rope_theta, vocab_size, max_seq_len, tied, llama3 scaling factor or None)
GENERATION_ROWS = {
    "llama-7b": (32, 1e-6, 1e4, 32000, 2048, False, None),
    "llama-65b": (64, 1e-6, 1e4, 32000, 2048, False, None),
    "llama-2-7b": (32, 1e-5, 1e4, 32000, 4096, False, None),
    "llama-2-70b": (8, 1e-5, 1e4, 32000, 4096, False, None),
    "code-llama-7b": (32, 1e-5, 1e6, 32016, 16384, False, None),
    "code-llama-34b": (8, 1e-5, 1e6, 32000, 16384, False, None),
    "code-llama-70b-instruct": (8, 1e-5, 1e4, 32016, 4096, False, None),
    "llama-3-8b": (8, 1e-5, 5e5, 128256, 8192, False, None),
    "llama-3.1-405b": (8, 1e-5, 5e5, 128256, 131072, False, 8.0),
    "llama-3.2-1b": (8, 1e-5, 5e5, 128256, 131072, True, 32.0),
    "llama-3.2-3b": (8, 1e-5, 5e5, 128256, 131072, True, 32.0),
    "llama-3.3-70b": (8, 1e-5, 5e5, 128256, 131072, False, 8.0),
}

RELEASED = [name for name, preset in PRESETS.items() if preset.published is not None]
RELEASED_MULTIMODAL = [name for name, preset in MULTIMODAL_PRESETS.items() if preset.published is not None]


def dense_formula(a: ModelArgs) -> int:
    """The closed-form count, written out again: embeddings (+ output unless tied), final norm, L blocks."""
    attention = a.dim * a.n_heads * a.head_dim * 2 + 2 * a.dim * a.n_kv_heads * a.head_dim
    block = attention + 3 * a.dim * a.ffn_hidden_dim + 2 * a.dim
    return a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2) + a.dim + a.n_layers * block


def test_every_released_preset_is_in_the_published_table():
    assert set(RELEASED) == set(PUBLISHED), "a preset was added or removed: update PUBLISHED from the release"
    for name in ["llama-7b", "llama-2-70b", "code-llama-34b", "llama-3.1-405b", "llama-3.2-1b"]:  # issue's names
        assert name in list_models()


@pytest.mark.parametrize("name", RELEASED)
def test_parameter_count_on_meta_device_equals_published(name):
    published, ffn = PUBLISHED[name]
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = module_for(args)  # the text Transformer, or Llama4Multimodal for the -vision presets
    assert model.norm.weight.device.type == "meta"  # nothing was allocated
    unique = {id(p): p for p in model.parameters()}  # tied matrices count once
    assert sum(p.numel() for p in unique.values()) == published
    assert count_parameters(args) == published
    if ffn is not None:  # dense: Meta's multiple_of / ffn_dim_multiplier rule reproduces HF's intermediate_size
        assert args.ffn_hidden_dim == ffn
        assert dense_formula(args) == published


@pytest.mark.parametrize("name", list(GENERATION_ROWS))
def test_generation_specific_settings(name):
    kv, eps, theta, vocab, ctx, tied, factor = GENERATION_ROWS[name]
    a = ModelArgs.from_name(name)
    assert (a.n_kv_heads, a.norm_eps, a.rope_theta, a.vocab_size, a.max_seq_len, a.tie_word_embeddings) == \
        (kv, eps, theta, vocab, ctx, tied)
    if factor is None:
        assert a.rope_scaling is None
    else:
        r = a.rope_scaling
        assert (r.rope_type, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings) \
            == ("llama3", factor, 1.0, 4.0, 8192)


def test_tied_presets_are_exactly_llama_32():
    tied = {name for name in RELEASED if ModelArgs.from_name(name).tie_word_embeddings}
    assert tied == {"llama-3.2-1b", "llama-3.2-3b"}


def test_from_name_overrides_and_leaves_the_preset_alone():
    a = ModelArgs.from_name("llama-2-7b", max_seq_len=1024)
    assert a.max_seq_len == 1024 and ModelArgs.from_name("llama-2-7b").max_seq_len == 4096


def test_zoo_table_reports_every_preset_matching(capsys):
    from llama import zoo

    assert zoo.main([]) == 0
    out = capsys.readouterr().out
    presets = all_presets()
    exact = [name for name in RELEASED + RELEASED_MULTIMODAL if presets[name].exact]
    shapes = [name for name in RELEASED + RELEASED_MULTIMODAL if not presets[name].exact]
    assert f"{len(exact)}/{len(exact)} released presets reproduce their exact published" in out
    assert f"{len(shapes)}/{len(shapes)} more" in out
    # only releases without an exact published total are marked as counted from their shapes
    assert {name for name in shapes} == {n for n in presets if n.startswith(("llama-7b", "llama-13b", "llama-33b",
                                                                            "llama-65b", "code-llama"))} | {
        "llama-3.2-90b-vision"}
    assert "405,853,388,800" in out and "88,593,355,323*" in out and "6,738,415,616*" in out


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    (dict(dim=100, n_heads=3), ["not divisible by n_heads", "head_dim"]),
    (dict(dim=64, n_heads=4, n_kv_heads=3), ["not divisible by n_kv_heads"]),
    (dict(dim=0), ["dim", "positive integer"]),
    (dict(dim=64.0), ["dim", "positive integer"]),
    (dict(n_layers=-1), ["n_layers", "positive integer"]),
    (dict(n_heads=0), ["n_heads", "positive integer"]),
    (dict(n_kv_heads=0), ["n_kv_heads", "positive integer"]),
    (dict(vocab_size=0), ["vocab_size", "positive integer"]),
    (dict(max_seq_len=0), ["max_seq_len", "positive integer"]),
    (dict(multiple_of=-256), ["multiple_of", "positive integer"]),
    (dict(norm_eps=0.0), ["norm_eps", "> 0"]),
    (dict(rope_theta=-1.0), ["rope_theta", "> 0"]),
    (dict(ffn_dim_multiplier=0.0), ["ffn_dim_multiplier", "> 0"]),
    (dict(head_dim=15), ["head_dim", "even"]),
])
def test_invalid_config_names_problem_and_fix(kwargs, words):
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128)
    with pytest.raises(ValueError) as info:
        ModelArgs(**{**base, **kwargs})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("name,suggestion", [("llama-2-7B", "llama-2-7b"), ("llama3-8b", "llama-3-8b"),
                                             ("llama-3.1-450b", "llama-3.1-405b"), ("codellama-34b", "code-llama-34b")])
def test_unknown_preset_suggests_close_names(name, suggestion):
    with pytest.raises(ValueError) as info:
        ModelArgs.from_name(name)
    assert "unknown model name" in str(info.value) and suggestion in str(info.value)
    assert "list_models()" in str(info.value)


def test_unknown_preset_without_close_match_points_to_the_list():
    with pytest.raises(ValueError, match=r"list_models\(\)"):
        ModelArgs.from_name("gpt-2")


@pytest.mark.parametrize("kwargs,words", [
    (dict(rope_type="ntk-aware", factor=2.0, original_max_position_embeddings=64), ["unknown rope scaling type"]),
    (dict(rope_type="llama3", factor=0.5, original_max_position_embeddings=64), ["factor", ">= 1"]),
])
def test_invalid_rope_scaling(kwargs, words):
    with pytest.raises(ValueError) as info:
        RopeScaling(**kwargs)
    for word in words:
        assert word in str(info.value)
