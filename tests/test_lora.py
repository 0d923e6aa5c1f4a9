"""LoRA, rsLoRA and DoRA (peft.lora) against the papers' equations, written independently in test_peft_reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
import peft
from peft import lora as lora_module
from tests.reference.paper_peft import (PRESETS, Adapters, base_weights, check_against_reference, forward_with_hidden,
                                        make_model, max_rel_error, reference_forward, tokens)
from tests.reference.tolerance import forward_tolerance

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
VARIANTS = {
    "lora": dict(r=4, alpha=8.0, target_modules=("wq", "wv")),
    "lora-all": dict(r=3, alpha=5.0, target_modules=ALL),
    "rslora": dict(r=4, alpha=8.0, target_modules=("wk", "wo", "w2"), use_rslora=True),
    "dora": dict(r=4, alpha=8.0, target_modules=ALL, use_dora=True),
    "layer-subset": dict(r=2, alpha=2.0, target_modules=("wq", "w3", "output"), layers=(1,)),
}


def randomize(model, seed: int = 3) -> None:
    """Non-zero adapter parameters (B ≠ 0, magnitudes away from ‖W0‖) so every term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("lora_magnitude"):
                p.mul_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)


def reference_adapters(model) -> Adapters:
    """Read the adapter tensors by name into the reference's plain structure."""
    ad = Adapters()
    for name, module in model.named_modules():
        if isinstance(module, lora_module.LoRALinear):
            A, B, s = module.lora_A.detach(), module.lora_B.detach(), module.scaling
            if module.use_dora:
                ad.dora[name] = (A, B, s, module.lora_magnitude.detach())
            else:
                ad.lora[name] = (A, B, s)
    return ad


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_at_init_bit_for_bit(kind, variant):
    model = make_model(kind)
    toks = tokens(model.args)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, peft.LoraConfig(**VARIANTS[variant]))
        assert torch.equal(model(toks), base)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_paper_equations(kind, variant):
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, peft.LoraConfig(**VARIANTS[variant]))
    randomize(model)
    check_against_reference(model, toks, reference_adapters(model))  # logits and the float64 last hidden state
    with torch.no_grad():
        ours, frozen = model(toks), reference_forward(model.args, base_weights(model), toks)
    assert max_rel_error(ours, frozen) > 1e-3  # the adapter really changes the function


def test_scaling_rules():
    assert peft.LoraConfig(r=16, alpha=32).scaling == 2.0  # LoRA: alpha / r
    assert peft.LoraConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0  # rsLoRA: alpha / sqrt(r)


def test_initialisation_distributions():
    torch.manual_seed(0)
    model = make_model("mha")
    peft.apply(model, peft.LoraConfig(r=8, target_modules=("w2",)))
    layer = model.layers[0].feed_forward.w2
    K = layer.in_features
    bound = 1.0 / math.sqrt(K)  # Kaiming-uniform(a=√5) on [r, K] = U(-1/√K, 1/√K), the nn.Linear default
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    model = make_model("mha")
    peft.apply(model, peft.LoraConfig(r=8, target_modules=("w2",), init="gaussian"))
    assert abs(model.layers[0].feed_forward.w2.lora_A.std().item() - 1 / 8) < 0.02  # N(0, 1/r²)


@pytest.mark.parametrize("variant", ["lora-all", "dora", "layer-subset"])
def test_gradients_reach_exactly_the_adapter(variant):
    model = make_model("gqa")
    peft.apply(model, peft.LoraConfig(**VARIANTS[variant]))
    randomize(model)
    model(tokens(model.args)).square().mean().backward()
    declared = set(peft.adapter_parameters(model))
    for name, p in model.named_parameters():
        if name in declared:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert peft.trainable_parameters(model) == sum(p.numel() for p in peft.adapter_parameters(model).values())


def test_dora_norm_is_detached():
    """DoRA §4.3: ‖W0 + sBA‖ is a constant in backprop. Gradients must match that graph and not the full one."""
    torch.manual_seed(0)
    model = make_model("mha")
    peft.apply(model, peft.LoraConfig(r=2, target_modules=("wq",), use_dora=True))
    randomize(model)
    layer = model.layers[0].attention.wq
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    grad_out = torch.randn(5, layer.out_features, dtype=torch.float64)
    layer(x).backward(grad_out)
    ours = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.lora_magnitude.grad.clone())

    def grads(detach: bool):
        A, B, m = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
        V = layer.weight.detach() + layer.scaling * B @ A
        n = V.norm(dim=1, keepdim=True)
        Wp = m[:, None] * V / (n.detach() if detach else n)
        (x @ Wp.T).backward(grad_out)
        return A.grad, B.grad, m.grad

    for a, b in zip(ours, grads(detach=True)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours[0], grads(detach=False)[0], rtol=1e-6)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("variant", ["lora-all", "dora", "rslora"])
def test_merge_equals_unmerged_forward(kind, variant):
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, peft.LoraConfig(**VARIANTS[variant]))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = torch.cat(forward_with_hidden(model, toks), dim=-1)  # logits and float64 hidden state
        peft.merge(model)
        merged = torch.cat(forward_with_hidden(model, toks), dim=-1)
        if model.args.tie_word_embeddings:  # merging the head must not write into the shared embedding
            assert torch.equal(model.tok_embeddings.weight, before["tok_embeddings.weight"])
        peft.unmerge(model)
        again = torch.cat(forward_with_hidden(model, toks), dim=-1)
    assert max_rel_error(merged, unmerged) <= 1e-10
    assert max_rel_error(again, unmerged) <= 1e-12
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], rtol=0, atol=1e-13), k
    if model.args.tie_word_embeddings:
        assert model.output.weight is model.tok_embeddings.weight  # re-tied after unmerge


