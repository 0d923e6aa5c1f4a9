"""LoRA on Llama 4's routed experts (peft.lora_experts, target name `experts`), checked against a hand-written MoE
layer (`tests/reference/moe.py`)."""

from __future__ import annotations

import math

import pytest
import torch

import llama
import peft
from peft.lora_experts import LoRAExperts
from tests.reference.moe import PRESETS, make_model, moe_modules, randomize, reference_moe, rel_error, tokens
from tests.reference.tolerance import tolerance

# The routing weight is a float32 sigmoid in a float64 layer: the router logit's rounding to float32 and the
# sigmoid's exp, add and divide, whose last bit depends on how many rows one call holds.
SIGMOID_BOUND = tolerance(torch.float32, 4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("targets", [("experts",), ("wq", "wv", "w1", "w2", "w3", "experts")])
def test_identity_at_init_bit_for_bit(name, targets):
    model = make_model(name)
    toks = tokens(model)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, peft.LoraConfig(r=4, alpha=8.0, target_modules=targets))
        assert torch.equal(model(toks), base)
    assert all(isinstance(m.experts, LoRAExperts) for m in moe_modules(model))
    assert all(torch.count_nonzero(m.experts.lora_B[n]) == 0 for m in moe_modules(model) for n in ("w1", "w2", "w3"))


# -- the equations ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_moe_layer_matches_hand_written_formula(name, use_rslora):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=3, alpha=6.0, target_modules=("experts",), use_rslora=use_rslora))
    randomize(model)
    g = torch.Generator().manual_seed(7)
    for moe in moe_modules(model):
        assert moe.experts.scaling == (6.0 / math.sqrt(3) if use_rslora else 2.0)
        x = torch.randn(2, 9, model.args.dim, generator=g, dtype=torch.float64)  # [B, T, C]
        expected = reference_moe(moe, x.reshape(-1, x.shape[-1])).reshape(x.shape)
        for dispatch in ("sorted", "dense"):
            moe.dispatch = dispatch
            with torch.no_grad():
                assert rel_error(moe(x), expected) <= SIGMOID_BOUND, dispatch  # see reference_moe
        # the update matters: the same layer without the adapters differs
        with torch.no_grad():
            moe.experts.merged = True  # forward with W only (merge flag without folding: base experts)
            assert rel_error(moe(x), expected) > 1e-3
            moe.experts.merged = False


@pytest.mark.parametrize("name", PRESETS)
def test_sorted_dispatch_equals_dense_reference_with_adapters(name):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=4, target_modules=("w1", "w3", "experts")))
    randomize(model)
    toks = tokens(model)
    with torch.no_grad():
        sorted_out = model(toks)
        for moe in moe_modules(model):
            moe.dispatch = "dense"
        dense_out = model(toks)
    assert rel_error(sorted_out, dense_out) < 1e-12


# -- training -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_gradients_reach_only_the_adapter(name):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=2, target_modules=("experts",)))
    randomize(model)
    toks = tokens(model, T=16)
    model(toks).square().mean().backward()
    declared = set(model.peft_state.parameter_names)
    assert declared == {f"layers.{i}.feed_forward.experts.lora_{s}.{w}" for i, layer in enumerate(model.layers)
                        if hasattr(layer.feed_forward, "router") for s in "AB" for w in ("w1", "w2", "w3")}
    for pname, p in model.named_parameters():
        if pname in declared:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, pname
    # per expert: an expert that received tokens gets a gradient, one that received none gets exactly zero
    for moe in moe_modules(model):
        used = moe.stats.tokens_per_expert > 0
        grad_norm = moe.experts.lora_B["w2"].grad.flatten(1).abs().sum(1)  # [E]
        assert torch.equal(grad_norm > 0, used)


@pytest.mark.parametrize("name", PRESETS)
def test_trainable_parameter_count(name):
    model = make_model(name)
    r = 4
    peft.apply(model, peft.LoraConfig(r=r, target_modules=("experts",)))
    a = model.args
    n_moe = len(moe_modules(model))
    # per MoE layer and expert: w1, w3 (C->F) and w2 (F->C), each r·(K + N)
    expected = n_moe * a.moe_args.num_experts * 3 * r * (a.dim + a.moe_hidden_dim)
    assert peft.trainable_parameters(model) == expected
    assert n_moe == (4 if name.endswith("scout") else 2)


# -- merge, save/load, cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_merge_equals_unmerged_and_unmerge_restores(name):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=4, alpha=16.0, target_modules=("wq", "w2", "experts")))
    randomize(model)
    toks = tokens(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts.w" in k}
    with torch.no_grad():
        unmerged = model(toks)
        peft.merge(model)
        merged = model(toks)
        changed = {k: v for k, v in model.state_dict().items() if "experts.w" in k}
        assert all(not torch.equal(changed[k], before[k]) for k in before)
        peft.unmerge(model)
        restored = model(toks)
    assert rel_error(merged, unmerged) <= 1e-10
    assert rel_error(restored, unmerged) <= 1e-12
    for k, v in model.state_dict().items():
        if k in before:
            assert (v - before[k]).abs().max() < 1e-12, k
    with pytest.raises(ValueError, match="already merged"):
        peft.merge(peft.merge(model))


@pytest.mark.parametrize("name", PRESETS)
def test_save_load_round_trip(name, tmp_path):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=3, alpha=6.0, target_modules=("experts", "wo"), use_rslora=True))
    randomize(model)
    toks = tokens(model)
    with torch.no_grad():
        expected = model(toks)
    peft.save_adapter(model, tmp_path / "ad")
    fresh = peft.load_adapter(make_model(name), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(toks), expected)
    assert fresh.peft_state.config.target_modules == ("experts", "wo")


