"""Bad image input to Llama 3.2 Vision (and to a text-only model): one clear error naming the mismatch."""

import json

import pytest
import torch

import llama
from llama.formats import CheckpointError
from llama import MllamaArgs
from tests.reference.mllama import mixed_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llama.build("tiny-llama-3.2-vision")


@pytest.fixture()
def batch():
    tokens, inputs = mixed_batch(MllamaArgs.from_name("tiny-llama-3.2-vision"), dtype=torch.float32)
    return tokens, inputs


def _call(model, tokens, **inputs):
    with torch.no_grad():
        return model(tokens, **inputs)


@pytest.mark.parametrize("change,words", [
    (lambda x: x[:, :, :, :1], ["pixel_values must have shape", "channels=3"]),  # grey images
    (lambda x: torch.cat([x, x[:, :, :, :1]], dim=3), ["channels=3"]),  # RGBA
    (lambda x: x[..., :14, :14], ["28, 28", "got (4, 2, 2, 3, 14, 14)"]),  # wrong tile size
    (lambda x: x[:, :, :1], ["tiles=2"]),  # tiles not padded to max_num_tiles
    (lambda x: x[:, 0], ["pixel_values must have shape [batch=4, images,"]),  # images axis missing
])
def test_wrong_pixel_shapes(model, batch, change, words):
    tokens, inputs = batch
    with pytest.raises(ValueError) as err:
        _call(model, tokens, **dict(inputs, pixel_values=change(inputs["pixel_values"])))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_aspect_ratio_ids_out_of_range(model, batch):
    tokens, inputs = batch
    ids = inputs["aspect_ratio_ids"].clone()
    ids[0, 0] = 7
    with pytest.raises(ValueError, match=r"aspect_ratio_id 7 is out of range \[0, 3\].*\(1, 1\), \(1, 2\), \(2, 1\)"):
        _call(model, tokens, **dict(inputs, aspect_ratio_ids=ids))
    ids[0, 0] = -1
    with pytest.raises(ValueError, match="aspect_ratio_id -1 is out of range"):
        _call(model, tokens, **dict(inputs, aspect_ratio_ids=ids))


def test_tile_mask_disagreeing_with_the_grid(model, batch):
    tokens, inputs = batch
    mask = inputs["aspect_ratio_mask"].clone()
    mask[0, 0, 1] = 0  # row 0's image is 1x2 (two tiles) but only one is marked
    with pytest.raises(ValueError, match=r"image 0 of row 0 has aspect_ratio_id 2 \(grid \(1, 2\), 2 tiles\) but "
                                         r"aspect_ratio_mask marks 1"):
        _call(model, tokens, **dict(inputs, aspect_ratio_mask=mask))


def test_more_images_than_image_tokens_and_the_reverse(model, batch):
    tokens, inputs = batch
    fewer_tokens = tokens.clone()
    fewer_tokens[1, 3] = 5  # row 1 keeps two images but one <|image|> token
    with pytest.raises(ValueError, match=r"row 1 has 2 image\(s\) but 1 <\|image\|> token\(s\)"):
        _call(model, fewer_tokens, **{k: v for k, v in inputs.items() if k != "cross_attention_mask"})
    more_tokens = tokens.clone()
    more_tokens[2, 4] = 256  # row 2 has no image but an <|image|> token
    with pytest.raises(ValueError, match=r"row 2 has 0 image\(s\) but 1 <\|image\|> token\(s\)"):
        _call(model, more_tokens, **{k: v for k, v in inputs.items() if k != "cross_attention_mask"})
    with pytest.raises(ValueError, match=r"row 0 has 1 <\|image\|> token\(s\) \(id 256\) but no images were given"):
        _call(model, tokens)


def test_incomplete_or_misplaced_image_inputs(model, batch):
    tokens, inputs = batch
    with pytest.raises(ValueError, match="missing aspect_ratio_ids, aspect_ratio_mask"):
        _call(model, tokens, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="cross_attention_mask given without images"):
        _call(model, tokens.masked_fill(tokens == 256, 1), cross_attention_mask=inputs["cross_attention_mask"])
    with pytest.raises(ValueError, match=r"cross_attention_mask must have shape \[batch=4, tokens=8"):
        _call(model, tokens, **dict(inputs, cross_attention_mask=inputs["cross_attention_mask"][:, :5]))
    with pytest.raises(ValueError, match="token id 264 is out of range"):
        _call(model, tokens.masked_fill(tokens == 256, 264), **inputs)


def test_images_given_to_a_text_only_model(batch):
    tokens, inputs = batch
    text_model = llama.build("tiny-llama-3")
    with pytest.raises(ValueError, match=r"text-only Transformer and cannot take image inputs \(aspect_ratio_ids, "
                                         r"aspect_ratio_mask, cross_attention_mask, pixel_values\)"):
        text_model(tokens.clamp(max=255), **inputs)


def test_generate_with_images_needs_equal_prompt_lengths(model, batch):
    tokens, inputs = batch
    with pytest.raises(ValueError, match="with images, every prompt must have the same length"):
        llama.generate(model, [tokens[0].tolist(), tokens[1, :5].tolist()], 2, **inputs)


def test_meta_layout_and_bad_configs_are_refused(model, tmp_path):
    with pytest.raises(CheckpointError, match="saved in the Hugging Face layout only"):
        llama.save(model, tmp_path / "m", format="meta")
    folder = llama.save(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["supported_aspect_ratios"] = [[1, 1], [2, 1], [1, 2]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"supported_aspect_ratios .* differ"):
        llama.load(folder)
    config["vision_config"]["supported_aspect_ratios"] = [[1, 1], [1, 2], [2, 1]]
    config["text_config"]["cross_attention_layers"] = [1]  # one block fewer than the weights hold
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*language_model\.model\.layers\.\d\.cross_attn"):
        llama.load(folder)
