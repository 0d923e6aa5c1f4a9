"""Property-based tests (hypothesis): NF4 quantisation, config parsing, and the chat and infilling prompt builders
hold their invariants on generated inputs, not only on the hand-picked ones of the other tests.

Examples are derandomised (the same on every run and machine) and nothing is written to a hypothesis database.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernels import nf4_quantize
from kernels.nf4 import BLOCKSIZES, nf4_code
from kernels.nf4_dequant import absmax_float32, nf4_dequantize_reference
from llama import ModelArgs, RopeScaling, Tokenizer
from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat
from llama.formats.hf import args_from_config, config_from_args
from llama.formats.io import CheckpointError
from llama.formats.meta import args_from_params, params_from_args
from tests.tokenizer_files import sample_text, train_bpe_ranks, train_sentencepiece, write_ranks

PROPERTIES = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# =====================================================================================================================
# NF4: quantise -> dequantise
# =====================================================================================================================

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_GAP = float(nf4_code().diff().max()) / 2  # the widest distance from a value to its nearest NF4 code
CLAMP = 1e-38  # bitsandbytes' floor on absmax before the reciprocal (and ours: kernels/nf4.py)


@st.composite
def weights(draw) -> torch.Tensor:
    """A weight of 1 or 2 dims (odd sizes, partial blocks), values of one magnitude scale per draw: zeros, float32
    subnormals, ordinary values and values near the dtype's largest finite number all occur."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(1, 97), min_size=1, max_size=2))
    top = math.log10(torch.finfo(dtype).max) - 0.5
    scale = 10.0 ** draw(st.floats(-42.0 if dtype == torch.float32 else -6.0, top))
    seed = draw(st.integers(0, 2**16))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    zeros = draw(st.floats(0.0, 1.0))
    w = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < zeros, 0.0, w)
    return w.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)


