"""Llama 3.2 Vision: a Llama 3.1 text model that reads images through tanh-gated cross-attention blocks.

Shapes: B batch, T new text tokens, S text positions (cache + new), I image slots per row, Tt tiles per image,
        N tokens per tile, Sv = I·Tt·N vision tokens per row, C text dim, H / Hkv query / key-value heads,
        D head dim, V text vocabulary, Wv encoder output width.

Architecture (Llama 3 paper arXiv 2407.21783 §7.2; Meta llama-models `models/llama3/multimodal/model.py`,
`CrossAttentionTransformer`):

    y = W_proj · VisionEncoder(images) + b_proj               vision tokens [B, Sv, C] (llama/vision/mllama_encoder.py)
    e = E[id] if id < V else E_learn[id − V]                  <|image|> (id V) has a learnable row of its own
    before self-attention layer i ∈ schedule (every 4th layer from the top: 3, 7, …, 31 for 11B) a block
        h   = x + tanh(g_attn) · W_o( m ⊙ softmax(q kᵀ/√D + mask) v ),   q = q_norm(W_q RMSNorm(x))
                                                                        k = k_norm(W_k y),  v = W_v y  (no RoPE)
        out = h + tanh(g_ffn) · m ⊙ FFN(RMSNorm(h))
    and the self-attention layers are the text model's own (`llama.Transformer`, reused unchanged).

g_attn = g_ffn = 0 at initialisation, so a freshly inserted block is the identity and the text model keeps its
behaviour ("zero-init gates", as in Flamingo, arXiv 2204.14198 §3.1). m = 1 on the text rows that see at least one
image and 0 on the others, which therefore get neither cross-attention nor the block's FFN.

Which images a text token sees (Meta `create_vision_mask`, HF `get_cross_attention_token_mask`): token t sees
image i iff t lies at or after image i's <|image|> token and before the next image's token; the last image stays
visible to the end, and consecutive <|image|> tokens all stay visible as long as the last of them. Within an image
only its real tiles are visible. `cross_attention_mask` [B, T, I, Tt] carries this (1 = visible); without it the
model derives it from the <|image|> tokens.

Departure from Hugging Face (transformers 5.24 `MllamaCrossAttentionDecoderLayer`): HF zeroes only the FFN of rows
that see no image; their cross-attention output (a uniform average of all vision tokens) still enters the
residual stream (transformers#39379). Meta's reference multiplies the attention output by m as well; we follow
Meta. The two agree on every row that sees an image only if no earlier row differs, i.e. when the image comes first.

KV cache: `setup_cache` allocates the text model's cache; the blocks then keep the image keys and values computed
by the call that passes the images (each image is encoded once) and reuse them on later calls (start_pos > 0),
together with the last token's row of the cross-attention mask (the newest image stays visible).

Adapters use the text model's override points on `text_model` (peft applies text-only methods there); the visual
PEFT branches read `vision_model.vision_encoder`'s output through PyTorch forward hooks (`peft/visual.py`), so
nothing here knows about them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..attention import attend
from ..config import ModelArgs
from ..ffn import FeedForward
from ..model import RMSNorm, Transformer, check_tokens, repeat_kv
from ..registry import register_architecture
from .mllama_config import MllamaArgs, count_mllama_parameters
from .mllama_encoder import VisionEncoder

IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class CrossAttention(nn.Module):
    """Text queries over vision keys/values, grouped like the text model's heads, q and k RMS-normalised per head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.n_rep = args.n_heads, args.n_kv_heads, args.head_dim, \
            args.n_rep
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.implementation = "sdpa"

    def image_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k = k_norm(W_k y), v = W_v y for vision tokens y [B, Sv, C] -> two [B, Hkv, Sv, D]."""
        B, Sv, _ = y.shape
        k = self.k_norm(self.wk(y).view(B, Sv, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(y).view(B, Sv, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                row_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k, v = repeat_kv(kv[0], self.n_rep), repeat_kv(kv[1], self.n_rep)  # [B, H, Sv, D]
        y = attend(q, k, v, mask, False, self.implementation) * row_mask  # [B, H, T, D], rows without image -> 0
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class CrossAttentionBlock(nn.Module):
    """h = x + tanh(g_attn)·CrossAttn(RMSNorm(x));  out = h + tanh(g_ffn)·m ⊙ FFN(RMSNorm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = CrossAttention(args)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))
        self.cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # image k, v kept for decoding

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                row_mask: torch.Tensor) -> torch.Tensor:
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, mask, row_mask)
        f = self.feed_forward(self.ffn_norm(h)) * row_mask[:, 0]  # [B, T, C]·[B, T, 1]
        return h + self.gate_ffwd.tanh() * f


