"""Load and save real checkpoints: `llama.load(folder)` and `llama.save(model, folder, format="hf" | "meta")`.

Two folder layouts exist for every dense LLaMA release (HF `convert_llama_weights_to_hf.py`):
  * Meta ("original"):  params.json + consolidated.00.pth … consolidated.NN.pth (one per model-parallel rank);
                        see `llama.formats.meta` for the per-weight shard merging.
  * Hugging Face:       config.json + model.safetensors, or model-0000k-of-0000n.safetensors + an index;
                        see `llama.formats.hf` for the names and the q/k RoPE row permutation.
Both are translated to one in-memory form, a state dict with Meta's names and Meta's RoPE row order, which is
exactly `Transformer.state_dict()`. The model is built on the meta device and the loaded tensors are assigned to
it, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..checks import check_int, parse_device, parse_dtype
from ..config import ModelArgs
from ..model import Transformer
from ..registry import build
from ..rope import RotaryEmbedding
from ..vision.mllama import MllamaTransformer
from . import hf, llama4, meta, mllama
from .io import CheckpointError, check_state_dict, expected_shapes, require_dense, staged_folder

FORMATS = ("hf", "meta")
PathLike = Union[str, os.PathLike]

__all__ = ["load", "save", "detect_format", "CheckpointError"]


def detect_format(path: PathLike) -> str:
    """'meta' for a folder with params.json, 'hf' for one with config.json; an error naming the fix otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass the folder that holds params.json "
                     f"(Meta) or config.json (Hugging Face)")
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that contains it ({folder.parent})")
    has_meta = (folder / meta.PARAMS_FILE).exists()
    has_hf = (folder / hf.CONFIG_FILE).exists()
    if has_meta and has_hf:
        raise CheckpointError(f"{folder} holds both params.json (Meta) and config.json (Hugging Face); pass "
                   f"format='meta' or format='hf' to choose")
    if has_meta:
        return "meta"
    if has_hf:
        return "hf"
    found = sorted(p.name for p in folder.iterdir())[:10]
    hint = ""
    if (folder / "original" / meta.PARAMS_FILE).exists():
        hint = f" (an HF download keeps Meta's files in {folder / 'original'}: pass that folder)"
    raise CheckpointError(f"{folder} is not a checkpoint folder: it has neither params.json + consolidated.NN.pth "
                          f"(Meta) nor config.json + model.safetensors (Hugging Face); found {found}{hint}")


def load(path: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
         format: Optional[str] = None, max_seq_len: Optional[int] = None) -> Union[Transformer, MllamaTransformer]:
    """Build a `Transformer` from a Meta or Hugging Face checkpoint folder (a `Llama4Multimodal`, which takes
    `pixel_values`, from a Llama 4 multimodal one; a `MllamaTransformer` from a Llama 3.2 Vision one).

    dtype: convert floating-point weights to this dtype, a torch.dtype or a name ("bf16", "bfloat16", "float32";
    None: keep the stored dtype). device: "cpu", "cuda", "cuda:1", ... format: 'meta' or 'hf' to skip detection.
    max_seq_len: override the context length (Meta's params.json does not record it; it is taken from the
    matching preset or the generation's default otherwise). Every argument is checked before a file is read.
    """
    folder = _folder_argument(path, "load")
    dtype, device = parse_dtype(dtype), parse_device(device)
    max_seq_len = check_int("max_seq_len", max_seq_len, optional=True)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; use format='hf', format='meta' or leave it None "
                         f"(detected from the folder)")
    fmt = format or detect_format(folder)
    if mllama.is_mllama_folder(folder, fmt):  # Llama 3.2 Vision (llama/formats/mllama.py)
        if fmt == "meta":
            raise CheckpointError(f"{folder} is Meta's layout of Llama 3.2 Vision, which llama.load does not read "
                                  f"(see llama/formats/mllama.py); load the Hugging Face folder of the model instead")
        args, sd = mllama.read_hf(folder)
        if max_seq_len is not None:
            args.text.max_seq_len = max_seq_len
    elif llama4.is_llama4_folder(folder, fmt):  # Llama 4: fused / expert tensors (llama/formats/llama4.py)
        args, sd = llama4.read(folder, fmt, max_seq_len=max_seq_len)
    elif fmt == "meta":
        args, sd = meta.read_meta(folder, max_seq_len=max_seq_len)
        check_state_dict(sd, args, config_file=str(folder / meta.PARAMS_FILE), weights=str(folder))
    else:
        args, sd = hf.read_hf(folder)  # checked inside, with HF names in the messages
        if max_seq_len is not None:
            args.max_seq_len = max_seq_len
    return build_model(args, sd, dtype=dtype, device=device)


