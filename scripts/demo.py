"""Demo: train a tiny LLaMA on the Zen of Python for a few hundred steps, generate from it, print the model zoo.

Everything is offline and built in: the text is the standard library's `this` module (PEP 20), the tokenizer is
plain UTF-8 bytes (vocabulary 256), and the model is a 4-layer, GQA, Llama-3-style `Transformer` of ~0.8M
parameters. Runs in well under a minute on one CPU core; the output is deterministic for a given --seed (on one
thread, the default).

    python scripts/demo.py --seed 0 --steps 300 --out runs/demo

Writes OUT/results.json (losses, samples, zoo check); OUT defaults to runs/demo/<timestamp>.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from llama import ModelArgs, Transformer  # noqa: E402
from llama.generate import generate  # noqa: E402
from llama.zoo import format_table, zoo_table  # noqa: E402
from scripts._cli import experiment_parser, positive, run_cli, start, write_results  # noqa: E402


def zen_of_python() -> str:
    """PEP 20 as the `this` module stores it (ROT13), decoded without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def demo_args() -> ModelArgs:
    """A Llama-3-shaped toy: GQA (4 query heads, 2 KV heads), theta 5e5, byte vocabulary."""
    return ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64,
                     rope_theta=500000.0, max_seq_len=256, name="demo-byte-llama")


def train(model: Transformer, data: torch.Tensor, steps: int, batch: int, seq: int, lr: float,
          generator: torch.Generator, log_every: int = 50) -> list[dict]:
    """AdamW on random windows of the text, next-byte cross-entropy, cosine learning-rate decay to 10%."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    history = []
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps)))
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])  # [B, T+1]
        logits = model(window[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == 1 or step == steps:
            history.append(dict(step=step, loss=round(loss.item(), 4)))
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({loss.item() / math.log(2):.2f} bits/byte)", flush=True)
    return history


parser = experiment_parser(__doc__, "demo")  # --threads 1 keeps the output bit-for-bit reproducible
parser.add_argument("--steps", type=positive(int), default=300, help="optimizer steps")
parser.add_argument("--batch-size", type=positive(int), default=16, help="windows per step")
parser.add_argument("--seq-len", type=positive(int), default=64, help="bytes per window")
parser.add_argument("--lr", type=positive(float), default=3e-3, help="peak learning rate")


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    out = start(args)
    generator = torch.Generator().manual_seed(args.seed)

    text = zen_of_python()
    data = torch.tensor(encode(text), dtype=torch.long)
    model = Transformer(demo_args())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"text: the Zen of Python, {len(data)} bytes; model: {n_params:,} parameters "
          f"(dim {model.args.dim}, {model.args.n_layers} layers, {model.args.n_heads} heads / "
          f"{model.args.n_kv_heads} KV heads)")

    t0 = time.perf_counter()
    history = train(model, data, args.steps, args.batch_size, args.seq_len, args.lr, generator)
    train_s = time.perf_counter() - t0
    model.eval()

    samples = []
    print("\ngenerations (prompt | continuation):")
    for prompt in ["Beautiful is", "Errors should", "If the implementation"]:
        for label, kw in [("greedy", {}), ("T=0.8, top-p 0.9", dict(temperature=0.8, top_p=0.9, seed=args.seed))]:
            new = generate(model, [encode(prompt)], max_new_tokens=60, stop_tokens=encode("\n"), **kw)[0]
            continuation = decode(new).rstrip("\n")
            samples.append(dict(prompt=prompt, mode=label, continuation=continuation))
            print(f"  {label:<17} {prompt} | {continuation}")

    print("\nthe model zoo (parameter counts built on the meta device vs published):")
    rows = zoo_table()
    print(format_table(rows))
    matched = sum(bool(r["match"]) for r in rows)
    print(f"{matched}/{len(rows)} released presets reproduce the published parameter count exactly")
    print(f"\ntrained {args.steps} steps in {train_s:.1f} s; final loss {history[-1]['loss']:.3f}")

    results = dict(seed=args.seed, steps=args.steps, params=n_params, train_seconds=round(train_s, 2),
                   loss=history, samples=samples, zoo_matched=matched, zoo_presets=len(rows))
    print(f"wrote {write_results(out, results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
