"""LLaMA-Excitor's multimodal variant (Zou et al., arXiv 2404.00913) on a multimodal model's text trunk.

Shapes: B batch rows, T new tokens, K prompts, Sv visual tokens per row, C model dim (= H·D), r rank,
        Wv frozen feature width.

Reconstructed from the authors' multimodal figure (`zoubo9034.github.io`, `Excitor/`; see `peft.excitor` for the
text-only block and for how far each element is established). The frozen image features F [Sv, Wv] (`peft.visual`:
every token of every real tile from the model's own encoder, in place of CLIP's) enter each Excitor block only
through its inner prompt attention, stacked below the learnable prompts along the prompt axis:

    F̂   = F W_F + b_F                                     one shared projection Wv -> C (trainable)
    K̃_l = [ P_l ; F̂ W^e_k ],   Ṽ_l = [ P_l ; F̂ W^e_v ]     "Wk_Excitor", "Wv_Excitor": rank r per layer (trainable)
    Key^extra = softmax_over_(K+Sv)( Q^e K̃_lᵀ / τ ) Ṽ_l     Q^e = x W_down W_up, as in the text-only block
    S^g = softmax( g_l·Q Key^extraᵀ/√D + S + mask ),  out = W_o(S^g V)           values of the layer untouched

Image features never enter the token sequence or the values; they only re-weight the frozen attention (the
paper's "no multimodal alignment" claim).

Choices where no source decides (the research note's suggested defaults):
  * one shared projection W_F (with bias, Kaiming-uniform like nn.Linear, b_F = 0), then per-layer rank-r maps
    W^e = down [r, C] · up [C, r] for keys and for values, r = `visual_rank` (default = the block's `rank`), both
    up matrices zero at initialisation: the visual entries start as zero keys and values, so the model starts
    exactly where the text-only Excitor does (identity at W_up = 0 still holds: a uniform mixture is a per-row
    constant of the logits).
  * padding tiles, empty image slots and rows without an image are masked out of the inner softmax (−inf); the
    identity trick subtracts the uniform mixture over the valid entries only.
  * KV-cache decoding: Key^extra_j depends on token j and the row's images, which are fixed for a sequence, so the
    block's key cache stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .excitor import ExcitorBlock, ExcitorConfig
from .lora_core import master_dtype
from .targets import check_free_extensions, top_layers
from .visual import VisualContext


@dataclass
class ExcitorVisualConfig(ExcitorConfig):
    """Excitor with image features stacked below its prompts; the text-side defaults are `ExcitorConfig`'s."""

    visual_rank: Optional[int] = None  # r of W^e_k and W^e_v (None: the block's `rank`)

    method = "excitor_visual"

    def __post_init__(self):
        super().__post_init__()
        if self.extra_key_rope != "none":
            raise ValueError("the visual Excitor keeps un-rotated extra keys (extra_key_rope='none'): image tokens "
                             "have no text position to rotate by")
        if self.visual_rank is not None and (not isinstance(self.visual_rank, int) or self.visual_rank <= 0):
            raise ValueError(f"visual_rank must be a positive integer or None, got {self.visual_rank!r}")


class SharedFeatureProjection(nn.Module):
    """F̂ = F W_F + b_F for every valid visual token of each row (one per model, shared by the blocks)."""

    def __init__(self, context: VisualContext, width: int, dtype=torch.float32, device=None):
        super().__init__()
        self.proj = nn.Linear(context.width, width, dtype=dtype, device=device)
        nn.init.zeros_(self.proj.bias)
        self.context = context

    def tokens(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(F̂ [B, Sv, C], valid [B, Sv])."""
        f, valid = self.context.token_features()
        return self.proj(f.to(self.proj.weight.dtype)).to(dtype), valid


class VisualExcitorBlock(ExcitorBlock):
    """An Excitor block whose inner prompt attention also reads the projected image tokens."""

    def __init__(self, config: ExcitorVisualConfig, dim: int, n_heads: int, head_dim: int,
                 source: SharedFeatureProjection, dtype=torch.float32, device=None):
        super().__init__(config, dim, n_heads, head_dim, None, dtype, device)
        width, r = n_heads * head_dim, config.visual_rank or config.rank
        self._source = (source,)  # shared by every block: kept out of this module's parameters
        self.k_down, self.k_up = _low_rank(width, r, dtype, device)  # W^e_k = k_up · k_down
        self.v_down, self.v_up = _low_rank(width, r, dtype, device)  # W^e_v = v_up · v_down

    def prompt_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        P = self.prompt.to(x.dtype)[None]  # [1, K, HD]
        source = self._source[0]
        if not source.context.has_images:
            return P, P, None
        f, valid = source.tokens(x.dtype)  # [B, Sv, HD], [B, Sv]
        B, K = f.shape[0], P.shape[1]

        def low_rank(down, up):
            return F.linear(F.linear(f, down.to(x.dtype)), up.to(x.dtype))  # [B, Sv, HD]

        keys = torch.cat([P.expand(B, -1, -1), low_rank(self.k_down, self.k_up)], dim=1)  # K̃ [B, K+Sv, HD]
        values = torch.cat([P.expand(B, -1, -1), low_rank(self.v_down, self.v_up)], dim=1)  # Ṽ [B, K+Sv, HD]
        valid = torch.cat([valid.new_ones(B, K), valid], dim=1)  # [B, K+Sv]
        return keys, values, valid


def _low_rank(width: int, r: int, dtype, device) -> tuple[nn.Parameter, nn.Parameter]:
    down = nn.Parameter(torch.empty(r, width, dtype=dtype, device=device))  # [r, C], Kaiming-uniform like LoRA's A
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    up = nn.Parameter(torch.zeros(width, r, dtype=dtype, device=device))  # [C, r], zero: no image at step 0
    return down, up


def validate(model: nn.Module, config: ExcitorVisualConfig) -> list[int]:
    """The topmost `adapter_layers` layers of `model.text_model`, each without an attention extension yet."""
    layers = top_layers(model.text_model, config.adapter_layers, "adapter_layers")
    check_free_extensions(model.text_model, layers)
    if getattr(model, "adapter_visual", None) is not None:
        raise ValueError("this model already has a visual adapter attached; build a fresh model")
    return layers


def attach(model: nn.Module, config: ExcitorVisualConfig, layers: list[int]) -> list[str]:
    """The shared projection as `model.adapter_visual`, a visual Excitor block in each of the top L trunk layers."""
    trunk = model.text_model
    ref = trunk.tok_embeddings.weight
    dtype = master_dtype(ref.dtype)
    attn0 = trunk.layers[layers[0]].attention
    source = SharedFeatureProjection(VisualContext(model), attn0.n_heads * attn0.head_dim, dtype, ref.device)
    model.adapter_visual = source
    names = [f"adapter_visual.{n}" for n, _ in source.named_parameters()]
    for i in layers:
        attn = trunk.layers[i].attention
        attn.extension = VisualExcitorBlock(config, trunk.args.dim, attn.n_heads, attn.head_dim, source, dtype,
                                            ref.device)
        names += [f"text_model.layers.{i}.attention.extension.{n}" for n, _ in attn.extension.named_parameters()]
    return names