def _folder_argument(path, action: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{action} needs a folder path (str or pathlib.Path), got {type(path).__name__}")
    return Path(path)


def build_model(args, sd: dict[str, torch.Tensor], *, dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The model of `args` (`llama.build`: text `Transformer`, `Llama4Multimodal` or `MllamaTransformer`) whose
    parameters are the tensors of `sd` (Meta names), without a second copy."""
    model = build(args, device="meta")

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    model.load_state_dict({k: place(v) for k, v in sd.items()}, strict=True, assign=True)
    if getattr(args, "tie_word_embeddings", False):  # assign=True replaced the shared Parameter by two; share again
        model.output.weight = model.tok_embeddings.weight
    for module in model.modules():
        if isinstance(getattr(module, "rope", None), RotaryEmbedding):
            module.rope = _fresh_rope(module.rope, device)
    return model


def _fresh_rope(meta_rope: RotaryEmbedding, device) -> RotaryEmbedding:
    """The RoPE inverse frequencies are a non-persistent buffer (not in checkpoints), so assign=True left them on
    the meta device: rebuild the module with the same settings on the target device."""
    with torch.device(device):
        return RotaryEmbedding(meta_rope.head_dim, meta_rope.theta, meta_rope.scaling, complex64=meta_rope.complex64)


def save(model: Transformer, path: PathLike, format: str = "hf", *, num_shards: int = 1,
         max_shard_size: Union[int, str] = "5GB", dtype: Union[torch.dtype, str, None] = None) -> Path:
    """Write `model` as a checkpoint folder and return its path.

    format 'hf': config.json + safetensors, split into shards of at most `max_shard_size` with an index
    (`LlamaForCausalLM.from_pretrained(path)` loads it; `Llama4ForConditionalGeneration` for a `Llama4Multimodal`).
    format 'meta': params.json + `num_shards` consolidated.NN.pth files split for model parallelism. dtype: a
    floating-point dtype or its name ("bf16").

    Every argument is checked before anything is written. The checkpoint is written into a temporary folder
    beside `path` that then replaces `path` in one rename (`llama.formats.io.staged_folder`): an interrupted save
    leaves the old checkpoint or the new one, never a mix, and a failed save leaves nothing behind. Other files
    in an existing folder (tokenizer, README) are kept; weight files of an earlier save are not.
    """
    if not isinstance(model, (Transformer, MllamaTransformer)):
        raise TypeError(f"save() needs a llama.Transformer or MllamaTransformer, got {type(model).__name__}")
    if isinstance(model, MllamaTransformer) and format != "hf":
        raise CheckpointError("Llama 3.2 Vision models are saved in the Hugging Face layout only (format='hf'); "
                              "Meta's layout of them is not documented in this project's sources")
    folder, num_shards, shard_bytes, dtype = check_save_arguments(path, format, num_shards, max_shard_size, dtype)
    args = model.args
    is_mllama = isinstance(model, MllamaTransformer)
    is_llama4 = not is_mllama and llama4.uses_llama4(args)  # Llama 4: its own writers (llama/formats/llama4.py)
    if not is_llama4 and not is_mllama:
        require_dense(args, "this model")
    sd = _model_state_dict(model, dtype)
    with staged_folder(folder, replaced=_is_checkpoint_file) as stage:
        if format == "hf":
            (mllama.write_hf if is_mllama else llama4.write_hf if is_llama4 else hf.write_hf)(args, sd, stage,
                                                                                            shard_bytes)
        else:
            (llama4.write_meta if is_llama4 else meta.write_meta)(args, sd, stage, num_shards)
    return folder


def check_save_arguments(path, format: str, num_shards, max_shard_size, dtype
                         ) -> tuple[Path, int, int, Optional[torch.dtype]]:
    """`save`'s arguments checked and normalised: (folder, num_shards, max shard bytes, dtype).

    The folder may be new or hold a checkpoint of the same format (replaced), never a file or the other format."""
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; use format='hf' or format='meta'")
    num_shards = check_int("num_shards", num_shards)
    if format == "hf" and num_shards != 1:
        raise ValueError("num_shards splits Meta checkpoints for model parallelism; for format='hf' use "
                         "max_shard_size to split the safetensors files")
    shard_bytes = hf.parse_size(max_shard_size)
    dtype = parse_dtype(dtype)
    folder = _folder_argument(path, "save")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass a folder path (it is created if missing)")
    other = hf.CONFIG_FILE if format == "meta" else meta.PARAMS_FILE
    if (folder / other).exists():
        raise CheckpointError(f"{folder} already holds a {'Hugging Face' if format == 'meta' else 'Meta'} "
                              f"checkpoint ({other}); save into an empty folder so loaders are not confused")
    return folder, num_shards, shard_bytes, dtype


def _model_state_dict(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The model's parameters under Meta names, checked against its config (adapters must be merged first)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    on_meta = [k for k, v in sd.items() if v.is_meta]
    if on_meta:
        raise CheckpointError(f"the model's weights were never materialised ({on_meta[:3]}… are on the meta device); "
                              f"load or initialise them (model.to_empty(device='cpu'); model.reset_parameters()) first")
    if set(sd) != set(expected_shapes(model.args)):
        extra = sorted(set(sd) - set(expected_shapes(model.args)))
        raise CheckpointError(f"the model has parameters outside the base architecture ({extra[:5]}…): merge "
                   f"adapter weights into the base layers (or save them separately) before saving")
    check_state_dict(sd, model.args, config_file="model.args", weights="the model")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.cpu() for k, v in sd.items()}


def _is_checkpoint_file(name: str) -> bool:
    """Files a save replaces: configs, weights and indexes of either layout (the rest of a folder is kept)."""
    return bool(meta.SHARD_RE.match(name) or hf.SHARD_RE.match(name)) or name in (
        meta.PARAMS_FILE, meta.SINGLE_FILE, hf.CONFIG_FILE, hf.SAFETENSORS_FILE, hf.SAFETENSORS_INDEX, hf.BIN_FILE,
        hf.BIN_INDEX)
