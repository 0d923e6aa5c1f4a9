"""QLoRA on Llama 4's routed experts (peft.qlora_experts): NF4 experts with per-expert LoRA, float64.

Reference: the same model with every block linear and every expert matrix replaced by its NF4 round trip
(`kernels.nf4_quantize`, then the plain-PyTorch `nf4_dequantize_reference`, one expert matrix at a time), adapted
with plain LoRA (`peft.lora_experts`, itself checked against a hand-written MoE in test_lora_experts.py) and given
the same adapter values: QLoRA must equal LoRA on the dequantised weights (QLoRA eq. 5).
"""

from __future__ import annotations

import copy

import pytest
import torch

import peft
from kernels import nf4_quantize
from kernels.nf4_dequant import nf4_dequantize_reference
from peft.lora_experts import LoRAExperts
from peft.qlora import dequantize_model
from peft.qlora_experts import NF4Experts, QLoRAExperts
from peft.targets import BLOCK_LINEARS, iter_experts, iter_linears
from tests.reference.moe import PRESETS, make_model, randomize, rel_error, tokens


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w (float64) -> NF4 (block 64, double quantisation) -> back, as float64."""
    return nf4_dequantize_reference(nf4_quantize(w.float(), blocksize=64, double_quant=True), torch.float64)


def dequantised_copy(model):
    """The model with every block linear and every routed expert matrix (per expert) replaced by its NF4 round trip."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, _, _, linear in iter_linears(ref, BLOCK_LINEARS):
            linear.weight.copy_(nf4_round_trip(linear.weight))
        for _, _, experts in iter_experts(ref):
            for name in ("w1", "w2", "w3"):
                W = getattr(experts, name)
                W.copy_(torch.stack([nf4_round_trip(W[e]) for e in range(W.shape[0])]))
    return ref


def qlora_and_reference(preset: str, targets=("wq", "wv", "experts")):
    base = make_model(preset)
    ref = dequantised_copy(base)
    qmodel = peft.apply(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets, quantize_base=True))
    peft.apply(ref, peft.LoraConfig(r=4, target_modules=targets))
    randomize(qmodel)
    adapters = peft.adapter_parameters(qmodel)
    reference_adapters = peft.adapter_parameters(ref)
    assert adapters.keys() == reference_adapters.keys()  # one adapter file fits LoRA and QLoRA experts alike
    with torch.no_grad():
        for name, p in reference_adapters.items():
            p.copy_(adapters[name])
    return qmodel, ref


@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
@pytest.mark.parametrize("preset", PRESETS)
def test_qlora_experts_equal_lora_on_the_dequantised_weights(preset, dispatch):
    qmodel, ref = qlora_and_reference(preset)
    moe_layers = [m for m in qmodel.modules() if isinstance(m, QLoRAExperts)]
    assert moe_layers and not any(isinstance(m, LoRAExperts) for m in qmodel.modules())
    for model in (qmodel, ref):
        for layer in model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.dispatch = dispatch
    x = tokens(qmodel)
    with torch.no_grad():
        assert rel_error(qmodel(x), ref(x)) <= 1e-12


def test_only_the_adapters_train_and_the_nf4_experts_are_buffers():
    qmodel, _ = qlora_and_reference("tiny-llama-4-scout")
    trainable = {n for n, p in qmodel.named_parameters() if p.requires_grad}
    assert trainable == set(peft.adapter_parameters(qmodel))
    experts = qmodel.layers[0].feed_forward.experts
    assert not any(n.startswith(("w1", "w2", "w3")) for n, _ in experts.named_parameters())
    E, C, Fh = experts.n_experts, experts.dim, experts.hidden_dim
    assert experts.w1_packed.shape == (E, C * Fh // 2, 1) and experts.w1_packed.dtype == torch.uint8  # 4 bits
    qmodel(tokens(qmodel)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft.adapter_parameters(qmodel).values())


def test_untargeted_experts_become_frozen_nf4_experts():
    base = make_model("tiny-llama-4-maverick")
    ref = dequantised_copy(base)
    qmodel = peft.apply(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=("wq",), quantize_base=True))
    assert [type(layer.feed_forward.experts) for layer in qmodel.layers if hasattr(layer.feed_forward, "router")] \
        == [NF4Experts, NF4Experts]
    peft.apply(ref, peft.LoraConfig(r=4, target_modules=("wq",)))
    randomize(qmodel)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(ref).items():
            p.copy_(peft.adapter_parameters(qmodel)[name])
        x = tokens(qmodel)
        assert rel_error(qmodel(x), ref(x)) <= 1e-12
        before = qmodel(x)
        dequantize_model(qmodel)  # deployment: frozen NF4 experts back to dense llama.moe.Experts
        assert type(qmodel.layers[1].feed_forward.experts).__name__ == "Experts"
        assert torch.equal(qmodel(x), before)


def test_merge_is_dense_and_unmerge_restores_the_nf4_model_exactly():
    qmodel, _ = qlora_and_reference("tiny-llama-4-scout")
    x = tokens(qmodel)
    with torch.no_grad():
        before = qmodel(x)
        peft.merge(qmodel)
        experts = qmodel.layers[0].feed_forward.experts
        assert experts.merged and experts.merged_w2.shape == (experts.n_experts, experts.hidden_dim, experts.dim)
        assert rel_error(qmodel(x), before) <= 1e-10
        with pytest.raises(RuntimeError, match="already merged"):
            experts.merge()
        peft.unmerge(qmodel)
        assert experts.merged_w2 is None and torch.equal(qmodel(x), before)


def test_bad_expert_weight_leaves_the_model_untouched():
    model = make_model("tiny-llama-4-scout")
    with torch.no_grad():
        model.layers[1].feed_forward.experts.w2[3, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="cannot quantise expert matrix w2"):
        peft.apply(model, peft.LoraConfig(r=4, target_modules=("experts",), quantize_base=True))
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    assert not any(isinstance(m, NF4Experts) for m in model.modules())
