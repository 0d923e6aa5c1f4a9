"""Hugging Face PEFT as the reference for LoRA, rsLoRA and DoRA, and the reader of `peft.export_hf` folders.

Runs in a reference process whose path starts with the folder HF `peft` was installed into (tests/test_lora_hf.py);
`import peft` there is Hugging Face's (checked below), never this project's.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft as hf_peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def version() -> str:
    return hf_peft.__version__


def _base_model(work: Path, case: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**case["hf_config"])).to(torch.float64)
    model.load_state_dict(load_file(str(work / "base.safetensors")), strict=True)
    return model.eval()


def _logits_and_hidden(model, tokens):
    """Logits and the last hidden state before the final norm (the norm rounds to float32; this does not)."""
    seen = []
    norm = model.get_base_model().model.norm
    handle = norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        logits = model(tokens).logits
    handle.remove()
    return logits, seen[-1]


def run_case(work: str, hf_peft_dir: str) -> dict:
    """For the case prepared in `work`: HF PEFT's LoRA with our tensors copied in, and our export_hf folder loaded
    by `PeftModel.from_pretrained`; logits and hidden states of both."""
    assert Path(hf_peft.__file__).resolve().is_relative_to(Path(hf_peft_dir).resolve()), hf_peft.__file__
    work = Path(work)
    case = json.loads((work / "case.json").read_text())
    tokens = load_file(str(work / "tokens.safetensors"))["tokens"]

    c = case["lora"]
    model = get_peft_model(_base_model(work, case), LoraConfig(
        r=c["r"], lora_alpha=c["alpha"], target_modules=c["hf_targets"], use_rslora=c["use_rslora"],
        use_dora=c["use_dora"], layers_to_transform=c["layers"], lora_dropout=0.0))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(work / "lora.safetensors")).items():  # rows already in HF order
            params[key].copy_(value)
    hf_lora, hf_lora_hidden = _logits_and_hidden(model, tokens)

    loaded = PeftModel.from_pretrained(_base_model(work, case), str(work / "export"))
    export, export_hidden = _logits_and_hidden(loaded, tokens)
    n_lora = sum(1 for n, _ in loaded.named_parameters() if "lora_" in n)
    return {"hf_lora": hf_lora, "export": export, "hf_lora_hidden": hf_lora_hidden, "export_hidden": export_hidden,
            "n_lora_tensors_loaded": n_lora}


def greedy_from_checkpoints(merged_dir: str, base_dir: str, adapter_dir: str, tokens: torch.Tensor,
                            n_new: int) -> dict:
    """A merged HF checkpoint, and a base HF checkpoint with an HF PEFT adapter folder on it, each loaded the way a
    user loads them (`from_pretrained`), in float64: their logits on `tokens` [B, T] and `n_new` greedy tokens."""
    merged = LlamaForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    for name, model in (("merged", merged), ("adapter", adapted)):
        model = model.to(torch.float64).eval()
        with torch.no_grad():
            out[name + "_logits"] = model(tokens).logits
            ids = tokens
            for _ in range(n_new):  # greedy without a cache: the plainest decoding there is
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        out[name + "_ids"] = ids[:, tokens.shape[1]:]
    return out
