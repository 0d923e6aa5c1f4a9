"""`export_hf`: write a LoRA adapter in Hugging Face PEFT's layout, loadable onto `LlamaForCausalLM`.

Shapes: N out features, r rank, H heads, D head dim.

Files: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, …) and `adapter_model.safetensors`
with PEFT's key names, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

RoPE convention: Meta rotates adjacent pairs (x_{2j}, x_{2j+1}) of each head, HF rotates (x_j, x_{j+D/2}); HF's
q_proj/k_proj rows are Meta's wq/wk rows permuted within each head (evens first, then odds). Everything indexed
by those output rows — lora_B's rows and DoRA's magnitude — is permuted the same way; lora_A (indexed by input
features) is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from llama.formats.io import atomic_write_bytes

from .api import _state

# Meta name -> HF module path inside a decoder layer (or at the top for the head)
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj", "output": "lm_head"}


def meta_to_hf_rows(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of x [N, ...] (N = n_heads·D) from Meta's pair order to HF's half-split order per head."""
    N = x.shape[0]
    rest = x.shape[1:]
    # [H, D/2, 2, ...] -> swap the pair axis in front of the D/2 axis -> [H, 2, D/2, ...]
    return x.reshape(n_heads, N // n_heads // 2, 2, *rest).transpose(1, 2).reshape(N, *rest)


def hf_key(meta_name: str) -> str:
    """`layers.3.attention.wq` -> `base_model.model.model.layers.3.self_attn.q_proj`; `output` -> `…lm_head`."""
    if meta_name == "output":
        return "base_model.model.lm_head"
    parts = meta_name.split(".")
    return f"base_model.model.model.layers.{parts[1]}.{HF_NAMES[parts[-1]]}"


def export_hf(model: nn.Module, folder: Union[str, os.PathLike], base_model: Optional[str] = None) -> Path:
    """Write the attached LoRA adapter (plain, rsLoRA or DoRA) for HF PEFT + transformers' LlamaForCausalLM.

    base_model: recorded as `base_model_name_or_path` (an HF folder or hub id), which HF's
    `AutoPeftModelForCausalLM.from_pretrained(folder)` loads the base from."""
    state = _state(model, "export an adapter")
    config = state.config
    if config.method != "lora":
        raise ValueError(f"export_hf writes LoRA adapters only; {config.method} has no Hugging Face PEFT "
                         f"equivalent (use peft.save_adapter)")
    if state.merged:
        raise ValueError("the LoRA adapter is merged; call peft.unmerge(model) before export_hf")
    if "experts" in config.target_modules:
        raise ValueError("export_hf maps the dense LlamaForCausalLM layout only; LoRA on Llama 4's routed experts "
                         "(target 'experts') has no entry in it: use peft.save_adapter, or drop 'experts' from "
                         "target_modules")
    args = model.args
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads}
    tensors = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        short = name.rsplit(".", 1)[-1]
        if name != "output" and len(name.split(".")) != 4:  # layers.<i>.<attention|feed_forward>.<w>
            raise ValueError(f"export_hf maps the dense LlamaForCausalLM layout only; {name} (a Llama 4 MoE "
                             f"shared expert) has no entry in it — use peft.save_adapter")
        key = hf_key(name)
        A = module.lora_A.detach().cpu()  # [r, K]: input side, same order in both conventions
        B = module.lora_B.detach().cpu()  # [N, r]
        if short in heads:
            B = meta_to_hf_rows(B, heads[short])
        tensors[f"{key}.lora_A.weight"] = A.contiguous()
        tensors[f"{key}.lora_B.weight"] = B.contiguous()
        if config.use_dora:
            m = module.lora_magnitude.detach().cpu()  # [N]
            tensors[f"{key}.lora_magnitude_vector"] = (meta_to_hf_rows(m, heads[short]) if short in heads
                                                       else m).contiguous()
    hf_targets = [HF_NAMES[n].rsplit(".", 1)[-1] for n in config.target_modules]
    if config.layers is None:
        target_modules = hf_targets
    else:  # a regular expression that PEFT full-matches against module names: only the chosen layers (+ lm_head)
        block = [t for t in hf_targets if t != "lm_head"]
        pattern = rf"model\.layers\.({'|'.join(map(str, config.layers))})\.(self_attn|mlp)\.({'|'.join(block)})"
        target_modules = "|".join(([pattern] if block else []) + (["lm_head"] if "lm_head" in hf_targets else []))
    hf_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": target_modules,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian", "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "adapter_model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / "adapter_config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
    return out
