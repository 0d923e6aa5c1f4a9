"""The visual branches of LLaMA-Adapter V2 and LLaMA-Excitor on a tiny Llama 3.2 Vision model."""

import math

import pytest
import torch
import torch.nn.functional as F

import llama
import peft
from peft.adapter_v2 import parameter_groups
from tests.reference.mllama import mixed_batch

CONFIGS = {
    "v2-early": peft.AdapterV2VisualConfig(adapter_len=4, adapter_layers=3, visual_len=5),
    "v2-late": peft.AdapterV2VisualConfig(adapter_len=4, adapter_layers=4, visual_fusion="late"),
    "excitor": peft.ExcitorVisualConfig(adapter_len=6, adapter_layers=4, rank=4, visual_rank=3),
}


def model_with(name, seed=0, perturb=True):
    torch.manual_seed(seed)
    model = llama.build("tiny-llama-3.2-vision", dtype=torch.float64)
    with torch.no_grad():  # open the cross-attention gates so the base model reads the images too
        for block in model.cross_attention_layers:
            block.gate_attn.fill_(0.5)
            block.gate_ffwd.fill_(-0.4)
    base = None
    tokens, inputs = mixed_batch(model.args)
    with torch.no_grad():
        base = model(tokens, **inputs)
    peft.apply(model, CONFIGS[name])
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return model, base, tokens, inputs


@pytest.mark.parametrize("name", CONFIGS)
def test_starts_exactly_at_the_base_model(name):
    model, base, tokens, inputs = model_with(name, perturb=False)
    with torch.no_grad():
        assert torch.equal(model(tokens, **inputs), base)


@pytest.mark.parametrize("name", CONFIGS)
def test_images_reach_the_logits_only_through_rows_that_have_one(name):
    model, _, tokens, inputs = model_with(name)
    with torch.no_grad():  # close the base model's gates: what still depends on the image is the adapter's doing
        for block in model.cross_attention_layers:
            block.gate_attn.zero_()
            block.gate_ffwd.zero_()
        a = model(tokens, **inputs)
        b = model(tokens, **dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"])))
    assert torch.equal(a[2], b[2])  # row 2 has no image
    for row in (0, 1, 3):
        assert float((a[row] - b[row]).abs().max()) > 1e-6


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_the_adapter_not_the_frozen_encoder(name):
    model, _, tokens, inputs = model_with(name)
    model(tokens, **inputs).square().mean().backward()
    assert model.adapter_visual.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(not p.requires_grad for p in model.cross_attention_layers.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_keeps_the_prefill_images(name):
    model, _, tokens, inputs = model_with(name)
    images = {k: v for k, v in inputs.items() if k != "cross_attention_mask"}
    with torch.no_grad():
        full = model(tokens, **images)
        model.setup_cache(4, 8)
        steps = [model(tokens[:, :5], 0, **images)] + [model(tokens[:, t:t + 1], t) for t in range(5, 8)]
        model.clear_cache()
    assert float((torch.cat(steps, 1) - full).norm() / full.norm()) < 1e-12


def test_excitor_visual_keys_follow_the_stacked_prompt_attention():
    """Key^extra = softmax(Q^e [P; F̂W_k]ᵀ/τ)[P; F̂W_v] over the valid entries (module notes), minus the uniform
    mixture."""
    model, _, tokens, inputs = model_with("excitor")
    block = model.text_model.layers[3].attention.extension
    with torch.no_grad():
        model(tokens, **inputs)  # records the image features
        x = torch.randn(4, 3, model.args.text.dim, dtype=torch.float64)
        got = block.extra_keys(None, x, 0)
        f, valid = model.adapter_visual.context.token_features()
        f_hat = model.adapter_visual.proj(f)
        for b in range(4):
            fb = f_hat[b, valid[b]]  # the row's real image tokens
            keys = torch.cat([block.prompt, fb @ block.k_down.T @ block.k_up.T])
            values = torch.cat([block.prompt, fb @ block.v_down.T @ block.v_up.T])
            q_e = x[b] @ block.w_down.T @ block.w_up.T
            A = F.softmax(q_e @ keys.T / math.sqrt(block.prompt.shape[1]), dim=-1)
            expected = A @ values - values.mean(0)
            assert torch.allclose(got[b], expected, rtol=0, atol=1e-12)
        assert int(valid[2].sum()) == 0 and int(valid[0].sum()) == 2 * model.args.vision.n_tokens


def test_trainable_counts_by_hand():
    a = llama.MllamaArgs.from_name("tiny-llama-3.2-vision")
    C, L, Wv, H = a.text.dim, a.text.n_layers, a.vision.output_dim, a.text.n_heads
    F_, KV = a.text.ffn_hidden_dim, a.text.n_kv_heads * a.text.head_dim
    bias_scale = 2 * L * (C + KV + KV + C + F_ + C + F_)  # wq wk wv wo w1 w2 w3: bias + output-side scale
    norms = (2 * L + 1) * C
    projection = Wv * C + C + 2 * C  # W_p, b_p, LayerNorm
    counts = {}
    for name in CONFIGS:
        model = llama.build(a, device="meta")
        peft.apply(model, CONFIGS[name])
        counts[name] = peft.trainable_parameters(model)
    assert counts["v2-early"] == bias_scale + norms + 3 * (4 * C + H) + projection + (5 * C + H)
    assert counts["v2-late"] == bias_scale + norms + 4 * (4 * C + H) + projection + 4 * C
    per_block = 6 * C + 2 * C * 4 + 1 + 2 * (2 * C * 3)  # prompts, Wq_Excitor, gate, W^e_k and W^e_v
    assert counts["excitor"] == Wv * C + C + 4 * per_block


def test_parameter_groups_split_visual_from_language():
    model, *_ = model_with("v2-early", perturb=False)
    groups = parameter_groups(model)
    assert set(groups["visual"]) == {"adapter_visual.proj.weight", "adapter_visual.proj.bias",
                                     "adapter_visual.norm.weight", "adapter_visual.norm.bias",
                                     "text_model.layers.0.attention.extension.prompt",
                                     "text_model.layers.0.attention.extension.gate"}
    assert "text_model.layers.3.attention.extension.prompt" in groups["language"]


def test_save_and_load_adapter_round_trip(tmp_path):
    model, _, tokens, inputs = model_with("excitor")
    peft.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = llama.build("tiny-llama-3.2-vision", dtype=torch.float64)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k and "extension" not in k})
    peft.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(tokens, **inputs), model(tokens, **inputs))


def test_bad_requests_are_refused():
    with pytest.raises(TypeError, match="needs a multimodal model with an image encoder"):
        peft.apply(llama.build("tiny-llama-3"), peft.ExcitorVisualConfig(adapter_layers=1))
    with pytest.raises(ValueError, match="early fusion puts the visual prompts in layer 0"):
        peft.apply(llama.build("tiny-llama-3.2-vision"), peft.AdapterV2VisualConfig(adapter_layers=4))
    with pytest.raises(ValueError, match="unknown visual_fusion 'middle'"):
        peft.AdapterV2VisualConfig(visual_fusion="middle")
    with pytest.raises(ValueError, match="un-rotated extra keys"):
        peft.ExcitorVisualConfig(extra_key_rope="absolute", gate_init=0.0, up_init="kaiming")
