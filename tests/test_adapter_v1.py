"""LLaMA-Adapter V1 (peft.adapter_v1) against the paper's concatenated-key form with two softmaxes (eqs. 5-8)."""

from __future__ import annotations

import pytest
import torch

import peft
from peft.adapter_v1 import AdaptionPrompt, set_visual_prompts
from tests.reference.paper_peft import (GATE_FNS, PRESETS, Adapters, base_weights, check_against_reference, make_model,
                                        max_rel_error, reference_forward, tokens)


def config(**kw) -> peft.AdapterV1Config:
    return peft.AdapterV1Config(**{"adapter_len": 5, "adapter_layers": 2, **kw})


def randomize(model, seed: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.7 if name.endswith("gate") else 1.0))


def reference_adapters(model) -> Adapters:
    ad = Adapters()
    for i, layer in enumerate(model.layers):
        ext = layer.attention.extension
        if isinstance(ext, AdaptionPrompt):
            ad.prompts[i] = (ext.prompt.detach(), ext.gate.detach(), GATE_FNS[ext.gate_activation])
    return ad


def test_defaults_are_the_papers():
    c = peft.AdapterV1Config()
    assert (c.adapter_len, c.adapter_layers, c.gate_activation) == (10, 30, "tanh")


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("gate", ["tanh", "identity"])
def test_identity_at_init_bit_for_bit(kind, gate):
    model = make_model(kind)
    toks = tokens(model.args)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, config(gate_activation=gate))
        assert torch.equal(model(toks), base)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("gate", ["tanh", "identity"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_forward_matches_paper_equations(kind, gate, n_layers):
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, config(gate_activation=gate, adapter_layers=n_layers))
    randomize(model)
    check_against_reference(model, toks, reference_adapters(model))  # logits and the float64 last hidden state
    with torch.no_grad():
        ours, frozen = model(toks), reference_forward(model.args, base_weights(model), toks)
    assert max_rel_error(ours, frozen) > 1e-3


def test_tanh_and_identity_differ_after_training():
    """The two gate readings (training vs inference code) agree at g = 0 but not for a trained gate."""
    toks = tokens(make_model("mha").args)
    outs = []
    for gate in ("tanh", "identity"):
        model = make_model("mha")
        peft.apply(model, config(gate_activation=gate))
        randomize(model)
        with torch.no_grad():
            outs.append(model(toks))
    assert max_rel_error(outs[0], outs[1]) > 1e-3


def test_top_layers_only():
    model = peft.apply(make_model("mha"), config(adapter_layers=1))
    assert model.layers[0].attention.extension is None
    assert isinstance(model.layers[1].attention.extension, AdaptionPrompt)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_gradients_reach_exactly_the_adapter(kind):
    model = make_model(kind)
    peft.apply(model, config())
    randomize(model)
    model(tokens(model.args)).square().mean().backward()
    declared = set(peft.adapter_parameters(model))
    for name, p in model.named_parameters():
        if name in declared:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_zero_init_only_the_gate_moves_at_step_zero():
    """With g = 0 the prompts' gradient is exactly 0 (it carries the factor γ(0) = 0); the gate's is not."""
    model = make_model("mha")
    peft.apply(model, config())
    model(tokens(model.args)).square().mean().backward()
    for name, p in peft.adapter_parameters(model).items():
        if name.endswith("prompt"):
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("kind", list(PRESETS))
def test_kv_cache_decoding_equals_full_forward(kind):
    model = make_model(kind)
    peft.apply(model, config())
    randomize(model)
    toks = tokens(model.args, T=9)
    with torch.no_grad():
        full = model(toks)
        model.setup_cache(toks.shape[0], 16)
        steps = [model(toks[:, :3], start_pos=0)] + [model(toks[:, t:t + 2], start_pos=t) for t in (3, 5, 7)]
        model.clear_cache()
    assert max_rel_error(torch.cat(steps, dim=1), full) < 1e-12


def test_visual_prompt_extension_point():
    """set_visual_prompts adds a per-example tensor to every adapted layer's prompts (V1 §3.3: P_l + Repeat(I_p))."""
    model = make_model("gqa")
    peft.apply(model, config())
    randomize(model)
    toks = tokens(model.args, B=2)
    visual = torch.randn(2, 1, model.args.dim, dtype=torch.float64)
    set_visual_prompts(model, visual)
    with torch.no_grad():
        ours = model(toks)
        for b in range(2):
            ad = reference_adapters(model)
            ad.prompts = {i: (P + visual[b], g, f) for i, (P, g, f) in ad.prompts.items()}
            ref = reference_forward(model.args, base_weights(model), toks[b:b + 1], ad)
            assert max_rel_error(ours[b:b + 1], ref) < 1e-12
    set_visual_prompts(model, None)
    with torch.no_grad():
        ref = reference_forward(model.args, base_weights(model), toks, reference_adapters(model))
        assert max_rel_error(model(toks), ref) < 1e-12


def test_parameter_count_formula():
    model = peft.apply(make_model("mha"), config())  # L·K·C prompts + L·H gates
    a = model.args
    assert peft.trainable_parameters(model) == 2 * 5 * a.dim + 2 * a.n_heads


# -- bad input ----------------------------------------------------------------------------------------------------
def test_more_adapted_layers_than_the_model_has():
    model = make_model("mha")
    with pytest.raises(ValueError, match="adapter_layers=30 but the model has only 2 layers; set adapter_layers to at "
                                         "most 2"):
        peft.apply(model, peft.AdapterV1Config())
    assert all(layer.attention.extension is None for layer in model.layers)


@pytest.mark.parametrize("bad", [dict(adapter_len=0), dict(gate_activation="sigmoid"), dict(prompt_init_std=0.0)])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        config(**bad)


def test_zero_adapted_layers():
    with pytest.raises(ValueError, match="adapter_layers must be a positive integer"):
        peft.apply(make_model("mha"), config(adapter_layers=0))


def test_cannot_merge_or_apply_twice():
    model = peft.apply(make_model("mha"), config())
    with pytest.raises(ValueError, match="adapter_v1 cannot be merged"):
        peft.merge(model)
    with pytest.raises(ValueError, match=r"already has an adapter attached \(adapter_v1\)"):
        peft.apply(model, config())
