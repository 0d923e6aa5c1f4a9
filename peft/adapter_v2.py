"""LLaMA-Adapter V2 (Gao et al., arXiv 2304.15010 §4): bias and scale tuning, unfrozen norms, and adaption prompts.

Shapes: B batch, T sequence, K in features, N out features, C model dim.

Three parameter sets are added to the frozen model (§4.1, §4.2 "bias tuning of linear layers"):
  1. the V1 adaption prompts with zero-init gated attention (peft.adapter_v1) in the last L layers;
  2. on every linear layer a bias b (init 0) and a scale s (init 1):    y = s ⊙ (W x + b)      (§4.1)
  3. every normalisation layer's gain is unfrozen.
At initialisation the model is the frozen one (b = 0, s = 1, gate = 0).

Differences and choices (arXiv 2304.15010 §4 vs. the OpenGVLab/LLaMA-Adapter code):
  * Scale placement: the paper's equation scales the *output* (`scale_side="output"`, default, as lit-llama and
    litgpt do); the released 65B chat code computes y = W(s ⊙ x) + b with an input-sized s (`scale_side="input"`).
    The authors say both work the same (OpenGVLab/LLaMA-Adapter#36); checkpoints are not interchangeable.
    The paper's "14M trainable parameters" for the 65B chat model is the input-side form on all seven block
    linears plus the norms, without prompts (13,811,712; see `python -m peft.count`).
  * Layers with prompts: the 7B implementation details say the last 31 layers (default `adapter_layers=31`);
    `adapter_layers=0` gives bias/scale/norm tuning only (the chat65b configuration). The gate uses tanh, as in all
    V2 code. Prompts pass through the biased and scaled wk/wv, as in the chat65b code.
  * Bias and scale go on wq wk wv wo w1 w2 w3 (`bias_scale_modules`); `output` may be added (lit-llama does).
    The released multimodal-7B code instead has biases only, on wq wo w1 w2 w3.
  * Parameter groups (§4 item 4, "joint training with disjoint parameters"): the language group (late prompts and
    gates, norms, biases, scales) is trained on instruction data; the visual group (visual projection, early
    zero-init gates) on image–text data. This file holds the language group; the visual branch (the paper's early
    fusion at layer 1 with 20 visual prompts, or the released code's visual tokens added to every prompt) is
    `peft.adapter_v2_visual`, on a multimodal model whose own frozen encoder provides the image features.
  * Merging folds b and s into the weights exactly (output side: W' = diag(s) W, b' = s ⊙ b; input side:
    W' = W diag(s), b' = b); the layer then computes W'x + b'. Norm gains are already in place. Prompts cannot merge.
  * The norm gains train in place, so attaching records each gain's starting value (a non-persistent buffer
    `base_gain` on its RMSNorm: C numbers per norm, not in the state dict) for `peft.disable_adapters`, which must
    give back the frozen base (DPO's reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import RMSNorm

from .adapter_v1 import AdaptionPrompt, attach_prompts, check_prompt_options
from .lora_core import master_dtype
from .targets import (BLOCK_LINEARS, LINEAR_NAMES, check_free_extensions, check_plain_linears, check_target_names,
                      iter_linears, shared_parameter_ids, top_layers)

BASE_GAIN = "base_gain"  # buffer name of a trained RMSNorm's gain before training (for peft.disable_adapters)


@dataclass
class AdapterV2Config:
    """LLaMA-Adapter V2 hyper-parameters (7B implementation details: prompts of length 10 in the last 31 layers)."""

    adapter_len: int = 10  # K, prompts per adapted layer
    adapter_layers: int = 31  # L, last L layers get prompts (0: none, bias/scale/norm tuning only)
    gate_activation: str = "tanh"  # all V2 code applies tanh to the gate
    prompt_init_std: float = 1.0
    bias_scale_modules: Sequence[str] = BLOCK_LINEARS  # linears that get a bias and a scale (may be empty)
    scale_side: str = "output"  # "output": y = s ⊙ (Wx + b) (paper); "input": y = W(s ⊙ x) + b (chat65b code)
    train_norms: bool = True  # unfreeze every RMSNorm gain

    method = "adapter_v2"

    def __post_init__(self):
        self.bias_scale_modules = (check_target_names(self.bias_scale_modules, LINEAR_NAMES)
                                   if len(self.bias_scale_modules) else ())
        if not isinstance(self.adapter_layers, int) or isinstance(self.adapter_layers, bool) or self.adapter_layers < 0:
            raise ValueError(f"adapter_layers must be an integer >= 0 (0: no prompts), got {self.adapter_layers!r}")
        check_prompt_options(self.adapter_len, self.gate_activation, self.prompt_init_std)
        if self.scale_side not in ("output", "input"):
            raise ValueError(f"unknown scale_side {self.scale_side!r}; use 'output' (paper: y = s(Wx+b)) or "
                             f"'input' (chat65b code: y = W(s x) + b)")


class BiasScaleLinear(nn.Module):
    """A frozen bias-free linear layer W with a trainable bias b (zeros) and scale s (ones)."""

    def __init__(self, base: nn.Linear, scale_side: str = "output", shares_weight: bool = False):
        super().__init__()
        N, K = base.weight.shape
        self.in_features, self.out_features, self.scale_side = K, N, scale_side
        self.weight = base.weight  # frozen W (the same Parameter object, so ties survive)
        self.shares_weight = shares_weight
        dtype, device = master_dtype(base.weight.dtype), base.weight.device
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device))  # b [N], zero-initialised
        self.scale = nn.Parameter(torch.ones(N if scale_side == "output" else K, dtype=dtype, device=device))  # s
        self.merged = False
        self._merge_cache: dict = {}
        self.register_buffer("merged_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.merged_bias.to(x.dtype))
        b, s = self.bias.to(x.dtype), self.scale.to(x.dtype)
        if self.scale_side == "output":
            # §4.1: y = s · (W x + b)
            return (F.linear(x, self.weight) + b) * s
        # chat65b code: y = W (s ⊙ x) + b
        return F.linear(x * s, self.weight) + b

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s and b into W: output side W' = diag(s)W, b' = s⊙b; input side W' = W diag(s), b' = b."""
        if self.merged:
            raise RuntimeError("this bias/scale layer is already merged (unmerge first)")
        W = self.weight
        compute = master_dtype(W.dtype)
        s = self.scale.to(compute)
        if self.scale_side == "output":
            merged, bias = s[:, None] * W.to(compute), s * self.bias.to(compute)  # [N, K], [N]
        else:
            merged, bias = W.to(compute) * s[None, :], self.bias.to(compute)
        if self.shares_weight:  # do not write into the tied embedding matrix
            self._merge_cache["tied_weight"] = W
            self.weight = nn.Parameter(merged.to(W.dtype), requires_grad=False)
        else:
            W.copy_(merged.to(W.dtype))
        self.merged_bias = bias.to(W.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this bias/scale layer is not merged; nothing to unmerge")
        if self.shares_weight:
            self.weight = self._merge_cache.pop("tied_weight")
        else:
            W = self.weight
            compute = master_dtype(W.dtype)
            s = self.scale.to(compute)
            if bool((s == 0).any()):
                raise RuntimeError("cannot unmerge: a scale entry is 0, so the original weight is lost")
            W.copy_((W.to(compute) / (s[:, None] if self.scale_side == "output" else s[None, :])).to(W.dtype))
        self.merged_bias = None
        self.merged = False

    def adapter_parameter_names(self) -> list[str]:
        return ["bias", "scale"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scale_side={self.scale_side}, "
                f"merged={self.merged}")


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every RMSNorm gain (attention_norm, ffn_norm of each layer, and the final norm)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, RMSNorm)]


