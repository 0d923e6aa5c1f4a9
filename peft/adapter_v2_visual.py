"""LLaMA-Adapter V2's visual branch (Gao et al., arXiv 2304.15010 §4.3) on a multimodal model's text trunk.

Shapes: B batch rows, K prompts, Kv visual prompts, C model dim, Wv frozen feature width, H heads.

Everything of `peft.adapter_v2` (bias and scale on the linears, unfrozen norms, adaption prompts in the last L
layers) is attached to the text trunk, plus a learnable projection of the frozen image encoder's global feature g of
each row (`peft.visual`: the model's own encoder stands in for CLIP):

    I_p = LayerNorm(W_p g + b_p)                                   the learnable projection (V1 §3.3 "Projection")

and one of two fusions (`visual_fusion`):
  * "early" (the paper, §4.3 "early fusion of visual knowledge"): Kv = 20 visual prompts enter only the *first*
    layer, through a zero-init gated attention branch of their own (V1 eqs. 6–8 with its own per-head gate):
        P^v = Q_v + Repeat(I_p)          Q_v [Kv, C] learnable, as V1 §3.3 adds the image to its prompts;
    the static adaption prompts stay in the last layers, so visual and language prompts never meet.
  * "late" (the released multimodal-7B code): visual tokens are *added* to the adaption prompts of every adapted
    layer: P^v_l = P_l + V, V = Q_v + Repeat(I_p), Q_v [K, C] shared by the layers.

Differences and choices:
  * The released code turns its 10 visual queries into visual tokens with 8 trainable ViT blocks over the CLIP patch
    tokens; here V is the queries plus the projected global feature (V1 §3.3's form), with the code's LayerNorm
    after the projection (`clip_proj_norm`).
  * A row without an image gets I_p = 0; in "early" mode its first-layer visual branch is switched off entirely (its
    output is multiplied by 0), so text-only rows see the language adapter alone.
  * Parameter groups (§4 item 4, "joint training with disjoint parameters"): `adapter_v2.parameter_groups` returns
    the projection, Q_v and the early gate as "visual", everything else as "language".
  * Initialisation: the early gate is zero (the model starts as the text-adapted one); W_p Kaiming-uniform like
    nn.Linear, b_p = 0, Q_v ~ N(0, prompt_init_std²) like the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import adapter_v1, adapter_v2
from .adapter_v1 import AdaptionPrompt
from .adapter_v2 import AdapterV2Config, merge, unmerge  # noqa: F401  (bias/scale merge: same as Adapter V2)
from .lora_core import master_dtype
from .targets import check_free_extensions
from .visual import VisualContext

FUSIONS = ("early", "late")


@dataclass
class AdapterV2VisualConfig(AdapterV2Config):
    """Adapter V2 with a visual branch; the defaults are the paper's (early fusion, 20 visual prompts)."""

    visual_fusion: str = "early"  # "early" (paper: first layer) or "late" (released code: added to every prompt)
    visual_len: int = 20  # Kv visual prompts of the early branch ("late" uses adapter_len)

    method = "adapter_v2_visual"

    def __post_init__(self):
        super().__post_init__()
        if self.visual_fusion not in FUSIONS:
            raise ValueError(f"unknown visual_fusion {self.visual_fusion!r}; use 'early' (paper §4.3) or 'late' "
                             f"(released multimodal code)")
        if not isinstance(self.visual_len, int) or isinstance(self.visual_len, bool) or self.visual_len <= 0:
            raise ValueError(f"visual_len must be a positive integer, got {self.visual_len!r}")
        if self.visual_fusion == "late" and not self.adapter_layers:
            raise ValueError("visual_fusion='late' adds the image to the adaption prompts: set adapter_layers >= 1")


