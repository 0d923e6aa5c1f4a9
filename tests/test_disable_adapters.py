"""peft.disable_adapters: with every adapter switched off, the policy computes the frozen base model bit for bit (the
DPO reference without a second copy), for every method; everything comes back on exit."""

from __future__ import annotations

import copy

import pytest
import torch

import llama
import peft
from kernels import nf4_dequantize
from peft.lora_core import quantize_frozen
from peft.targets import BLOCK_LINEARS, EXPERT_MATRICES, iter_experts, iter_linears
from tests.reference import moe as moe_reference
from tests.reference.paper_peft import PRESETS, make_model, tokens

ALL = BLOCK_LINEARS + ("output",)
METHODS = {
    "lora": peft.LoraConfig(r=4, target_modules=ALL),
    "dora": peft.LoraConfig(r=4, use_dora=True, target_modules=("wq", "wv", "w2", "output")),
    "qlora": peft.LoraConfig(r=4, quantize_base=True, target_modules=BLOCK_LINEARS),
    "adapter_v1": peft.AdapterV1Config(adapter_len=3, adapter_layers=2),
    "adapter_v2": peft.AdapterV2Config(adapter_len=3, adapter_layers=2, bias_scale_modules=ALL),
    "excitor": peft.ExcitorConfig(adapter_len=3, adapter_layers=2, rank=4),
}


def nf4_weight(w: torch.Tensor) -> torch.Tensor:
    """What QLoRA's frozen base holds instead of w: its NF4 round trip (decoded in float32, as NF4Linear does)."""
    return nf4_dequantize(quantize_frozen(w, "test"), torch.float32).to(w.dtype)


def nf4_base(model):
    """The base a QLoRA policy starts from: every block linear and routed expert matrix through NF4, dense."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for _, _, _, linear in iter_linears(base, BLOCK_LINEARS):
            linear.weight.copy_(nf4_weight(linear.weight))
        for _, _, experts in iter_experts(base):
            for name in EXPERT_MATRICES:
                W = getattr(experts, name)
                W.copy_(torch.stack([nf4_weight(W[e]) for e in range(W.shape[0])]))
    return base


def trained_policy(base, config, seed=0):
    """base + the method, every trainable parameter moved away from its initial value (as after training)."""
    policy = peft.apply(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def check_bit_for_bit(base, reference, policy, toks):
    labels = toks.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        expected = reference(toks)
        adapted = policy(toks)
        assert not torch.equal(adapted, expected)  # the adapter really changes the model
        with peft.disable_adapters(policy):
            off = policy(toks)
        assert torch.equal(off, expected)
        assert torch.equal(peft.sequence_logps(off, labels), peft.sequence_logps(expected, labels))
        assert torch.equal(policy(toks), adapted)  # everything is back


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adapters_off_is_the_base_model_bit_for_bit(method, kind, dtype):
    model = make_model(kind, dtype=dtype)
    reference = nf4_base(model) if method == "qlora" else model
    check_bit_for_bit(model, reference, trained_policy(model, METHODS[method]), tokens(model.args))


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("preset", ["tiny-llama-4-maverick"])  # MoE and dense layers
def test_routed_expert_adapters_off_is_the_base_bit_for_bit(preset, quantize):
    model = moe_reference.make_model(preset)
    reference = nf4_base(model) if quantize else model
    config = peft.LoraConfig(r=4, target_modules=("wq", "wv", "experts"), quantize_base=quantize)
    check_bit_for_bit(model, reference, trained_policy(model, config), moe_reference.tokens(model))


def test_no_adapter_is_in_the_graph_inside_and_training_resumes_after():
    model = make_model("gqa")
    policy = trained_policy(model, METHODS["lora"])
    toks = tokens(model.args)
    with peft.disable_adapters(policy):
        assert not policy(toks).requires_grad  # only frozen tensors took part: no gradient can reach the adapter
    policy(toks).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.adapter_parameters(policy).values())


def test_greedy_generation_with_adapters_off_equals_the_base():
    model = make_model("gqa")
    policy = trained_policy(model, METHODS["excitor"])  # Excitor keeps a key cache of its own beside the KV cache
    prompts = [[1, 5, 9, 3], [1, 7]]
    with peft.disable_adapters(policy):
        off = llama.generate(policy, prompts, 6)
    assert off == llama.generate(model, prompts, 6)
    assert llama.generate(policy, prompts, 6) != off


def test_everything_is_restored_when_the_block_raises():
    model = make_model("gqa")
    policy = trained_policy(model, METHODS["adapter_v2"])
    toks = tokens(model.args)
    with torch.no_grad():
        before = policy(toks)
    modules = dict(policy.named_modules())
    with pytest.raises(RuntimeError, match="inside"):
        with peft.disable_adapters(policy):
            raise RuntimeError("inside")
    assert dict(policy.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in policy.named_modules())
    with torch.no_grad():
        assert torch.equal(policy(toks), before)


def test_adapter_v2_records_the_norm_gains_outside_the_state_dict():
    model = make_model("gqa")
    policy = trained_policy(model, METHODS["adapter_v2"])
    assert not any(k.endswith("base_gain") for k in policy.state_dict())
    assert torch.equal(policy.norm.base_gain, model.norm.weight)
    assert not torch.equal(policy.norm.weight, model.norm.weight)  # the gain trained; the record did not


def test_bad_input():
    model = make_model("gqa")
    with pytest.raises(ValueError, match="needs a model with an adapter"):
        with peft.disable_adapters(model):
            pass
    policy = trained_policy(model, METHODS["lora"])
    peft.merge(policy)
    with pytest.raises(ValueError, match="adapter is merged"):
        with peft.disable_adapters(policy):
            pass
