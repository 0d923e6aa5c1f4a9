"""Benchmark: our `Transformer` against Hugging Face `LlamaForCausalLM` with identical weights, on CPU.

Measures, side by side in one run (alternating the models so that noise from other processes hits both):
  * training step: forward + next-token cross-entropy + backward, tokens/s at batch 4 x 512, next to the
    float32 GEMM floor: the time of just the weight-matrix products of that step (3 per matrix);
  * decode: greedy generation of 128 new tokens at batch 1, tokens/s (`llama.generate` vs HF `generate`),
    next to the float32 GEMV floor: the time one pass over every weight matrix takes at batch 1, the bound that
    no implementation of this model can beat at this precision on this machine;
  * "ours, lean CE": the same step with a cross-entropy that allocates one [N, V] buffer instead of three;
  * optionally (--compile) the same with `torch.compile(model)`.
Before timing, it checks that both models give the same logits and the same greedy tokens.

Each run is timed twice: wall clock, and the CPU time of this process. On a machine shared with other jobs the
CPU time of a single-threaded run (the default, --threads 1) is the robust measure, since time spent descheduled
does not count; on an idle machine the two agree. Tokens/s and ratios use the best (least disturbed) of several
alternating runs of CPU time; the JSON keeps every run, wall and CPU.

    python scripts/bench_model.py --seed 0 --out bench_model.json [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from llama.generate import generate


def bench_args(vocab_size: int = 32000) -> ModelArgs:
    """dim 512, 8 layers, 8 query heads sharing 2 KV heads (GQA), Llama 2 style otherwise (~41M parameters)."""
    return ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=vocab_size, multiple_of=256,
                     max_seq_len=1024, name="bench-512x8-gqa")


def to_hf(model: Transformer):
    """An HF LlamaForCausalLM with the same weights (Meta -> HF q/k row permutation, research notes §4.4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                         tie_word_embeddings=a.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    hf = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)

    def permute(w: torch.Tensor, n: int) -> torch.Tensor:  # [n·D, C]: interleaved pairs -> halves, per head
        return w.view(n, a.head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        p, att, ffn = f"model.layers.{i}.", layer.attention, layer.feed_forward
        sd |= {p + "self_attn.q_proj.weight": permute(att.wq.weight, a.n_heads),
               p + "self_attn.k_proj.weight": permute(att.wk.weight, a.n_kv_heads),
               p + "self_attn.v_proj.weight": att.wv.weight, p + "self_attn.o_proj.weight": att.wo.weight,
               p + "mlp.gate_proj.weight": ffn.w1.weight, p + "mlp.up_proj.weight": ffn.w3.weight,
               p + "mlp.down_proj.weight": ffn.w2.weight,
               p + "input_layernorm.weight": layer.attention_norm.weight,
               p + "post_attention_layernorm.weight": layer.ffn_norm.weight}
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf.eval()


# -- a leaner cross-entropy (a proposal measured here, not used by the library) -------------------------------------


class LeanCrossEntropy(torch.autograd.Function):
    """mean_i [logsumexp(z_i) - z_i[y_i]] with gradient (softmax(z_i) - onehot(y_i)) / N.

    F.cross_entropy materialises log_softmax [N, V] in the forward, then a zero-filled [N, V] gradient for nll_loss
    and another [N, V] for log_softmax's backward. Here the forward keeps only logsumexp [N] (computed in row blocks
    so temporaries stay in cache) and the backward writes softmax - onehot into one fresh [N, V] buffer.
    """

    @staticmethod
    def forward(ctx, logits, targets, block: int = 256):
        lse = torch.cat([torch.logsumexp(logits[i:i + block], dim=-1) for i in range(0, len(logits), block)])
        ctx.save_for_backward(logits, targets, lse)
        ctx.block = block
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        N, b = len(logits), ctx.block
        grad = torch.empty_like(logits)
        for i in range(0, N, b):
            torch.exp(logits[i:i + b] - lse[i:i + b, None], out=grad[i:i + b])  # softmax rows
        grad[torch.arange(N, device=grad.device), targets] -= 1.0
        return grad.mul_(grad_loss / N), None, None


# -- the workloads ------------------------------------------------------------------------------------------------


class Timer:
    """Wall-clock and process CPU seconds of a `with` block."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def train_step(forward, tokens: torch.Tensor, loss_fn=F.cross_entropy) -> Timer:
    """One forward + next-token cross-entropy + backward. `forward(tokens) -> logits`."""
    with Timer() as t:
        logits = forward(tokens[:, :-1])  # [B, T, V]
        loss = loss_fn(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    return t


def decode_ours(model, prompt: list[int], n: int) -> tuple[Timer, list[int]]:
    with Timer() as t:
        out = generate(model, [prompt], n)[0]
    return t, out


def decode_hf(hf, prompt: list[int], n: int) -> tuple[Timer, list[int]]:
    ids = torch.tensor([prompt])
    with Timer() as t, torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return t, out[0, len(prompt):].tolist()


def gemm_floor(model: Transformer, M: int) -> Timer:
    """The three products per weight matrix of a training step on M tokens: y = x Wᵀ, dx = dy W, dW = dyᵀ x."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    act = {n: torch.randn(M, n) for w in weights for n in w.shape}  # inputs x [M, K] and gradients dy [M, N]
    with Timer() as t:
        for w in weights:
            x, dy = act[w.shape[1]], act[w.shape[0]]
            x @ w.T, dy @ w, dy.T @ x
    return t


def gemv_floor(model: Transformer, n: int) -> Timer:
    """n passes over every matrix the decoder multiplies by (not the embedding lookup) at batch 1."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    with Timer() as t, torch.inference_mode():
        for _ in range(n):
            for w in weights:
                F.linear(x[w.shape[1]], w)
    return t


# -- driver -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_model.json", help="JSON results file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other load)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) (minutes to compile)")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = Transformer(bench_args())
    hf = to_hf(model)
    gen = torch.Generator().manual_seed(args.seed)
    V = model.args.vocab_size
    tokens = torch.randint(0, V, (args.batch, args.seq + 1), generator=gen)
    prompt = torch.randint(0, V, (args.prompt_len,), generator=gen).tolist()

    # Same function? Logits and greedy tokens must agree before the timings mean anything.
    with torch.no_grad():
        ours_logits, hf_logits = model(tokens[:1, :64]), hf(tokens[:1, :64]).logits
    rel_err = float((ours_logits - hf_logits).norm() / hf_logits.norm())
    same_tokens = decode_ours(model, prompt, 16)[1] == decode_hf(hf, prompt, 16)[1]
    print(f"parity: logits rel. err {rel_err:.2e}, 16 greedy tokens equal: {same_tokens}")
    results = dict(config=model.args.to_dict(), seed=args.seed, threads=torch.get_num_threads(),
                   torch=torch.__version__, machine=platform.machine(), cpu_count=os.cpu_count(),
                   parity=dict(logits_rel_err=rel_err, greedy_16_equal=same_tokens), rows=[])

    def add(workload: str, impl: str, timers: list[Timer], n_tokens: int, note: str = ""):
        cpu, wall = [t.cpu for t in timers], [t.wall for t in timers]
        best = min(cpu)
        results["rows"].append(dict(workload=workload, impl=impl, cpu_s=cpu, wall_s=wall, best_cpu_s=best,
                                    median_wall_s=statistics.median(wall), tokens_per_s=n_tokens / best,
                                    tokens_per_s_wall=n_tokens / min(wall), note=note))
        print(f"  {workload:<16} {impl:<16} {n_tokens / best:9.1f} tok/s  (best CPU {best:.3f} s, "
              f"best wall {min(wall):.3f} s)", flush=True)

    train = f"train {args.batch}x{args.seq}"
    decode = f"decode b1 +{args.new_tokens}"
    n_train = args.batch * args.seq
    hf_forward = lambda t: hf(t).logits  # noqa: E731
    if not args.skip_train:
        model.train(), hf.train()
        variants = {"ours": (model, F.cross_entropy), "hf": (hf_forward, F.cross_entropy),
                    "ours, lean CE": (model, LeanCrossEntropy.apply)}
        times = {name: [] for name in variants}
        for forward, loss_fn in variants.values():  # warm-up
            train_step(forward, tokens, loss_fn)
        model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        for _ in range(args.repeats):  # alternate so that noise from other processes hits every variant
            for name, (forward, loss_fn) in variants.items():
                times[name].append(train_step(forward, tokens, loss_fn))
                model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        for name, t in times.items():
            add(train, name, t, n_train, "loss: LeanCrossEntropy (proposal)" if "lean" in name else "")
        add(train, "GEMM floor", [gemm_floor(model, n_train) for _ in range(args.repeats)], n_train,
            "upper bound: the weight-matrix products of forward and backward only, float32")
        model.eval(), hf.eval()

    decode_ours(model, prompt, 8), decode_hf(hf, prompt, 8)  # warm-up
    ours_t, hf_t, floor_t = [], [], []
    for _ in range(args.repeats):
        ours_t.append(decode_ours(model, prompt, args.new_tokens)[0])
        hf_t.append(decode_hf(hf, prompt, args.new_tokens)[0])
        floor_t.append(gemv_floor(model, args.new_tokens))
    add(decode, "ours", ours_t, args.new_tokens)
    add(decode, "hf", hf_t, args.new_tokens)
    add(decode, "GEMV floor", floor_t, args.new_tokens, "upper bound: weight matrices x vector only, float32")

    if args.compile:
        compile_rows(model, tokens, prompt, args, add, results, train, decode)

    best = {(r["workload"], r["impl"]): r["tokens_per_s"] for r in results["rows"]}
    results["ratios_over_hf"] = {f"{w} | {impl}": tps / best[(w, "hf")] for (w, impl), tps in best.items()
                                 if impl != "hf" and (w, "hf") in best}
    print_table(results)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.flush(), os.fsync(f.fileno())
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def compile_rows(model, tokens, prompt, args, add, results, train, decode):
    """torch.compile(model): compile time, then steady-state speed with the shapes it was compiled for."""
    compiled = torch.compile(model, dynamic=True)
    info = {}
    if not args.skip_train:
        model.train()
        t0 = time.perf_counter()
        train_step(compiled, tokens), model.zero_grad(set_to_none=True)
        info["train_compile_and_first_step_wall_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            times.append(train_step(compiled, tokens)), model.zero_grad(set_to_none=True)
        add(train, "ours+compile", times, args.batch * args.seq)
        model.eval()
    t0 = time.perf_counter()
    decode_ours(compiled, prompt, args.new_tokens)  # same cache size as the timed calls: no recompilation
    info["decode_compile_and_first_call_wall_s"] = time.perf_counter() - t0
    times = [decode_ours(compiled, prompt, args.new_tokens)[0] for _ in range(args.repeats)]
    add(decode, "ours+compile", times, args.new_tokens)
    results["compile"] = info
    print(f"  compile: {info}")


def print_table(results):
    print(f"\n{'workload':<16} {'impl':<16} {'tokens/s':>9} {'CPU s':>7} {'wall s':>7} {'vs hf':>6}")
    print("-" * 66)
    ratios = results["ratios_over_hf"]
    for r in results["rows"]:
        ratio = ratios.get(f"{r['workload']} | {r['impl']}")
        ratio = f"{ratio:.2f}x" if ratio is not None else ("1.00x" if r["impl"] == "hf" else "")
        print(f"{r['workload']:<16} {r['impl']:<16} {r['tokens_per_s']:>9.1f} {r['best_cpu_s']:>7.3f} "
              f"{min(r['wall_s']):>7.3f} {ratio:>6}")
    print(f"threads={results['threads']}  parity: logits rel. err {results['parity']['logits_rel_err']:.1e}, "
          f"greedy tokens equal: {results['parity']['greedy_16_equal']}")


if __name__ == "__main__":
    raise SystemExit(main())
