"""Meta and HF checkpoint folders: shard merging and splitting, config translation, atomic writes.

The Meta checkpoints here are built by hand from a random HF model, with this file's own key mapping, RoPE row
reordering (explicit loops over heads and pairs) and model-parallel splitting, so `llama.load` is checked against
an independent construction and, through the logits, against `transformers`. Bad input (every error names
the problem and the fix) is in test_checkpoint_errors.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llama.formats.checkpoint as ckpt
from tests.reference.hf import hf_folders  # noqa: F401 - pytest fixture
from tests.reference.hf import GENERATIONS, hf_logits, hf_state_dict, random_tokens, relative_error, save_hf_model
from tests.reference.tolerance import forward_tolerance
from llama import ModelArgs, RopeScaling, Transformer
from llama.formats.io import CheckpointError, expected_shapes
from llama.config import PRESETS, count_parameters
from llama.formats.convert import main as convert_main
from llama.formats.hf import args_from_config, config_from_args
from llama.formats.meta import args_from_params, params_from_args

_TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=256)

# ---------------------------------------------------------------------------------------------------------------
# A hand-built Meta checkpoint


def meta_state_dict_by_hand(hf_sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM weights -> Meta names and Meta's interleaved RoPE row order (explicit loops)."""

    def to_meta_rows(w, n_heads):  # Meta row 2j <- HF row j, Meta row 2j+1 <- HF row D/2 + j, in every head
        D, out = args.head_dim, torch.empty_like(w)
        for h in range(n_heads):
            for j in range(D // 2):
                out[h * D + 2 * j] = w[h * D + j]
                out[h * D + 2 * j + 1] = w[h * D + D // 2 + j]
        return out

    sd = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"],
          "output.weight": hf_sd.get("lm_head.weight", hf_sd["model.embed_tokens.weight"])}
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        sd.update({
            f"layers.{i}.attention.wq.weight": to_meta_rows(hf_sd[p + "self_attn.q_proj.weight"], args.n_heads),
            f"layers.{i}.attention.wk.weight": to_meta_rows(hf_sd[p + "self_attn.k_proj.weight"], args.n_kv_heads),
            f"layers.{i}.attention.wv.weight": hf_sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf_sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf_sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf_sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf_sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf_sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf_sd[p + "post_attention_layernorm.weight"],
        })
    return {k: v.clone() for k, v in sd.items()}


def split_by_hand(sd, args: ModelArgs, P: int, embedding_dim: int) -> list[dict[str, torch.Tensor]]:
    """Fairscale's layout: column-parallel rows, row-parallel columns, norms on every rank, KV heads repeated
    on P/Hkv ranks when P > Hkv."""
    shards = [{} for _ in range(P)]
    D = args.head_dim
    for key, w in sd.items():
        name = key.split(".")[-2]
        for r in range(P):
            if name in ("attention_norm", "ffn_norm", "norm"):
                part = w
            elif name in ("wk", "wv") and P > args.n_kv_heads:
                head = r // (P // args.n_kv_heads)
                part = w[head * D:(head + 1) * D]
            elif name in ("wq", "wk", "wv", "w1", "w3", "output"):
                rows = w.shape[0] // P
                part = w[r * rows:(r + 1) * rows]
            elif name in ("wo", "w2"):
                cols = w.shape[1] // P
                part = w[:, r * cols:(r + 1) * cols]
            else:  # tok_embeddings
                n = w.shape[embedding_dim] // P
                part = w.narrow(embedding_dim, r * n, n)
            shards[r][key] = part.clone()
    return shards


def write_meta_by_hand(folder: Path, params: dict, shards: list[dict], single_file: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for r, shard in enumerate(shards):
        torch.save(shard, folder / ("consolidated.pth" if single_file else f"consolidated.{r:02d}.pth"))
    return folder


def _l3_meta(**kw) -> ModelArgs:  # llama3 scaling with Meta's own constants (L0 = 8192), expressible in params.json
    return ModelArgs(rope_theta=500000.0, rope_scaling=RopeScaling("llama3", factor=kw.pop("factor", 8.0),
                                                                   original_max_position_embeddings=8192), **kw)


META_CASES = {
    # name: (args, params.json as Meta writes it, shards, embedding split dim)
    "llama1-mp2": (ModelArgs(norm_eps=1e-6, **_TINY),
                   {"model": {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06,
                              "vocab_size": -1}}, 2, 1),
    "llama2-gqa-mp2": (ModelArgs(n_kv_heads=2, **_TINY),
                       {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                        "norm_eps": 1e-05, "vocab_size": 256}, 2, 1),
    "llama2-gqa-mp4-kv-repeat": (ModelArgs(n_kv_heads=2, **_TINY),
                                 {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                                  "norm_eps": 1e-05, "vocab_size": 256}, 4, 1),
    "llama3.1-mp4": (_l3_meta(n_kv_heads=2, ffn_dim_multiplier=1.3, **_TINY),
                     {"dim": 64, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2,
                      "n_layers": 2, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 256}, 4, 0),
    "llama3.2-tied-mp2": (_l3_meta(n_kv_heads=1, factor=32.0, tie_word_embeddings=True, **_TINY),
                          {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 1, "n_layers": 2,
                           "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                           "rope_scaling_factor": 32.0, "vocab_size": 256}, 2, 0),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_hand_built_meta_shards_load_and_match_hf(case, hf_folders, tmp_path):
    args, params, P, emb_dim = META_CASES[case]
    hf = hf_folders(args)
    shards = split_by_hand(meta_state_dict_by_hand(hf_state_dict(hf), args), args, P, emb_dim)
    if case == "llama1-mp2":
        for shard in shards:
            shard["rope.freqs"] = torch.randn(8)  # early checkpoints carry a RoPE table that loaders ignore
    write_meta_by_hand(tmp_path, params, shards)
    model = ckpt.load(tmp_path)
    assert model.args.vocab_size == args.vocab_size and model.args.tie_word_embeddings == args.tie_word_embeddings
    if args.tie_word_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    tokens = random_tokens(args)
    assert relative_error(model(tokens), hf_logits(hf, tokens)) <= 1e-10


def test_single_consolidated_pth(hf_folders, tmp_path):
    args, params, _, _ = META_CASES["llama2-gqa-mp2"]
    hf = hf_folders(args)
    write_meta_by_hand(tmp_path, params, [meta_state_dict_by_hand(hf_state_dict(hf), args)], single_file=True)
    tokens = random_tokens(args)
    assert relative_error(ckpt.load(tmp_path)(tokens), hf_logits(hf, tokens)) <= 1e-10


def _merge_by_hand(shards, args: ModelArgs, embedding_dim: int) -> dict[str, torch.Tensor]:
    P, out = len(shards), {}
    for key in shards[0]:
        name = key.split(".")[-2]
        parts = [s[key] for s in shards]
        if name in ("attention_norm", "ffn_norm", "norm"):
            assert all(torch.equal(p, parts[0]) for p in parts)
            out[key] = parts[0]
        elif name in ("wk", "wv") and P > args.n_kv_heads:
            out[key] = torch.cat(parts[::P // args.n_kv_heads])
        elif name in ("wo", "w2"):
            out[key] = torch.cat(parts, dim=1)
        elif name == "tok_embeddings":
            out[key] = torch.cat(parts, dim=embedding_dim)
        else:
            out[key] = torch.cat(parts, dim=0)
    return out


@pytest.mark.parametrize("P, n_kv_heads, vocab_size, emb_dim", [(2, 2, 256, 1), (4, 2, 256, 1), (4, 1, 128256, 0)])
def test_meta_save_splits_like_fairscale(P, n_kv_heads, vocab_size, emb_dim, tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size, multiple_of=32,
                     max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args)
    ckpt.save(model, tmp_path, format="meta", num_shards=P)
    shards = [torch.load(tmp_path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(P)]
    D, C, F = args.head_dim, args.dim, args.ffn_hidden_dim
    s0 = shards[0]
    assert tuple(s0["layers.0.attention.wq.weight"].shape) == (4 * D // P, C)
    assert tuple(s0["layers.0.attention.wk.weight"].shape) == (max(n_kv_heads // P, 1) * D, C)
    assert tuple(s0["layers.0.attention.wo.weight"].shape) == (C, 4 * D // P)
    assert tuple(s0["layers.0.feed_forward.w2.weight"].shape) == (C, F // P)
    assert tuple(s0["output.weight"].shape) == (vocab_size // P, C)
    emb = (vocab_size // P, C) if emb_dim == 0 else (vocab_size, C // P)
    assert tuple(s0["tok_embeddings.weight"].shape) == emb
    merged = _merge_by_hand(shards, args, emb_dim)
    for key, value in model.state_dict().items():
        assert torch.equal(merged[key], value), key
    params = json.loads((tmp_path / "params.json").read_text())
    assert params == {"dim": 32, "n_layers": 1, "n_heads": 4, **({"n_kv_heads": n_kv_heads} if n_kv_heads != 4 else {}),
                      "vocab_size": vocab_size, "multiple_of": 32, "norm_eps": 1e-05}


def test_tied_embeddings_in_both_formats(tmp_path):
    args = GENERATIONS["llama-3.2-tied"]
    model = Transformer(args)
    ckpt.save(model, tmp_path / "hf", format="hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    ckpt.save(model, tmp_path / "meta", format="meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    for fmt in ("hf", "meta"):
        loaded = ckpt.load(tmp_path / fmt)
        assert loaded.output.weight is loaded.tok_embeddings.weight
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_dtype_conversion_on_load_and_save(tmp_path):
    model = Transformer(GENERATIONS["llama-2-gqa"])
    ckpt.save(model, tmp_path / "hf", format="hf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert ckpt.load(tmp_path / "hf").norm.weight.dtype == torch.bfloat16  # stored dtype kept by default
    loaded = ckpt.load(tmp_path / "hf", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = model.layers[0].attention.wq.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.layers[0].attention.wq.weight, expected)


# ---------------------------------------------------------------------------------------------------------------
# params.json / config.json translation


def test_meta_params_of_released_models():
    path = Path("params.json")
    l31 = args_from_params({"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                            "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                            "use_scaled_rope": True, "vocab_size": 128256}, path=path)
    assert l31.name == "llama-3.1-8b" and l31.max_seq_len == 131072 and l31.rope_scaling.factor == 8.0
    l1 = args_from_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                           "vocab_size": -1}, path=path, vocab_size=32000)
    assert l1.name == "llama-7b" and l1.max_seq_len == 2048 and l1.ffn_hidden_dim == 11008
    cl = args_from_params({"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
                           "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32000},
                          path=path, max_seq_len=100_000)
    assert cl.name == "code-llama-34b" and cl.max_seq_len == 100_000


# Public hub config.json files (values as published), in the transformers 4.x layout.
HUB_CONFIGS = {
    "llama-2-7b": {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                   "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
                   "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                   "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
                   "use_cache": True, "vocab_size": 32000},
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                     "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
                     "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
                     "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
                     "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                     "use_cache": True, "vocab_size": 128256},
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                     "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
                     "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
                     "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
                     "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                     "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                     "use_cache": True, "vocab_size": 128256},
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_configs_are_recognised_as_presets(name):
    args = args_from_config(HUB_CONFIGS[name], path=Path("config.json"))
    preset = ModelArgs.from_name(name)
    assert args.name == name and dataclasses.asdict(args) == dataclasses.asdict(preset)
    assert count_parameters(args) == sum(math.prod(s) for k, s in expected_shapes(args).items()
                                         if not (args.tie_word_embeddings and k == "output.weight"))


DENSE_RELEASES = [n for n, p in PRESETS.items() if p.published is not None and p.args.moe_args is None]


def _without_name(args: ModelArgs) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if k != "name"}


@pytest.mark.parametrize("name", DENSE_RELEASES)
def test_every_dense_release_survives_both_config_files(name):
    args = ModelArgs.from_name(name)
    via_hf = args_from_config(config_from_args(args, torch.bfloat16), path=Path("config.json"))
    assert _without_name(via_hf) == _without_name(args)
    # the name is recovered up to releases with one architecture (Llama 3.1 70B = Llama 3.3 70B)
    assert _without_name(ModelArgs.from_name(via_hf.name)) == _without_name(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our params.json records factor 32 for 3.2, so no guess and no warning
        via_meta = args_from_params(params_from_args(args), path=Path("params.json"))
    # tying is read from the weights (identical output and embedding rows), not from params.json
    assert _without_name(via_meta) == _without_name(dataclasses.replace(args, tie_word_embeddings=False))


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.args.moe_args is not None])
def test_llama4_configs_are_refused(name):
    with pytest.raises(CheckpointError, match="Llama 4 features .*dense generations"):
        config_from_args(ModelArgs.from_name(name), torch.bfloat16)
    with pytest.raises(CheckpointError, match="Llama 4 features"):
        params_from_args(ModelArgs.from_name(name))


def test_llama_3_2_meta_params_get_factor_32_with_a_warning():
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
    with pytest.warns(UserWarning, match="factor 32"):
        args = args_from_params(params, path=Path("params.json"))
    assert args.name == "llama-3.2-1b" and args.rope_scaling.factor == 32.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced = args_from_params({**params, "rope_scaling_factor": 8}, path=Path("params.json"))
    assert forced.rope_scaling.factor == 8.0


def test_transformers_4_config_layout(tmp_path):
    """rope_theta at the top level and rope_scaling with the old 'type' key (transformers 4.x) read the same."""
    model = Transformer(GENERATIONS["llama-3.1-scaled-rope"])
    ckpt.save(model, tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    scaling = dict(config.pop("rope_parameters"))
    scaling.pop("rope_theta")
    scaling["type"] = scaling.pop("rope_type")
    config["rope_scaling"] = scaling
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ckpt.load(tmp_path).args
    # config.json has no multiple_of / ffn_dim_multiplier: it stores their result, intermediate_size
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len", "tie_word_embeddings", "head_dim"):
        assert getattr(loaded, field) == getattr(model.args, field), field


def test_vocab_from_tokenizer_when_params_say_minus_one(hf_folders, tmp_path):
    from tokenizer_files import train_sentencepiece

    args = ModelArgs(**{**_TINY, "vocab_size": 512})
    params = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    write_meta_by_hand(tmp_path / "7B", params,
                       split_by_hand(meta_state_dict_by_hand(hf_state_dict(hf_folders(args)), args), args, 2, 1))
    train_sentencepiece(tmp_path / "tokenizer.model", vocab_size=512)  # LLaMA 1 kept it next to the size folders
    assert ckpt.load(tmp_path / "7B").args.vocab_size == 512
    train_sentencepiece(tmp_path / "7B" / "tokenizer.model", vocab_size=400)
    with pytest.raises(CheckpointError, match="400 tokens but the embedding .* has 512 rows"):
        ckpt.load(tmp_path / "7B")


# ---------------------------------------------------------------------------------------------------------------
# Writing: atomic, stale files, the converter


def test_save_replaces_stale_shards_and_leaves_no_temporary_files(tmp_path):
    model = Transformer(GENERATIONS["llama-2-gqa"])
    ckpt.save(model, tmp_path, format="meta", num_shards=4)
    ckpt.save(model, tmp_path, format="meta", num_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    hf = tmp_path / "hf"
    ckpt.save(model, hf, format="hf", max_shard_size="60KB")
    ckpt.save(model, hf, format="hf")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = Transformer(GENERATIONS["llama-2-gqa"])
    ckpt.save(model, tmp_path, format="meta")
    before = (tmp_path / "consolidated.00.pth").read_bytes()

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(Transformer(GENERATIONS["llama-2-gqa"]), tmp_path, format="meta")
    assert (tmp_path / "consolidated.00.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_convert_cli_both_directions(tmp_path, capsys):
    args = GENERATIONS["llama-2-gqa"]
    hf = save_hf_model(args, tmp_path / "hf")
    summary = convert_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "meta"), "--to", "meta",
                            "--shards", "2", "--json", str(tmp_path / "summary.json")])
    assert summary["src_format"] == "hf" and summary["files"] == ["consolidated.00.pth", "consolidated.01.pth",
                                                                  "params.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["parameters"] == summary["parameters"]
    convert_main(["--src", str(tmp_path / "meta"), "--dst", str(tmp_path / "back"), "--to", "hf",
                  "--dtype", "float32", "--max-seq-len", "256"])
    assert "dst_format" in capsys.readouterr().out
    back = ckpt.load(tmp_path / "back")
    assert back.norm.weight.dtype == torch.float32 and back.args.max_seq_len == 256
    tokens = random_tokens(args)
    assert relative_error(back(tokens), hf_logits(hf, tokens)) <= forward_tolerance(args, tokens.shape[1],
                                                                                    torch.float32)


def test_convert_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama.convert", "--src", str(tmp_path / "nowhere"), "--dst",
                             str(tmp_path / "out"), "--to", "hf"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint folder") and "Traceback" not in result.stderr
