"""Pre-train or fine-tune any preset with any method: a TOML config, command-line overrides, one run folder.

    python scripts/train.py --config configs/pretrain_tiny.toml                    # pre-train the tiny base
    python scripts/train.py --config configs/sft_lora.toml --train.lr 1e-2 --seed 1 --out runs/sft_lora_s1
    python scripts/train.py --resume runs/sft_lora                                 # continue after a crash
    torchrun --nproc_per_node 2 scripts/train.py --config configs/sft_lora.toml    # FSDP2, one shard per rank

Overrides: `--section.key=value` or `--section.key value`, values as TOML literals (1e-3, true, ['wq', 'wv']; a
string field takes the text as written). Unknown sections and keys are errors naming the nearest valid key.

The common flags (docs/cli.md) are names for config keys: --out DIR is train.out_dir, --seed N is train.seed,
--no-progress is train.progress=false. The command line overrides the file; a flag and its own key on one command
line is an error. Without train.out_dir the run writes to runs/train/<timestamp>. --threads (torch CPU threads) is
not a config key; results.json records it.

The resolved config is printed first (valid TOML) and written to <out>/config.toml, which --config reads back to
reproduce the run. The folder's layout (metrics, checkpoints, final/, results.json) is in peft/training/recipe.py.
--resume DIR continues the run in DIR with the settings of DIR/config.toml; only bookkeeping keys (progress,
log/eval/save frequency, micro_batch_size) may be overridden, anything else is refused with the list of changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft.training.config import to_toml, load_config, parse_overrides  # noqa: E402
from peft.training.loop import init_distributed, split_batch  # noqa: E402
from peft.training.recipe import CONFIG_FILE, RESULTS_FILE, check_run_folder, run, summary  # noqa: E402
from scripts._cli import UsageError, default_out, experiment_parser, run_cli, set_threads  # noqa: E402

# common flag -> (config key, the override text for the flag's value)
FLAG_KEYS = {"out": ("train.out_dir", str), "seed": ("train.seed", str),
             "no_progress": ("train.progress", lambda on: "false")}

parser = experiment_parser(__doc__, "train", seed=None)
parser.add_argument("--config", type=Path, help="TOML config file (configs/*.toml, or a run's config.toml)")
parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR with its own config")
parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")


def resolve(argv=None):
    """(args, RunConfig) from the command line: file or run folder, overrides, the common flags."""
    args, rest = parser.parse_known_args(argv)
    overrides = list(rest)
    given = {f"{section}.{key}" for section, key, _ in parse_overrides(overrides)}
    if args.resume is not None:
        if args.config is not None:
            raise UsageError("--resume DIR reads DIR/config.toml; drop --config")
        if args.out is not None and Path(args.out) != args.resume:
            raise UsageError(f"--resume {args.resume} continues that folder; drop --out {args.out}")
        args.config = args.resume / CONFIG_FILE
        if not args.config.is_file():
            raise UsageError(f"{args.resume} is not a run folder of scripts/train.py (no {CONFIG_FILE}); pass the "
                             f"--out folder of the run to continue")
        overrides += [f"--train.out_dir={args.resume}", "--train.resume=true"]
    elif args.config is None:
        raise UsageError("no config: pass --config FILE (configs/ has a pre-training config and one per method) or "
                         "--resume DIR")
    for flag, (key, convert) in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if key in given:
            raise UsageError(f"--{flag.replace('_', '-')} and --{key} name the same setting; give one of them")
        section, name = key.split(".")
        overrides.append(f"--{section}.{name}={convert(value)}")
    cfg = load_config(args.config, overrides)
    return args, cfg


def main(argv=None) -> dict:
    args, cfg = resolve(argv)
    set_threads(args.threads)
    ctx = init_distributed()
    if cfg.train.out_dir is None:  # rank 0's timestamp for every rank
        cfg.train.out_dir = ctx.all_gather(str(default_out("train")))[0]
    split_batch(cfg.train, ctx.world_size)  # before anything: the batch splits over the processes,
    check_run_folder(cfg)  # and the folder holds no finished run, no other run's checkpoints, no changed settings
    if ctx.is_main:
        print(to_toml(cfg), flush=True)
    if args.dry_run:
        return {}
    if ctx.is_main:
        print(f"writing to {cfg.train.out_dir}/", file=sys.stderr, flush=True)
    out = run(cfg, ctx=ctx)
    result = summary(out, ctx)
    if ctx.is_main:
        width = max(map(len, result))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items() if k != "resumes"))
        print(f"wrote {cfg.train.out_dir}/: {CONFIG_FILE}, metrics.jsonl, checkpoints/, final/, {RESULTS_FILE}",
              file=sys.stderr)
    return result


if __name__ == "__main__":
    run_cli(main)
