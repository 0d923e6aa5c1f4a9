"""The reference model without a second copy: every adapter switched off, the frozen base computed from the same
tensors.

    with torch.no_grad(), peft.disable_adapters(policy):
        ref_logits = policy(tokens)            # the frozen base model's logits, bit for bit

DPO's reference π_ref is the model the policy starts from (DPO arXiv 2305.18290 §4). When the policy is that model
plus an adapter, switching the adapter off recovers it exactly, so the reference costs one forward pass and no
weights (the PEFT trick of trl #624 / PR #640 and torchtune's `disable_adapter`).

How each method is switched off, through the override points the methods attach by (the method files are not
touched): the adapted module is swapped, for the duration of the block, for the plain module it wraps, built over
the very same tensors.

    LoRA, DoRA, Adapter V2 bias/scale   LoRALinear / BiasScaleLinear  ->  nn.Linear holding the same `weight`
    QLoRA                               QLoRALinear                   ->  NF4Linear holding the same NF4 buffers
    LoRA on routed experts (Llama 4)    LoRAExperts                   ->  llama.moe.Experts holding the same w1 w2 w3
    QLoRA on routed experts             QLoRAExperts                  ->  its NF4 experts, without the update
    LLaMA-Adapter V1/V2, Excitor        Attention.extension           ->  None
    Adapter V2's trained norm gains     RMSNorm                       ->  an RMSNorm with the gains recorded at
                                                                          attach time (`adapter_v2.BASE_GAIN`)

Everything is put back on exit, also when the block raises. Preconditions (pipeline.md §6.5): the base must *be* the
reference, so an adapter trained before (e.g. an SFT LoRA) must be merged into the weights before a fresh DPO adapter
is attached; a merged adapter cannot be switched off (its update is inside the weight); and a model sharded by FSDP2
cannot either (its modules see gathered copies of the parameters only during their own forward). Both raise here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from llama.model import RMSNorm
from llama.moe import Experts

from .adapter_v2 import BASE_GAIN, BiasScaleLinear
from .lora import LoRALinear
from .lora_experts import LoRAExperts, SwiGLUExperts
from .qlora import NF4Linear, QLoRALinear
from .qlora_experts import NF4Experts, QLoRAExperts
from .targets import EXPERT_MATRICES


class FrozenNF4Experts(SwiGLUExperts):
    """The NF4 routed experts of a `QLoRAExperts` without its update: x @ dequant(W_e), over the same buffers."""

    def __init__(self, adapted: QLoRAExperts):
        super().__init__()
        self._adapted = (adapted,)  # a tuple: not registered as a submodule, nothing is copied

    def _matmul(self, name: str, x: torch.Tensor, e: Optional[int] = None) -> torch.Tensor:
        return NF4Experts._matmul(self._adapted[0], name, x, e)


def _linear(weight: nn.Parameter) -> nn.Linear:
    """A bias-free nn.Linear whose weight *is* `weight` (no copy)."""
    N, K = weight.shape
    with torch.device("meta"):
        layer = nn.Linear(K, N, bias=False)
    layer.weight = weight
    return layer


def _experts(adapted: LoRAExperts) -> Experts:
    E, C, Fh = adapted.w1.shape
    with torch.device("meta"):
        experts = Experts(E, C, Fh)
    for name in EXPERT_MATRICES:
        setattr(experts, name, getattr(adapted, name))
    return experts


def _norm(norm: RMSNorm) -> RMSNorm:
    with torch.device("meta"):
        frozen = RMSNorm(norm.weight.shape[0], norm.eps)
    frozen.weight = nn.Parameter(getattr(norm, BASE_GAIN), requires_grad=False)  # shares the recorded tensor
    return frozen


def _frozen(module: nn.Module) -> Optional[nn.Module]:
    """The plain module an adapter wraps, built over the same tensors; None where `module` carries no adapter."""
    if isinstance(module, QLoRALinear):  # an NF4Linear plus LoRA factors: its frozen part is that NF4Linear
        return NF4Linear(module.qweight, module.compute_dtype)
    if isinstance(module, (LoRALinear, BiasScaleLinear)):
        return _linear(module.weight)
    if isinstance(module, QLoRAExperts):
        return FrozenNF4Experts(module)
    if isinstance(module, LoRAExperts):
        return _experts(module)
    if isinstance(module, RMSNorm) and hasattr(module, BASE_GAIN):
        return _norm(module)
    return None


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its frozen base inside the block (see the module docstring); yields the model."""
    state = getattr(model, "peft_state", None)
    if state is None:
        raise ValueError("disable_adapters needs a model with an adapter (peft.apply); for full fine-tuning, "
                         "precompute the reference log-probabilities before training instead")
    if state.merged:
        raise ValueError("the adapter is merged into the weights, so switching it off would not recover the base; "
                         "call peft.unmerge(model) first")
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # FSDP2 swaps in gathered tensors at each forward
        raise ValueError("disable_adapters cannot run on an FSDP-sharded model (the swapped-in modules would hold the "
                         "shards); precompute the reference log-probabilities instead (dpo.precompute_reference)")
    swaps = []  # (parent, attribute, adapted module, its frozen stand-in), in the order they are swapped
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            frozen = _frozen(child)
            if frozen is not None:
                swaps.append((parent, attr, child, frozen))
    for layer in model.layers:
        if layer.attention.extension is not None:
            swaps.append((layer.attention, "extension", layer.attention.extension, None))
    try:
        for parent, attr, _, frozen in swaps:
            setattr(parent, attr, frozen)
        yield model
    finally:
        for parent, attr, adapted, _ in reversed(swaps):
            setattr(parent, attr, adapted)
