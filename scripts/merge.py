"""Turn a finished training run into a standalone checkpoint: the adapter merged into its base, saved as HF or Meta.

    python scripts/merge.py --run runs/sft_lora --out runs/sft_lora_merged             # HF: config.json + safetensors
    python scripts/merge.py --run runs/sft_lora --format meta --dtype bf16 --out runs/sft_lora_meta

Writes OUT/model/ (the checkpoint and the run's tokenizer.model: `llama.load(OUT/model)`,
`transformers.LlamaForCausalLM.from_pretrained(OUT/model)`) and OUT/results.json. The run's adapter is attached to
its base (peft.training.recipe.load_run), folded in with peft.merge_and_unload (LoRA, DoRA, QLoRA dequantised and
never re-quantised, LoRA on Llama 4 experts; Adapter V1, Excitor and Adapter V2 with learnt biases cannot be folded
and are refused), and saved with llama.save. A full fine-tuning or pre-training run is re-saved as it is, in the
format and dtype asked for. Before saving, the merged model's logits on a seeded probe are compared with the
attached adapter's; the largest relative difference is printed and recorded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import llama  # noqa: E402
from peft import merge_and_unload  # noqa: E402
from peft.training.recipe import load_run  # noqa: E402
from scripts._cli import dtype_arg, experiment_parser, run_cli, start, write_results  # noqa: E402

PROBE_TOKENS = 16

parser = experiment_parser(__doc__, "merge")
parser.add_argument("--run", type=Path, required=True, help="the --out folder of a finished scripts/train.py run")
parser.add_argument("--format", choices=("hf", "meta"), default="hf", help="checkpoint layout to write")
parser.add_argument("--dtype", type=dtype_arg, default=None,
                    help="weight dtype of the checkpoint: fp32, bf16, fp16 (default: the model's own)")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    model, tokenizer, cfg = load_run(args.run)  # checked before the output folder is made
    out = start(args)
    model.eval()
    probe = torch.randint(0, model.args.vocab_size, (1, PROBE_TOKENS))
    with torch.no_grad():
        before = model(probe).double()
        if cfg.method["name"] != "full":
            merge_and_unload(model)
        after = model(probe).double()
    rel = float((after - before).abs().max() / before.abs().max())
    folder = llama.save(model, out / "model", format=args.format, dtype=args.dtype)
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
    results = {"run": str(args.run), "method": cfg.method["name"], "format": args.format,
               "dtype": str(args.dtype or next(model.parameters()).dtype).removeprefix("torch."),
               "model": str(folder), "parameters": sum(p.numel() for p in model.parameters()),
               "tokenizer": "bytes" if tokenizer.path is None else str(folder / "tokenizer.model"),
               "probe_tokens": PROBE_TOKENS, "max_rel_logit_difference": rel, "seed": args.seed}
    print(f"{cfg.method['name']} run {args.run} -> {args.format} checkpoint {folder} "
          f"({results['parameters']:,} parameters, {results['dtype']})")
    print(f"merged vs attached logits on {PROBE_TOKENS} probe tokens: max relative difference {rel:.2e}")
    if tokenizer.path is None:
        print('the run used the byte tokenizer (data.tokenizer = "bytes"): ids are UTF-8 bytes, no tokenizer file')
    print(f"wrote {write_results(out, results)}, {folder}/", file=sys.stderr)
    return results


if __name__ == "__main__":
    run_cli(main)
