"""The multimodal members of the family: image encoders, fusion into the text model, image preprocessing.

    mllama_config      Llama 3.2 Vision: `MllamaVisionArgs`, `MllamaArgs`, presets llama-3.2-{11b,90b}-vision
    mllama_encoder     its ViT-H/14 tile encoder (local + gated global layers, tile and aspect-ratio embeddings)
    mllama             `MllamaTransformer`: the text model with tanh-gated cross-attention blocks
    mllama_preprocess  best-fit tiling, resize, normalisation (equal to HF's MllamaImageProcessor)

Each family registers its args type and presets with `llama.registry`, so `llama.build(name)` returns its module.
"""

from .mllama import MllamaTransformer, cross_attention_mask_from_tokens
from .mllama_config import MllamaArgs, MllamaVisionArgs

__all__ = ["MllamaArgs", "MllamaVisionArgs", "MllamaTransformer", "cross_attention_mask_from_tokens"]
