"""Parity with Hugging Face `transformers` through real checkpoint files.

Each tiny config (one per generation's distinguishing feature, `tests.reference.hf.GENERATIONS`) is built as a random
HF `LlamaForCausalLM`, written with `save_pretrained` (config.json + safetensors) and read back with `llama.load`.
Logits must agree to a relative error of 1e-10 in float64 and to the float32 bound of tests/reference/tolerance.py
in float32, for both of our attention paths against both of HF's (HF's "eager" path takes its softmax in float32 even
for float64 models, so against it the float64 bound is the float32 one). The other direction: HF's
`from_pretrained` on what `llama.save` writes gives HF's logits, and HF -> ours -> Meta (2 and 4 model-parallel
shards) -> ours -> HF reproduces every tensor bit for bit. HF runs in the reference process
(tests/reference/isolation.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import llama.formats.checkpoint as ckpt
from tests.reference.hf import hf_folders  # noqa: F401 - pytest fixture
from tests.reference.hf import GENERATIONS, hf_logits, random_tokens, relative_error, save_hf_model
from tests.reference.isolation import reference
from tests.reference.tolerance import forward_tolerance

DTYPE_IDS = {torch.float64: "float64", torch.float32: "float32"}
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
               "rope_parameters"]


def tolerance_for(args, tokens, dtype) -> float:
    return 1e-10 if dtype == torch.float64 else forward_tolerance(args, tokens.shape[1], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(GENERATIONS))
def test_logits_match_hf(name, dtype, hf_folders):
    args = GENERATIONS[name]
    folder = hf_folders(args, dtype)
    tokens = random_tokens(args)
    refs = {impl: hf_logits(folder, tokens, dtype=dtype, attn=impl) for impl in ("sdpa", "eager")}
    model = ckpt.load(folder)
    assert model.norm.weight.dtype == dtype  # the stored dtype is kept
    for ours_impl in ("sdpa", "math"):
        model.set_attention_implementation(ours_impl)
        with torch.no_grad():
            logits = model(tokens)
        for hf_impl, ref in refs.items():
            err = relative_error(logits, ref)
            bound = tolerance_for(args, tokens, dtype if hf_impl == "sdpa" else torch.float32)
            assert err <= bound, f"{name} {dtype} ours={ours_impl} hf={hf_impl}: rel. error {err:.2e}"


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_from_pretrained_reads_what_we_save(name, hf_folders, tmp_path):
    args = GENERATIONS[name]
    folder = hf_folders(args)
    tokens = random_tokens(args)
    ckpt.save(ckpt.load(folder), tmp_path / "ours", format="hf")
    assert relative_error(hf_logits(tmp_path / "ours", tokens), hf_logits(folder, tokens)) == 0.0
    config_fields = reference().call("hf_llama.config_fields", str(tmp_path / "ours"), CONFIG_KEYS)
    assert config_fields == reference().call("hf_llama.config_fields", str(folder), CONFIG_KEYS)


def _tensors(folder) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("num_shards", [2, 4])
@pytest.mark.parametrize("name", list(GENERATIONS))
def test_round_trip_hf_meta_hf_is_bit_exact(name, num_shards, hf_folders, tmp_path):
    args = GENERATIONS[name]
    folder = hf_folders(args)
    ckpt.save(ckpt.load(folder), tmp_path / "meta", format="meta", num_shards=num_shards)
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == num_shards
    model = ckpt.load(tmp_path / "meta", max_seq_len=args.max_seq_len)
    assert model.args.tie_word_embeddings == args.tie_word_embeddings
    ckpt.save(model, tmp_path / "hf", format="hf")

    before, after = _tensors(folder), _tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    config_before = json.loads((folder / "config.json").read_text())
    config_after = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in CONFIG_KEYS:
        assert config_after[key] == config_before[key], key


def test_hf_sharded_index_written_by_transformers(tmp_path):
    args = GENERATIONS["llama-2-gqa"]
    save_hf_model(args, tmp_path, dtype=torch.float32, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = random_tokens(args)
    err = relative_error(ckpt.load(tmp_path)(tokens), hf_logits(tmp_path, tokens, dtype=torch.float32))
    assert err <= tolerance_for(args, tokens, torch.float32)


def test_our_sharded_hf_output_loads_in_transformers(hf_folders, tmp_path):
    args = GENERATIONS["llama-3.1-scaled-rope"]
    folder = hf_folders(args)
    ckpt.save(ckpt.load(folder), tmp_path, format="hf", max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    tokens = random_tokens(args)
    assert relative_error(hf_logits(tmp_path, tokens), hf_logits(folder, tokens)) == 0
