"""LLaMA-Adapter V2 (peft.adapter_v2): bias/scale tuning, unfrozen norms and prompts vs. the paper's equations."""

from __future__ import annotations

import pytest
import torch

import peft
from peft.adapter_v1 import AdaptionPrompt
from peft.adapter_v2 import BiasScaleLinear, parameter_groups
from tests.reference.paper_peft import (GATE_FNS, PRESETS, Adapters, check_against_reference, forward_with_hidden,
                                        make_model, max_rel_error, tokens)

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def config(**kw) -> peft.AdapterV2Config:
    return peft.AdapterV2Config(**{"adapter_len": 4, "adapter_layers": 1, **kw})


def randomize(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith(("scale", "norm.weight")):
                p.mul_(1.0 + 0.3 * noise)  # multiplicative parameters: keep them near 1
            else:
                p.copy_(0.5 * noise)


def reference_adapters(model) -> Adapters:
    ad = Adapters()
    for name, module in model.named_modules():
        if isinstance(module, BiasScaleLinear):
            ad.bias_scale[name] = (module.bias.detach(), module.scale.detach(), module.scale_side)
    for i, layer in enumerate(model.layers):
        ext = layer.attention.extension
        if isinstance(ext, AdaptionPrompt):
            ad.prompts[i] = (ext.prompt.detach(), ext.gate.detach(), GATE_FNS[ext.gate_activation])
    return ad


def test_defaults():
    c = peft.AdapterV2Config()
    assert (c.adapter_len, c.adapter_layers, c.gate_activation, c.scale_side, c.train_norms) == \
        (10, 31, "tanh", "output", True)
    assert c.bias_scale_modules == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("side", ["output", "input"])
def test_identity_at_init_bit_for_bit(kind, side):
    model = make_model(kind)
    toks = tokens(model.args)
    with torch.no_grad():
        base = model(toks)
        peft.apply(model, config(scale_side=side, bias_scale_modules=ALL, adapter_layers=2))
        assert torch.equal(model(toks), base)


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo", "w1", "w2", "w3"), ALL, ("wq", "w2")])
def test_forward_matches_paper_equations(kind, side, targets):
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, config(scale_side=side, bias_scale_modules=targets))
    randomize(model)
    # the reference reads the trained norm gains from the same state dict as the frozen weights
    check_against_reference(model, toks, reference_adapters(model))  # logits and the float64 last hidden state


def test_scale_sides_have_the_papers_shapes():
    model = peft.apply(make_model("mha"), config(scale_side="input"))
    w1 = model.layers[0].feed_forward.w1  # 64 -> F
    assert w1.scale.shape == (w1.in_features,) and w1.bias.shape == (w1.out_features,)
    model = peft.apply(make_model("mha"), config(scale_side="output"))
    w1 = model.layers[0].feed_forward.w1
    assert w1.scale.shape == (w1.out_features,) and w1.bias.shape == (w1.out_features,)


@pytest.mark.parametrize("kind", ["mha", "gqa", "tied"])
def test_gradients_reach_exactly_the_adapter(kind):
    model = make_model(kind)
    peft.apply(model, config(bias_scale_modules=ALL))
    randomize(model)
    model(tokens(model.args)).square().mean().backward()
    declared = set(peft.adapter_parameters(model))
    assert {n for n in declared if n.endswith("norm.weight")} == \
        {"norm.weight"} | {f"layers.{i}.{k}.weight" for i in range(2) for k in ("attention_norm", "ffn_norm")}
    for name, p in model.named_parameters():
        if name in declared:
            assert p.requires_grad and p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_norms_can_stay_frozen():
    model = peft.apply(make_model("mha"), config(train_norms=False))
    assert not any(n.endswith("norm.weight") for n in peft.adapter_parameters(model))
    assert not model.norm.weight.requires_grad


