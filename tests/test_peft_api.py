"""The common interface (peft.api): apply, counting, merge errors, adapter save/load, and `python -m peft.count`."""

from __future__ import annotations

import json

import pytest
import torch

import llama
import peft
from peft import count
from tests.reference.paper_peft import make_model, max_rel_error, tokens
from tests.reference.tolerance import tolerance

CONFIGS = {
    "lora": peft.LoraConfig(r=4, alpha=8, target_modules=("wq", "wv", "w2"), use_rslora=True),
    "dora": peft.LoraConfig(r=2, target_modules=("wk", "output"), use_dora=True, layers=(1,)),
    "adapter_v1": peft.AdapterV1Config(adapter_len=3, adapter_layers=2, gate_activation="identity"),
    "adapter_v2": peft.AdapterV2Config(adapter_len=3, adapter_layers=1, scale_side="input"),
    "excitor": peft.ExcitorConfig(adapter_len=5, adapter_layers=1, rank=3, gate_per_head=True),
}


def randomize(model, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.adapter_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_save_load_round_trip(tmp_path, name, kind):
    model = peft.apply(make_model(kind), CONFIGS[name])
    randomize(model)
    toks = tokens(model.args)
    folder = peft.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no temp files
    fresh = make_model(kind)  # same base weights, no adapter: load applies the saved config
    peft.load_adapter(fresh, folder)
    assert fresh.peft_state.config == CONFIGS[name]
    with torch.no_grad():
        assert torch.equal(fresh(toks), model(toks))
    # a model carrying the same method and config gets its weights replaced
    other = peft.apply(make_model(kind), CONFIGS[name])
    peft.load_adapter(other, folder)
    with torch.no_grad():
        assert torch.equal(other(toks), model(toks))


def test_saved_json_holds_every_hyperparameter(tmp_path):
    model = peft.apply(make_model("mha"), CONFIGS["excitor"])
    peft.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["config"] == {"method": "excitor", "adapter_len": 5, "adapter_layers": 1, "rank": 3,
                              "prompt_temperature": None, "gate_init": 1.0, "gate_per_head": True,
                              "gate_activation": "identity", "up_init": "zeros", "prompt_init_std": 1.0,
                              "extra_key_rope": "none"}
    assert meta["model"]["dim"] == 64 and meta["model"]["n_layers"] == 2
    assert set(meta["parameters"]) == set(peft.adapter_parameters(model))


def test_saving_overwrites_atomically(tmp_path):
    model = peft.apply(make_model("mha"), CONFIGS["lora"])
    peft.save_adapter(model, tmp_path)
    randomize(model)
    peft.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    fresh = peft.load_adapter(make_model("mha"), tmp_path)
    for k, v in peft.adapter_parameters(fresh).items():
        assert torch.equal(v, peft.adapter_parameters(model)[k])


def test_trainable_parameters_counts_unique_tensors():
    model = make_model("tied")
    assert peft.trainable_parameters(model) == llama.config.count_parameters(model.args)  # tied counted once
    peft.apply(model, peft.LoraConfig(r=2, target_modules=("output",)))
    assert peft.trainable_parameters(model) == 2 * (model.args.dim + model.args.vocab_size)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_save_without_adapter(tmp_path):
    with pytest.raises(ValueError, match="cannot save an adapter: no adapter is attached"):
        peft.save_adapter(make_model("mha"), tmp_path)


def test_load_onto_a_model_of_a_different_shape(tmp_path):
    peft.save_adapter(peft.apply(make_model("mha"), CONFIGS["lora"]), tmp_path)
    with pytest.raises(ValueError, match="different shape: n_kv_heads saved 4 vs model 2"):
        peft.load_adapter(make_model("gqa"), tmp_path)


def test_load_onto_a_different_method(tmp_path):
    peft.save_adapter(peft.apply(make_model("mha"), CONFIGS["lora"]), tmp_path)
    with pytest.raises(ValueError, match="is lora but the model carries adapter_v1"):
        peft.load_adapter(peft.apply(make_model("mha"), CONFIGS["adapter_v1"]), tmp_path)
    with pytest.raises(ValueError, match="config .* differs from the attached one"):
        peft.load_adapter(peft.apply(make_model("mha"), peft.LoraConfig(r=5)), tmp_path)


def test_load_into_merged_model(tmp_path):
    model = peft.apply(make_model("mha"), CONFIGS["lora"])
    peft.save_adapter(model, tmp_path)
    peft.merge(model)
    with pytest.raises(ValueError, match="merged; call peft.unmerge"):
        peft.load_adapter(model, tmp_path)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="save one with peft.save_adapter"):
        peft.load_adapter(make_model("mha"), tmp_path / "nothing")


def test_merge_without_adapter():
    with pytest.raises(ValueError, match="cannot merge: no adapter is attached"):
        peft.merge(make_model("mha"))


def test_export_hf_refuses_other_methods(tmp_path):
    with pytest.raises(ValueError, match="export_hf writes LoRA adapters only; adapter_v2"):
        peft.export_hf(peft.apply(make_model("mha"), CONFIGS["adapter_v2"]), tmp_path)


def test_apply_rejects_unknown_configs_and_models():
    with pytest.raises(TypeError, match="unknown PEFT config dict"):
        peft.apply(make_model("mha"), {"r": 8})
    with pytest.raises(TypeError, match="expected a llama.Transformer"):
        peft.apply(torch.nn.Linear(4, 4), peft.LoraConfig())



