"""Bad checkpoint input, loading and saving: every error names the problem and the fix.

Each test damages a checkpoint written by `llama.save` or `save_pretrained` (a missing, extra or misshaped key,
a corrupt file, an inconsistent config, a pickled object, mismatched shards, an unknown format, bad save
arguments) and checks the exception type and message.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama.formats.checkpoint as ckpt
from tests.reference.hf import hf_models  # noqa: F401 - pytest fixture
from tests.reference.hf import GENERATIONS
from llama import Transformer
from llama.formats.io import CheckpointError


@pytest.fixture()
def hf_dir(hf_models, tmp_path):
    folder = tmp_path / "hf"
    hf_models(GENERATIONS["llama-2-gqa"]).save_pretrained(folder)
    return folder


@pytest.fixture()
def meta_dir(tmp_path):
    folder = tmp_path / "meta"
    ckpt.save(Transformer(GENERATIONS["llama-2-gqa"]), folder, format="meta", num_shards=2)
    return folder


def _edit_safetensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(hf_dir):
    _edit_safetensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight.*Fix"):
        ckpt.load(hf_dir)


def test_unexpected_key_is_named(hf_dir):
    _edit_safetensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.layers\.0\.self_attn\.lora_A\.weight"):
        ckpt.load(hf_dir)


def test_misshaped_key_is_named_with_both_shapes(hf_dir):
    _edit_safetensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: \[16, 64\] in the weights, \[32, 64\] from"):
        ckpt.load(hf_dir)


def test_config_inconsistent_with_weights(hf_dir, meta_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys .*model\.layers\.2\..*config\.json belongs to"):
        ckpt.load(hf_dir)
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "n_kv_heads": 1}))
    with pytest.raises(CheckpointError, match=r"wk\.weight: 2 ranks for 1 KV heads should repeat .*check n_kv_heads"):
        ckpt.load(meta_dir)  # 2 ranks, 1 KV head: each rank would hold a copy of the same head
    single = meta_dir.parent / "single"
    ckpt.save(Transformer(GENERATIONS["llama-2-gqa"]), single, format="meta")
    (single / "params.json").write_text(json.dumps({**params, "n_kv_heads": 1}))
    with pytest.raises(CheckpointError, match=r"attention\.wk\.weight: \[32, 64\] in the weights, \[16, 64\] from "
                                              r".*params\.json"):
        ckpt.load(single)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_safetensors(hf_dir, damage):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(os.urandom(1000) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors file is corrupt or truncated.*"
                                              r"re-download"):
        ckpt.load(hf_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_meta_shard(meta_dir, damage):
    path = meta_dir / "consolidated.01.pth"
    data = path.read_bytes()
    path.write_bytes(os.urandom(1000) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: the file is corrupt or truncated.*re-download"):
        ckpt.load(meta_dir)


def test_corrupt_json(hf_dir):
    (hf_dir / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON.*restore it"):
        ckpt.load(hf_dir)


class NotATensor:
    pass


def test_pickled_objects_are_refused(meta_dir):
    torch.save({"tok_embeddings.weight": NotATensor()}, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"objects other than tensors.*weights_only=True"):
        ckpt.load(meta_dir)


def test_missing_shard_in_sequence(meta_dir):
    shutil.copy(meta_dir / "consolidated.01.pth", meta_dir / "consolidated.03.pth")
    with pytest.raises(CheckpointError, match=r"missing \[2\]\); restore the missing consolidated\.NN\.pth"):
        ckpt.load(meta_dir)


def test_shards_with_different_keys(meta_dir):
    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.feed_forward.w3.weight"]
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"shards disagree on their keys.*w3\.weight.*restore a matching set"):
        ckpt.load(meta_dir)


def test_shards_with_different_shapes(meta_dir):
    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-8]
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"shards of layers\.0\.feed_forward\.w1\.weight have mismatched "
                                              r"shapes \(consolidated\.00\.pth: \[96, 64\], "
                                              r"consolidated\.01\.pth: \[88, 64\]\)"):
        ckpt.load(meta_dir)


def test_shards_from_different_checkpoints(meta_dir, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(123)
    ckpt.save(Transformer(GENERATIONS["llama-2-gqa"]), other, format="meta", num_shards=2)
    shard = torch.load(other / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1  # replicated gains must agree across ranks
    torch.save(shard, meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"norm\.weight is replicated on every rank but consolidated\.01\.pth "
                                              r"differs"):
        ckpt.load(meta_dir)


def test_three_shards_for_a_two_shard_params(meta_dir):
    shutil.copy(meta_dir / "consolidated.01.pth", meta_dir / "consolidated.02.pth")  # wrong shard count
    with pytest.raises(CheckpointError, match=r"the 3 consolidated\.NN\.pth files \(one extra or missing\?\)"):
        ckpt.load(meta_dir)


def test_hf_index_naming_missing_shard(hf_models, tmp_path):
    hf_models(GENERATIONS["llama-2-gqa"]).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard files that are not in .*{victim.name}.*copy every shard"):
        ckpt.load(tmp_path)


def test_unknown_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"neither params\.json \+ consolidated\.NN\.pth .* found "
                                              r"\['notes.txt'\]"):
        ckpt.load(tmp_path)
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint folder"):
        ckpt.load(tmp_path / "notes.txt")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pass that folder"):
        ckpt.load(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="both params.json .* and config.json .*format='meta'"):
        ckpt.load(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'"):
        ckpt.load(tmp_path, format="gguf")


def test_weights_missing_next_to_config(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no weights .*copy the weight files next to config\.json"):
        ckpt.load(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(CheckpointError, match=r"no consolidated\.NN\.pth weight files; copy the weights"):
        ckpt.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "describes a 'mistral' model"),
    ({"hidden_act": "gelu"}, "'hidden_act': 'gelu'"),
    ({"attention_bias": True}, "'attention_bias': True"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "cannot use its RoPE scaling"),
])
def test_unsupported_hf_configs(hf_dir, change, message):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(hf_dir)


def test_vision_params_are_refused(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "vision_chunk_size": 560}))
    with pytest.raises(CheckpointError, match="Meta's layout of Llama 3.2 Vision.*load the Hugging Face folder"):
        ckpt.load(meta_dir)


def test_bad_save_arguments(tmp_path):
    model = Transformer(GENERATIONS["llama-2-gqa"])
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'"):
        ckpt.save(model, tmp_path / "a", format="gguf")
    with pytest.raises(CheckpointError, match=r"cannot split into 3 .*n_heads=4.*choose num_shards"):
        ckpt.save(model, tmp_path / "b", format="meta", num_shards=3)
    with pytest.raises(ValueError, match="use max_shard_size"):
        ckpt.save(model, tmp_path / "c", format="hf", num_shards=2)
    with pytest.raises(CheckpointError, match="max_shard_size 'big' is not a size"):
        ckpt.save(model, tmp_path / "d", format="hf", max_shard_size="big")
    with pytest.raises(TypeError, match="needs a llama.Transformer"):
        ckpt.save(torch.nn.Linear(2, 2), tmp_path / "e")
    ckpt.save(model, tmp_path / "f", format="meta")
    with pytest.raises(CheckpointError, match="already holds a Meta checkpoint .*empty folder"):
        ckpt.save(model, tmp_path / "f", format="hf")


def test_adapter_parameters_must_be_merged_before_saving(tmp_path):
    model = Transformer(GENERATIONS["llama-2-gqa"])
    model.layers[0].attention.wq.lora_A = torch.nn.Parameter(torch.zeros(2, 64))
    with pytest.raises(CheckpointError, match=r"outside the base architecture .*lora_A.*merge adapter weights"):
        ckpt.save(model, tmp_path, format="hf")


def test_tied_config_with_different_lm_head(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs .*set tie_word_embeddings to false"):
        ckpt.load(hf_dir)
