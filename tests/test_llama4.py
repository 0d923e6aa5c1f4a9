"""Llama 4 text model: float64 parity with Hugging Face `Llama4ForCausalLM`, checkpoints, counts, KV cache.

The reference is HF transformers 5.24 (`models/llama4/modeling_llama4.py`), built from its own config class with
random O(1) weights in the reference process (tests/reference/outside/hf_llama.py), saved with `save_pretrained` and
read back through `llama.load` — so the config translation, the weight mapping and the model are all checked against
HF's own reading of the same folder.
Configs are tiny but chosen so every Llama 4 mechanism acts inside a 40-token sequence: chunks of 8 positions,
a NoPE layer (layer 3 of 4), temperature tuning with floor_scale 8 (τ > 1 from position 7 on), QK-norm, MoE in
every layer or every other layer.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from llama.formats.checkpoint import load, save
from llama import ModelArgs, Transformer
from llama.formats.io import CheckpointError
from llama.moe import MoE
from llama.config import PRESETS, MoEArgs, RopeScaling, count_active_parameters, count_parameters
from tests.reference.hf import hf_logits
from tests.reference.isolation import reference
from tests.reference.tolerance import tolerance

T = 40  # 5 chunks of 8


def hf_config(step: int, qk_norm: bool, scaled_rope: bool, **over) -> dict:
    """Llama4TextConfig fields of a tiny model where every Llama 4 mechanism acts."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaled_rope:  # Scout's rule (low == high: no blend band) with a tiny L0 so that it changes frequencies
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 32}
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=step,
                  use_qk_norm=qk_norm, no_rope_layer_interval=4, attention_chunk_size=8, attn_temperature_tuning=True,
                  floor_scale=8, attn_scale=0.5, rope_parameters=rope)
    fields.update(over)
    return fields


def save_hf(config: dict, folder):
    """A random Llama4ForCausalLM (weights of std 1/sqrt(fan_in), gains 1 + 0.1·N(0,1)) saved by save_pretrained."""
    reference().call("hf_llama.save_random", "llama4", config, str(folder))
    return folder


def hf_logits4(folder, x, attn: str = "sdpa"):
    return hf_logits(folder, x, arch="llama4", attn=attn)


def tokens(seed=1, B=2, n=T):
    return torch.randint(0, 256, (B, n), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [(1, True, True), (1, False, False), (2, True, False), (2, False, True)]  # (moe step, qk norm, scaled rope)


@pytest.mark.parametrize("step, qk_norm, scaled_rope", CASES)
def test_float64_parity_with_hf_llama4_through_files(tmp_path, step, qk_norm, scaled_rope):
    folder = save_hf(hf_config(step, qk_norm, scaled_rope), tmp_path / "hf")
    ours = load(folder).eval()
    a = ours.args
    assert (a.moe_args.interleave_moe_layer_step, a.use_qk_norm, a.nope_layer_interval) == (step, qk_norm, 4)
    moe_layers = reference().call("hf_llama.config_fields", str(folder), ["moe_layers"], arch="llama4")["moe_layers"]
    assert [a.layer_spec(i).moe for i in range(4)] == [i in moe_layers for i in range(4)]
    x = tokens()
    ref = hf_logits4(folder, x)
    with torch.no_grad():
        assert rel_err(ours(x), ref) <= 1e-10
        ours.set_attention_implementation("math")
        assert rel_err(ours(x), ref) <= 1e-10
        for layer in ours.layers:  # the dense reference dispatch gives the same logits
            if isinstance(layer.feed_forward, MoE):
                layer.feed_forward.dispatch = "dense"
        assert rel_err(ours(x), ref) <= 1e-10


def test_parity_with_hf_eager_attention(tmp_path):
    folder = save_hf(hf_config(1, True, True), tmp_path / "hf")
    ours = load(folder).eval()
    x = tokens(seed=3)
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits4(folder, x, attn="eager")) <= 1e-10


@pytest.mark.parametrize("change", [dict(attention_chunk_size=None), dict(attn_temperature_tuning=False),
                                    dict(floor_scale=1024), dict(no_rope_layer_interval=100),
                                    dict(use_qk_norm=False)])
