"""Parameter-efficient fine-tuning of the LLaMA zoo: LoRA (rsLoRA, DoRA, QLoRA), LLaMA-Adapter V1 and V2, LLaMA-Excitor.

One file per method (`lora`, `qlora`, `lora_experts`, `qlora_experts`, `adapter_v1`, `adapter_v2`, `excitor`, and
the visual branches `adapter_v2_visual`, `excitor_visual` for multimodal models; the LoRA family shares
`lora_core`), one interface (`api`):

    peft.apply(model, peft.LoraConfig(r=8))      # freeze the base, attach in place
    peft.trainable_parameters(model)
    peft.merge(model) / peft.unmerge(model)
    peft.merge_and_unload(model)                 # the plain llama.Transformer with the adapter folded in
    peft.save_adapter(model, folder) / peft.load_adapter(model, folder)
    peft.export_hf(model, folder)                # a LoRA adapter in Hugging Face PEFT's layout

Methods attach through the two override points of `llama.model` (linear-layer replacement and
`Attention.extension`); `llama` never imports this package.

Post-training (Llama 2 / Llama 3: reward model, rejection sampling, DPO; `peft.training`, docs/post_training.md):

    peft.sequence_logps(logits, labels)          # Σ log π(y|x) over the response, HF shift convention
    peft.reward_loss(r_chosen, r_rejected, m)    # Bradley–Terry with Llama 2's margin
    peft.dpo_loss(π_c, π_r, ref_c, ref_r, beta)  # DPO / cDPO / IPO / hinge, with the implicit rewards
    peft.reward_model(checkpoint, method)        # the trunk with a scalar head
    with peft.disable_adapters(model): ...       # the reference model: every adapter off, no second copy
"""

from .adapter_v1 import AdapterV1Config
from .adapter_v2 import AdapterV2Config
from .adapter_v2_visual import AdapterV2VisualConfig
from .api import (adapter_parameters, adapter_state_dict, apply, load_adapter, merge, save_adapter,
                  trainable_parameters, unmerge)
from .excitor import ExcitorConfig
from .excitor_visual import ExcitorVisualConfig
from .hf_export import export_hf
from .lora_core import LoraConfig
from .unload import merge_and_unload
from .disable import disable_adapters
from .training.preference import dpo_loss, reward_accuracy, reward_loss, sequence_logps
from .training.reward_model import reward_model

__all__ = ["LoraConfig", "AdapterV1Config", "AdapterV2Config", "ExcitorConfig", "AdapterV2VisualConfig",
           "ExcitorVisualConfig", "apply", "trainable_parameters",
           "adapter_parameters", "adapter_state_dict", "merge", "unmerge", "save_adapter", "load_adapter",
           "export_hf", "merge_and_unload", "disable_adapters", "sequence_logps", "reward_loss", "reward_accuracy",
           "dpo_loss", "reward_model"]
