r"""Generate from a trained run (adapter attached, or merged into the base) or from any checkpoint folder.

    python scripts/generate.py --run runs/sft_lora --prompt $'Sort: 3914\nAnswer:'
    python scripts/generate.py --run runs/sft_lora --merge --prompts-file prompts.jsonl --json out.json
    python scripts/generate.py --checkpoint runs/pretrain_tiny/final/model \
        --tokenizer runs/pretrain_tiny/final/tokenizer.model --prompt "Return the" --temperature 0.8 --seed 1

--run takes the train.out_dir of scripts/train.py (it holds final/run.json, the tokenizer and the trained tensors);
--merge folds the adapter into the base weights first (LoRA, QLoRA into the dequantised base, Adapter V2's
bias/scale), which must give the same tokens. A prompts file is JSONL with a "prompt" field per line.

Code Llama fill-in-the-middle (Code Llama paper §2.3): with --suffix, each prompt is the text before a gap and the
suffix the text after it; the completion is the middle, generated up to Code Llama's <EOT>:

    python scripts/generate.py --checkpoint CodeLlama-7b --tokenizer CodeLlama-7b/tokenizer.model \
        --prompt $'def add(a, b):\n    ' --suffix $'\n    return c\n'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama.formats import load as load_checkpoint  # noqa: E402
from llama.generate import generate  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402
from peft.training.data import _check_file  # noqa: E402
from peft.training.recipe import load_run  # noqa: E402


def load(args):
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("give exactly one of --run (a training run folder) or --checkpoint (a model folder)")
    if args.run:
        model, tokenizer, _ = load_run(args.run, merge=args.merge, device=args.device)
        return model, tokenizer
    if args.merge:
        raise SystemExit("--merge needs --run (a checkpoint folder holds no adapter)")
    if not args.tokenizer:
        raise SystemExit("--checkpoint needs --tokenizer (the tokenizer.model the model was trained with)")
    return load_checkpoint(args.checkpoint, device=args.device), Tokenizer(args.tokenizer)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = _check_file(args.prompts_file)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"{path}:{lineno}: expected a JSON object with a \"prompt\" field") from None
    if not prompts:
        raise SystemExit("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    return prompts


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a scripts/train.py output folder (train.out_dir)")
    p.add_argument("--checkpoint", help="a Meta or HF checkpoint folder (llama.load)")
    p.add_argument("--tokenizer", help="tokenizer.model (with --checkpoint)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base before generating")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="JSONL with a \"prompt\" field per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write prompts and completions to this file")
    p.add_argument("--suffix", help="Code Llama fill-in-the-middle: the text after the gap (each prompt is the text "
                                    "before it); the completion is the middle")
    p.add_argument("--suffix-first", action="store_true", help="with --suffix: the suffix-prefix-middle order")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load(args)
    model.eval()
    prompts = read_prompts(args)
    if args.suffix is None:
        ids = [tokenizer.encode(s, bos=True, eos=False) for s in prompts]
        stop_tokens, decode = tokenizer.stop_tokens, tokenizer.decode
    else:
        if getattr(tokenizer, "kind", None) != "sentencepiece":
            raise SystemExit("--suffix (fill-in-the-middle) needs a Code Llama tokenizer (SentencePiece with <PRE>, "
                             "<SUF>, <MID>, <EOT>)")
        try:
            ids = [tokenizer.infilling_prompt(s, args.suffix, suffix_first=args.suffix_first) for s in prompts]
        except ValueError as err:
            raise SystemExit(str(err)) from None
        stop_tokens, decode = (tokenizer.eot_id, tokenizer.eos_id), tokenizer.decode_infilling
    outs = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    stop_tokens=stop_tokens, seed=args.seed)
    rows = []
    for prompt, out in zip(prompts, outs):
        stopped = bool(out) and out[-1] in stop_tokens
        text = decode([t for t in out if t not in stop_tokens])
        rows.append({"prompt": prompt, "completion": text, "tokens": len(out), "stopped": stopped})
    width = min(40, max(len(repr(r["prompt"])) for r in rows))
    print(f"{'prompt':<{width}}  completion")
    for r in rows:
        print(f"{repr(r['prompt']):<{width}}  {r['completion']!r}{'' if r['stopped'] else '  (no EOS)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
