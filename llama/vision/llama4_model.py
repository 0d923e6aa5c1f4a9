"""Llama 4 multimodal: early fusion of image features into the token embeddings of the text trunk.

Shapes: B batch, T tokens, C text width, V vocab, N tiles (every tile of every image in the batch, stacked),
        K image tokens per tile, O adapter width, S tile side in pixels.

Architecture (Meta llama-models `models/llama4/model.py` `Transformer.forward` with an `image_embedding`;
HF `Llama4ForConditionalGeneration.forward`):
    f   = VisionEmbeddings(pixel_values)        [N, K, O]  encoder + pixel shuffle + adapter (llama4_encoder.py)
    e   = W_proj · f                            [N·K, C]   `vision_projection`, no bias
    h_t = e_j(t)  where tokens[t] = <|patch|>   the j-th image token of the batch (row by row, left to right) takes
        = E[tokens[t]]  elsewhere                the j-th feature; every other token keeps its embedding
    logits = Transformer(h)                     the Llama 4 trunk, unchanged (llama/model.py, llama/moe.py)
So after layer 0's input the image is just more tokens: the trunk's causal (chunked) attention reads it like text,
and a KV cache holds its keys and values like any prompt's (`llama.generate` encodes each image once).

Parameter names are Meta's (`vision_embeddings.vision_encoder.…`, `vision_projection.weight`, the trunk's own), so the
state dict is the one of Meta's `Transformer` built with `vision_args`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelArgs
from ..model import Transformer, check_tokens
from .llama4_encoder import VisionEmbeddings


class Llama4Multimodal(Transformer):
    """The Llama 4 text `Transformer` plus a vision encoder whose outputs replace the image tokens' embeddings."""

    def __init__(self, args: ModelArgs):
        if args.vision_args is None:
            raise ValueError(f"{args.name or 'these ModelArgs'} has no vision_args; a text-only model is "
                             f"llama.Transformer(args) (or use a *-vision preset)")
        super().__init__(args)
        v = args.vision_args
        self.vision_embeddings = VisionEmbeddings(v)
        self.vision_projection = nn.Linear(v.output_dim, args.dim, bias=False)
        self._reset_vision()

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if hasattr(self, "vision_embeddings"):  # Transformer.__init__ runs this before the vision modules exist
            self._reset_vision(std)

    def _reset_vision(self, std: float = 0.02) -> None:
        self.vision_embeddings.reset_parameters(std)
        nn.init.normal_(self.vision_projection.weight, std=std)

    def set_attention_implementation(self, implementation: str) -> None:
        """'sdpa' or 'math', in the text trunk and the vision encoder alike."""
        super().set_attention_implementation(implementation)
        for block in self.vision_embeddings.vision_encoder.transformer.resblocks:
            block.attn.implementation = implementation

    # -- images -> features ---------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (normalised tiles, the HF processor's `pixel_values`) -> features [N·K, C].

        Row n·K + k is the k-th image token of tile n. The pixels are cast to the model's dtype (the HF processor
        returns bfloat16).
        """
        self._check_pixel_values(pixel_values)
        weight = self.vision_projection.weight
        f = self.vision_embeddings(pixel_values.to(device=weight.device, dtype=weight.dtype))  # [N, K, O]
        return self.vision_projection(f).flatten(0, 1)  # [N·K, C]

    def _check_pixel_values(self, pixel_values) -> None:
        S = self.args.vision_args.image_size
        want = f"[tiles, 3, {S}, {S}] (every tile of every image of the batch, stacked, as the HF processor returns)"
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            got = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise TypeError(f"pixel_values must be a floating-point tensor of normalised pixels {want}, got {got}; "
                            f"see llama.vision.llama4_preprocess.preprocess")
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() == 5:
            raise ValueError(f"pixel_values has shape {shape} (images × tiles); the encoder takes {want}: pass "
                             f"pixel_values.flatten(0, 1)")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape {want}, got {shape}")
        if shape[1] != 3:
            raise ValueError(f"pixel_values has {shape[1]} channels; the Llama 4 encoder takes 3 (RGB): convert "
                             f"grayscale or RGBA images to RGB before preprocessing")
        if shape[2:] != (S, S):
            raise ValueError(f"tiles must be {S}×{S} pixels for this model, got {shape[2]}×{shape[3]}; cut images into "
                             f"tiles with llama.vision.llama4_preprocess.preprocess (or HF's Llama4ImageProcessor)")

    def fuse(self, h: torch.Tensor, positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Early fusion: h [B, T, C] with features [n, C] written, in row-major order, at the n True positions [B, T]."""
        n_tokens, n_features = int(positions.sum()), features.shape[0]
        if n_tokens != n_features:
            K, token = self.args.vision_args.tokens_per_tile, self.args.vision_args.image_token_id
            raise ValueError(
                f"the prompt has {n_tokens} image tokens (<|patch|>, id {token}) but the images give {n_features} "
                f"features ({n_features // K} tiles × {K}): every tile needs exactly {K} image tokens in the prompt, "
                f"so pass one image per image placeholder and build the placeholders with "
                f"llama.vision.llama4_preprocess.image_prompt_tokens")
        return h.masked_scatter(positions[..., None], features.to(h.dtype))  # [B, T, C]

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: Optional[int] = None,
                segment_ids: Optional[torch.Tensor] = None, embeddings: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, *, image_features: Optional[torch.Tensor] = None,
                image_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] and pixel_values [N, 3, S, S] -> logits [B, T, V]; without images, the text trunk's forward.

        image_features [n, C]: features from `encode_images`, instead of pixel_values (to encode images once and feed
        them over several calls, as `llama.generate` does). image_positions [B, T] bool: where they go (default:
        tokens == the image token id). Image tokens in a call without images keep their token embedding, as in
        Meta's and HF's references.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features (already encoded), not both")
        check_tokens(tokens, start_pos, self.args.max_seq_len, self.args.vocab_size)
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if image_features is not None:
            if image_positions is None:
                image_positions = tokens == self.args.vision_args.image_token_id  # [B, T]
            elif image_positions.shape != tokens.shape or image_positions.dtype != torch.bool:
                raise ValueError(f"image_positions must be a bool tensor shaped like tokens {list(tokens.shape)}, "
                                 f"got {image_positions.dtype} {list(image_positions.shape)}")
            h = self.tok_embeddings(tokens) if embeddings is None else embeddings  # [B, T, C]
            embeddings = self.fuse(h, image_positions, image_features)
        return super().forward(tokens, start_pos, segment_ids, embeddings)


def module_for(args: ModelArgs) -> Transformer:
    """The module `args` describes: `Llama4Multimodal` with vision_args, else the text `Transformer`."""
    return Llama4Multimodal(args) if args.vision_args is not None else Transformer(args)
