r"""Generate from a trained run (adapter attached, or merged into the base) or from any checkpoint folder.

    python scripts/generate.py --run runs/sft_lora --prompt $'Sort: 3914\nAnswer:'
    python scripts/generate.py --run runs/sft_lora --merge --prompts-file prompts.jsonl --out runs/gen1
    python scripts/generate.py --checkpoint runs/sft_lora_merged/model --prompt $'Sort: 3914\nAnswer:'
    python scripts/generate.py --checkpoint runs/pretrain_tiny/final/model \
        --tokenizer runs/pretrain_tiny/final/tokenizer.model --prompt "Return the" --temperature 0.8 --seed 1

--run takes the output folder of scripts/train.py (its final/ holds the config, the tokenizer and the trained
tensors); --merge folds the adapter into the base weights first (LoRA, QLoRA into the dequantised base, Adapter V2's
bias/scale), which must give the same tokens. --checkpoint takes any Meta or HF folder; --tokenizer defaults to the
folder's tokenizer.model, and "bytes" names the byte tokenizer. A prompts file is JSONL with a "prompt" field per
line. Prompts and completions go to OUT/results.json.

Code Llama fill-in-the-middle (Code Llama paper §2.3): with --suffix, each prompt is the text before a gap and the
suffix the text after it; the completion is the middle, generated up to Code Llama's <EOT>:

    python scripts/generate.py --checkpoint CodeLlama-7b --tokenizer CodeLlama-7b/tokenizer.model \
        --prompt $'def add(a, b):\n    ' --suffix $'\n    return c\n'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.formats import load as load_checkpoint  # noqa: E402
from llama.generate import generate  # noqa: E402
from peft.training.config import check_device  # noqa: E402
from peft.training.data import _check_file, load_tokenizer  # noqa: E402
from peft.training.recipe import load_run  # noqa: E402
from scripts._cli import UsageError, experiment_parser, positive, run_cli, start, write_results  # noqa: E402


def load(args):
    device = check_device(args.device, "--device")
    if bool(args.run) == bool(args.checkpoint):
        raise UsageError("give exactly one of --run (a training run folder) or --checkpoint (a model folder)")
    if args.run:
        model, tokenizer, _ = load_run(args.run, merge=args.merge, device=device)
        return model, tokenizer
    if args.merge:
        raise UsageError("--merge needs --run (a checkpoint folder holds no adapter)")
    tokenizer = args.tokenizer or args.checkpoint  # a folder: its tokenizer.model
    model = load_checkpoint(args.checkpoint, device=device)
    tokenizer = load_tokenizer(str(tokenizer))
    if tokenizer.n_words != model.args.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.n_words} ids but {args.checkpoint} has vocab_size="
                         f"{model.args.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    return model, tokenizer


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = _check_file(args.prompts_file)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{path}:{lineno}: expected a JSON object with a \"prompt\" field") from None
    if not prompts:
        raise UsageError("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    return prompts


parser = experiment_parser(__doc__, "generate")
parser.add_argument("--run", help="the output folder of a scripts/train.py run")
parser.add_argument("--checkpoint", help="a Meta or HF checkpoint folder (llama.load)")
parser.add_argument("--tokenizer", help="with --checkpoint: a tokenizer file, or bytes (default: the folder's "
                                        "tokenizer.model)")
parser.add_argument("--merge", action="store_true", help="merge the adapter into the base before generating")
parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
parser.add_argument("--prompts-file", help="JSONL with a \"prompt\" field per line")
parser.add_argument("--max-new-tokens", type=positive(int), default=32, help="tokens to generate per prompt")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
parser.add_argument("--suffix", help="Code Llama fill-in-the-middle: the text after the gap (each prompt is the text "
                                     "before it); the completion is the middle")
parser.add_argument("--suffix-first", action="store_true", help="with --suffix: the suffix-prefix-middle order")


def main(argv=None) -> list[dict]:
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    model, tokenizer = load(args)
    model.eval()
    if args.suffix is None:
        ids = [tokenizer.encode(s, bos=True, eos=False) for s in prompts]
        stop_tokens, decode = tokenizer.stop_tokens, tokenizer.decode
    else:
        if getattr(tokenizer, "kind", None) != "sentencepiece":
            raise UsageError("--suffix (fill-in-the-middle) needs a Code Llama tokenizer (SentencePiece with <PRE>, "
                             "<SUF>, <MID>, <EOT>)")
        try:
            ids = [tokenizer.infilling_prompt(s, args.suffix, suffix_first=args.suffix_first) for s in prompts]
        except ValueError as err:
            raise UsageError(str(err)) from None
        stop_tokens, decode = (tokenizer.eot_id, tokenizer.eos_id), tokenizer.decode_infilling
    out = start(args)  # everything checked: now the output folder
    outs = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    stop_tokens=stop_tokens, seed=args.seed)
    rows = []
    for prompt, new in zip(prompts, outs):
        stopped = bool(new) and new[-1] in stop_tokens
        text = decode([t for t in new if t not in stop_tokens])
        rows.append({"prompt": prompt, "completion": text, "tokens": len(new), "stopped": stopped})
    width = min(40, max(len(repr(r["prompt"])) for r in rows))
    print(f"{'prompt':<{width}}  completion")
    for r in rows:
        print(f"{repr(r['prompt']):<{width}}  {r['completion']!r}{'' if r['stopped'] else '  (no EOS)'}")
    settings = {k: getattr(args, k) for k in ("run", "checkpoint", "merge", "max_new_tokens", "temperature", "top_p",
                                              "seed", "suffix")}
    print(f"wrote {write_results(out, {'settings': settings, 'rows': rows})}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_cli(main)