def test_each_mechanism_changes_the_logits(change):
    """Guards the parity test against vacuity: switching any one mechanism off moves HF's logits."""
    x = tokens()
    base = reference().call("hf_llama.random_logits", "llama4", hf_config(1, True, False), x)
    other = reference().call("hf_llama.random_logits", "llama4", hf_config(1, True, False, **change), x)
    assert rel_err(other, base) > 1e-3


def test_save_is_read_by_hf_from_pretrained(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(ModelArgs.from_name("tiny-llama-4-maverick")).double().eval()
    ours.reset_parameters(std=0.2)
    save(ours, tmp_path / "out", format="hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama4_text" and config["moe_layers"] == [1, 3]
    x = tokens(n=48)
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits4(tmp_path / "out", x)) <= 1e-10


# -- Meta's Llama 4 layout --------------------------------------------------------------------------------------


CONFIG_KEYS = ["num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "hidden_size",
               "num_hidden_layers", "moe_layers"]


def meta_shards_by_hand(folder, P: int) -> list[dict]:
    """Meta's per-rank tensors from HF's weights, per llama-models' load hooks and HF's converter, not via llama/."""
    cfg = dataclasses.make_dataclass("Config", CONFIG_KEYS)(
        **reference().call("hf_llama.config_fields", str(folder), CONFIG_KEYS, arch="llama4"))
    sd = load_file(folder / "model.safetensors")
    H, Hkv, D, E, C = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_local_experts,
                       cfg.hidden_size)
    shards = [{} for _ in range(P)]

    def put(key, parts):
        for r in range(P):
            shards[r][key] = parts[r].contiguous()

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"].chunk(P, 0))  # VocabParallelEmbedding: rows
    put("output.weight", sd["lm_head.weight"].chunk(P, 0))
    put("norm.weight", [sd["model.norm.weight"]] * P)
    put("rope.freqs", [torch.zeros(D // 2)] * P)  # ignored by every loader
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"layers.{i}."
        q, k, v = (sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv")
        put(m + "attention.wqkv.weight", [torch.cat([a, b, c]) for a, b, c in
                                          zip(q.chunk(P), k.chunk(P), v.chunk(P))])  # per rank [q_r; k_r; v_r]
        put(m + "attention.wo.weight", sd[h + "self_attn.o_proj.weight"].chunk(P, 1))
        put(m + "attention.wqkv.layer_norm_weight", [sd[h + "input_layernorm.weight"]] * P)
        if i in cfg.moe_layers:
            put(m + "feed_forward.norm.weight", [sd[h + "post_attention_layernorm.weight"]] * P)
            put(m + "feed_forward.router_DE", [sd[h + "feed_forward.router.weight"].t()] * P)
            gate, up = sd[h + "feed_forward.experts.gate_up_proj"].chunk(2, dim=-1)  # [E, C, F]
            down = sd[h + "feed_forward.experts.down_proj"]  # [E, F, C]
            put(m + "feed_forward.experts.moe_w_in_eD_F", [g.reshape(E * C, -1) for g in gate.chunk(P, 2)])
            put(m + "feed_forward.experts.moe_w_swiglu_eD_F", [u.reshape(E * C, -1) for u in up.chunk(P, 2)])
            put(m + "feed_forward.experts.moe_w_out_eF_D", [d.reshape(-1, C) for d in down.chunk(P, 1)])
            shared = h + "feed_forward.shared_expert."
            put(m + "feed_forward.w_in_shared_FD.weight", sd[shared + "gate_proj.weight"].chunk(P))
            put(m + "feed_forward.w_swiglu_FD.weight", sd[h + "feed_forward.shared_expert.up_proj.weight"].chunk(P))
            put(m + "feed_forward.w_out_shared_DF.weight",
                sd[h + "feed_forward.shared_expert.down_proj.weight"].chunk(P, 1))
            put(m + "feed_forward.global_gate_stats_3E", [torch.zeros(3, E)] * P)  # dropped by Meta's hooks
        else:
            put(m + "feed_forward.mlp.layer_norm_weight", [sd[h + "post_attention_layernorm.weight"]] * P)
            g, u = sd[h + "feed_forward.gate_proj.weight"], sd[h + "feed_forward.up_proj.weight"]
            put(m + "feed_forward.mlp.fc1_weight", [torch.cat([a, b]) for a, b in zip(g.chunk(P), u.chunk(P))])
            put(m + "feed_forward.mlp.fc2_weight", sd[h + "feed_forward.down_proj.weight"].chunk(P, 1))
    return shards


@pytest.mark.parametrize("P", [1, 2])
def test_meta_layout_by_hand_matches_hf(tmp_path, P):
    hf = save_hf(hf_config(2, True, True), tmp_path / "hf")
    folder = tmp_path / "meta"
    folder.mkdir()
    for r, shard in enumerate(meta_shards_by_hand(hf, P)):
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    params = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  ffn_dim_multiplier=0.25, ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                  rope_scaling_factor=16.0, rope_high_freq_factor=1.0, rope_original_max_position_embeddings=32,
                  nope_layer_interval=4, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8.0,
                  attn_scale=0.5, attention_chunk_size=8, max_seq_len=256,
                  moe_args=dict(num_experts=4, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                                interleave_moe_layer_step=2))
    (folder / "params.json").write_text(json.dumps({"model": params}))
    ours = load(folder, dtype=torch.float64).eval()
    # Meta's sizing rules give HF's sizes: experts int(4·64)=256 -> 170 -> ·0.25 = 42 -> /2 = 21 -> 32;
    # dense int(8·64/3)=170 -> ·0.25 = 42 -> 48
    assert (ours.args.moe_hidden_dim, ours.args.ffn_hidden_dim) == (32, 48)
    x = tokens()
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits4(hf, x)) <= 1e-10


@pytest.mark.parametrize("fmt, shards", [("meta", 1), ("meta", 2), ("hf", 1)])
def test_save_load_round_trip_is_exact(tmp_path, fmt, shards):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-llama-4-maverick"))
    kw = dict(num_shards=shards) if fmt == "meta" else dict(max_shard_size=60_000)  # hf: several shards + index
    save(model, tmp_path / "ckpt", format=fmt, **kw)
    back = load(tmp_path / "ckpt")
    assert back.args.moe_args == model.args.moe_args and back.args.layer_spec(3) == model.args.layer_spec(3)
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dynamic_ntk_model_saved_for_hf_scales_like_ours(tmp_path):
    """HF's dynamic NTK scales past max_position_embeddings: the HF config must hold L0 there (and our longest input
    beside it), or HF's logits beyond L0 differ from ours."""
    torch.manual_seed(0)
    args = dataclasses.replace(ModelArgs.from_name("tiny-llama-4-scout"), max_seq_len=128, attention_chunk_size=None,
                               rope_scaling=RopeScaling("dynamic", factor=4.0, original_max_position_embeddings=16))
    ours = Transformer(args).double().eval()
    save(ours, tmp_path / "hf", format="hf")
    back = load(tmp_path / "hf").args
    assert (back.rope_scaling, back.max_seq_len) == (args.rope_scaling, 128)
    x = tokens(n=40)                                                          # 2.5x L0
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits4(tmp_path / "hf", x)) <= 1e-10


def test_meta_save_refuses_sizes_off_metas_rule(tmp_path):
    args = dataclasses.replace(ModelArgs.from_name("tiny-llama-4-scout"), moe_hidden_dim=40)
    with pytest.raises(CheckpointError, match="does not follow Meta's rule.*format='hf'"):
        save(Transformer(args), tmp_path / "m", format="meta")


def test_hf_config_with_irregular_nope_pattern_is_refused(tmp_path):
    save_hf(hf_config(1, True, False, no_rope_layers=[1, 0, 1, 1]), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no_rope_layers .* not one layer in every n"):
        load(tmp_path / "hf")


# -- parameter counts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, total, active, active_no_embed", [
    ("llama-4-scout", 107_769_861_120, 17_172_894_720, 16_138_408_960),
    ("llama-4-maverick", 400_711_848_960, 17_184_691_200, 16_150_205_440),
])
def test_published_counts(name, total, active, active_no_embed):
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == total == count_parameters(args) == PRESETS[name].published
    assert count_active_parameters(args) == active
    assert count_active_parameters(args, include_embedding=False) == active_no_embed


