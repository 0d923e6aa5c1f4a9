"""The bad-input catalogue: calls to the public entry points with bad arguments, files or folders, each with the
error it must raise and the words its message must contain (the field or file at fault, and the fix).

    python -m tests.bad_inputs [--json FILE]     # the probe: per area, how many are clear, cryptic, accepted, changed

`tests/test_bad_inputs.py` requires every case to be "clear" (machinery and outcomes: `tests/bad_input_probe.py`).
This file holds the model, config, checkpoint, load/save and converter cases; `bad_inputs_runtime.py` the tokenizer,
chat-format, generation and adapter cases.
A case that writes (llama.save, the converter) or attaches (peft.load_adapter) watches the folder or model it
could damage, and is "changed", not clear, if the call modified it before refusing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import llama
from llama import ModelArgs, MoEArgs, RopeScaling
from llama.formats.io import CheckpointError
from tests.bad_input_probe import (ARGS, INF, NAN, REMOVE, TINY, Case, CommandLineError, Workspace, adder, convert,
                                   damage, edit_json, edit_tensors, lora_model, model, probe)
from tests.bad_inputs_runtime import CASES as RUNTIME_CASES

CASES: list[Case] = []
add = adder(CASES)


class NotATensor:  # pickled into a shard: weights_only=True must refuse it
    pass


# =====================================================================================================================
# ModelArgs, RopeScaling, MoEArgs: every field's type, finiteness and range


def model_args(**over):
    return lambda ws: ModelArgs(**{**TINY, **over})


for field, value, words in [
    ("dim", "64", ["ModelArgs.dim", "remove the quotes"]), ("dim", 64.0, ["ModelArgs.dim", "positive integer"]),
    ("dim", 0, ["ModelArgs.dim", "positive integer"]), ("dim", True, ["ModelArgs.dim", "positive integer"]),
    ("dim", None, ["ModelArgs.dim", "positive integer"]), ("n_layers", -1, ["ModelArgs.n_layers", "positive"]),
    ("n_layers", "2", ["ModelArgs.n_layers", "remove the quotes"]), ("n_heads", 0, ["ModelArgs.n_heads", "positive"]),
    ("n_heads", 3, ["not divisible by n_heads", "head_dim"]), ("n_heads", 2.5, ["ModelArgs.n_heads", "integer"]),
    ("n_kv_heads", 0, ["ModelArgs.n_kv_heads", "positive"]), ("n_kv_heads", 3, ["not divisible by n_kv_heads"]),
    ("n_kv_heads", "2", ["ModelArgs.n_kv_heads", "remove the quotes"]),
    ("vocab_size", 0, ["ModelArgs.vocab_size", "positive"]), ("vocab_size", "256", ["ModelArgs.vocab_size", "quotes"]),
    ("vocab_size", None, ["ModelArgs.vocab_size"]), ("multiple_of", -256, ["ModelArgs.multiple_of", "positive"]),
    ("multiple_of", 0.5, ["ModelArgs.multiple_of", "integer"]), ("max_seq_len", 0, ["ModelArgs.max_seq_len"]),
    ("max_seq_len", "2048", ["ModelArgs.max_seq_len", "quotes"]), ("max_seq_len", INF, ["ModelArgs.max_seq_len"]),
    ("head_dim", 15, ["head_dim", "even"]), ("head_dim", -2, ["ModelArgs.head_dim", "positive"]),
    ("head_dim", "16", ["ModelArgs.head_dim", "quotes"]), ("ffn_hidden_dim", 0, ["ModelArgs.ffn_hidden_dim"]),
    ("ffn_hidden_dim", "192", ["ModelArgs.ffn_hidden_dim", "quotes"]),
    ("nope_layer_interval", 0, ["ModelArgs.nope_layer_interval"]),
    ("nope_layer_interval", "4", ["ModelArgs.nope_layer_interval", "quotes"]),
    ("attention_chunk_size", -8, ["ModelArgs.attention_chunk_size"]),
    ("norm_eps", 0.0, ["ModelArgs.norm_eps", "> 0"]), ("norm_eps", -1e-5, ["ModelArgs.norm_eps", "> 0"]),
    ("norm_eps", NAN, ["ModelArgs.norm_eps", "finite"]), ("norm_eps", INF, ["ModelArgs.norm_eps", "finite"]),
    ("norm_eps", "1e-5", ["ModelArgs.norm_eps", "quotes"]), ("norm_eps", True, ["ModelArgs.norm_eps", "number"]),
    ("rope_theta", -1.0, ["ModelArgs.rope_theta", "> 0"]), ("rope_theta", 0, ["ModelArgs.rope_theta", "> 0"]),
    ("rope_theta", NAN, ["ModelArgs.rope_theta", "finite"]), ("rope_theta", INF, ["ModelArgs.rope_theta", "finite"]),
    ("rope_theta", "1e4", ["ModelArgs.rope_theta", "quotes"]),
    ("ffn_dim_multiplier", 0.0, ["ModelArgs.ffn_dim_multiplier", "> 0"]),
    ("ffn_dim_multiplier", NAN, ["ModelArgs.ffn_dim_multiplier", "finite"]),
    ("ffn_dim_multiplier", "1.3", ["ModelArgs.ffn_dim_multiplier", "quotes"]),
    ("floor_scale", 0, ["ModelArgs.floor_scale", "> 0"]), ("floor_scale", NAN, ["ModelArgs.floor_scale", "finite"]),
    ("attn_scale", -0.1, ["ModelArgs.attn_scale", ">= 0"]), ("attn_scale", INF, ["ModelArgs.attn_scale", "finite"]),
    ("ffn_exp", NAN, ["ModelArgs.ffn_exp", "finite"]),
    ("tie_word_embeddings", "false", ["ModelArgs.tie_word_embeddings", "true or false"]),
    ("tie_word_embeddings", 1, ["ModelArgs.tie_word_embeddings", "true or false"]),
    ("use_qk_norm", "true", ["ModelArgs.use_qk_norm", "without quotes"]),
    ("attn_temperature_tuning", None, ["ModelArgs.attn_temperature_tuning"]),
    ("rope_complex64", "no", ["ModelArgs.rope_complex64"]), ("name", 5, ["ModelArgs.name", "string"]),
    ("rope_scaling", [8.0], ["ModelArgs.rope_scaling", "RopeScaling"]),
    ("rope_scaling", {"factor": 8.0, "original_max_position_embeddings": 64, "scale": 2}, ["unknown fields", "scale"]),
    ("moe_args", "16", ["ModelArgs.moe_args", "MoEArgs"]), ("moe_args", {"experts": 4}, ["unknown fields", "experts"]),
    ("moe_args", MoEArgs(), ["ffn_exp", "moe_hidden_dim"]),
]:
    add("ModelArgs", f"{field}={value!r}", model_args(**{field: value}), ValueError, *words)
add("ModelArgs", "MoE step 3 on 2 layers", model_args(ffn_exp=2.0, moe_args=MoEArgs(interleave_moe_layer_step=3)),
    ValueError, "interleave_moe_layer_step (3) must divide n_layers (2)")
add("ModelArgs", "unknown field", model_args(dims=64), TypeError, "dims")
add("ModelArgs", "unknown preset", lambda ws: ModelArgs.from_name("llama-2-7B"), ValueError, "unknown model name",
    "llama-2-7b")
add("ModelArgs", "unknown preset override", lambda ws: ModelArgs.from_name("tiny-llama-1", n_layer=3), TypeError,
    "n_layer")


def rope(**kw):
    return lambda ws: RopeScaling(**kw)


L3 = dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64)
for name, kw, words in [
    ("unknown type", dict(rope_type="ntk", factor=2.0), ["unknown rope scaling type 'ntk'"]),
    ("yarn without factor", dict(rope_type="yarn", original_max_position_embeddings=8), ["needs `factor`"]),
    ("factor NaN", {**L3, "factor": NAN}, ["RopeScaling.factor", "finite"]),
    ("factor inf", {**L3, "factor": INF}, ["RopeScaling.factor", "finite"]),
    ("factor 0.5", {**L3, "factor": 0.5}, ["RopeScaling.factor", ">= 1"]),
    ("factor '8'", {**L3, "factor": "8"}, ["RopeScaling.factor", "quotes"]),
    ("llama3 without L0", dict(rope_type="llama3", factor=8.0), ["needs `original_max_position_embeddings`"]),
    ("L0 = 0", {**L3, "original_max_position_embeddings": 0}, ["original_max_position_embeddings", "positive"]),
    ("L0 '8192'", {**L3, "original_max_position_embeddings": "8192"}, ["original_max_position_embeddings", "quotes"]),
    ("L0 = 8192.5", {**L3, "original_max_position_embeddings": 8192.5}, ["original_max_position_embeddings"]),
    ("low > high", {**L3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, ["high_freq_factor >= low_freq_factor"]),
    ("low NaN", {**L3, "low_freq_factor": NAN}, ["RopeScaling.low_freq_factor", "finite"]),
    ("yarn betas", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=1.0,
                        beta_slow=2.0), ["beta_fast > beta_slow"]),
    ("attention_factor -1", {**L3, "attention_factor": -1.0}, ["RopeScaling.attention_factor", "> 0"]),
    ("attention_factor NaN", {**L3, "attention_factor": NAN}, ["RopeScaling.attention_factor", "finite"]),
    ("mscale NaN", {**L3, "mscale": NAN}, ["RopeScaling.mscale", "finite"]),
    ("truncate 'yes'", {**L3, "truncate": "yes"}, ["RopeScaling.truncate", "true or false"]),
]:
    add("RopeScaling", name, rope(**kw), ValueError, *words)
add("RopeScaling", "unknown HF key", lambda ws: RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0,
                                                                       "short_factor": [1.0]}),
    ValueError, "unsupported rope scaling keys ['short_factor']")

for name, kw, words in [
    ("num_experts 0", dict(num_experts=0), ["MoEArgs.num_experts", "positive"]),
    ("num_experts '4'", dict(num_experts="4"), ["MoEArgs.num_experts", "quotes"]),
    ("top_k > E", dict(num_experts=4, top_k=5), ["top_k (5) is larger than num_experts (4)"]),
    ("top_k 0", dict(top_k=0), ["MoEArgs.top_k", "positive"]),
    ("step 0", dict(interleave_moe_layer_step=0), ["MoEArgs.interleave_moe_layer_step"]),
    ("capacity_factor NaN", dict(capacity_factor=NAN), ["MoEArgs.capacity_factor", "finite"]),
    ("capacity_factor 0", dict(capacity_factor=0.0), ["MoEArgs.capacity_factor", "> 0"]),
    ("expert_capacity_factor 0", dict(expert_capacity_factor=0), ["MoEArgs.expert_capacity_factor", "> 0"]),
    ("load_balance_coef -1", dict(load_balance_coef=-1.0), ["MoEArgs.load_balance_coef", ">= 0"]),
    ("router_z_loss_coef NaN", dict(router_z_loss_coef=NAN), ["MoEArgs.router_z_loss_coef", "finite"]),
    ("shared_expert 'yes'", dict(shared_expert="yes"), ["MoEArgs.shared_expert", "true or false"]),
]:
    add("MoEArgs", name, lambda ws, kw=kw: MoEArgs(**kw), ValueError, *words)


# =====================================================================================================================
# params.json and config.json fields (numbers as strings, NaN, ranges)


def edited_config(kind: str, name: str, changes: dict):
    """llama.load on a copy of a pristine checkpoint whose params.json / config.json got `changes`."""
    def run(ws: Workspace):
        folder = ws.copy(kind)
        edit_json(folder / name, changes)
        llama.load(folder)
    return run


for name, changes, words in [
    ("dim '64'", dict(dim="64"), ["params.json", "'dim'", "remove the quotes"]),
    ("n_heads '4'", dict(n_heads="4"), ["params.json", "'n_heads'", "quotes"]),
    ("n_layers 2.0", dict(n_layers=2.0), ["params.json", "'n_layers'", "integer"]),
    ("norm_eps '1e-5'", dict(norm_eps="1e-5"), ["params.json", "'norm_eps'", "quotes"]),
    ("norm_eps NaN", dict(norm_eps=NAN), ["params.json", "'norm_eps'", "finite"]),
    ("rope_theta Infinity", dict(rope_theta=INF), ["params.json", "'rope_theta'", "finite"]),
    ("use_scaled_rope 'true'", dict(use_scaled_rope="true"), ["params.json", "'use_scaled_rope'", "true or false"]),
    ("rope_scaling_factor '8'", dict(use_scaled_rope=True, rope_scaling_factor="8"),
     ["params.json", "'rope_scaling_factor'", "quotes"]),
    ("rope_scaling_factor NaN", dict(use_scaled_rope=True, rope_scaling_factor=NAN),
     ["params.json", "'rope_scaling_factor'", "finite"]),
    ("rope_scaling_factor 0.5", dict(use_scaled_rope=True, rope_scaling_factor=0.5),
     ["params.json", "field 'rope_scaling_factor'", ">= 1"]),
    ("n_kv_heads 3", dict(n_kv_heads=3), ["params.json", "field 'n_kv_heads'", "not divisible"]),
    ("vocab_size '256'", dict(vocab_size="256"), ["params.json", "'vocab_size'", "quotes"]),
    ("multiple_of 0", dict(multiple_of=0), ["params.json", "'multiple_of'", "positive"]),
    ("max_seq_len -5", dict(max_seq_len=-5), ["params.json", "'max_seq_len'", "positive"]),
    ("head_dim '16'", dict(head_dim="16"), ["params.json", "'head_dim'", "quotes"]),
    ("ffn_dim_multiplier '1.3'", dict(ffn_dim_multiplier="1.3"), ["params.json", "'ffn_dim_multiplier'", "quotes"]),
    ("no dim", dict(dim=REMOVE), ["params.json has no 'dim' field", "restore the original"]),
    ("vision params", dict(vision_chunk_size=560), ["Meta's layout of Llama 3.2 Vision", "Hugging Face folder"]),
]:
    add("params.json", name, edited_config("meta-single", "params.json", changes), CheckpointError, *words)


def write_file(kind: str, name: str, content: str):
    def run(ws: Workspace):
        folder = ws.copy(kind)
        (folder / name).write_text(content)
        llama.load(folder)
    return run


add("params.json", "a JSON list", write_file("meta-single", "params.json", "[1, 2]"), CheckpointError,
    "params.json must hold a JSON object")
add("params.json", "cut JSON", write_file("meta-single", "params.json", '{"dim": 64,'), CheckpointError,
    "params.json is not valid JSON", "restore it")


for name, changes, words in [
    ("hidden_size '64'", dict(hidden_size="64"), ["config.json", "'hidden_size'", "remove the quotes"]),
    ("num_hidden_layers '2'", dict(num_hidden_layers="2"), ["config.json", "'num_hidden_layers'", "quotes"]),
    ("rms_norm_eps NaN", dict(rms_norm_eps=NAN), ["config.json", "'rms_norm_eps'", "finite"]),
    ("rope_theta '1e4'", dict(rope_theta="1e4"), ["config.json", "'rope_theta'", "quotes"]),
    ("rope_parameters.rope_theta '1e4'", dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     ["config.json (rope_parameters)", "'rope_theta'", "quotes"]),
    ("rope_parameters a list", dict(rope_parameters=[1]), ["config.json", "'rope_parameters' must be a JSON object"]),
    ("rope_scaling factor '8'", dict(rope_scaling={"rope_type": "linear", "factor": "8"}),
     ["config.json (rope_scaling)", "'factor'", "quotes"]),
    ("tie_word_embeddings 'false'", dict(tie_word_embeddings="false"),
     ["config.json", "'tie_word_embeddings'", "true or false"]),
    ("max_position_embeddings 0", dict(max_position_embeddings=0), ["config.json", "'max_position_embeddings'"]),
    ("intermediate_size -1", dict(intermediate_size=-1), ["config.json", "'intermediate_size'", "positive"]),
    ("head_dim '16'", dict(head_dim="16"), ["config.json", "'head_dim'", "quotes"]),
    ("vocab_size 0", dict(vocab_size=0), ["config.json", "'vocab_size'", "positive"]),
    ("num_key_value_heads 3", dict(num_key_value_heads=3), ["config.json", "field 'num_key_value_heads'",
                                                            "not divisible"]),
    ("no vocab_size", dict(vocab_size=REMOVE), ["has no 'vocab_size'", "LlamaConfig"]),
    ("model_type mistral", dict(model_type="mistral"), ["describes a 'mistral' model"]),
    ("hidden_act gelu", dict(hidden_act="gelu"), ["'hidden_act': 'gelu'"]),
    ("attention_bias", dict(attention_bias=True), ["'attention_bias': True"]),
    ("longrope", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), ["cannot use its RoPE scaling"]),
    ("tied but lm_head differs", dict(tie_word_embeddings=True), ["lm_head.weight differs",
                                                                  "set tie_word_embeddings to false"]),
]:
    add("config.json", name, edited_config("hf", "config.json", changes), CheckpointError, *words)
add("config.json", "cut JSON", write_file("hf", "config.json", '{"hidden_size": 64,'), CheckpointError,
    "config.json is not valid JSON", "restore it")


# =====================================================================================================================
# Damaged checkpoint files and folders


def damaged(kind: str, edit):
    def run(ws: Workspace):
        folder = ws.copy(kind)
        edit(folder)
        llama.load(folder)
    return run


def hf_tensors(edit):
    return lambda folder: edit_tensors(folder / "model.safetensors", edit)


def meta_shard(edit, shard: str = "consolidated.01.pth"):
    def apply(folder):
        tensors = torch.load(folder / shard, weights_only=True)
        edit(tensors)
        torch.save(tensors, folder / shard)
    return apply


def other_checkpoint_norm(folder):
    tensors = torch.load(folder / "consolidated.01.pth", weights_only=True)
    tensors["norm.weight"] = tensors["norm.weight"] + 1  # replicated gains must agree across ranks
    torch.save(tensors, folder / "consolidated.01.pth")


def index_points_elsewhere(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def overlapping_shards(folder):
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    extra = next(iter(load_file(str(first)).items()))
    edit_tensors(second, lambda t: t.update([extra]))


def with_files(*names):
    return lambda folder: [(folder / name).write_text("{}") for name in names]


for name, kind, edit, error, words in [
    ("missing key", "hf", hf_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), CheckpointError,
     ["missing keys (1): model.layers.1.mlp.up_proj.weight", "Fix"]),
    ("unexpected key", "hf", hf_tensors(lambda t: t.update({"model.layers.0.self_attn.lora_A.weight": torch.zeros(2)})),
     CheckpointError, ["unexpected keys (1): model.layers.0.self_attn.lora_A.weight"]),
    ("mis-shaped key", "hf", hf_tensors(lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                           torch.zeros(16, 64)})),
     CheckpointError, ["k_proj.weight: [16, 64] in the weights, [32, 64] from"]),
    ("config for 3 layers", "hf", lambda f: edit_json(f / "config.json", {"num_hidden_layers": 3}), CheckpointError,
     ["missing keys", "model.layers.2.", "config.json belongs to"]),
    ("2 ranks for 1 KV head", "meta", lambda f: edit_json(f / "params.json", {"n_kv_heads": 1}), CheckpointError,
     ["wk.weight: 2 ranks for 1 KV heads should repeat", "check n_kv_heads"]),
    ("params for 1 KV head", "meta-single", lambda f: edit_json(f / "params.json", {"n_kv_heads": 1}),
     CheckpointError, ["attention.wk.weight: [32, 64] in the weights, [16, 64] from", "params.json"]),
    ("safetensors garbage", "hf", lambda f: damage(f / "model.safetensors", "garbage"), CheckpointError,
     ["model.safetensors: the safetensors file is corrupt or truncated", "re-download"]),
    ("safetensors truncated", "hf", lambda f: damage(f / "model.safetensors", "truncated"), CheckpointError,
     ["model.safetensors: the safetensors file is corrupt or truncated", "re-download"]),
    ("shard garbage", "meta", lambda f: damage(f / "consolidated.01.pth", "garbage"), CheckpointError,
     ["consolidated.01.pth: the file is corrupt or truncated", "re-download"]),
    ("shard truncated", "meta", lambda f: damage(f / "consolidated.01.pth", "truncated"), CheckpointError,
     ["consolidated.01.pth: the file is corrupt or truncated", "re-download"]),
    ("pickled object", "meta", lambda f: torch.save({"tok_embeddings.weight": NotATensor()},
                                                    f / "consolidated.01.pth"),
     CheckpointError, ["objects other than tensors", "weights_only=True"]),
    ("shard 2 missing", "meta", lambda f: shutil.copy(f / "consolidated.01.pth", f / "consolidated.03.pth"),
     CheckpointError, ["missing [2]); restore the missing consolidated.NN.pth"]),
    ("shards with other keys", "meta", meta_shard(lambda t: t.pop("layers.1.feed_forward.w3.weight")),
     CheckpointError, ["shards disagree on their keys", "w3.weight", "restore a matching set"]),
    ("shards with other shapes", "meta", meta_shard(lambda t: t.update(
        {"layers.0.feed_forward.w1.weight": t["layers.0.feed_forward.w1.weight"][:-8]})), CheckpointError,
     ["shards of layers.0.feed_forward.w1.weight have mismatched shapes (consolidated.00.pth: [96, 64], "
      "consolidated.01.pth: [88, 64])"]),
    ("shards of two checkpoints", "meta", other_checkpoint_norm, CheckpointError,
     ["norm.weight is replicated on every rank but consolidated.01.pth differs"]),
    ("3 shards for 2", "meta", lambda f: shutil.copy(f / "consolidated.01.pth", f / "consolidated.02.pth"),
     CheckpointError, ["the 3 consolidated.NN.pth files (one extra or missing?)"]),
    ("single file and shards", "meta", lambda f: shutil.copy(f / "consolidated.01.pth", f / "consolidated.pth"),
     CheckpointError, ["holds both consolidated.pth and consolidated.NN.pth shards"]),
    ("index names a missing shard", "hf-sharded", lambda f: sorted(f.glob("model-*.safetensors"))[1].unlink(),
     CheckpointError, ["lists shard files that are not in", "model-00002-of-", "copy every shard"]),
    ("index without weight_map", "hf-sharded", lambda f: (f / "model.safetensors.index.json").write_text("{}"),
     CheckpointError, ["has no 'weight_map'", "restore it"]),
    ("index from another save", "hf-sharded", index_points_elsewhere, CheckpointError,
     ["in shards that do not hold them", "restore a matching set"]),
    ("overlapping shards", "hf-sharded", overlapping_shards, CheckpointError,
     ["appears in both", "the shards overlap"]),
    ("config without weights", "hf", lambda f: (f / "model.safetensors").unlink(), CheckpointError,
     ["no weights", "copy the weight files next to config.json"]),
    ("params without shards", "meta", lambda f: [p.unlink() for p in f.glob("consolidated.*.pth")], CheckpointError,
     ["no consolidated.NN.pth weight files; copy the weights"]),
    ("both formats", "hf", with_files("params.json"), CheckpointError, ["both params.json", "format='meta'"]),
]:
    add("checkpoint files", name, damaged(kind, edit), error, *words)


def load_path(make):
    def run(ws: Workspace):
        llama.load(make(ws.tmp))
    return run


def notes_only(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("hi")
    return tmp


def hub_download_root(tmp: Path) -> Path:
    (tmp / "original").mkdir()
    (tmp / "original" / "params.json").write_text("{}")
    return tmp


add("checkpoint files", "no such folder", load_path(lambda tmp: tmp / "nowhere"), FileNotFoundError,
    "does not exist", "params.json (Meta) or config.json")
add("checkpoint files", "a file, not a folder", load_path(lambda tmp: notes_only(tmp) / "notes.txt"),
    CheckpointError, "is a file; pass the checkpoint folder")
add("checkpoint files", "not a checkpoint", load_path(notes_only), CheckpointError,
    "neither params.json + consolidated.NN.pth", "found ['notes.txt']")
add("checkpoint files", "the hub folder above original/", load_path(hub_download_root), CheckpointError,
    "pass that folder")


# =====================================================================================================================
# llama.load and llama.save arguments


def load_with(**kw):
    return lambda ws: llama.load(ws.copy("hf"), **kw)


LOAD_CASES = [
    ("dtype int8", dict(dtype=torch.int8), ValueError, ["dtype=torch.int8 is not a floating-point dtype",
                                                        "quantize_int8"]),
    ("dtype 'int4'", dict(dtype="int4"), ValueError, ["dtype='int4' is not a floating-point dtype name", "bf16"]),
    ("dtype 'bf17'", dict(dtype="bf17"), ValueError, ["dtype='bf17'", "bfloat16"]),
    ("dtype 3", dict(dtype=3), ValueError, ["dtype must be a torch.dtype or a name"]),
    ("dtype bool", dict(dtype=torch.bool), ValueError, ["dtype=torch.bool is not a floating-point dtype"]),
    ("device 'gpu'", dict(device="gpu"), ValueError, ["device='gpu'", "use 'cuda'"]),
    ("device 'tpu'", dict(device="tpu"), ValueError, ["device='tpu' is not a device", "'cuda:N'"]),
    ("device 5", dict(device=5), ValueError, ["device must be a torch.device or a name"]),
    ("max_seq_len -5", dict(max_seq_len=-5), ValueError, ["max_seq_len must be a positive integer, got -5"]),
    ("max_seq_len 0", dict(max_seq_len=0), ValueError, ["max_seq_len must be a positive integer"]),
    ("max_seq_len '8'", dict(max_seq_len="8"), ValueError, ["max_seq_len", "remove the quotes"]),
    ("max_seq_len 1.5", dict(max_seq_len=1.5), ValueError, ["max_seq_len must be a positive integer"]),
    ("max_seq_len True", dict(max_seq_len=True), ValueError, ["max_seq_len must be a positive integer"]),
    ("format 'gguf'", dict(format="gguf"), ValueError, ["unknown checkpoint format 'gguf'", "format='hf'"]),
    ("format 'HF'", dict(format="HF"), ValueError, ["unknown checkpoint format 'HF'"]),
]
if not torch.cuda.is_available():  # on a GPU machine these are valid devices
    LOAD_CASES += [("device 'cuda' without a GPU", dict(device="cuda"), ValueError, ["no CUDA device", "'cpu'"])]
elif torch.cuda.device_count() < 8:
    LOAD_CASES += [("device 'cuda:7'", dict(device="cuda:7"), ValueError, ["CUDA device(s), numbered from 0"])]
for name, kw, error, words in LOAD_CASES:
    add("llama.load arguments", name, load_with(**kw), error, *words)
add("llama.load arguments", "path 5", lambda ws: llama.load(5), TypeError, "needs a folder path")
add("llama.load arguments", "path None", lambda ws: llama.load(None), TypeError, "needs a folder path")


def save_over(kind: str, m=model, **kw):
    """Save into a copy of a good checkpoint (which must stay exactly as it was)."""
    def run(ws: Workspace):
        llama.save(m(), ws.watch_folder(ws.copy(kind)), **kw)
    return run


def save_new(m=model, **kw):
    """Save into a new folder (which must not be created)."""
    def run(ws: Workspace):
        llama.save(m(), ws.watch_folder(ws.tmp / "new" / "ckpt"), **kw)
    return run


def meta_device_model():
    with torch.device("meta"):
        return llama.Transformer(ARGS)


def yarn_model():
    return llama.Transformer(ModelArgs(**{**TINY, "rope_scaling": RopeScaling("yarn", factor=4.0,
                                                                               original_max_position_embeddings=32)}))


def no_shared_expert_model():
    return llama.Transformer(ModelArgs.from_name("tiny-llama-4-scout", moe_args=MoEArgs(num_experts=4,
                                                                                        shared_expert=False)))


for name, run, error, words in [
    ("dtype int8 over a good checkpoint", save_over("hf", dtype=torch.int8), ValueError,
     ["dtype=torch.int8 is not a floating-point dtype", "quantize_int8"]),
    ("dtype 'int8'", save_new(dtype="int8"), ValueError, ["dtype='int8' is not a floating-point dtype name"]),
    ("dtype int32", save_new(dtype=torch.int32), ValueError, ["not a floating-point dtype"]),
    ("dtype 'bf17'", save_new(dtype="bf17"), ValueError, ["dtype='bf17'", "bfloat16"]),
    ("num_shards 0", save_new(format="meta", num_shards=0), ValueError, ["num_shards must be a positive integer"]),
    ("num_shards -1", save_new(format="meta", num_shards=-1), ValueError, ["num_shards must be a positive integer"]),
    ("num_shards '2'", save_new(format="meta", num_shards="2"), ValueError, ["num_shards", "remove the quotes"]),
    ("num_shards True", save_new(format="meta", num_shards=True), ValueError, ["num_shards must be a positive"]),
    ("num_shards 1.5", save_new(format="meta", num_shards=1.5), ValueError, ["num_shards must be a positive"]),
    ("num_shards 3 over a good checkpoint", save_over("meta", format="meta", num_shards=3), CheckpointError,
     ["cannot split into 3", "n_heads=4", "choose num_shards"]),
    ("num_shards with format hf", save_new(format="hf", num_shards=2), ValueError, ["use max_shard_size"]),
    ("max_shard_size 0", save_new(max_shard_size=0), CheckpointError, ["max_shard_size 0 is not a positive size"]),
    ("max_shard_size -5", save_new(max_shard_size=-5), CheckpointError, ["max_shard_size -5", "positive size"]),
    ("max_shard_size 'big'", save_new(max_shard_size="big"), CheckpointError, ["max_shard_size 'big'", "'5GB'"]),
    ("max_shard_size True", save_new(max_shard_size=True), CheckpointError, ["max_shard_size True"]),
    ("max_shard_size '5XB'", save_new(max_shard_size="5XB"), CheckpointError, ["max_shard_size '5XB'"]),
    ("max_shard_size 1.5", save_new(max_shard_size=1.5), CheckpointError, ["max_shard_size 1.5"]),
    ("format 'gguf'", save_new(format="gguf"), ValueError, ["unknown checkpoint format 'gguf'"]),
    ("not a Transformer", save_new(m=lambda: torch.nn.Linear(2, 2)), TypeError, ["needs a llama.Transformer"]),
    ("hf into a Meta folder", save_over("meta", format="hf"), CheckpointError,
     ["already holds a Meta checkpoint", "empty folder"]),
    ("meta into an HF folder", save_over("hf", format="meta"), CheckpointError,
     ["already holds a Hugging Face checkpoint"]),
    ("adapter not merged", save_over("hf", m=lora_model), CheckpointError,
     ["outside the base architecture", "lora_A", "merge adapter weights"]),
    ("weights on the meta device", save_new(m=meta_device_model), CheckpointError,
     ["never materialised", "meta device"]),
    ("YaRN into params.json", save_over("meta-single", m=yarn_model, format="meta"), CheckpointError,
     ["no field for 'yarn' RoPE scaling", "format='hf'"]),
    ("MoE without shared expert", save_new(m=no_shared_expert_model), CheckpointError,
     ["no shared expert", "torch.save"]),
]:
    add("llama.save arguments", name, run, error, *words)


def save_into_file(ws: Workspace):
    (ws.tmp / "weights.bin").write_text("x")
    llama.save(model(), ws.watch_folder(ws.tmp / "weights.bin"))


add("llama.save arguments", "path is a file", save_into_file, CheckpointError, "is a file; pass a folder path")
add("llama.save arguments", "path 5", lambda ws: llama.save(model(), 5), TypeError, "needs a folder path")


def save_into_the_working_directory(ws: Workspace):
    previous = os.getcwd()
    os.chdir(ws.watch_folder(ws.copy("hf")))
    try:
        llama.save(model(), ".")
    finally:
        os.chdir(previous)


add("llama.save arguments", "the working directory", save_into_the_working_directory, CheckpointError,
    "holds the current working directory", "pass a sub-folder")


# =====================================================================================================================
# python -m llama.convert


def converting(*argv: str, dst: str = "out", dst_kind: str = ""):
    def run(ws: Workspace):
        src = ws.copy("hf", "src")
        target = ws.copy(dst_kind, dst) if dst_kind else ws.tmp / dst
        ws.watch_folder(target)
        convert("--src", str(src), "--dst", str(target), *argv)
    return run


def convert_into_file(ws: Workspace):
    (ws.tmp / "out").write_text("x")
    convert("--src", str(ws.copy("hf", "src")), "--dst", str(ws.watch_folder(ws.tmp / "out")), "--to", "hf")


def convert_json_into_folder(ws: Workspace):
    convert("--src", str(ws.copy("hf", "src")), "--dst", str(ws.watch_folder(ws.tmp / "out")), "--to", "meta",
            "--json", str(ws.tmp))


for name, run, words in [
    ("--max-seq-len -1", converting("--to", "meta", "--max-seq-len", "-1"),
     ["exit 2", "--max-seq-len", "positive integer, got -1"]),
    ("--max-seq-len 0", converting("--to", "meta", "--max-seq-len", "0"), ["exit 2", "--max-seq-len", "positive"]),
    ("--max-seq-len abc", converting("--to", "meta", "--max-seq-len", "abc"), ["exit 2", "--max-seq-len", "'abc'"]),
    ("--shards 0", converting("--to", "meta", "--shards", "0"), ["exit 2", "--shards", "positive integer"]),
    ("--shards x", converting("--to", "meta", "--shards", "x"), ["exit 2", "--shards", "'x'"]),
    ("--shards 2 --to hf", converting("--to", "hf", "--shards", "2"), ["exit 2", "--max-shard-size"]),
    ("--dtype int8", converting("--to", "hf", "--dtype", "int8"), ["exit 2", "--dtype", "invalid choice: 'int8'"]),
    ("--max-shard-size 0", converting("--to", "hf", "--max-shard-size", "0"),
     ["exit 2", "max_shard_size '0' is not a positive size"]),
    ("--to xyz", converting("--to", "xyz"), ["exit 2", "--to", "invalid choice: 'xyz'"]),
    ("no --to", converting(), ["exit 2", "the following arguments are required: --to"]),
    ("--dst holds the other format", converting("--to", "hf", dst_kind="meta"),
     ["exit 2", "already holds a Meta checkpoint"]),
    ("--dst is a file", convert_into_file, ["exit 2", "is a file; pass a folder path"]),
    ("--json is a folder", convert_json_into_folder, ["exit 2", "--json", "is a folder"]),
]:
    add("python -m llama.convert", name, run, CommandLineError, *words)
add("python -m llama.convert", "--src missing",
    lambda ws: convert("--src", str(ws.tmp / "nowhere"), "--dst", str(ws.tmp / "out"), "--to", "hf"),
    CommandLineError, "exit 2", "does not exist")


CASES += RUNTIME_CASES  # tokenizers, chat formats, generation, adapters

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bad_inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write every case's outcome to this JSON file")
    summary = probe(CASES, parser.parse_args().json)
    sys.exit(0 if all(r["outcome"] == "clear" for r in summary["cases"]) else 1)