@pytest.mark.parametrize("name", PRESETS)
def test_kv_cache_decode_equals_full_forward(name):
    model = make_model(name)
    peft.apply(model, peft.LoraConfig(r=4, target_modules=("wk", "w1", "experts")))
    randomize(model)
    toks = tokens(model, T=20)
    with torch.no_grad():
        full = model(toks)
        model.setup_cache(toks.shape[0], toks.shape[1])
        steps = [model(toks[:, :7], start_pos=0)]
        for t in range(7, toks.shape[1]):
            steps.append(model(toks[:, t:t + 1], start_pos=t))
        model.clear_cache()
    # float32 router sigmoid (and QK-norm) whose last bit depends on how many rows one call holds, as in
    # test_llama4's cache test; an adapter missing from the decode path would differ by O(1)
    a = model.args
    assert rel_error(torch.cat(steps, dim=1), full) <= tolerance(torch.float32, a.n_layers * (a.head_dim + 9))


# -- bad input --------------------------------------------------------------------------------------------------------
def test_unknown_target_lists_valid_names_including_experts():
    with pytest.raises(ValueError, match="valid names are .*experts"):
        peft.LoraConfig(target_modules=("experts.w1",))


def test_experts_on_a_dense_model_or_dense_layers_is_rejected():
    with pytest.raises(ValueError, match="only in Llama 4 MoE layers"):
        peft.apply(llama.Transformer(llama.ModelArgs.from_name("tiny-llama-3")),
                   peft.LoraConfig(target_modules=("experts",)))
    model = make_model("tiny-llama-4-maverick")  # layers 1 and 3 are MoE, 0 and 2 dense
    with pytest.raises(ValueError, match="experts"):
        peft.apply(model, peft.LoraConfig(target_modules=("experts",), layers=(0, 2)))
    peft.apply(model, peft.LoraConfig(r=2, target_modules=("experts",), layers=(3,)))
    assert isinstance(model.layers[3].feed_forward.experts, LoRAExperts)
    assert not isinstance(model.layers[1].feed_forward.experts, LoRAExperts)


def test_dora_on_experts_with_an_nf4_base_is_rejected():
    with pytest.raises(ValueError, match="use_dora=False"):
        peft.LoraConfig(target_modules=("experts",), use_dora=True, quantize_base=True)


# -- DoRA -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_dora_experts_identity_at_init_and_hand_written_formula(name):
    model = make_model(name)
    toks = tokens(model)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, peft.LoraConfig(r=3, alpha=6.0, target_modules=("experts",), use_dora=True))
        assert torch.equal(model(toks), base)  # m = ‖W0‖ and B = 0: m/n = 1 exactly
    randomize(model)  # A, B and the magnitudes
    g = torch.Generator().manual_seed(7)
    for moe in moe_modules(model):
        assert moe.experts.lora_magnitude["w2"].shape == (model.args.moe_args.num_experts, model.args.dim)
        x = torch.randn(2, 9, model.args.dim, generator=g, dtype=torch.float64)
        expected = reference_moe(moe, x.reshape(-1, x.shape[-1])).reshape(x.shape)
        for dispatch in ("sorted", "dense"):
            moe.dispatch = dispatch
            with torch.no_grad():
                assert rel_error(moe(x), expected) <= SIGMOID_BOUND, dispatch


def test_dora_experts_train_the_magnitude_and_merge():
    model = make_model("tiny-llama-4-maverick")
    peft.apply(model, peft.LoraConfig(r=2, target_modules=("experts",), use_dora=True))
    randomize(model)
    toks = tokens(model)
    model(toks).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.adapter_parameters(model).values())
    assert any(".lora_magnitude.w1" in n for n in peft.adapter_parameters(model))
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts.w" in k}
    with torch.no_grad():
        unmerged = model(toks)
        peft.merge(model)
        assert rel_error(model(toks), unmerged) <= 1e-10
        peft.unmerge(model)
        assert rel_error(model(toks), unmerged) <= 1e-12
    assert all((model.state_dict()[k] - v).abs().max() < 1e-12 for k, v in before.items())


def test_rank_larger_than_the_experts_is_rejected():
    model = make_model("tiny-llama-4-scout")
    with pytest.raises(ValueError, match="use r <= 64"):
        peft.apply(model, peft.LoraConfig(r=65, target_modules=("experts",)))


def test_export_hf_refuses_expert_lora(tmp_path):
    model = make_model("tiny-llama-4-scout")
    peft.apply(model, peft.LoraConfig(target_modules=("experts",)))
    with pytest.raises(ValueError, match="routed experts.*save_adapter"):
        peft.export_hf(model, tmp_path / "hf")
