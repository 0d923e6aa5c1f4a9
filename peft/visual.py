"""Frozen image features for the visual branches of LLaMA-Adapter V2 and LLaMA-Excitor on a multimodal model.

Shapes: B batch rows, I image slots per row, Tt tiles per image, N tokens per tile, Wv encoder output width
        (7680 at Llama 3.2 Vision: the final state and five intermediate ones, concatenated), Sv = I·Tt·N.

Both papers feed LLaMA with a *frozen* CLIP encoder's features through a small learnable projection (LLaMA-Adapter
arXiv 2303.16199 §3.3: "multi-scale global features"; V2 arXiv 2304.15010 §4.3; LLaMA-Excitor arXiv 2404.00913,
multimodal figure). On a Llama 3.2 Vision model (`llama.vision.MllamaTransformer`) the frozen encoder is the
model's own `vision_model.vision_encoder`, whose per-token output already concatenates several depths.

`VisualContext` reads that output with two PyTorch forward hooks; the model's modules and weights are untouched:
  * a pre-hook on the model forgets the previous sequence's images when a new one starts (start_pos None or 0);
  * a hook on the encoder keeps its output and the image layout (grid ids, real-tile mask) of the current call.
During KV-cache decoding (start_pos > 0) no image is passed and the prefill's features stay in use, so each image is
encoded once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def is_multimodal(model: nn.Module) -> bool:
    """A model with a text trunk (`text_model`) and an image encoder (`vision_model.vision_encoder`)."""
    return hasattr(model, "text_model") and hasattr(getattr(model, "vision_model", None), "vision_encoder")


class VisualContext:
    """The current sequence's frozen image features, recorded from the model's own encoder."""

    def __init__(self, model: nn.Module):
        if not is_multimodal(model):
            raise TypeError(f"a visual branch needs a multimodal model with an image encoder (e.g. "
                            f"llama.build('llama-3.2-11b-vision')), got {type(model).__name__}")
        self.features: Optional[torch.Tensor] = None  # [B·I, Tt, N, Wv]
        self.aspect_ratio_ids: Optional[torch.Tensor] = None  # [B·I]
        self.aspect_ratio_mask: Optional[torch.Tensor] = None  # [B·I, Tt]
        self.batch_size = 0
        self.width = model.args.vision.output_dim  # Wv
        self.handles = [model.register_forward_pre_hook(self._new_call, with_kwargs=True),
                        model.vision_model.vision_encoder.register_forward_hook(self._keep)]

    def _new_call(self, model, args, kwargs) -> None:
        tokens = args[0] if args else kwargs["tokens"]
        start_pos = args[1] if len(args) > 1 else kwargs.get("start_pos")
        if not start_pos:  # a new sequence: the previous images no longer apply
            self.features = self.aspect_ratio_ids = self.aspect_ratio_mask = None
            self.batch_size = tokens.shape[0]

    def _keep(self, encoder, inputs, output) -> None:
        self.features = output.detach()  # frozen: no gradient flows into the encoder
        self.aspect_ratio_ids, self.aspect_ratio_mask = inputs[1], inputs[2]

    @property
    def has_images(self) -> bool:
        return self.features is not None

    def _per_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = self.batch_size
        f = self.features.unflatten(0, (B, -1))  # [B, I, Tt, N, Wv]
        return f, self.aspect_ratio_ids.view(B, -1), self.aspect_ratio_mask.view(B, -1, f.shape[2])

    def global_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, Wv], has_image [B]): the class token of the first tile of each row's first image.

        The local and global layers attend across all tiles of an image, so this token summarises the whole image,
        like CLIP's class token in the papers. Rows without an image get g = 0 and has_image False.
        """
        f, ids, _ = self._per_row()
        has_image = ids[:, 0] != 0  # images fill the first slots
        return f[:, 0, 0, 0] * has_image[:, None], has_image

    def token_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [B, Sv, Wv], valid [B, Sv]): every token of every real tile of the row's images; the rest invalid."""
        f, ids, mask = self._per_row()
        B, I, Tt, N, Wv = f.shape
        valid = (ids != 0)[:, :, None] & (mask != 0)  # [B, I, Tt]
        valid = valid[..., None].expand(B, I, Tt, N).reshape(B, I * Tt * N)  # [B, Sv]
        return f.reshape(B, I * Tt * N, Wv), valid
