"""Llama 3.2 Vision against Hugging Face `MllamaForConditionalGeneration` (transformers 5.24) on tiny random configs.

Every gate of the reference is opened to a random angle and every table is random, so each path (pre/post tile
embeddings, gated position embeddings, padding tiles, intermediate features, both gates of each block, rows without an
image) moves the logits. The float64 bound 1e-10 is ~10⁶ ulps: summation-order differences stay far below it, a
wrong sign, index or permutation lands near 1. The hidden state before the final RMSNorm is compared too: that norm
rounds to float32, which would hide smaller differences in the logits. HF runs in the reference process
(tests/reference/mllama.py).
"""

import dataclasses

import pytest
import torch

import llama
from llama import MllamaArgs, MllamaTransformer
from llama.vision.mllama_encoder import VisionEncoder
from tests.reference.mllama import (MIXED_NUM_TILES, hf_cross_attention_mask, hf_generate, hf_logits,
                                    hf_state_dict, mixed_batch, relative_error, save_hf)

TOL = 1e-10


@pytest.fixture(scope="module")
def args():
    return MllamaArgs.from_name("tiny-llama-3.2-vision")


@pytest.fixture(scope="module")
def hf_folder(args, tmp_path_factory):
    """A saved random HF model (its config.json holds Meta's meaning of the feature indices)."""
    return save_hf(tmp_path_factory.mktemp("mllama_hf"), args)


@pytest.fixture(scope="module")
def loaded(hf_folder):
    return llama.load(hf_folder, dtype=torch.float64)


def test_load_gives_the_multimodal_module_with_hf_weights(loaded, args):
    assert isinstance(loaded, MllamaTransformer)
    assert loaded.args.fusion_schedule == args.fusion_schedule
    assert loaded.args.vision == args.vision
    assert all(b.gate_attn.item() != 0 and b.gate_ffwd.item() != 0 for b in loaded.cross_attention_layers)


def with_hidden(model, tokens, inputs):
    """(logits, the input of the final RMSNorm) of our model."""
    seen = []
    handle = model.text_model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            return model(tokens, **inputs), seen[-1]
    finally:
        handle.remove()


def test_logits_match_hf_on_a_mixed_batch(loaded, hf_folder, args):
    tokens, inputs = mixed_batch(args)
    ref, ref_hidden = hf_logits(hf_folder, tokens, inputs)
    ours, hidden = with_hidden(loaded, tokens, inputs)
    assert ours.shape == (4, 8, args.text.vocab_size)
    assert relative_error(ours, ref) < TOL
    assert relative_error(hidden, ref_hidden) < TOL


def test_mask_derived_from_image_tokens_equals_hf_processor(loaded, args):
    tokens, inputs = mixed_batch(args)
    ref = hf_cross_attention_mask(tokens, args.image_token_id, MIXED_NUM_TILES, args.vision.max_num_tiles)
    assert torch.equal(inputs["cross_attention_mask"], ref)
    given = {k: v for k, v in inputs.items() if k != "cross_attention_mask"}
    with torch.no_grad():
        assert torch.equal(loaded(tokens, **given), loaded(tokens, **inputs))


def test_rows_before_their_first_image_ignore_the_images(loaded, hf_folder, args):
    """Meta's row mask m: a row that sees no image gets neither cross-attention nor the gated FFN, so its logits do
    not depend on the pixels; transformers 5.24 without the fix leaks the images into it (transformers#39379)."""
    tokens, inputs = mixed_batch(args)
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 0.5)
    with torch.no_grad():
        a, b = loaded(tokens, **inputs), loaded(tokens, **other)
    leak = hf_logits(hf_folder, tokens, inputs, meta_row_mask=False)[0] - \
        hf_logits(hf_folder, tokens, other, meta_row_mask=False)[0]
    assert torch.equal(a[2], b[2]) and torch.equal(a[0, 0], b[0, 0]) and torch.equal(a[1, :2], b[1, :2])
    assert not torch.equal(a[0, 1:], b[0, 1:])
    assert float(leak[2].abs().max()) > 1e-3  # the text-only row of HF's batch sees the images


