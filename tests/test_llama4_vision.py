"""Llama 4 multimodal: float64 parity with HF `Llama4ForConditionalGeneration`, checkpoints, generation, bad input.

The reference (tests/reference/llama4_multimodal.py) is HF transformers 5.24 built from its own config classes with
every parameter random in the reference process (tests/reference/isolation.py), saved with `save_pretrained` and read
back through `llama.load`, so the config translation,
the weight names and the model are all checked against HF's own reading of the same folder. Batches mix a row with
two images (1 tile; 4 tiles + the global view) and a row without one.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
from llama import ModelArgs, Transformer
from llama.config import PRESETS, count_parameters
from llama.formats.io import CheckpointError
from llama.vision.llama4_encoder import pixel_shuffle, rope_2d
from llama.vision.llama4_model import Llama4Multimodal
from llama.vision.llama4_preprocess import image_prompt_tokens, preprocess
from tests.reference.isolation import reference
from tests.reference.llama4_multimodal import (IMAGE_TOKEN, TOKENS_PER_TILE, hf_logits, image_prompt, pixels,
                                               relative_error, save_hf)

CONFIGS = {"scout-like": (1, True, True), "maverick-like": (2, False, False)}  # (moe step, QK norm, scaled RoPE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> the save_pretrained folder of a random HF model of that shape, built once per module."""
    return {name: save_hf(tmp_path_factory.mktemp(name), *cfg) for name, cfg in CONFIGS.items()}


def mixed_batch(seed=1):
    """Row 0: text, a 1-tile image, text, a 5-tile image, text; row 1: text only, same length. 6 tiles."""
    gen = torch.Generator().manual_seed(seed)
    with_images = image_prompt([1, 5], gen)
    text_only = image_prompt([], gen, text=len(with_images))
    return torch.tensor([with_images, text_only]), pixels(6, seed)


