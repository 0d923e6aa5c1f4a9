"""The one command-line convention of every script in `scripts/` (documented in docs/cli.md).

Flags every experiment script takes, with the same names, meanings and defaults:

    --out DIR       a folder, always; created if missing. Default runs/<script>/<YYYYmmdd-HHMMSS> under the current
                    folder. Fixed layout: DIR/results.json (everything measured), DIR/results.md (the printed table),
                    DIR/*.png (plots), one sub-folder per training run where there are several.
    --seed N        seeds Python's and torch's generators before anything random happens (default 0): a rerun with
                    the same seed on the same machine reproduces every number.
    --threads N     torch CPU threads (default 1: one thread gives the same float32 reductions run after run, and
                    the tiny matrices of the CPU experiments gain little from more).
    --no-progress   no progress bars (tqdm) on stderr.
    --debug         show the full traceback of a user error instead of one line.

A user error (a bad flag value, a missing file, an invalid config: ValueError, FileNotFoundError, or
`UsageError`) prints one line, `error: <message>`, on stderr and exits with status 2, before any work is done where
the check allows it (under torchrun, rank 0 prints it). Everything else is a bug and keeps its traceback.

    parser = experiment_parser(__doc__, "ablate_moe")          # the common flags, with defaults shown in --help
    parser.add_argument("--steps", type=positive(int), default=300, help="training steps")
    def main(argv=None):
        args = parser.parse_args(argv)                          # check what can be checked, then
        out = start(args)                                       # threads, seed, output folder (printed)
        ...
        write_results(out, results, table)                      # results.json (+ results.md), each whole or absent
    if __name__ == "__main__":
        run_cli(main)

scripts/train.py maps the common flags onto config keys instead (docs/cli.md gives the rule).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.formats.io import atomic_write_bytes

EXIT_USAGE = 2  # what argparse itself exits with on a bad flag
RANK_GRACE_S = 10.0  # how long a non-zero torchrun rank waits before reporting a user error itself


class UsageError(ValueError):
    """A problem with what the user asked for; printed as one line (no traceback) by `run_cli`."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default (a help text that names its default, and
    flags whose default is "not given", are left as written)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def default_out(script: str) -> Path:
    """runs/<script>/<YYYYmmdd-HHMMSS>: a fresh folder per run, never the repository root."""
    return Path("runs") / script / time.strftime("%Y%m%d-%H%M%S")


def experiment_parser(doc: Optional[str], script: str, *, seed: Optional[int] = 0,
                      threads: int = 1) -> argparse.ArgumentParser:
    """An ArgumentParser with the common flags of the convention (see the module docstring).

    seed=None: the script takes its seed from elsewhere unless --seed is given (scripts/train.py: train.seed).
    Abbreviated flags are not accepted (`--se` is an error, not --seed), so a flag means what it spells.
    """
    parser = argparse.ArgumentParser(prog=f"scripts/{script}.py", description=doc, formatter_class=_Formatter,
                                     allow_abbrev=False)
    common = parser.add_argument_group("common flags (docs/cli.md)")
    common.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"output folder (default: runs/{script}/<timestamp>)")
    common.add_argument("--seed", type=int, default=seed, metavar="N",
                        help="random seed" + (" (default: the config's train.seed)" if seed is None else ""))
    common.add_argument("--threads", type=int, default=threads, metavar="N", help="torch CPU threads")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="full tracebacks for user errors")
    parser.set_defaults(_script=script)
    return parser


def positive(kind: type = int) -> Callable[[str], object]:
    """An argparse `type` that accepts only numbers > 0 of `kind`, naming the problem otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def set_threads(threads: int) -> None:
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@contextlib.contextmanager
def flush_denormals():
    """Denormal floats flushed to zero inside the block, IEEE behaviour (the process default) restored after it.

    The ablations flush them: they carry no signal at a tiny model's magnitudes and make single-threaded float32
    kernels several times slower on x86. Restoring matters where a script runs inside another process (the tests).
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "fp64": torch.float64,
          "float64": torch.float64}


def dtype_arg(text: str) -> torch.dtype:
    """An argparse `type` for a floating-point dtype, in the spellings users type (bf16, bfloat16, fp32, …)."""
    try:
        return DTYPES[text.lower().removeprefix("torch.")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use fp32, bf16, fp16 or fp64 (or float32, "
                                         f"bfloat16, float16, float64)") from None


def start(args: argparse.Namespace) -> Path:
    """Apply the common flags: check them, set threads, seed every generator, create the output folder.

    Returns the output folder (args.out is replaced by it) and prints where the run writes.
    """
    set_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out) if args.out is not None else default_out(args._script)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; --out names a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {out} ({err.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"the output folder {out} is not writable; choose another --out")
    args.out = out
    print(f"writing to {out}/", file=sys.stderr, flush=True)
    return out


def write_results(out: Path, results: dict, table: Optional[str] = None) -> Path:
    """out/results.json (and out/results.md when a table is given), each written whole or not at all."""
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)), ("results.md", table)):
        if text is not None:
            atomic_write_bytes(out / name, (text.rstrip("\n") + "\n").encode())
    return out / "results.json"


def run_cli(main: Callable[[Optional[list]], object], argv: Optional[list] = None) -> None:
    """Run `main(argv)`; a user error prints `error: <message>` and exits 2 (the traceback only with --debug)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (UsageError, ValueError, FileNotFoundError) as err:
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            # under torchrun every rank usually fails alike: rank 0 says it, and torchrun stops the other ranks when
            # the first one exits; a rank still alive after a moment failed on its own and says so itself
            time.sleep(RANK_GRACE_S)
        if debug:
            traceback.print_exc()
        print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
