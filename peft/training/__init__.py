"""The fine-tuning machinery: everything between a model with an adapter and a trained result.

    loop           the one training loop (`train`): micro-batches, global token normalisation, AdamW, warmup +
                   cosine, gradient clipping, FSDP2 across processes, crash-safe checkpoints, resume
    data           built-in corpus and tokenizer, synthetic SFT tasks, SFT encoding with response masking, packing
    config         a run's config: TOML file + command-line overrides, checked field by field, written back as TOML
    recipe         a run from a config (`scripts/train.py`): model, data, method, train, eval, the run folder
    checkpointing  training checkpoints: atomic save, resume, pruning
    memory         the memory calculator (weights, gradients, optimizer, activations) and a measured peak

The methods themselves live one level up (`peft.lora`, `peft.adapter_v1`, …); this package only drives them.
"""

from .loop import TrainConfig, TrainResult, evaluate_loss, set_seed, train, train_examples
from .config import RunConfig, load_config
from .recipe import load_run, run

__all__ = ["TrainConfig", "TrainResult", "train", "train_examples", "evaluate_loss", "set_seed", "RunConfig",
           "load_config", "run", "load_run"]