def with_final_norm_input(norm: torch.nn.Module, forward):
    """(forward(), the input of `norm` during it): the last hidden state, which the final RMSNorm rounds to float32
    in every LLaMA implementation, so that logits alone would hide differences below ~1e-8."""
    seen = []
    handle = norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            out = forward()
    finally:
        handle.remove()
    return out, seen[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_float64_parity_with_hf_through_files(folders, name):
    folder = folders[name]
    ours = llama.load(folder).eval()
    assert isinstance(ours, Llama4Multimodal) and ours.args.vision_args.image_token_id == IMAGE_TOKEN
    x, px = mixed_batch()
    ref, ref_hidden = hf_logits(folder, x, px, hidden=True)
    features = reference().call("hf_llama4_multimodal.image_features", str(folder), px)
    with torch.no_grad():  # the projected image features: encoder, pixel shuffle, adapter, projector
        assert relative_error(ours.encode_images(px), features) <= 1e-10
    for implementation in ("sdpa", "math"):  # "math": the formula written out, in the encoder and the trunk
        ours.set_attention_implementation(implementation)
        logits, hidden = with_final_norm_input(ours.norm, lambda: ours(x, pixel_values=px))
        assert relative_error(logits, ref) <= 1e-10
        assert relative_error(hidden, ref_hidden) <= 1e-10


def test_images_reach_their_row_only(folders):
    """Guards the parity test against vacuity: other pixels move row 0's logits after its first image, not row 1's."""
    ours = llama.load(folders["scout-like"]).eval()
    x, px = mixed_batch()
    with torch.no_grad():
        a, b = ours(x, pixel_values=px), ours(x, pixel_values=px + 1)
    first_image = int((x[0] == IMAGE_TOKEN).nonzero()[0])
    assert torch.equal(a[0, :first_image], b[0, :first_image])  # causal: nothing before the image changes
    assert relative_error(b[0, first_image:], a[0, first_image:]) > 1e-3
    assert torch.equal(a[1], b[1])


def test_two_rows_with_images(folders):
    folder = folders["maverick-like"]
    ours = llama.load(folder).eval()
    gen = torch.Generator().manual_seed(5)
    rows = [image_prompt([2], gen, text=9), image_prompt([1, 1], gen, text=6)]
    x, px = torch.tensor(rows), pixels(4, seed=5)
    with torch.no_grad():
        assert relative_error(ours(x, pixel_values=px), hf_logits(folder, x, px)) <= 1e-10


def hf_greedy(folder, prompt: list[int], px: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by HF, recomputing the whole sequence at every step (no cache)."""
    return reference().call("hf_llama4_multimodal.greedy", str(folder), prompt, px, n)


def test_kv_cache_generation_encodes_each_image_once(folders):
    """Rows of different lengths: row 1's image lies past the shortest prompt, so its tokens enter the cache one per
    step; each still gets its own feature, and the encoder runs once for all six tiles."""
    folder = folders["scout-like"]
    ours = llama.load(folder).eval()
    gen = torch.Generator().manual_seed(7)
    prompts = [image_prompt([1], gen, text=2), image_prompt([2], gen, text=20)]  # 21 and 55 tokens
    px = pixels(3, seed=7)
    calls = []
    ours.vision_embeddings.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    out = llama.generate(ours, prompts, max_new_tokens=4, pixel_values=px)
    assert calls == [3]
    assert out[0] == hf_greedy(folder, prompts[0], px[:1], 4)
    assert out[1] == hf_greedy(folder, prompts[1], px[1:], 4)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases, gains and the class token included), as in the HF reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 1.0 if p.ndim == 1 else p.shape[-1] ** -0.5
            p.copy_((1.0 if p.ndim == 1 else 0.0) + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) *
                    (0.1 if p.ndim == 1 else 1.0))
    return model


def tiny_model() -> Llama4Multimodal:
    return randomise(Llama4Multimodal(ModelArgs.from_name("tiny-llama-4-scout-vision")).double()).eval()


def tiny_batch():
    """The tiny preset's image token is 200 too: reuse the reference's prompts."""
    return mixed_batch(seed=3)


def test_save_hf_is_read_by_transformers(tmp_path):
    ours = tiny_model()
    llama.save(ours, tmp_path / "out", format="hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"] and config["image_token_index"] == 200
    x, px = tiny_batch()
    with torch.no_grad():
        assert relative_error(ours(x, pixel_values=px), hf_logits(tmp_path / "out", x, px)) <= 1e-10
    back = llama.load(tmp_path / "out")
    assert back.args.name == "tiny-llama-4-scout-vision"  # the preset is recognised, vision included
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("P", [1, 2])
def test_meta_layout_round_trip(tmp_path, P):
    ours = tiny_model()
    llama.save(ours, tmp_path / "meta", format="meta", num_shards=P)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["vision_args"]["image_size"] == {"height": 32, "width": 32}
    back = llama.load(tmp_path / "meta").double().eval()
    x, px = tiny_batch()
    with torch.no_grad():
        assert torch.equal(back(x, pixel_values=px), ours(x, pixel_values=px))


def test_meta_vision_shards_follow_the_converters_split_table(tmp_path):
    """Rank slices of the vision tensors, cut by hand after HF's converter (`get_concat_dim`,
    `is_param_same_across_shards`): row-parallel wo / c_proj weights along dim 1, their biases, norms and embeddings
    replicated, everything else along dim 0."""
    ours = tiny_model()
    llama.save(ours, tmp_path / "meta", format="meta", num_shards=2)
    shards = [torch.load(tmp_path / "meta" / f"consolidated.0{r}.pth", weights_only=True) for r in range(2)]
    sd = ours.state_dict()
    for key, w in sd.items():
        if not key.startswith(("vision_embeddings.", "vision_projection.")):
            continue
        if key.endswith(("attn.wo.weight", "mlp.c_proj.weight")):
            parts = w.chunk(2, dim=1)
        elif key.endswith(("embedding", "embedding_vlm", "attn.wo.bias", "mlp.c_proj.bias")) or ".ln_" in key:
            parts = [w, w]
        else:
            parts = w.chunk(2, dim=0)
        for r in range(2):
            assert torch.equal(shards[r][key], parts[r]), key


def test_folder_without_its_vision_tensors_is_refused(folders, tmp_path):
    """Nothing is dropped or invented silently: a multimodal config whose weights lack the encoder is an error."""
    folder = folders["scout-like"]
    weights = load_file(folder / "model.safetensors")
    (tmp_path / "cut").mkdir()
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.")},
              tmp_path / "cut" / "model.safetensors")
    (tmp_path / "cut" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing keys .*vision_embeddings\.vision_encoder"):
        llama.load(tmp_path / "cut")
    save_file({**weights, "vision_model.extra.weight": torch.zeros(2)}, tmp_path / "cut" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys .*vision_model\.extra\.weight"):
        llama.load(tmp_path / "cut")


def test_encoder_pieces_equal_hf_at_the_released_size():
    """2D RoPE tables (336-pixel tiles, 14-pixel patches, head dim 88) and pixel shuffle, bit for bit."""
    v = PRESETS["llama-4-scout-vision"].args.vision_args
    config = dict(hidden_size=v.dim, num_attention_heads=v.n_heads, image_size=v.image_size, patch_size=v.patch_size,
                  rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta})
    x = torch.randn(2, v.grid_size ** 2, 8, dtype=torch.float64)
    real, imag, shuffled = reference().call("hf_llama4_multimodal.encoder_pieces", config, x)  # [577, 44] tables
    cos, sin = rope_2d(v)
    assert torch.equal(cos, real) and torch.equal(sin, imag)
    assert torch.equal(pixel_shuffle(x, 2), shuffled)


def test_preprocess_prompt_and_model_fit_together():
    """Images through our preprocessing (32-pixel tiles for the tiny preset), prompt blocks from
    image_prompt_tokens (markers mapped into the tiny vocabulary), one forward: the counts line up."""
    ours = tiny_model()
    images = [torch.randint(0, 256, (3, 40, 90), dtype=torch.uint8), torch.randint(0, 256, (3, 20, 20),
                                                                                   dtype=torch.uint8)]
    pixel_values, grids = preprocess(images, tile=32, max_tiles=4)
    assert grids == [(1, 3), (1, 1)] and pixel_values.shape == (5, 3, 32, 32)
    special = {"<|image_start|>": 201, "<|image_end|>": 202, "<|tile_x_separator|>": 203,
               "<|tile_y_separator|>": 204, "<|image|>": 205, "<|patch|>": IMAGE_TOKEN}
    prompt = [1, 2] + image_prompt_tokens(grids[0], TOKENS_PER_TILE, special) + [3] + image_prompt_tokens(
        grids[1], TOKENS_PER_TILE, special)
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]), pixel_values=pixel_values)  # bfloat16 pixels, cast to float64
    assert logits.shape == (1, len(prompt), 256) and logits.isfinite().all()


def test_tiny_module_count_is_the_closed_form():
    args = ModelArgs.from_name("tiny-llama-4-scout-vision")
    assert sum(p.numel() for p in Llama4Multimodal(args).parameters()) == count_parameters(args)


# -- bad input: one clear error naming the mismatch, raised before anything runs ---------------------------------


@pytest.mark.parametrize("make, error, words", [
    (lambda px: px[None], ValueError, r"\(images × tiles\).*flatten\(0, 1\)"),
    (lambda px: px[:, 0], ValueError, r"must have shape \[tiles, 3, 32, 32\]"),
    (lambda px: px[:, :1], ValueError, r"1 channels.*RGB"),
    (lambda px: torch.cat([px, px[:, :1]], 1), ValueError, r"4 channels.*RGB"),
    (lambda px: px[..., :28, :28], ValueError, r"tiles must be 32×32 pixels.*got 28×28"),
    (lambda px: (px * 255).to(torch.uint8), TypeError, r"floating-point tensor of normalised pixels"),
    (lambda px: torch.cat([px, px[:1]]), ValueError, r"96 image tokens .* 112 features \(7 tiles × 16\)"),
    (lambda px: px[:5], ValueError, r"96 image tokens .* 80 features \(5 tiles × 16\)"),
])
def test_bad_pixel_values(make, error, words):
    ours = tiny_model()
    x, px = tiny_batch()
    with pytest.raises(error, match=words):
        ours(x, pixel_values=make(px))


def test_images_for_a_text_only_model_are_refused():
    text = Transformer(ModelArgs.from_name("tiny-llama-4-scout"))
    x, px = tiny_batch()
    with pytest.raises(ValueError, match="tiny-llama-4-scout is a text-only Transformer"):
        text(x, pixel_values=px)
    with pytest.raises(ValueError, match="text-only model and cannot take pixel_values"):
        llama.generate(text, x.tolist(), 2, pixel_values=px)
    with pytest.raises(ValueError, match="has no vision_args"):
        Llama4Multimodal(ModelArgs.from_name("tiny-llama-4-scout"))


def test_generate_checks_the_image_count_before_decoding():
    ours = tiny_model()
    x, px = tiny_batch()
    with pytest.raises(ValueError, match=r"prompts hold 96 image tokens but pixel_values gives 80 features"):
        llama.generate(ours, x.tolist(), 2, pixel_values=px[:5])
    assert all(layer.attention.cache is None for layer in ours.layers)  # nothing was allocated
    with pytest.raises(ValueError, match="either pixel_values or image_features"):
        ours(x, pixel_values=px, image_features=ours.encode_images(px))


def test_image_tokens_without_images_are_read_as_text():
    """As in Meta's and HF's references: without pixel_values the trunk embeds <|patch|> like any token."""
    ours = tiny_model()
    x, _ = tiny_batch()
    text = Transformer(ours.args).double()
    text.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("vision_")})
    with torch.no_grad():
        assert torch.equal(ours(x), text(x))
    assert TOKENS_PER_TILE == ours.args.vision_args.tokens_per_tile
