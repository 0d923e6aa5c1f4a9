"""Independent references the tests compare against, each written without calling the code under test.

    hf            tiny random Hugging Face `LlamaForCausalLM` models (our converters are checked against HF's reading)
    meta_forward  a float64 LLaMA forward in Meta's form: per-head loop, complex-number RoPE, llama3 frequencies
    paper_peft    the same forward with every PEFT method in its paper's form (LoRA, DoRA, Adapter V1/V2, Excitor)
    moe           one Llama 4 MoE layer with LoRA experts, from the equations
    llama4_multimodal  tiny random HF `Llama4ForConditionalGeneration` models and image prompts
    mllama        tiny random HF `MllamaForConditionalGeneration` models, image inputs, HF's mask and image processor
    isolated_install   packages kept out of the environment (HF peft, torchvision), installed into folders of their own
    tolerance     the one rule for float32 / half-precision bounds: eps × reduction length (docs/testing.md)
    isolation     the reference process: transformers, bitsandbytes, HF PEFT run there, never in the tests' own
    outside/      the code that runs in the reference process (the only importer of those libraries)
"""
