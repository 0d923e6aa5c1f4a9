"""LLaMA-Excitor (peft.excitor) against the reconstructed equations (see peft/excitor.py), written independently."""

from __future__ import annotations

import math

import pytest
import torch

import peft
from peft.excitor import ExcitorBlock
from tests.reference.paper_peft import (GATE_FNS, PRESETS, Adapters, base_weights, check_against_reference, make_model,
                                        max_rel_error, reference_forward, tokens)


def config(**kw) -> peft.ExcitorConfig:
    return peft.ExcitorConfig(**{"adapter_len": 6, "adapter_layers": 2, "rank": 4, **kw})


def randomize(model, seed: int = 6) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(noise * (0.5 if name.endswith(("w_down", "w_up")) else 1.0))


def reference_adapters(model) -> Adapters:
    ad = Adapters()
    for i, layer in enumerate(model.layers):
        ext = layer.attention.extension
        if isinstance(ext, ExcitorBlock):
            ad.excitor[i] = (ext.prompt.detach(), ext.w_down.detach(), ext.w_up.detach(), ext.gate.detach(), ext.tau,
                             GATE_FNS[ext.gate_activation], ext.extra_key_rope == "absolute")
    return ad


def test_defaults_are_the_notes():
    c = peft.ExcitorConfig()
    assert (c.adapter_len, c.adapter_layers, c.rank, c.gate_init, c.up_init, c.extra_key_rope) == \
        (30, 30, 16, 1.0, "zeros", "none")


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("option", [dict(), dict(gate_init=0.0, up_init="kaiming"), dict(gate_per_head=True)])
def test_identity_at_init_bit_for_bit(kind, option):
    model = make_model(kind)
    toks = tokens(model.args)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, config(**option))
        assert torch.equal(model(toks), base)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("option", [dict(), dict(gate_per_head=True, gate_activation="tanh"),
                                    dict(prompt_temperature=2.5, adapter_layers=1), dict(extra_key_rope="absolute")])
def test_forward_matches_reconstructed_equations(kind, option):
    """The reference uses the un-centred Key^extra = softmax(Q^e Pᵀ/τ) P; ours subtracts p̄ (a per-row constant)."""
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, config(**option))
    randomize(model)
    check_against_reference(model, toks, reference_adapters(model))  # logits and the float64 last hidden state
    with torch.no_grad():
        ours, frozen = model(toks), reference_forward(model.args, base_weights(model), toks)
    assert max_rel_error(ours, frozen) > 1e-3


def test_default_temperature_is_sqrt_width():
    model = peft.apply(make_model("mha"), config())
    assert model.layers[1].attention.extension.tau == math.sqrt(model.args.n_heads * model.args.head_dim)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_gradients_reach_exactly_the_adapter(kind):
    model = make_model(kind)
    peft.apply(model, config())
    randomize(model)
    model(tokens(model.args)).square().mean().backward()
    declared = set(peft.adapter_parameters(model))
    assert len(declared) == 8  # prompt, w_down, w_up, gate in each of 2 layers
    for name, p in model.named_parameters():
        if name in declared:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("option, moving", [(dict(), "w_up"), (dict(gate_init=0.0, up_init="kaiming"), "gate")])
def test_which_parameter_moves_at_step_zero(option, moving):
    """Option B (W_up = 0, g = 1): W_up gets the gradient, like LoRA's B. Option A (g = 0): only the gate moves."""
    model = make_model("mha")
    peft.apply(model, config(**option))
    model(tokens(model.args)).square().mean().backward()
    for name, p in peft.adapter_parameters(model).items():
        nonzero = torch.count_nonzero(p.grad) > 0
        assert nonzero == name.endswith(moving), name


def test_zero_gradient_trap():
    """gate = 0 and W_up = 0 together: every gradient is exactly 0 (the config refuses it; here forced by hand)."""
    with pytest.raises(ValueError, match="zero-gradient trap"):
        peft.ExcitorConfig(gate_init=0.0, up_init="zeros")
    model = make_model("mha")
    peft.apply(model, config())
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.extension.gate.zero_()
    model(tokens(model.args)).square().mean().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in peft.adapter_parameters(model).values())


def test_causal_future_tokens_do_not_leak():
    model = make_model("gqa")
    peft.apply(model, config())
    randomize(model)
    toks = tokens(model.args, B=1, T=10)
    changed = toks.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % model.args.vocab_size
    with torch.no_grad():
        assert torch.equal(model(toks)[:, :7], model(changed)[:, :7])


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("rope", ["none", "absolute"])
def test_kv_cache_decoding_equals_full_forward(kind, rope):
    model = make_model(kind)
    peft.apply(model, config(extra_key_rope=rope))
    randomize(model)
    toks = tokens(model.args, T=9)
    with torch.no_grad():
        full = model(toks)
        for _ in range(2):  # a second cache must be picked up (the Excitor keeps its own cache of extra keys)
            model.setup_cache(toks.shape[0], 16)
            steps = [model(toks[:, :4], start_pos=0)] + [model(toks[:, t:t + 1], start_pos=t) for t in range(4, 9)]
            assert max_rel_error(torch.cat(steps, dim=1), full) < 1e-12
        model.clear_cache()
        assert max_rel_error(model(toks), full) < 1e-12


def test_cache_set_up_mid_decoding_is_refused():
    model = make_model("mha")
    peft.apply(model, config())
    toks = tokens(model.args, T=6)
    model.setup_cache(2, 16)
    with torch.no_grad():
        model(toks[:, :3], start_pos=0)
        model.setup_cache(2, 16)  # a new, empty KV cache, but decoding continues at position 3
        with pytest.raises(RuntimeError, match="set up after decoding started"):
            model(toks[:, 3:4], start_pos=3)


def test_parameter_count_formula():
    model = peft.apply(make_model("mha"), config())
    a = model.args
    K, r, L, HD = 6, 4, 2, a.n_heads * a.head_dim
    assert peft.trainable_parameters(model) == L * (K * HD + r * a.dim + HD * r + 1)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(adapter_len=-1), "adapter_len must be a positive integer"),
    (dict(prompt_temperature=0.0), "prompt_temperature"),
    (dict(gate_activation="relu"), "gate_activation"),
    (dict(up_init="ones"), "up_init"),
    (dict(extra_key_rope="relative"), "extra_key_rope"),
])
def test_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        config(**bad)


def test_more_adapted_layers_than_the_model_has():
    with pytest.raises(ValueError, match="adapter_layers=30 but the model has only 2 layers"):
        peft.apply(make_model("mha"), peft.ExcitorConfig())


def test_cannot_merge():
    with pytest.raises(ValueError, match="excitor cannot be merged"):
        peft.merge(peft.apply(make_model("mha"), config()))
