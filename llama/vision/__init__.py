"""The multimodal members of the family: vision encoders and the ways their features enter the text model.

    llama4_encoder     Llama 4's ViT with 2D RoPE, pixel shuffle and adapter MLP
    llama4_model       Llama 4 early fusion: image features replace the embeddings of image tokens
    llama4_preprocess  Llama 4 image preprocessing (best-fit tiles, resize, normalise, global view)
    mllama_config      Llama 3.2 Vision: `MllamaVisionArgs`, `MllamaArgs`, presets llama-3.2-{11b,90b}-vision
    mllama_encoder     its ViT-H/14 tile encoder (local + gated global layers, tile and aspect-ratio embeddings)
    mllama             `MllamaTransformer`: the text model with tanh-gated cross-attention blocks
    mllama_preprocess  best-fit tiling, Pillow-exact resize, normalisation (equal to HF's MllamaImageProcessor)

Llama 4's multimodal presets are `ModelArgs` with `vision_args`; Llama 3.2 Vision has its own args type, registered
with `llama.registry`, so `llama.build(name)` returns the right module for either.
"""
