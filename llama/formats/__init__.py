"""Checkpoint formats: read and write the folders Meta and Hugging Face publish.

    checkpoint  `load(folder)` / `save(model, folder, format=...)` / `detect_format(folder)`: the entry points
    meta        Meta's layout: params.json + consolidated.NN.pth (model-parallel shards merged per weight)
    hf          Hugging Face's layout: config.json + safetensors (names, q/k RoPE row permutation, shards)
    llama4      Llama 4's text weights in both layouts (fused q/k/v and expert tensors)
    mllama      Llama 3.2 Vision: HF `MllamaForConditionalGeneration` folders <-> `MllamaTransformer`
    io          what every format shares: safe readers, atomic writers, state-dict checks, `CheckpointError`
    convert     `python -m llama.convert`: one layout to the other

Every reader translates to one in-memory form, the state dict of the model `llama.build(args)` returns
(`Transformer.state_dict()`: Meta's names and RoPE row order; `MllamaTransformer.state_dict()` for 3.2 Vision).
"""

from .checkpoint import detect_format, load, save
from .io import CheckpointError

__all__ = ["load", "save", "detect_format", "CheckpointError"]