class VisualProjection(nn.Module):
    """I_p = LayerNorm(W_p g + b_p) for each row's global image feature g; "late" adds the shared queries Q_v."""

    def __init__(self, context: VisualContext, dim: int, n_queries: Optional[int], prompt_init_std: float,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.proj = nn.Linear(context.width, dim, dtype=dtype, device=device)
        nn.init.zeros_(self.proj.bias)
        self.norm = nn.LayerNorm(dim, dtype=dtype, device=device)
        self.query = None
        if n_queries is not None:
            self.query = nn.Parameter(torch.empty(n_queries, dim, dtype=dtype, device=device))  # Q_v [K, C]
            nn.init.normal_(self.query, std=prompt_init_std)
        self.context = context

    def projected(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(I_p [B, 1, C], has_image [B]); zeros for rows without an image."""
        g, has_image = self.context.global_features()
        i_p = self.norm(self.proj(g.to(self.proj.weight.dtype))) * has_image[:, None]  # [B, C]
        return i_p[:, None].to(dtype), has_image

    def visual_tokens(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """V = Q_v + Repeat(I_p) [B, K, C] for the "late" fusion (zeros for rows without an image), None if no image."""
        if not self.context.has_images:
            return None
        i_p, has_image = self.projected(dtype)
        return (self.query.to(dtype)[None] + i_p) * has_image[:, None, None].to(dtype)


class VisualAdaptionPrompt(AdaptionPrompt):
    """An `AdaptionPrompt` whose prompts get image information added (V1 §3.3: P^v_l = P_l + Repeat(I_p)).

    early=True: the first layer's visual prompts Q_v + Repeat(I_p), rows without an image skip the branch;
    early=False: the late prompts P_l + V (V from `VisualProjection.visual_tokens`).
    """

    def __init__(self, *args, source: VisualProjection, early: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._source = (source,)  # shared with other layers: kept out of this module's parameters
        self.early = early

    def prompts(self, dtype: torch.dtype) -> torch.Tensor:
        source = self._source[0]
        if not source.context.has_images:
            return self.prompt[None].to(dtype)
        if self.early:
            i_p, _ = source.projected(dtype)
            return self.prompt[None].to(dtype) + i_p  # [B, Kv, C]
        return self.prompt[None].to(dtype) + source.visual_tokens(dtype)  # [B, K, C]

    def extra_output(self, attn, x, q, start_pos):
        if not self.early:
            return super().extra_output(attn, x, q, start_pos)
        context = self._source[0].context
        if not context.has_images:
            return None  # no image in this sequence: the visual branch is off
        _, has_image = context.global_features()
        out = super().extra_output(attn, x, q, start_pos)  # [B, H, T, D]
        return out * has_image.to(out.dtype)[:, None, None, None]


def validate(model: nn.Module, config: AdapterV2VisualConfig) -> tuple[list[int], list]:
    """Adapter V2's plan for `model.text_model`, after the visual branch's own checks."""
    trunk = model.text_model
    if config.visual_fusion == "early":
        if config.adapter_layers >= trunk.args.n_layers:
            raise ValueError(f"early fusion puts the visual prompts in layer 0, but adapter_layers="
                             f"{config.adapter_layers} covers all {trunk.args.n_layers} layers; use adapter_layers <= "
                             f"{trunk.args.n_layers - 1}")
        check_free_extensions(trunk, [0])
    if getattr(model, "adapter_visual", None) is not None:
        raise ValueError("this model already has a visual adapter attached; build a fresh model")
    return adapter_v2.validate(trunk, config)


def attach(model: nn.Module, config: AdapterV2VisualConfig, plan: tuple[list[int], list]) -> list[str]:
    """Adapter V2 on `model.text_model`, the projection as `model.adapter_visual`, the early branch on layer 0."""
    trunk = model.text_model
    early = config.visual_fusion == "early"
    context = VisualContext(model)
    ref = trunk.tok_embeddings.weight
    source = VisualProjection(context, trunk.args.dim, None if early else config.adapter_len, config.prompt_init_std,
                              master_dtype(ref.dtype), ref.device)
    late_prompt = AdaptionPrompt if early else _maker(source, early=False)
    names = ["text_model." + n for n in adapter_v2.attach(trunk, config, plan, late_prompt)]
    model.adapter_visual = source
    names += [f"adapter_visual.{n}" for n, _ in source.named_parameters()]
    if early:  # the paper's first-layer visual prompts, with their own zero-init gate
        names += ["text_model." + n for n in adapter_v1.attach_prompts(
            trunk, [0], config.visual_len, config.gate_activation, config.prompt_init_std,
            _maker(source, early=True))]
    return names


def _maker(source: VisualProjection, early: bool):
    def make(*args):
        return VisualAdaptionPrompt(*args, source=source, early=early)
    return make

