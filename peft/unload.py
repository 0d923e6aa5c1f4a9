"""`merge_and_unload`: fold a trained adapter into the base weights and hand back a plain `llama.Transformer`.

`peft.merge` makes the adapter layers compute with W0 + ΔW, but they stay adapter modules (LoRALinear holding A
and B, QLoRALinear holding NF4 codes, …), so `llama.save` refuses the model. `merge_and_unload` replaces each of
them by the base module it stands for, holding the merged weight:

    linear layer      nn.Linear(W0 + s·BA)                     LoRA §4.1 eq. (3) folded; DoRA: m ⊙ (W0 + s·BA)/‖·‖
    routed experts    llama.moe.Experts(W_e + s·A_e B_e)       per expert and matrix (peft.lora_experts)
    NF4 layer         nn.Linear(dequant(W^NF4) [+ s·BA])       QLoRA: dense in the compute dtype, never re-quantised
    Adapter V2        nn.Linear(diag(s) W)                     only when every learnt bias is zero (see below)

and removes `model.peft_state`: the result is the model a checkpoint with these weights would load as, every
parameter trainable again, so `llama.save(model, folder, format="hf" | "meta")` writes a standalone checkpoint. This
is Hugging Face PEFT's `merge_and_unload` and LitGPT's `merge_lora`.

Departures and limits, checked before anything is changed:
  * Adapter V1 and Excitor act through attention on the input (prompts, gates): nothing to fold, refused.
  * Adapter V2 learns a bias per adapted linear; LLaMA's linear layers have none, so a merged model with a non-zero
    bias is no LLaMA: refused unless every bias is zero, and adaption prompts (adapter_layers) are refused.
  * A tied head (Llama 3.2 1B/3B) whose `output` carries LoRA gets its own merged matrix; the embedding stays as
    trained, so the result is untied (`args.tie_word_embeddings = False`) and saves with a separate lm_head.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llama.moe import Experts

from .api import MERGEABLE, merge
from .qlora import dequantize_model
from .targets import EXPERT_MATRICES, EXPERT_TARGET, LINEAR_NAMES, iter_linears


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the attached adapter into the weights (if not merged yet) and return the plain base model, in place."""
    state = getattr(model, "peft_state", None)
    if state is None:
        raise ValueError("merge_and_unload needs a model with an adapter attached (peft.apply or peft.load_adapter); "
                         "a plain model can be saved with llama.save as it is")
    _check_foldable(model, state)
    if not state.merged:
        merge(model)
    dequantize_model(model)  # frozen NF4 layers without an adapter (QLoRA's untargeted linears and experts)
    untied = False
    for _, parent, attr, child in list(iter_linears(model, LINEAR_NAMES)):
        if type(child) is nn.Linear:
            continue
        dense = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")  # no second copy
        dense.weight = nn.Parameter(child.weight.detach())  # the merged dense weight [N, K] of an adapter linear
        setattr(parent, attr, dense)
        untied |= attr == "output" and model.args.tie_word_embeddings
    for layer in model.layers:
        child = getattr(layer.feed_forward, EXPERT_TARGET, None)
        if child is None or type(child) is Experts:
            continue
        # LoRA experts merge into w1 w2 w3 in place; QLoRA experts keep dense merged_w* beside their NF4 codes
        merged = {name: getattr(child, f"merged_{name}", None) for name in EXPERT_MATRICES}
        merged = {name: (w if w is not None else getattr(child, name)).detach() for name, w in merged.items()}
        with torch.device("meta"):  # no second copy of the experts
            dense = Experts(child.n_experts, child.dim, child.hidden_dim)
        for name in EXPERT_MATRICES:
            setattr(dense, name, nn.Parameter(merged[name]))
        setattr(layer.feed_forward, EXPERT_TARGET, dense)
    if untied:
        model.args = dataclasses.replace(model.args, tie_word_embeddings=False)
    del model.peft_state
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _check_foldable(model: nn.Module, state) -> None:
    method = state.config.method
    if method not in MERGEABLE:
        raise ValueError(f"{method} cannot be merged into the weights: its attention terms depend on the input; keep "
                         f"the adapter (peft.save_adapter) and load it onto the base (mergeable: "
                         f"{', '.join(MERGEABLE)})")
    if method == "adapter_v2":
        if state.config.adapter_layers:
            raise ValueError("this Adapter V2 has adaption prompts (adapter_layers), which act through attention and "
                             "cannot be folded into a plain LLaMA; keep the adapter (peft.save_adapter)")
        learnt = [name for name, p in model.named_parameters() if name.endswith(".bias") and bool(p.detach().any())]
        if learnt:
            raise ValueError(f"this Adapter V2 learnt non-zero biases ({learnt[0]} and {len(learnt) - 1} more) and "
                             f"LLaMA's linear layers have no bias, so the merged model is not a plain LLaMA; keep "
                             f"the adapter (peft.save_adapter) or generate with it merged in place (peft.merge)")