def validate(model: nn.Module, config: AdapterV2Config) -> tuple[list[int], list]:
    """The prompt layers (topmost `adapter_layers`, without an extension yet) and the bias/scale linears (plain)."""
    prompt_layers = top_layers(model, config.adapter_layers, "adapter_layers") if config.adapter_layers else []
    check_free_extensions(model, prompt_layers)
    found = list(iter_linears(model, config.bias_scale_modules))
    check_plain_linears(found)
    return prompt_layers, found


def attach(model: nn.Module, config: AdapterV2Config, plan: tuple[list[int], list],
           make_prompt=AdaptionPrompt) -> list[str]:
    """Bias/scale on the linears, norms unfrozen, prompts (built by `make_prompt`) in the last layers -> names."""
    prompt_layers, found = plan
    shared = shared_parameter_ids(model)
    names = []
    for name, parent, attr, child in found:
        layer = BiasScaleLinear(child, config.scale_side, shares_weight=id(child.weight) in shared)
        setattr(parent, attr, layer)
        names += [f"{name}.bias", f"{name}.scale"]
    if config.train_norms:  # §4.1: every normalisation layer is unfrozen
        record_base_gains(model)
        names += norm_parameter_names(model)
    names += attach_prompts(model, prompt_layers, config.adapter_len, config.gate_activation, config.prompt_init_std,
                            make_prompt)
    return names


def record_base_gains(model: nn.Module) -> None:
    """Keep each RMSNorm gain's value before training, as the non-persistent buffer `base_gain` of its norm."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.register_buffer(BASE_GAIN, module.weight.detach().clone(), persistent=False)


def bias_scale_layers(model: nn.Module) -> list[BiasScaleLinear]:
    return [m for m in model.modules() if isinstance(m, BiasScaleLinear)]


def merge(model: nn.Module) -> None:
    """Fold every bias and scale into its weight; the adaption prompts stay attached (they cannot merge)."""
    for layer in bias_scale_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in bias_scale_layers(model):
        layer.unmerge()


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The paper's disjoint groups (§4 item 4): "language" (trained on instruction data) and "visual" (image–text).

    language: adaption prompts and gates of the late layers, norm gains, biases and scales.
    visual:   the visual projection and the early zero-init gated prompts (`peft.adapter_v2_visual`); empty without
              a visual branch.
    """
    state = getattr(model, "peft_state", None)
    if state is None or state.config.method not in ("adapter_v2", "adapter_v2_visual"):
        raise ValueError("parameter_groups needs a model with LLaMA-Adapter V2 attached: "
                         "call peft.apply(model, peft.AdapterV2Config(...)) first")
    params = dict(model.named_parameters())
    early = getattr(state.config, "visual_fusion", None) == "early"
    visual = [n for n in state.parameter_names if n.startswith("adapter_visual.")
              or (early and n.startswith("text_model.layers.0.attention.extension."))]
    return {"language": {n: params[n] for n in state.parameter_names if n not in visual},
            "visual": {n: params[n] for n in visual}}