def test_active_count_by_hand_on_a_tiny_model():
    """One token touches the shared expert, the router and top_k experts of each MoE layer: count them directly."""
    args = ModelArgs.from_name("tiny-llama-4-maverick", moe_args=MoEArgs(num_experts=8, top_k=2,
                                                                         interleave_moe_layer_step=2))
    model = Transformer(args)
    per_expert = 3 * args.dim * args.moe_hidden_dim
    unused = sum(1 for layer in model.layers if isinstance(layer.feed_forward, MoE)) * 6 * per_expert
    assert count_active_parameters(args) == sum(p.numel() for p in model.parameters()) - unused


# -- KV cache ----------------------------------------------------------------------------------------------------


DECODE_STEPS = [5, 1, 1, 1, 7, 9, 1, 12, 8]  # prefill, single tokens, appends straddling chunk boundaries; 45 in all


def decode_in_pieces(model, x):
    model.setup_cache(batch_size=x.shape[0], max_seq_len=64)
    pieces, pos = [], 0
    for n in DECODE_STEPS:
        pieces.append(model(x[:, pos:pos + n], start_pos=pos))
        pos += n
    model.clear_cache()
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("implementation", ["sdpa", "math"])
def test_kv_cache_decoding_with_chunks_nope_and_temperature_is_exact_in_float64(implementation):
    """All-float64 arithmetic (interleaved real RoPE, dense FFN), chunks of 8, NoPE every 2nd layer, τ from m = 7:
    the cache must reproduce the full forward to rounding."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-llama-3", attention_chunk_size=8, nope_layer_interval=2,
                               attn_temperature_tuning=True, floor_scale=8.0, attn_scale=0.5)
    model = Transformer(args).double().eval()
    model.reset_parameters(std=0.2)
    model.set_attention_implementation(implementation)
    x = tokens(n=45)
    with torch.no_grad():
        assert rel_err(decode_in_pieces(model, x), model(x)) <= 1e-12


@pytest.mark.parametrize("implementation", ["sdpa", "math"])
@pytest.mark.parametrize("name", ["tiny-llama-4-scout", "tiny-llama-4-maverick"])
def test_kv_cache_decoding_equals_full_forward(name, implementation):
    """The full Llama 4 layer. Its reference numerics keep float32 steps inside a float64 model (complex64 RoPE,
    float32 QK-norm and router sigmoid), whose last bit depends on how many rows one call holds: per layer the
    float32 rounding of q and k (1), the complex rotation (2), the QK norm over D (D + 3) and the sigmoid (3)."""
    torch.manual_seed(0)
    args = ModelArgs.from_name(name, attention_chunk_size=8, floor_scale=8.0, attn_scale=0.5)
    model = Transformer(args).double().eval()
    model.reset_parameters(std=0.2)
    model.set_attention_implementation(implementation)
    x = tokens(n=45)
    with torch.no_grad():
        assert rel_err(decode_in_pieces(model, x), model(x)) <= tolerance(torch.float32,
                                                                          args.n_layers * (args.head_dim + 9))


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(moe_args=MoEArgs(num_experts=4, interleave_moe_layer_step=3)),
     r"interleave_moe_layer_step \(3\) must divide"),
    (dict(attention_chunk_size=0), "attention_chunk_size must be a positive integer"),
    (dict(attention_chunk_size=-8), "attention_chunk_size must be a positive integer"),
    (dict(nope_layer_interval=0), "nope_layer_interval must be a positive integer"),
    (dict(floor_scale=0.0), "floor_scale must be > 0"),
    (dict(ffn_exp=None), "needs the expert hidden size"),
])
def test_bad_llama4_config(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_name("tiny-llama-4-scout", **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(num_experts=4, top_k=5), r"top_k \(5\) is larger than num_experts \(4\)"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(expert_capacity_factor=0.0), "expert_capacity_factor must be > 0"),
    (dict(expert_capacity_factor=-1.0), "expert_capacity_factor must be > 0"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(interleave_moe_layer_step=0), "interleave_moe_layer_step must be a positive integer"),
])
def test_bad_moe_args(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEArgs(**kw)


def test_moe_args_from_dict_and_to_dict_round_trip():
    args = ModelArgs.from_name("tiny-llama-4-scout")
    again = ModelArgs(**args.to_dict())
    assert again == args and isinstance(again.moe_args, MoEArgs) and isinstance(again.rope_scaling, (RopeScaling,
                                                                                                   type(None)))
