"""Convert a checkpoint folder between Meta's and Hugging Face's layouts.

    python -m llama.convert --src Meta-Llama-3.1-8B/original --dst llama-3.1-8b-hf --to hf
    python -m llama.convert --src llama-2-13b-hf --dst llama-2-13b-meta --to meta --shards 2 --dtype bfloat16

The source format is detected (params.json: Meta, config.json: HF). Weights keep their stored dtype unless --dtype
is given. The conversion goes through `llama.load` (which checks every key and shape) and `llama.save`; every
argument, the destination included, is checked before the source is read. A user error prints one line,
`error: <message>`, and exits with status 2 (argparse's status for a bad flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..checks import FLOAT_DTYPES, ConfigError, check_int
from .checkpoint import check_save_arguments, detect_format, load, save


def positive_int(text: str) -> int:
    """argparse type: a positive integer, or the flag's error naming what it got."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    try:
        return check_int("value", value)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="source checkpoint folder (Meta or HF; detected)")
    p.add_argument("--dst", required=True, help="destination folder (created; must not hold the other format)")
    p.add_argument("--to", required=True, choices=("hf", "meta"), help="destination format")
    p.add_argument("--shards", type=positive_int, default=1, help="model-parallel shards for --to meta (default 1)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file for --to hf (default 5GB)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), default=None, help="convert weights (default: keep)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="context length to record (Meta's params.json does not store it)")
    p.add_argument("--json", default=None, help="also write a summary of the conversion to this JSON file")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    opts = parse_args(argv)
    if opts.to == "hf" and opts.shards != 1:
        raise ValueError("--shards splits Meta checkpoints for model parallelism; with --to hf use --max-shard-size")
    check_save_arguments(opts.dst, opts.to, opts.shards, opts.max_shard_size, opts.dtype)  # before reading --src
    if opts.json and Path(opts.json).is_dir():
        raise ValueError(f"--json {opts.json} is a folder; give the path of a .json file to write")
    src_format = detect_format(opts.src)
    model = load(opts.src, dtype=opts.dtype, max_seq_len=opts.max_seq_len)
    dst = save(model, opts.dst, format=opts.to, num_shards=opts.shards, max_shard_size=opts.max_shard_size)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    files = sorted(p.name for p in Path(dst).iterdir() if not p.name.startswith("."))
    summary = {"src": str(opts.src), "src_format": src_format, "dst": str(dst), "dst_format": opts.to,
               "model": model.args.name or "(no preset matches)", "parameters": n_params,
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "max_seq_len": model.args.max_seq_len, "files": files}
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """The command line: `main`, with a user error printed as one line (no traceback) and exit status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; OSError: missing folder, disk full
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
