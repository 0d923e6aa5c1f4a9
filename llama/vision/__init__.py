"""The multimodal members of the family: vision encoders and the ways their features enter the text model.

    llama4_encoder   Llama 4's ViT with 2D RoPE, pixel shuffle and adapter MLP
    llama4_model     Llama 4 early fusion: image features replace the embeddings of image tokens
    llama4_preprocess  Llama 4 image preprocessing (best-fit tiles, resize, normalise, global view)
"""