class VisionModel(nn.Module):
    """The encoder and the projector into the text model's width: images -> vision tokens [B, I·Tt·N, C]."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(args.vision)
        self.vision_projection = nn.Linear(args.vision.output_dim, args.text.dim)  # with bias

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        B, I = aspect_ratio_ids.shape
        features = self.vision_encoder(pixel_values.flatten(0, 1), aspect_ratio_ids.flatten(),
                                       aspect_ratio_mask.flatten(0, 1))  # [B·I, Tt, N, Wv]
        return self.vision_projection(features).view(B, -1, self.vision_projection.out_features)


class MllamaTransformer(nn.Module):
    """tokens [B, T] (+ images) -> logits [B, T, V]; keyword arguments named as the HF processor's outputs."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.args = args
        self.vision_model = VisionModel(args)
        self.text_model = Transformer(args.text)
        self.learnable_embedding = nn.Embedding(args.n_learnable_embeddings, args.text.dim)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(args.text) for _ in args.fusion_schedule)
        self._mask_row: Optional[torch.Tensor] = None  # [B, 1, I, Tt]: last token's image visibility, for decoding
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Text model and encoder as in their own files; blocks N(0, std), norm gains 1, gates 0 (closed)."""
        self.text_model.reset_parameters(std)
        self.vision_model.vision_encoder.reset_parameters(std)
        nn.init.normal_(self.vision_model.vision_projection.weight, std=std)
        nn.init.zeros_(self.vision_model.vision_projection.bias)
        nn.init.normal_(self.learnable_embedding.weight, std=std)
        for module in self.cross_attention_layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CrossAttentionBlock):
                nn.init.zeros_(module.gate_attn)
                nn.init.zeros_(module.gate_ffwd)

    # -- KV cache -------------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None) -> None:
        """Text KV cache for `batch_size` rows; the blocks keep the image K/V of the call that passes the images."""
        self.text_model.setup_cache(batch_size, max_seq_len, dtype, device)
        self._clear_images()

    def clear_cache(self) -> None:
        self.text_model.clear_cache()
        self._clear_images()

    def _clear_images(self) -> None:
        for block in self.cross_attention_layers:
            block.cache = None
        self._mask_row = None

    @property
    def decoding(self) -> bool:
        return self.text_model.layers[0].attention.cache is not None

    # -- forward --------------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """E[id] for text ids, E_learn[id − V] for the extra ids (Meta `get_partially_trainable_embedding`)."""
        V = self.args.text.vocab_size
        extra = tokens >= V
        text = self.text_model.tok_embeddings(tokens.masked_fill(extra, 0))  # [B, T, C]
        learned = self.learnable_embedding((tokens - V).clamp(min=0))  # [B, T, C]
        return torch.where(extra[..., None], learned, text)

    def forward(self, tokens: torch.Tensor, start_pos: Optional[int] = None, *,
                pixel_values: Optional[torch.Tensor] = None, aspect_ratio_ids: Optional[torch.Tensor] = None,
                aspect_ratio_mask: Optional[torch.Tensor] = None,
                cross_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V].

        pixel_values [B, I, Tt, C, P, P], aspect_ratio_ids [B, I] (0: no image in that slot), aspect_ratio_mask
        [B, I, Tt] (1: real tile) and cross_attention_mask [B, T, I, Tt] as `transformers.MllamaProcessor` returns
        them (`llama.vision.mllama_preprocess` makes the first three in PyTorch). start_pos: position of tokens[:, 0]
        when decoding with a KV cache; images go with the first call.
        """
        a = self.args
        check_tokens(tokens, start_pos, a.text.max_seq_len, a.vocab_size)
        pos = start_pos or 0
        kv = self._image_kv(tokens, pos, pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # per block, or None
        if kv is None and cross_attention_mask is not None:
            raise ValueError("cross_attention_mask given without images: pass pixel_values, aspect_ratio_ids and "
                             "aspect_ratio_mask with it (or drop the mask for a text-only input)")
        masks = self._cross_mask(tokens, pos, cross_attention_mask, aspect_ratio_ids) if kv is not None else None
        T = tokens.shape[1]
        cos, sin = self.text_model.rope(torch.arange(pos, pos + T, device=tokens.device))
        h = self.embed(tokens)  # [B, T, C]
        for i, layer in enumerate(self.text_model.layers):
            h = self._blocks_before(i, h, kv, masks)
            h = layer(h, cos, sin, start_pos)
        h = self._blocks_before(len(self.text_model.layers), h, kv, masks)
        logits = self.text_model.output(self.text_model.norm(h))  # [B, T, V]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _blocks_before(self, layer_index: int, h: torch.Tensor, kv, masks) -> torch.Tensor:
        """The cross-attention blocks scheduled before self-attention layer `layer_index` (none for text only)."""
        if kv is None:
            return h
        for before, block, block_kv in zip(self.args.fusion_schedule, self.cross_attention_layers, kv):
            if before == layer_index:
                h = block(h, block_kv, *masks)
        return h

    def _image_kv(self, tokens, pos, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """Per block (k, v) of the images: computed from pixel_values, else the cached ones, else None (text only)."""
        given = {k: v for k, v in zip(IMAGE_INPUTS, (pixel_values, aspect_ratio_ids, aspect_ratio_mask))
                 if v is not None}
        n_image_tokens = (tokens == self.args.image_token_id).sum(dim=1)  # [B]
        if not given:
            cached = self.cross_attention_layers[0].cache if len(self.cross_attention_layers) else None
            if pos > 0 and cached is not None:
                return [block.cache for block in self.cross_attention_layers]
            if bool((n_image_tokens > 0).any()):
                row = int(n_image_tokens.nonzero()[0])
                raise ValueError(f"row {row} has {int(n_image_tokens[row])} <|image|> token(s) (id "
                                 f"{self.args.image_token_id}) but no images were given: pass pixel_values, "
                                 f"aspect_ratio_ids and aspect_ratio_mask (llama.vision.mllama_preprocess)")
            return None
        check_images(self.args, tokens, pos, pixel_values, aspect_ratio_ids, aspect_ratio_mask, given)
        y = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # [B, Sv, C]
        y = y.to(self.text_model.norm.weight.dtype)
        kv = [block.attention.image_kv(y) for block in self.cross_attention_layers]
        if self.decoding:  # encode once: later calls read these
            for block, block_kv in zip(self.cross_attention_layers, kv):
                block.cache = block_kv
        return kv

    def _cross_mask(self, tokens, pos, cross_attention_mask, aspect_ratio_ids):
        """Masks for the blocks: bool [B, 1, T, Sv] (True = visible) and the row mask m [B, 1, T, 1]."""
        B, T = tokens.shape
        v = self.args.vision
        n_images = self.cross_attention_layers[0].cache[0].shape[2] // (v.max_num_tiles * v.n_tokens) \
            if aspect_ratio_ids is None else aspect_ratio_ids.shape[1]
        if cross_attention_mask is not None:
            m = cross_attention_mask
            if m.dim() != 4 or m.shape[0] != B or not (m.shape[1] == T or m.shape[1] >= pos + T) \
                    or tuple(m.shape[2:]) != (n_images, v.max_num_tiles):
                raise ValueError(f"cross_attention_mask must have shape [batch={B}, tokens={T} (or at least the "
                                 f"{pos + T} positions so far), images={n_images}, tiles={v.max_num_tiles}], got "
                                 f"{tuple(m.shape)}")
            # the rows of these tokens: all of it, or positions pos … pos+T-1 of a longer mask (as HF slices it)
            cross_attention_mask = m if m.shape[1] == T else m[:, pos:pos + T]
        elif aspect_ratio_ids is not None:  # the call with the images: Meta's rule over the <|image|> tokens
            cross_attention_mask = cross_attention_mask_from_tokens(
                tokens, self.args.image_token_id, _num_tiles(self.args, aspect_ratio_ids), v.max_num_tiles)
        else:  # a later decoding call: every new token sees what the last one saw
            cross_attention_mask = self._mask_row.expand(B, T, -1, -1)
        if self.decoding:
            self._mask_row = cross_attention_mask[:, -1:].clone()
        visible = (cross_attention_mask != 0).flatten(2).repeat_interleave(v.n_tokens, dim=2)  # [B, T, Sv]
        row_mask = visible.any(dim=-1, keepdim=True)  # [B, T, 1]
        # rows without an image attend uniformly (their output is zeroed by m): never a row of -inf
        mask = (visible | ~row_mask)[:, None]  # [B, 1, T, Sv]
        return mask, row_mask[:, None].to(self.text_model.norm.weight.dtype)  # m [B, 1, T, 1]


def _num_tiles(args: MllamaArgs, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
    """Tiles of each image [B, I] from its grid id (0 for an empty image slot)."""
    counts = torch.tensor([0] + [h * w for h, w in args.vision.tile_grids], device=aspect_ratio_ids.device)
    return counts[aspect_ratio_ids]


def cross_attention_mask_from_tokens(tokens: torch.Tensor, image_token_id: int, num_tiles: torch.Tensor,
                                     max_num_tiles: int) -> torch.Tensor:
    """[B, T, I, Tt] visibility of each image's real tiles to each token, from the <|image|> positions (see the
    module notes; Meta `create_vision_mask`). num_tiles [B, I]: real tiles of each image (0 = empty slot)."""
    B, T = tokens.shape
    I = num_tiles.shape[1]
    mask = torch.zeros(B, T, I, max_num_tiles, dtype=torch.long, device=tokens.device)
    for b in range(B):
        starts = (tokens[b] == image_token_id).nonzero().flatten().tolist()
        ends = starts[1:] + [T]  # image i is visible from its token to the next image's token ...
        for i in range(len(starts) - 2, -1, -1):  # ... and consecutive image tokens share the later span's end
            if starts[i + 1] == starts[i] + 1:
                ends[i] = ends[i + 1]
        for i, (s, e) in enumerate(zip(starts, ends)):
            mask[b, s:e, i, : int(num_tiles[b, i])] = 1
    return mask


def check_images(args: MllamaArgs, tokens: torch.Tensor, pos: int, pixel_values, aspect_ratio_ids,
                 aspect_ratio_mask, given: dict) -> None:
    """Refuse image inputs the model cannot read, naming the mismatch (called before anything is computed)."""
    v = args.vision
    missing = [k for k in IMAGE_INPUTS if k not in given]
    if missing:
        raise ValueError(f"images need all of pixel_values, aspect_ratio_ids and aspect_ratio_mask; missing "
                         f"{', '.join(missing)} (llama.vision.mllama_preprocess.preprocess returns all three)")
    if pos > 0:
        raise ValueError("images go with the first call (start_pos None or 0); later decoding calls reuse them")
    B, Tt, P, C = tokens.shape[0], v.max_num_tiles, v.image_size, v.in_channels
    if pixel_values.dim() != 6 or pixel_values.shape[0] != B or tuple(pixel_values.shape[2:]) != (Tt, C, P, P):
        raise ValueError(f"pixel_values must have shape [batch={B}, images, tiles={Tt}, channels={C}, {P}, {P}] "
                         f"(tiles of {P}×{P} {C}-channel pixels, padded to {Tt} tiles), got "
                         f"{tuple(pixel_values.shape)}")
    I = pixel_values.shape[1]
    if tuple(aspect_ratio_ids.shape) != (B, I) or aspect_ratio_ids.is_floating_point():
        raise ValueError(f"aspect_ratio_ids must be an integer tensor of shape [batch={B}, images={I}], got "
                         f"{aspect_ratio_ids.dtype} {tuple(aspect_ratio_ids.shape)}")
    if tuple(aspect_ratio_mask.shape) != (B, I, Tt):
        raise ValueError(f"aspect_ratio_mask must have shape [batch={B}, images={I}, tiles={Tt}], got "
                         f"{tuple(aspect_ratio_mask.shape)}")
    R = len(v.tile_grids)
    lo, hi = int(aspect_ratio_ids.min()), int(aspect_ratio_ids.max())
    if lo < 0 or hi > R:
        raise ValueError(f"aspect_ratio_id {lo if lo < 0 else hi} is out of range [0, {R}]: ids 1…{R} name the "
                         f"tile grids {list(v.tile_grids)} (rows, cols), 0 an empty image slot")
    num_tiles = _num_tiles(args, aspect_ratio_ids)
    marked = (aspect_ratio_mask != 0).sum(dim=-1)  # [B, I]
    bad = ((num_tiles > 0) & (marked != num_tiles)).nonzero()
    if len(bad):
        b, i = bad[0].tolist()
        raise ValueError(f"image {i} of row {b} has aspect_ratio_id {int(aspect_ratio_ids[b, i])} (grid "
                         f"{v.tile_grids[int(aspect_ratio_ids[b, i]) - 1]}, {int(num_tiles[b, i])} tiles) but "
                         f"aspect_ratio_mask marks {int(marked[b, i])} real tiles")
    n_images = (aspect_ratio_ids != 0).sum(dim=1)  # [B]
    n_tokens = (tokens == args.image_token_id).sum(dim=1)  # [B]
    bad = (n_images != n_tokens).nonzero()
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"row {b} has {int(n_images[b])} image(s) but {int(n_tokens[b])} <|image|> token(s) (id "
                         f"{args.image_token_id}); each image needs exactly one <|image|> token in the text, in order")
    if bool((aspect_ratio_ids[:, :-1] == 0).logical_and(aspect_ratio_ids[:, 1:] != 0).any()):
        raise ValueError("empty image slots (aspect_ratio_id 0) must come after a row's images, not between them")


register_architecture(MllamaArgs, MllamaTransformer, count_mllama_parameters)
