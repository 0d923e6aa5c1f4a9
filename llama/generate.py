"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling, stop tokens.

Shapes: B batch (number of prompts), S buffer length (longest prompt + new tokens), V vocab.

Batching prompts of different lengths follows Meta's reference `generate`: all prompts sit left-aligned in one
right-padded token buffer [B, S]. Decoding starts after the *shortest* prompt; at each position a row that is
still inside its own prompt keeps its prompt token instead of the sampled one. Every row therefore feeds the model
exactly its own tokens at exactly their own positions, so padding is never attended and no attention mask is
needed beyond the causal one: a row's result is the same as if it had been decoded alone.

One step of the loop, for the positions `prev … cur-1` not yet in the cache (the whole common prefix on the first
step, then one position per step):

    logits = model(tokens[:, prev:cur], start_pos=prev)      # appends keys/values to the cache
    next   = pick(logits[:, -1])                             # argmax, or a sample from the (nucleus) softmax
    tokens[:, cur] = prompt token where the row is still in its prompt, else next
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             pixel_values: Optional[torch.Tensor] = None, **image_inputs) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return only the new tokens of each prompt.

    temperature: 0 picks the most likely token (greedy, deterministic); > 0 samples from softmax(logits / T).
    top_p: nucleus sampling (Holtzman et al. 2019, arXiv 1904.09751 §3.1): sample only from the smallest set of most
        likely tokens whose total probability reaches top_p (1.0 = the whole vocabulary). Ignored when greedy.
    stop_tokens: a row stops at the first generated token in this set. The stop token IS included as the last
        element of that row's output (so callers can tell "stopped" from "ran out of budget"); nothing after it is.
        Tokens inside the prompt never stop a row.
    seed / generator: source of randomness for sampling (give at most one). Same seed, same model, same prompts
        -> same output. Neither: PyTorch's global generator.
    pixel_values: for a multimodal Llama 4 model (`llama.vision.llama4_model`), the tiles of every image in the
        prompts, in prompt order ([N, 3, S, S], the HF processor's output). They are encoded once, before the first
        step; each step then writes the features of the prompt image tokens it feeds (early fusion), and the KV
        cache keeps them like any prompt token.
        For Llama 3.2 Vision (`llama.vision.MllamaTransformer`, cross-attention) pass its other image inputs too
        (image_inputs: aspect_ratio_ids, aspect_ratio_mask, optionally cross_attention_mask): all go with the first
        forward call, which encodes each image once; the blocks keep the images' keys and values for the later
        steps. The prompts must then have the same length, so that every <|image|> token is in that first call.

    The model's KV cache is (re)allocated for this call and cleared again before returning, also on error.
    """
    prompts = _check_prompts(model, prompts, max_new_tokens)
    temperature, top_p = _check_sampling(temperature, top_p)
    stop = sorted({int(t) for t in stop_tokens})
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both (a seed builds a fresh generator)")
    cross_attention = pixel_values is not None and hasattr(model, "cross_attention_layers")  # Llama 3.2 Vision
    if image_inputs and not cross_attention:
        raise ValueError(f"{', '.join(sorted(image_inputs))} go with pixel_values to a cross-attention model "
                         f"(Llama 3.2 Vision); this model takes pixel_values alone (or no images at all)")
    if cross_attention and len({len(p) for p in prompts}) > 1:
        raise ValueError("with images, every prompt must have the same length (the images and their <|image|> "
                         "tokens go in the first forward call); pad the prompts or generate them separately")
    device = next(model.parameters()).device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    min_len, max_len = int(lengths.min()), int(lengths.max())
    S = max_len + max_new_tokens
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)  # right-padded; padding is never fed to the model
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    in_prompt = torch.arange(S, device=device)[None, :] < lengths[:, None]  # [B, S]
    stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # row has emitted a stop token
    images = None if pixel_values is None or cross_attention else _encode_prompt_images(model, tokens, in_prompt,
                                                                                          pixel_values)

    model.setup_cache(B, S)
    try:
        prev = 0
        for cur in range(min_len, S):
            if cross_attention:  # Llama 3.2 Vision: the images with the first call only
                step_images = {"pixel_values": pixel_values, **image_inputs} if prev == 0 else {}
            else:  # Llama 4: the features of this step's prompt image tokens
                step_images = _image_inputs(images, prev, cur)
            logits = model(tokens[:, prev:cur], start_pos=prev, **step_images)[:, -1]  # [B, V]: position cur
            next_token = sample(logits, temperature, top_p, generator)  # [B]
            next_token = torch.where(in_prompt[:, cur], tokens[:, cur], next_token)
            tokens[:, cur] = next_token
            finished |= ~in_prompt[:, cur] & torch.isin(next_token, stop_ids)
            prev = cur
            # a row is done once it has stopped or produced its budget (positions len_i … len_i+max_new_tokens-1)
            if bool((finished | (cur + 1 >= lengths + max_new_tokens)).all()):
                break
    finally:
        model.clear_cache()

    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p): min(len(p) + max_new_tokens, cur + 1)].tolist()
        for j, t in enumerate(new):
            if t in stop:
                new = new[: j + 1]
                break
        out.append(new)
    return out


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row of logits [B, V]: argmax if temperature == 0, else a (nucleus) sample. -> [B]."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # [B, V]; float64 so tiny tails keep their order
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p nucleus of probs [B, V] and renormalise (Holtzman et al. 2019, eq. 2).

    The nucleus V(p) is the smallest set of most likely tokens with sum_{x in V(p)} P(x) >= p: walking down the
    sorted probabilities, a token is kept while the mass *before* it is still below p (so the most likely token is
    always kept). Ties at the boundary are broken by sort order.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # back to vocabulary order
    return kept / kept.sum(dim=-1, keepdim=True)


def _encode_prompt_images(model: nn.Module, tokens: torch.Tensor, in_prompt: torch.Tensor,
                          pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every image once: (features [n, C], prompt image-token positions [B, S], their feature index [B, S])."""
    if not hasattr(model, "encode_images"):
        raise ValueError(f"{model.args.name or 'this model'} is a text-only model and cannot take pixel_values; "
                         f"generate with a multimodal model (a *-vision preset or a multimodal checkpoint)")
    where = in_prompt & (tokens == model.args.vision_args.image_token_id)  # [B, S]; generated tokens never count
    features = model.encode_images(pixel_values)  # [n, C]
    if int(where.sum()) != features.shape[0]:
        K = model.args.vision_args.tokens_per_tile
        raise ValueError(f"the prompts hold {int(where.sum())} image tokens but pixel_values gives "
                         f"{features.shape[0]} features ({features.shape[0] // K} tiles × {K}); pass exactly the "
                         f"tiles of the images the prompts' placeholders stand for, in prompt order")
    index = where.flatten().cumsum(0).view_as(where) - 1  # image token -> its row-major rank = its feature row
    return features, where, index


def _image_inputs(images, prev: int, cur: int) -> dict:
    """Keyword arguments that hand positions prev … cur-1 their image features (none if they hold no image token)."""
    if images is None:
        return {}
    features, where, index = images
    step = where[:, prev:cur]  # [B, cur-prev]
    if not bool(step.any()):
        return {}
    return {"image_features": features[index[:, prev:cur][step]], "image_positions": step}


# -- argument checks (each message names the problem and the fix) ------------------------------------------------


def _check_prompts(model: nn.Module, prompts, max_new_tokens) -> list[list[int]]:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise TypeError("prompts must be a list of token-id lists, e.g. [[1, 306, 4658]]; for a tensor use "
                        "tokens.tolist(), for text encode it with the tokenizer first")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
    args = model.args
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or isinstance(p, torch.Tensor):
            raise TypeError(f"prompt {i} must be a list of int token ids, got {type(p).__name__}; "
                            f"encode text with the tokenizer and pass lists, e.g. tokenizer.encode(text)")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                             f"(start it with the tokenizer's BOS token)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise TypeError(f"prompt {i} must contain Python ints only (token ids); convert with int(...)")
        bad = [t for t in p if not 0 <= t < args.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {args.vocab_size}); check that the "
                             f"tokenizer matches the model's vocab_size")
        if len(p) + max_new_tokens > args.max_seq_len:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{len(p) + max_new_tokens} exceeds the model context max_seq_len={args.max_seq_len}; "
                             f"shorten the prompt or lower max_new_tokens")
        out.append(list(p))
    return out


def _check_sampling(temperature, top_p) -> tuple[float, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {top_p!r}")
    return float(temperature), float(top_p)