def test_merge_in_float32_for_low_precision_weights():
    model = make_model("mha").to(torch.bfloat16)
    peft.apply(model, peft.LoraConfig(r=4, target_modules=("wv",)))
    randomize(model)
    layer = model.layers[0].attention.wv
    assert layer.lora_A.dtype == torch.float32  # adapter master weights in float32 for a bf16 model
    W = layer.weight.detach().clone()
    expected = (W.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(torch.bfloat16)
    peft.merge(model)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, expected)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("variant", ["lora-all", "dora"])
def test_kv_cache_decoding_equals_full_forward(kind, variant):
    model = make_model(kind)
    peft.apply(model, peft.LoraConfig(**VARIANTS[variant]))
    randomize(model)
    toks = tokens(model.args, T=9)
    with torch.no_grad():
        full = model(toks)
        model.setup_cache(toks.shape[0], 16)
        steps = [model(toks[:, :4], start_pos=0)] + [model(toks[:, t:t + 1], start_pos=t) for t in range(4, 9)]
        model.clear_cache()
    assert max_rel_error(torch.cat(steps, dim=1), full) < 1e-12


def test_dropout_only_on_the_lora_input():
    torch.manual_seed(0)
    model = make_model("mha")
    peft.apply(model, peft.LoraConfig(r=4, dropout=0.5, target_modules=("wq",)))
    randomize(model)
    layer = model.layers[0].attention.wq
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    W, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scaling
    assert torch.allclose(y, x @ W.T + s * dropped @ A.T @ B.T, rtol=1e-12, atol=1e-12)
    layer.eval()  # dropout is the identity at evaluation
    assert torch.allclose(layer(x), x @ W.T + s * x @ A.T @ B.T, rtol=1e-12, atol=1e-12)


def test_one_kernel_call_site(monkeypatch):
    """Without dropout the layer goes through lora_matmul(x, W, A, B, s) (the fused kernel when present)."""
    calls = []

    def fake(x, W, A, B, scale):
        calls.append((tuple(x.shape), x.dtype, scale))
        return F.linear(x, W) + scale * F.linear(F.linear(x, A), B)

    monkeypatch.setattr(kernels, "lora_matmul", fake)
    model = make_model("mha", dtype=torch.float32)
    peft.apply(model, peft.LoraConfig(r=4, alpha=8, target_modules=("wq",)))
    model(tokens(model.args, B=2, T=5))
    assert calls == [((2, 5, model.args.dim), torch.float32, 2.0)] * model.args.n_layers
    calls.clear()
    model.double()(tokens(model.args))  # float64 is not a kernel dtype: the eager formula
    assert calls == []
    model = make_model("mha", dtype=torch.float32)
    peft.apply(model, peft.LoraConfig(r=4, dropout=0.1, target_modules=("wq",)))
    model.train()(tokens(model.args))
    assert calls == []  # active dropout: the unfused formula
    model.eval()(tokens(model.args))
    assert len(calls) == model.args.n_layers


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_target_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown target module name\(s\) \['q_proj'\].*wq, wk, wv, wo"):
        peft.LoraConfig(target_modules=("q_proj",))


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_rank_must_be_positive_integer(r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        peft.LoraConfig(r=r)


def test_rank_larger_than_layer():
    model = make_model("gqa")  # wk maps 64 -> 32
    with pytest.raises(ValueError, match=r"r=40 exceeds layers\.0\.attention\.wk's size 64->32; use r <= 32"):
        peft.apply(model, peft.LoraConfig(r=40, target_modules=("wk",)))
    assert peft.trainable_parameters(model) == sum(p.numel() for p in model.parameters())  # untouched


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"layer indices \[2\] are out of range .* 2 layers"):
        peft.apply(make_model("mha"), peft.LoraConfig(layers=(0, 2)))


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(dropout=1.0), dict(init="xavier"), dict(target_modules=())])
def test_other_config_errors(bad):
    with pytest.raises(ValueError):
        peft.LoraConfig(**bad)


def test_apply_twice():
    model = peft.apply(make_model("mha"), peft.LoraConfig())
    with pytest.raises(ValueError, match=r"already has an adapter attached \(lora\)"):
        peft.apply(model, peft.LoraConfig(target_modules=("wk",)))


def test_merge_twice_and_unmerge_unmerged():
    model = peft.apply(make_model("mha"), peft.LoraConfig())
    with pytest.raises(ValueError, match="not merged"):
        peft.unmerge(model)
    peft.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        peft.merge(model)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_through_the_kernels_package(monkeypatch, backend):
    """float32 goes through kernels.lora_matmul: its reference, or its Triton kernel (interpreted on CPU)."""
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    config = peft.LoraConfig(r=4, alpha=8.0, target_modules=("wq", "wv", "w2"))
    model32 = peft.apply(make_model("gqa", dtype=torch.float32), config)
    randomize(model32)
    model64 = peft.apply(make_model("gqa"), config)
    with torch.no_grad():
        for p64, p32 in zip(peft.adapter_parameters(model64).values(), peft.adapter_parameters(model32).values()):
            p64.copy_(p32)
    toks = tokens(model32.args, T=6)
    out32 = model32(toks)
    out32.square().mean().backward()
    out64 = model64(toks)
    out64.square().mean().backward()
    bound = forward_tolerance(model32.args, toks.shape[1], torch.float32)
    assert max_rel_error(out32.double(), out64.detach()) <= bound
    for (name, p32), p64 in zip(peft.adapter_parameters(model32).items(), peft.adapter_parameters(model64).values()):
        assert max_rel_error(p32.grad.double(), p64.grad) <= 2 * bound, name  # backward: every reduction once more