def block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |w| per block of the flattened weight (the last block may be partial)."""
    flat = w.reshape(-1).float().abs()
    return torch.stack([block.max() for block in flat.split(blocksize)])


@PROPERTIES
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES[:4]), double_quant=st.booleans())
def test_nf4_round_trip_error_is_within_half_a_code_gap_of_each_block(w, blocksize, double_quant):
    """|w - dequant(quant(w))| <= half the widest NF4 gap x the stored absmax, + the stored absmax's own error
    (double quantisation), + one rounding to the output dtype. Blocks whose absmax is below 1e-38 (float32
    subnormals) are quantised against the 1e-38 floor, as in bitsandbytes: their values (all below 1e-38) may be
    lost, an absolute error under 1e-38."""
    q = nf4_quantize(w, blocksize, double_quant)
    out = nf4_dequantize_reference(q)
    assert out.shape == w.shape and out.dtype == w.dtype and bool(torch.isfinite(out).all())
    exact, stored = block_absmax(w, blocksize), absmax_float32(q)
    per_block = HALF_GAP * stored + (stored - exact).abs() + torch.where(exact < CLAMP, CLAMP, 0.0) \
        + torch.finfo(w.dtype).eps * exact
    bound = per_block.repeat_interleave(blocksize)[: w.numel()].reshape(w.shape)
    assert bool(((out.float() - w.float()).abs() <= bound).all())


@PROPERTIES
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES[:4]))
def test_nf4_requantising_a_dequantised_weight_gives_the_same_codes(w, blocksize):
    """Every dequantised value is code x absmax and each block keeps its absmax (its largest element has code +-1),
    so quantisation is a fixed point: no drift when a QLoRA base is dequantised and quantised again."""
    w = w.float()
    absmax = block_absmax(w, blocksize)
    assume(not bool(((absmax > 0) & (absmax < CLAMP)).any()))  # blocks under the floor lose their values (above)
    q = nf4_quantize(w, blocksize, double_quant=False)
    again = nf4_quantize(nf4_dequantize_reference(q), blocksize, double_quant=False)
    assert torch.equal(again.packed, q.packed) and torch.equal(again.absmax, q.absmax)


@PROPERTIES
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), data=st.data(),
       bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]), dtype=st.sampled_from(DTYPES))
def test_nf4_refuses_nan_and_inf_naming_the_position(shape, data, bad, dtype):
    position = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    w = torch.randn(shape).to(dtype)
    w[position] = bad
    with pytest.raises(ValueError) as info:
        nf4_quantize(w)
    assert f"weight{list(position)} is {bad}" in str(info.value) and "finite" in str(info.value)


@PROPERTIES
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=2), blocksize=st.sampled_from(BLOCKSIZES[:4]),
       double_quant=st.booleans())
def test_nf4_zeros_stay_exact_zeros(shape, blocksize, double_quant):
    assert torch.equal(nf4_dequantize_reference(nf4_quantize(torch.zeros(shape), blocksize, double_quant)),
                       torch.zeros(shape))


# =====================================================================================================================
# Config parsing
# =====================================================================================================================


@st.composite
def dense_args(draw) -> ModelArgs:
    """A consistent dense configuration: GQA groups divide the heads, head_dim even, optional llama3 scaling."""
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    scaling = None
    if draw(st.booleans()):
        scaling = RopeScaling("llama3", factor=draw(st.sampled_from([8.0, 16.0, 32.0])),
                              original_max_position_embeddings=8192)
    return ModelArgs(dim=n_heads * head_dim, n_layers=draw(st.integers(1, 4)), n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=draw(st.integers(2, 5000)), multiple_of=draw(st.sampled_from([16, 32, 256])),
                     ffn_dim_multiplier=draw(st.sampled_from([None, 1.0, 1.3])),
                     norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
                     rope_theta=draw(st.sampled_from([1e4, 5e5, 1e6])), rope_scaling=scaling,
                     max_seq_len=draw(st.sampled_from([128, 2048, 8192])),
                     tie_word_embeddings=draw(st.booleans()))


ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "head_dim", "ffn_hidden_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_word_embeddings")


@PROPERTIES
@given(args=dense_args())
def test_params_json_and_config_json_round_trip_every_architecture_field(args):
    via_meta = args_from_params(json.loads(json.dumps(params_from_args(args))), path=Path("params.json"),
                                max_seq_len=args.max_seq_len)
    via_hf = args_from_config(json.loads(json.dumps(config_from_args(args, torch.bfloat16))), path=Path("config.json"))
    for field in ARCHITECTURE:
        assert getattr(via_hf, field) == getattr(args, field), field
        if field != "tie_word_embeddings":  # Meta's params.json has no field for it (the weights tell)
            assert getattr(via_meta, field) == getattr(args, field), field
    assert via_hf.max_seq_len == via_meta.max_seq_len == args.max_seq_len


INT_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
REAL_FIELDS = ("norm_eps", "rope_theta")
bad_ints = st.one_of(st.integers(max_value=0), st.integers(1, 10**6).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer()),
                     st.booleans(), st.none())
bad_reals = st.one_of(st.floats(max_value=0.0), st.sampled_from([float("nan"), float("inf"), float("-inf")]),
                      st.floats(1e-9, 1e9).map(str), st.booleans())


@PROPERTIES
@given(field=st.sampled_from(INT_FIELDS + REAL_FIELDS), data=st.data())
def test_model_args_refuse_every_bad_value_naming_the_field(field, data):
    value = data.draw(bad_ints if field in INT_FIELDS else bad_reals)
    tiny = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128)
    with pytest.raises(ValueError) as info:
        ModelArgs(**{**tiny, field: value})
    assert f"ModelArgs.{field}" in str(info.value)


CONFIG_NUMBERS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta")


@PROPERTIES
@given(args=dense_args(), field=st.sampled_from(CONFIG_NUMBERS))
def test_config_json_numbers_written_as_strings_are_refused_naming_the_key(args, field):
    config = config_from_args(args, torch.float32)
    config[field] = str(config[field])
    with pytest.raises(CheckpointError) as info:
        args_from_config(config, path=Path("model/config.json"))
    assert "model/config.json" in str(info.value) and repr(field) in str(info.value)


# =====================================================================================================================
# Chat and infilling prompts
# =====================================================================================================================


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("property-tokenizers")
    return {"llama3": Tokenizer(write_ranks(root / "ranks.model", train_bpe_ranks(sample_text(), n_merges=300))),
            "code": Tokenizer(train_sentencepiece(root / "code.model", control_symbols=(
                "▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>", "<step>")))}


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LLAMA2_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


@PROPERTIES
@given(dialog=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "ipython"]),
                                              "content": texts}), min_size=1, max_size=5))
def test_llama3_prompt_is_the_template_and_content_never_forges_a_turn(tokenizers, dialog):
    """Decoded, the prompt is Meta's template with each content stripped; a content that spells a special token
    stays text, so the prompt holds exactly one end-of-turn id per message."""
    tok = tokenizers["llama3"]
    ids = Llama3ChatFormat(tok).encode_dialog_prompt(dialog)
    expected = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in dialog) \
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(ids) == expected
    assert ids[0] == tok.bos_id and ids.count(tok.eot_id) == len(dialog)


@st.composite
def llama2_dialogs(draw) -> list[dict]:
    clean = texts.filter(lambda t: not any(tag in t for tag in LLAMA2_TAGS))
    n = draw(st.integers(0, 2))
    turns = [m for _ in range(n) for m in ({"role": "user", "content": draw(clean)},
                                           {"role": "assistant", "content": draw(clean)})]
    system = [{"role": "system", "content": draw(clean)}] if draw(st.booleans()) else []
    return system + turns + [{"role": "user", "content": draw(clean)}]


@PROPERTIES
@given(dialog=llama2_dialogs())
def test_llama2_prompt_has_one_bos_per_exchange_and_eos_after_each_answer(tokenizers, dialog):
    tok = tokenizers["code"]
    ids = Llama2ChatFormat(tok).encode_dialog_prompt(dialog)
    n_answers = sum(m["role"] == "assistant" for m in dialog)
    assert ids.count(tok.bos_id) == n_answers + 1 and ids.count(tok.eos_id) == n_answers
    assert ids[0] == tok.bos_id and ids[-1] != tok.eos_id  # the last turn is open for the model's answer
    segments = [tok.decode(s) for s in _split(ids, tok.bos_id)]
    assert all(s.startswith("[INST] ") for s in segments) and segments[-1].endswith(" [/INST]")


def _split(ids: list[int], bos: int) -> list[list[int]]:
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    return [ids[a + 1:b] for a, b in zip(starts, starts[1:])]


@PROPERTIES
@given(prefix=texts, suffix=texts, suffix_first=st.booleans())
def test_infilling_prompt_layout_and_lossless_suffix(tokenizers, prefix, suffix, suffix_first):
    """Code Llama §2.3: <s> <PRE> prefix <SUF> suffix <MID> (or <s> <PRE> <SUF> suffix <MID> prefix); the suffix is
    encoded without the implicit leading space, and decoding it back gives exactly the suffix, spaces included."""
    tok = tokenizers["code"]
    suf = tok.encode_infilling(suffix)
    assert tok.decode_infilling(suf) == suffix
    pre = tok.encode(prefix, bos=False, eos=False)
    ids = tok.infilling_prompt(prefix, suffix, suffix_first=suffix_first)
    if suffix_first:
        assert ids == [tok.bos_id, tok.prefix_id, tok.suffix_id] + suf + [tok.middle_id] + pre
    else:
        assert ids == [tok.bos_id, tok.prefix_id] + pre + [tok.suffix_id] + suf + [tok.middle_id]