@pytest.mark.parametrize("kind", list(PRESETS))
@pytest.mark.parametrize("side", ["output", "input"])
def test_merge_equals_unmerged_forward(kind, side):
    model = make_model(kind)
    toks = tokens(model.args)
    peft.apply(model, config(scale_side=side, bias_scale_modules=ALL))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = torch.cat(forward_with_hidden(model, toks), dim=-1)  # logits and float64 hidden state
        peft.merge(model)  # bias and scale fold into the weights; the prompts stay attached
        merged = torch.cat(forward_with_hidden(model, toks), dim=-1)
        if model.args.tie_word_embeddings:
            assert torch.equal(model.tok_embeddings.weight, before["tok_embeddings.weight"])
        peft.unmerge(model)
        again = torch.cat(forward_with_hidden(model, toks), dim=-1)
    assert max_rel_error(merged, unmerged) <= 1e-10
    assert max_rel_error(again, unmerged) <= 1e-12
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], rtol=0, atol=1e-13), k


def test_merged_layer_is_a_plain_affine_map():
    model = peft.apply(make_model("mha"), config(scale_side="output"))
    randomize(model)
    layer = model.layers[0].attention.wo
    W0, b, s = layer.weight.detach().clone(), layer.bias.detach(), layer.scale.detach()
    peft.merge(model)
    assert torch.allclose(layer.weight, s[:, None] * W0, rtol=1e-15) and torch.allclose(layer.merged_bias, s * b)


@pytest.mark.parametrize("kind", list(PRESETS))
def test_kv_cache_decoding_equals_full_forward(kind):
    model = make_model(kind)
    peft.apply(model, config(bias_scale_modules=ALL, adapter_layers=2))
    randomize(model)
    toks = tokens(model.args, T=8)
    with torch.no_grad():
        full = model(toks)
        model.setup_cache(toks.shape[0], 16)
        steps = [model(toks[:, :5], start_pos=0)] + [model(toks[:, t:t + 1], start_pos=t) for t in range(5, 8)]
        model.clear_cache()
    assert max_rel_error(torch.cat(steps, dim=1), full) < 1e-12


def test_parameter_groups():
    model = peft.apply(make_model("gqa"), config())
    groups = parameter_groups(model)
    assert set(groups) == {"language", "visual"} and groups["visual"] == {}
    assert set(groups["language"]) == set(peft.adapter_parameters(model))
    with pytest.raises(ValueError, match="needs a model with LLaMA-Adapter V2 attached"):
        parameter_groups(peft.apply(make_model("gqa"), peft.LoraConfig()))


def test_parameter_count_formula():
    """chat65b form (input-side scale, no prompts): Σ (bias N + scale K) over the 7 block linears + norms."""
    model = peft.apply(make_model("gqa"), config(adapter_layers=0, scale_side="input"))
    a = model.args
    kv = a.n_kv_heads * a.head_dim
    per_layer_bias = a.dim + 2 * kv + a.dim + 2 * a.ffn_hidden_dim + a.dim
    per_layer_scale = 4 * a.dim + 2 * a.dim + a.ffn_hidden_dim
    norms = (2 * a.n_layers + 1) * a.dim
    assert peft.trainable_parameters(model) == a.n_layers * (per_layer_bias + per_layer_scale) + norms


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (dict(bias_scale_modules=("q_proj",)), "unknown target module name"),
    (dict(scale_side="both"), "unknown scale_side"),
    (dict(adapter_layers=-1), "adapter_layers must be an integer >= 0"),
    (dict(adapter_len=0), "adapter_len"),
])
def test_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        config(**bad)


def test_more_adapted_layers_than_the_model_has():
    model = make_model("mha")
    with pytest.raises(ValueError, match="adapter_layers=31 but the model has only 2 layers"):
        peft.apply(model, peft.AdapterV2Config())
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and not hasattr(model, "peft_state")  # untouched


def test_apply_twice():
    model = peft.apply(make_model("mha"), config())
    with pytest.raises(ValueError, match="already has"):
        peft.apply(model, config())
