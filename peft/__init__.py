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

__all__ = ["LoraConfig", "AdapterV1Config", "AdapterV2Config", "ExcitorConfig", "AdapterV2VisualConfig",
           "ExcitorVisualConfig", "apply", "trainable_parameters",
           "adapter_parameters", "adapter_state_dict", "merge", "unmerge", "save_adapter", "load_adapter",
           "export_hf", "merge_and_unload"]
