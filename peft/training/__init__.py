"""The fine-tuning machinery: everything between a model with an adapter and a trained result.

    loop           the one training loop (`train`): micro-batches, global token normalisation, AdamW, warmup +
                   cosine, gradient clipping, FSDP2 across processes, crash-safe checkpoints, resume
    data           built-in corpus and tokenizer, synthetic SFT tasks, SFT encoding with response masking, packing
    config         a run's config: TOML file + command-line overrides, checked field by field, written back as TOML
    recipe         a run from a config (`scripts/train.py`): model, data, method, train, eval, the run folder
    checkpointing  training checkpoints: atomic save, resume, pruning
    memory         the memory calculator (weights, gradients, optimizer, activations) and a measured peak

Post-training (Llama 2 §3, Llama 3 §4; docs/post_training.md), each an objective of the one loop or a step around it:

    preference     sequence log-probabilities, the reward model's Bradley–Terry loss with Llama 2's margins, DPO
    pairs          preference pairs: checks, tokenisation, concatenated [chosen; rejected] batches
    reward_model   the trunk with a scalar head read at the EOS, and its loss for the loop
    dpo            DPO (+ Llama 3's NLL term and formatting-token mask) for the loop; reference log-probabilities
    rejection      best-of-K sampling with the KV cache, its expected-best-of-k curve and KL bound
    prompts        the prompt pool: capability tags, deduplication, provenance
    oracle         the miniature's known reward, imperfect teacher and simulated annotators

The methods themselves live one level up (`peft.lora`, `peft.adapter_v1`, …); this package only drives them.
"""

from .loop import TrainConfig, TrainResult, evaluate_loss, set_seed, train, train_examples
from .config import RunConfig, load_config
from .recipe import load_run, run

__all__ = ["TrainConfig", "TrainResult", "train", "train_examples", "evaluate_loss", "set_seed", "RunConfig",
           "load_config", "run", "load_run"]
