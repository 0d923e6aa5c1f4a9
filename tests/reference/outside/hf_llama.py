"""Hugging Face `transformers` as the reference for the model, the checkpoint formats, RoPE and the tokenizers.

Runs in the reference process (tests/reference/isolation.py). Every function takes and returns plain values,
tensors and folder paths; models never cross the process boundary, folders written by `save_pretrained` do.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers import (Llama4Config, Llama4ForCausalLM, Llama4Processor, Llama4TextConfig, LlamaConfig,
                          LlamaForCausalLM, LlamaTokenizer)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE
from transformers.utils.chat_template_utils import render_jinja_template

ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "llama4": (Llama4TextConfig, Llama4ForCausalLM)}


def version() -> str:
    return transformers.__version__


@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, in place, large enough that every term matters in the logits.

    HF's default init (std 0.02, unit norm gains) gives near-uniform logits that hide mistakes, so matrices get std
    1/sqrt(fan_in) (HF's Llama 4 experts are stored [E, in, out]) and vectors (norm gains, biases, the class token)
    1 + 0.1·N(0, 1): a transposed or skipped gain, or a zero-initialised bias, then shows.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if p.ndim == 1:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        else:
            fan_in = p.shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
    return model


def random_model(arch: str, config: dict, *, dtype=torch.float64, seed: int = 0, attn: str = "sdpa"):
    """An HF model of `arch` ("llama", "llama4") for `config`, with `random_weights_`."""
    config_class, model_class = ARCHITECTURES[arch]
    model = model_class._from_config(config_class(**config), attn_implementation=attn, dtype=dtype).eval()
    return random_weights_(model, seed)


def save_random(arch: str, config: dict, folder: str, *, dtype=torch.float64, seed: int = 0,
                max_shard_size=None) -> None:
    """`random_model(...).save_pretrained(folder)`: config.json + safetensors as HF writes them."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    random_model(arch, config, dtype=dtype, seed=seed).save_pretrained(folder, **kwargs)


@torch.no_grad()
def random_logits(arch: str, config: dict, tokens: torch.Tensor, *, seed: int = 0, attn: str = "sdpa"):
    return random_model(arch, config, seed=seed, attn=attn)(input_ids=tokens).logits


@torch.no_grad()
def logits(folder: str, tokens: torch.Tensor, *, arch: str = "llama", dtype=torch.float64, attn: str = "sdpa",
           hidden: bool = False):
    """Logits of `from_pretrained(folder)` (and, with hidden=True, the last hidden state before the final norm)."""
    model = ARCHITECTURES[arch][1].from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()
    out = model(input_ids=tokens, output_hidden_states=hidden)
    return (out.logits, out.hidden_states[-1]) if hidden else out.logits


def config_fields(folder: str, keys: list, arch: str = "llama") -> dict:
    """The listed attributes of the config HF reads from folder/config.json."""
    config = ARCHITECTURES[arch][0].from_pretrained(folder)
    return {key: getattr(config, key) for key in keys}


@torch.no_grad()
def greedy(folder: str, prompts: list, n: int) -> list:
    """HF `generate` with do_sample=False, one prompt at a time, exactly n new tokens each."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="sdpa").eval()
    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        rows.append(out[0, len(prompt):].tolist())
    return rows


# -- RoPE ------------------------------------------------------------------------------------------------------------


def rope_init(config: dict, seq_len=None):
    """(inverse frequencies, attention factor) of HF's rope-init function for config["rope_parameters"]."""
    hf = LlamaConfig(**config)
    init = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]]
    if seq_len is None:
        inv_freq, factor = init(hf, None)
    else:
        inv_freq, factor = init(hf, None, seq_len=torch.tensor(seq_len))
    return inv_freq, float(factor)


def rotary(config: dict, steps: list) -> list:
    """(cos, sin) of HF's LlamaRotaryEmbedding for each (start, length) in turn (the dynamic update included)."""
    module = LlamaRotaryEmbedding(LlamaConfig(**config))
    x = torch.zeros(1)
    out = []
    for start, length in steps:
        cos, sin = module(x, torch.arange(start, start + length)[None])
        out.append((cos[0], sin[0]))
    return out


# -- tokenizers and chat templates -------------------------------------------------------------------------------


def llama_tokenizer(folder: str, texts: list) -> dict:
    """HF's LlamaTokenizer on folder/tokenizer.model: special ids, ids of each text, decoding of those ids."""
    tok = LlamaTokenizer.from_pretrained(folder)
    ids = [tok.encode(text, add_special_tokens=False) for text in texts]
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "ids": ids,
            "decoded": [tok.decode(i) for i in ids]}


def tokenizer_json_from_tiktoken(vocab_file: str, pattern: str, specials: list, out: str) -> None:
    """The tokenizer.json HF's converter makes from a tiktoken ranks file (how the hub's Llama 3/4 files were made)."""
    TikTokenConverter(vocab_file=vocab_file, pattern=pattern, extra_special_tokens=specials).converted().save(out)


def tokenizer_json_from_sentencepiece(folder: str, out: str) -> None:
    """The tokenizer.json HF's LlamaTokenizerFast builds from folder/tokenizer.model (a Llama 2 hub file)."""
    transformers.LlamaTokenizerFast.from_pretrained(folder, from_slow=True).backend_tokenizer.save(out)


def llama4_prompt_split_image(grid: list, tokens_per_tile: int) -> str:
    """HF `Llama4Processor._prompt_split_image`: the image markers of one image as text."""
    return Llama4Processor._prompt_split_image(None, tuple(grid), tokens_per_tile)


def llama4_vision_token_ids() -> dict:
    config = Llama4Config()
    return {"boi": config.boi_token_index, "eoi": config.eoi_token_index, "image": config.image_token_index}


def llama4_chat_template(dialog: list, bos_token: str) -> str:
    """HF's Llama 4 chat template rendered for a dialog, with the generation prompt."""
    rendered, _ = render_jinja_template([dialog], chat_template=LLAMA4_CHAT_TEMPLATE, add_generation_prompt=True,
                                        bos_token=bos_token)
    return rendered[0]