def biased_wq(model) -> None:
    """Layer 0's wq replaced by an nn.Linear with a bias (no LLaMA linear has one)."""
    N, K = model.layers[0].attention.wq.weight.shape
    model.layers[0].attention.wq = torch.nn.Linear(K, N, dtype=torch.float64)


def foreign_w2(model) -> None:
    """Layer 1's w2 already replaced by something that is not the model's own nn.Linear."""
    model.layers[1].feed_forward.w2 = torch.nn.Identity()


def extended_layer_1(model) -> None:
    """Layer 1's attention already carries an extension."""
    model.layers[1].attention.extension = llama.model.AttentionExtension()


# peft.apply checks the whole request against the model before changing anything
@pytest.mark.parametrize("prepare, config, message", [
    (biased_wq, peft.LoraConfig(target_modules=("wq",)), r"layers\.0\.attention\.wq has a bias"),
    (biased_wq, peft.AdapterV2Config(adapter_layers=0), r"layers\.0\.attention\.wq has a bias"),
    (foreign_w2, peft.LoraConfig(target_modules=("w2",)), r"layers\.1\.feed_forward\.w2 is a Identity, not a plain"),
    # QLoRA quantises every block linear, targeted or not
    (foreign_w2, peft.LoraConfig(target_modules=("wq",), quantize_base=True), r"layers\.1\.feed_forward\.w2 is a"),
    (extended_layer_1, peft.AdapterV1Config(adapter_layers=1), r"layer 1 already has an attention extension"),
    (extended_layer_1, peft.AdapterV2Config(adapter_layers=2), r"layer 1 already has an attention extension"),
    (extended_layer_1, peft.ExcitorConfig(adapter_layers=1), r"layer 1 already has an attention extension"),
])
def test_apply_checks_the_request_before_changing_anything(prepare, config, message):
    model = make_model("mha")
    prepare(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        peft.apply(model, config)
    assert not hasattr(model, "peft_state") and [type(m) for m in model.modules()] == modules
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

# -- python -m peft.count -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, config, expected", [
    ("llama-7b", peft.LoraConfig(r=8, target_modules=("wq", "wv")), 4_194_304),  # Alpaca-LoRA, exact
    ("llama-7b", peft.AdapterV1Config(), 30 * 10 * 4096 + 30 * 32),  # 1.2M
    ("llama-65b", peft.AdapterV2Config(adapter_layers=0, scale_side="input"), 13_811_712),  # "14M"
    ("llama-7b", peft.ExcitorConfig(), 7_618_590),  # "about 7.6M"
])
def test_paper_parameter_counts(model_name, config, expected):
    assert count.measured(model_name, config) == expected


def test_count_cli_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(count, "ROWS", [r for r in count.ROWS if r[1] == "llama-7b"][:2])
    assert count.main(["--json", str(tmp_path / "count.json")]) == 0
    out = capsys.readouterr().out
    assert "4,194,304 (4.19M)" in out and "4.2M" in out and "yes" in out
    assert json.loads((tmp_path / "count.json").read_text())[0]["trainable"] == 4_194_304


# -- Llama 4 (MoE, NoPE layers, chunked attention, QK norm): every method attaches through the same override points
LLAMA4_CONFIGS = {
    "lora": peft.LoraConfig(r=4, target_modules=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")),
    "dora": peft.LoraConfig(r=2, target_modules=("wv", "w2"), use_dora=True),
    "adapter_v1": peft.AdapterV1Config(adapter_len=3, adapter_layers=4),
    "adapter_v2": peft.AdapterV2Config(adapter_len=3, adapter_layers=2),
    "excitor": peft.ExcitorConfig(adapter_len=5, adapter_layers=4, rank=3),
}


@pytest.mark.parametrize("preset", ["tiny-llama-4-scout", "tiny-llama-4-maverick"])
@pytest.mark.parametrize("name", list(LLAMA4_CONFIGS))
def test_llama4_identity_gradients_and_decoding(preset, name):
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs.from_name(preset)).double()
    toks = tokens(model.args, T=9)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, LLAMA4_CONFIGS[name])
        assert torch.equal(model(toks), base)
    randomize(model)
    out = model(toks)
    out.square().mean().backward()
    declared = set(peft.adapter_parameters(model))
    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared
    assert not any("experts.w" in n for n in declared)  # routed experts stay frozen (no expert LoRA yet)
    with torch.no_grad():
        model.setup_cache(toks.shape[0], 16)
        steps = [model(toks[:, :5], start_pos=0)] + [model(toks[:, t:t + 1], start_pos=t) for t in range(5, 9)]
    # Llama 4 rounds q/k to float32 (complex64 RoPE, QK norm), so decoding matches to float32 precision only
    a = model.args
    bound = tolerance(torch.float32, a.n_layers * (a.head_dim + 9))  # per layer as in test_llama4's cache test
    assert max_rel_error(torch.cat(steps, dim=1), out.detach()) <= bound


def test_export_hf_refuses_moe_shared_experts(tmp_path):
    model = peft.apply(llama.Transformer(llama.ModelArgs.from_name("tiny-llama-4-scout")),
                       peft.LoraConfig(target_modules=("w1",)))
    with pytest.raises(ValueError, match="dense LlamaForCausalLM layout only"):
        peft.export_hf(model, tmp_path)
