"""Write a LoRA or QLoRA training run's adapter in Hugging Face PEFT's layout (peft.export_hf).

    python scripts/export_hf.py --run runs/sft_lora --out runs/sft_lora_hf

Writes OUT/adapter/ (adapter_config.json + adapter_model.safetensors, Meta's wq/wk rows permuted to HF's RoPE
order) and OUT/results.json. With transformers and HF peft installed (in another environment: see the README's
name-clash paragraph):

    base = LlamaForCausalLM.from_pretrained("runs/pretrain_tiny/final/model")
    model = PeftModel.from_pretrained(base, "runs/sft_lora_hf/adapter")

`base_model_name_or_path` in adapter_config.json is the run's base checkpoint when it is an HF folder (so
`AutoPeftModelForCausalLM.from_pretrained(OUT/adapter)` finds it); a Meta base must be converted first
(`python -m llama.convert --to hf`). A QLoRA adapter was trained against the NF4-dequantised base: on the full-
precision base its outputs differ by the quantisation error. Other methods have no HF PEFT equivalent (use
scripts/merge.py, or keep final/adapter.safetensors).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import export_hf  # noqa: E402
from peft.training.recipe import load_run  # noqa: E402
from scripts._cli import UsageError, experiment_parser, run_cli, start, write_results  # noqa: E402

parser = experiment_parser(__doc__, "export_hf")
parser.add_argument("--run", type=Path, required=True, help="the --out folder of a finished LoRA/QLoRA training run")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    model, _, cfg = load_run(args.run)
    method = cfg.method["name"]
    if method not in ("lora", "qlora"):
        raise UsageError(f"run {args.run} trained {method!r}; HF PEFT layouts exist for LoRA and QLoRA runs only "
                         f"(scripts/merge.py writes any mergeable run as a standalone checkpoint)")
    if not cfg.model.checkpoint:
        raise UsageError(f"run {args.run} fine-tuned a freshly initialised {cfg.model.preset} (no model.checkpoint), "
                         f"which no HF model holds; write the merged model instead: scripts/merge.py --run {args.run}")
    base = Path(cfg.model.checkpoint)
    hf_base = str(base.resolve()) if (base / "config.json").is_file() else None
    out = start(args)
    folder = export_hf(model, out / "adapter", base_model=hf_base)
    lora = model.peft_state.config
    results = {"run": str(args.run), "method": method, "adapter": str(folder), "base_model": hf_base, "r": lora.r,
               "alpha": lora.alpha, "target_modules": list(lora.target_modules)}
    print(f"{method} adapter of {args.run} -> HF PEFT folder {folder} (base: {hf_base or base})")
    if hf_base is None:
        print(f"the base {base} is a Meta folder: convert it for transformers with "
              f"python -m llama.convert --src {base} --dst BASE_HF --to hf")
    print(f"wrote {write_results(out, results)}, {folder}/", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_cli(main)