def test_text_only_input_and_closed_gates_give_the_text_model(args):
    torch.manual_seed(0)
    model = llama.build(args, dtype=torch.float64)  # fresh: every cross-attention gate is 0
    tokens, inputs = mixed_batch(args)
    text_tokens = tokens.masked_fill(tokens == args.image_token_id, 3)
    with torch.no_grad():
        assert torch.equal(model(text_tokens), model.text_model(text_tokens))
        shifted = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
        assert torch.equal(model(tokens, **inputs), model(tokens, **shifted))  # closed gates: images change nothing


def test_save_round_trip_is_loadable_by_transformers(loaded, hf_folder, tmp_path, args):
    out = llama.save(loaded, tmp_path / "out")
    ours, ref = hf_state_dict(out), hf_state_dict(hf_folder)
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    again = llama.load(out, dtype=torch.float64)
    tokens, inputs = mixed_batch(args)
    with torch.no_grad():
        assert torch.equal(again(tokens, **inputs), loaded(tokens, **inputs))


def test_intermediate_features_are_the_states_entering_the_listed_layers(args):
    """Meta's `return_intermediate`: index 0 keeps the encoder input (after ln_pre), index 1 what enters layer 1."""
    torch.manual_seed(0)
    enc = VisionEncoder(dataclasses.replace(args.vision, intermediate_layers=(0, 1))).double()
    _, inputs = mixed_batch(args)
    captured = {}

    def keep(name):
        def hook(module, inputs, output=None):
            captured[name] = inputs[0] if output is None else output
        return hook

    enc.ln_pre.register_forward_hook(keep("ln_pre"))
    enc.transformer.resblocks[1].register_forward_pre_hook(keep("into_1"))
    with torch.no_grad():
        out = enc(inputs["pixel_values"][0], inputs["aspect_ratio_ids"][0], inputs["aspect_ratio_mask"][0])
    W, N = args.vision.dim, args.vision.n_tokens
    kept = out[..., W:].unflatten(-1, (W, 2))  # feature w·k + j is layer j's feature w
    assert torch.equal(kept[..., 0], captured["ln_pre"])
    assert torch.equal(kept[..., 1], captured["into_1"].view(*kept.shape[:2], -1, W)[:, :, :N])


def test_kv_cache_generation_matches_hf_and_encodes_each_image_once(loaded, hf_folder, args):
    tokens, inputs = mixed_batch(args)
    ref = hf_generate(hf_folder, tokens, inputs, 6)
    calls = []
    hook = loaded.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours = llama.generate(loaded, tokens.tolist(), max_new_tokens=6, **inputs)
    finally:
        hook.remove()
    assert ours == ref.tolist()
    assert len(calls) == 1

    # cached decoding = one uncached forward over the whole sequence, step by step
    full = torch.cat([tokens, torch.tensor(ours)], dim=1)
    with torch.no_grad():
        reference = loaded(full, **{k: v for k, v in inputs.items() if k != "cross_attention_mask"})
        loaded.setup_cache(4, full.shape[1])
        steps = [loaded(full[:, :8], 0, **inputs)]
        steps += [loaded(full[:, t:t + 1], t) for t in range(8, full.shape[1])]
        # the same with HF's convention: a mask over every position so far, which the model slices
        grown = torch.cat([inputs["cross_attention_mask"]] + [inputs["cross_attention_mask"][:, -1:]] * 6, dim=1)
        loaded.setup_cache(4, full.shape[1])
        again = [loaded(full[:, :5], 0, **dict(inputs, cross_attention_mask=grown))]
        again += [loaded(full[:, t:t + 1], t, cross_attention_mask=grown) for t in range(5, full.shape[1])]
        loaded.clear_cache()
    assert relative_error(torch.cat(steps, dim=1), reference) < TOL
    assert relative_error(torch.cat(again, dim=1), reference) < TOL


def test_presets_count_the_published_parameters():
    for name, published in (("llama-3.2-11b-vision", 10_670_220_835), ("llama-3.2-90b-vision", 88_593_355_323)):
        model = llama.build(name, device="meta")
        assert sum(p.numel() for p in model.parameters()) == published
        assert isinstance(model, MllamaTransformer)
    assert isinstance(llama.build("llama-3.1-8b", device="meta"), llama.Transformer)
