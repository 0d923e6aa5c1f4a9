"""Benchmark: our `Transformer` against Hugging Face `LlamaForCausalLM` with identical weights, on CPU.

Measures, side by side in one run (alternating the models so that noise from other processes hits both):
  * training step: forward + next-token cross-entropy + backward, tokens/s at batch 4 x 512, next to the
    float32 GEMM floor: the time of just the weight-matrix products of that step (3 per matrix);
  * decode: greedy generation of 128 new tokens at batch 1, tokens/s (`llama.generate` vs HF `generate`),
    next to the float32 GEMV floor: the time one pass over every weight matrix takes at batch 1, the bound that
    no implementation of this model can beat at this precision on this machine;
  * "ours, lean CE": the same step with a cross-entropy that allocates one [N, V] buffer instead of three;
  * the training step under bfloat16 autocast (both models: a different precision, compared with each other);
  * decode with weight-only int8 (`llama.quantize`): ours, and HF with the *same* `Int8Linear` swapped into its
    linear layers (so the int8 rows compare like with like too), next to the int8 GEMV floor; plus the accuracy
    cost of int8 against float32 (logit differences, top-1 agreement, whether 128 greedy tokens match);
  * optionally (--compile) the same with `torch.compile` (training: ours and HF, model and loss compiled together;
    decode: ours, float32 and int8; HF's `generate` is not compiled).
Before timing, it checks that both models give the same logits and the same greedy tokens.

Which rows compare like with like: every row carries its numerics (fp32, bf16-autocast, int8 weights). The column
"vs like" divides by the HF row of the same workload, numerics and compilation (the decode compile rows by HF
eager, marked *); "vs hf fp32" divides by HF in float32, eager: the baseline the targets in the issue refer to.
int8 rows are a different (approximate) model: their speed-up over HF float32 is real but not like for like.

Each run is timed twice: wall clock, and the CPU time of this process. On a machine shared with other jobs the
CPU time of a single-threaded run (the default, --threads 1) is the robust measure, since time spent descheduled
does not count; on an idle machine the two agree. Tokens/s and ratios use the best (least disturbed) of several
alternating runs of CPU time; the JSON keeps every run, wall and CPU.

    python scripts/bench_model.py --seed 0 [--threads 2] [--compile] [--out runs/bench_model/mine]

Writes OUT/results.json (every run, wall and CPU) and OUT/results.md (the table); OUT defaults to
runs/bench_model/<timestamp>.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from llama import ModelArgs, Transformer  # noqa: E402
from llama.generate import generate  # noqa: E402
from llama.quantize import Int8Linear, int8_weight_bytes, quantize_int8  # noqa: E402
from scripts._cli import experiment_parser, positive, run_cli, start, write_results  # noqa: E402


def bench_args(vocab_size: int = 32000) -> ModelArgs:
    """dim 512, 8 layers, 8 query heads sharing 2 KV heads (GQA), Llama 2 style otherwise (~41M parameters)."""
    return ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=vocab_size, multiple_of=256,
                     max_seq_len=1024, name="bench-512x8-gqa")


def to_hf(model: Transformer):
    """An HF LlamaForCausalLM with the same weights (Meta -> HF q/k row permutation, HF's converter)."""
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


def next_token_loss(forward, loss_fn=F.cross_entropy):
    """tokens [B, T+1] -> mean cross-entropy of forward(tokens[:, :-1]) [B, T, V] against tokens[:, 1:]."""

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = forward(tokens[:, :-1])  # [B, T, V]
        return loss_fn(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # float: bf16 under autocast

    return loss


def train_step(loss, tokens: torch.Tensor, autocast: bool = False) -> Timer:
    """One forward + loss + backward; autocast: matrix products in bfloat16 (torch.autocast), the rest float32."""
    with Timer() as t:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(tokens)
        value.backward()
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


def int8_gemv_floor(qmodel: Transformer, n: int) -> Timer:
    """The same n passes over the int8 weights of a quantised model (bfloat16 vectors: no casts, just the kernel)."""
    layers = [m for m in qmodel.modules() if isinstance(m, Int8Linear)]
    x = {m.in_features: torch.randn(1, m.in_features, dtype=torch.bfloat16) for m in layers}
    with Timer() as t, torch.inference_mode():
        for _ in range(n):
            for m in layers:
                m(x[m.in_features])
    return t


def int8_accuracy(model: Transformer, qmodel: Transformer, prompt: list[int], reference: list[int]) -> dict:
    """Accuracy cost of int8 weights, measured along the float32 greedy continuation `reference` of `prompt`.

    Teacher-forced (both models read prompt + reference): logit differences and how often the int8 model's top
    token is float32's. Free-running: whether its own greedy continuation equals `reference`, and where it first
    departs (one flipped near-tie changes everything after it).
    """
    seq = torch.tensor([prompt + reference])
    with torch.inference_mode():
        ref = model(seq)[0, len(prompt) - 1:-1]  # [n, V]: the logits that picked each reference token
        out = qmodel(seq)[0, len(prompt) - 1:-1]  # [n, V]
    top2 = ref.topk(2, dim=-1).values  # [n, 2]
    greedy = generate(qmodel, [prompt], len(reference))[0]
    first = next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b), None)
    return dict(max_abs_logit_diff=float((out - ref).abs().max()),
                rel_logit_err=float((out - ref).norm() / ref.norm()),
                float32_logit_std=float(ref.std()),
                float32_median_top2_margin=float((top2[:, 0] - top2[:, 1]).median()),
                top1_agreement=float((out.argmax(-1) == torch.tensor(reference)).float().mean()),
                greedy_equal=greedy == reference, first_divergence=first)


# -- driver -------------------------------------------------------------------------------------------------------


parser = experiment_parser(__doc__, "bench_model")  # --threads 1: the least sensitive to other load
parser.add_argument("--repeats", type=positive(int), default=3, help="timed repetitions per measurement")
parser.add_argument("--batch-size", type=positive(int), default=4, help="rows of the training step")
parser.add_argument("--seq-len", type=positive(int), default=512, help="tokens per row of the training step")
parser.add_argument("--new-tokens", type=positive(int), default=128, help="tokens to decode")
parser.add_argument("--prompt-len", type=positive(int), default=16, help="prompt tokens before decoding")
parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
parser.add_argument("--skip-train", action="store_true", help="decode rows only")


def main(argv=None) -> int:
    args = parser.parse_args(argv)
    out = start(args)
    model = Transformer(bench_args())
    hf = to_hf(model)
    gen = torch.Generator().manual_seed(args.seed)
    V = model.args.vocab_size
    tokens = torch.randint(0, V, (args.batch_size, args.seq_len + 1), generator=gen)
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

    def add(workload: str, impl: str, numerics: str, timers: list[Timer], n_tokens: int, note: str = "",
            like: Optional[str] = None):
        """like: the HF row (impl name) of the same workload this row is compared with like for like."""
        cpu, wall = [t.cpu for t in timers], [t.wall for t in timers]
        best = min(cpu)
        results["rows"].append(dict(workload=workload, impl=impl, numerics=numerics, like=like, cpu_s=cpu,
                                    wall_s=wall, best_cpu_s=best, median_wall_s=statistics.median(wall),
                                    tokens_per_s=n_tokens / best, tokens_per_s_wall=n_tokens / min(wall), note=note))
        print(f"  {workload:<16} {impl:<20} {numerics:<12} {n_tokens / best:9.1f} tok/s  (best CPU {best:.3f} s, "
              f"best wall {min(wall):.3f} s)", flush=True)

    train = f"train {args.batch_size}x{args.seq_len}"
    decode = f"decode b1 +{args.new_tokens}"
    n_train = args.batch_size * args.seq_len
    hf_forward = lambda t: hf(t).logits  # noqa: E731
    if not args.skip_train:
        model.train(), hf.train()
        # (name, loss, autocast, numerics, like-for-like HF row)
        variants = [("ours", next_token_loss(model), False, "fp32", "hf"),
                    ("hf", next_token_loss(hf_forward), False, "fp32", "hf"),
                    ("ours, lean CE", next_token_loss(model, LeanCrossEntropy.apply), False, "fp32", "hf"),
                    ("ours", next_token_loss(model), True, "bf16-autocast", "hf"),
                    ("hf", next_token_loss(hf_forward), True, "bf16-autocast", "hf")]
        times = {i: [] for i in range(len(variants))}
        for _, loss, autocast, _, _ in variants:  # warm-up
            train_step(loss, tokens, autocast)
        model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        for _ in range(args.repeats):  # alternate so that noise from other processes hits every variant
            for i, (_, loss, autocast, _, _) in enumerate(variants):
                times[i].append(train_step(loss, tokens, autocast))
                model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
        floor = [gemm_floor(model, n_train) for _ in range(args.repeats)]
        for i, (name, _, _, numerics, like) in enumerate(variants):
            add(train, name, numerics, times[i], n_train,
                "loss: LeanCrossEntropy (proposal)" if "lean" in name else "", like)
            if i == 2:  # after the float32 rows
                add(train, "GEMM floor", "fp32", floor, n_train,
                    "upper bound: the weight-matrix products of forward and backward only, float32", "hf")
        model.eval(), hf.eval()

    # weight-only int8 (llama/quantize.py): ours, and HF with the same Int8Linear in place of its nn.Linear layers
    qmodel, qhf = quantize_int8(copy.deepcopy(model)), quantize_int8(copy.deepcopy(hf))
    results["int8_weight_bytes"] = int8_weight_bytes(qmodel)
    results["fp32_weight_bytes"] = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    decoders = [("ours", lambda: decode_ours(model, prompt, args.new_tokens)[0], "fp32", "hf", ""),
                ("hf", lambda: decode_hf(hf, prompt, args.new_tokens)[0], "fp32", "hf", ""),
                ("GEMV floor", lambda: gemv_floor(model, args.new_tokens), "fp32", "hf",
                 "upper bound: weight matrices x vector only, float32"),
                ("ours int8", lambda: decode_ours(qmodel, prompt, args.new_tokens)[0], "int8-weights", "hf int8",
                 "weight-only int8 (llama.quantize), bf16 matmul inputs"),
                ("hf int8", lambda: decode_hf(qhf, prompt, args.new_tokens)[0], "int8-weights", "hf int8",
                 "HF with our Int8Linear swapped in"),
                ("int8 GEMV floor", lambda: int8_gemv_floor(qmodel, args.new_tokens), "int8-weights", "hf int8",
                 "upper bound: _weight_int8pack_mm over the int8 weights only")]
    decode_ours(model, prompt, 8), decode_hf(hf, prompt, 8)  # warm-up
    decode_ours(qmodel, prompt, 8), decode_hf(qhf, prompt, 8)
    times = {name: [] for name, *_ in decoders}
    for _ in range(args.repeats):
        for name, run, *_ in decoders:
            times[name].append(run())
    for name, _, numerics, like, note in decoders:
        add(decode, name, numerics, times[name], args.new_tokens, note, like)

    reference = decode_ours(model, prompt, args.new_tokens)[1]
    results["int8_accuracy"] = {
        "int8 (kernel: bf16 inputs)": int8_accuracy(model, qmodel, prompt, reference),
        "int8 (dequant reference: weight rounding only)": int8_accuracy(
            model, quantize_int8(copy.deepcopy(model), implementation="dequant"), prompt, reference),
        "for scale, not int8: the whole model in bfloat16": int8_accuracy(
            model, copy.deepcopy(model).to(torch.bfloat16), prompt, reference)}

    if args.compile:
        compile_rows(model, hf, qmodel, tokens, prompt, args, add, results, train, decode)

    hf_best = {(r["workload"], r["impl"], r["numerics"]): r["tokens_per_s"] for r in results["rows"]
               if r["impl"].startswith("hf")}
    for r in results["rows"]:
        like = hf_best.get((r["workload"], r["like"], r["numerics"]))
        base = hf_best.get((r["workload"], "hf", "fp32"))
        r["vs_like"] = r["tokens_per_s"] / like if like else None
        r["vs_hf_fp32"] = r["tokens_per_s"] / base if base else None
    table = format_table(results)
    print(table)
    print(f"wrote {write_results(out, results, table)}, {out / 'results.md'}", file=sys.stderr)
    return 0


def compile_rows(model, hf, qmodel, tokens, prompt, args, add, results, train, decode):
    """torch.compile: compile time, then steady-state speed with the shapes it was compiled for.

    Training compiles model *and* loss in one graph (so the cross-entropy fuses with the logits), for ours and for
    HF alike. Decode compiles our model (dynamic shapes: one graph for every cache length); HF stays eager.
    """
    info = {}
    if not args.skip_train:
        model.train(), hf.train()
        losses = [("ours+compile", torch.compile(next_token_loss(model))),
                  ("hf+compile", torch.compile(next_token_loss(lambda t: hf(t).logits)))]
        for autocast, numerics in ((False, "fp32"), (True, "bf16-autocast")):
            for name, loss in losses:
                t0 = time.perf_counter()
                train_step(loss, tokens, autocast), model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
                info[f"train {name} {numerics} compile_and_first_step_wall_s"] = time.perf_counter() - t0
            times = {name: [] for name, _ in losses}
            for _ in range(args.repeats):
                for name, loss in losses:
                    times[name].append(train_step(loss, tokens, autocast))
                    model.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
            for name, _ in losses:
                add(train, name, numerics, times[name], args.batch_size * args.seq_len, like="hf+compile")
        model.eval(), hf.eval()
    for name, m, numerics, like in (("ours+compile", model, "fp32", "hf"),
                                    ("ours int8+compile", qmodel, "int8-weights", "hf int8")):
        compiled = torch.compile(m, dynamic=True)
        t0 = time.perf_counter()
        decode_ours(compiled, prompt, args.new_tokens)  # same cache size as the timed calls: no recompilation
        info[f"decode {name} compile_and_first_call_wall_s"] = time.perf_counter() - t0
        times = [decode_ours(compiled, prompt, args.new_tokens)[0] for _ in range(args.repeats)]
        add(decode, name, numerics, times, args.new_tokens, "compared with HF eager (HF generate not compiled)",
            like)
    results["compile"] = info
    print(f"  compile: {info}")


def format_table(results) -> str:
    lines = [f"\n{'workload':<16} {'impl':<20} {'numerics':<14} {'tokens/s':>9} {'CPU s':>7} {'wall s':>7} "
             f"{'vs like':>8} {'vs hf fp32':>10}", "-" * 98]
    for r in results["rows"]:
        star = "*" if "HF eager" in r["note"] else " "
        like = f"{r['vs_like']:.2f}x{star}" if r["vs_like"] is not None else ""
        base = f"{r['vs_hf_fp32']:.2f}x" if r["vs_hf_fp32"] is not None else ""
        lines.append(f"{r['workload']:<16} {r['impl']:<20} {r['numerics']:<14} {r['tokens_per_s']:>9.1f} "
                     f"{r['best_cpu_s']:>7.3f} {min(r['wall_s']):>7.3f} {like:>8} {base:>10}")
    lines.append("vs like: over the HF row with the same numerics (and compilation; * = over HF eager). "
                 "vs hf fp32: over HF float32 eager.")
    lines.append(f"threads={results['threads']}  parity: logits rel. err {results['parity']['logits_rel_err']:.1e}, "
                 f"greedy tokens equal: {results['parity']['greedy_16_equal']}")
    lines.append(f"int8 weights: {results['int8_weight_bytes'] / 1e6:.1f} MB vs "
                 f"{results['fp32_weight_bytes'] / 1e6:.1f} MB float32 (the bytes a decoding step reads)")
    for name, acc in results["int8_accuracy"].items():
        lines.append(f"accuracy {name}: max |Δlogit| {acc['max_abs_logit_diff']:.3f} (float32 logit std "
                     f"{acc['float32_logit_std']:.2f}, median top-2 margin {acc['float32_median_top2_margin']:.3f}), "
                     f"rel. err {acc['rel_logit_err']:.3f}, teacher-forced top-1 agreement "
                     f"{acc['top1_agreement']:.3f}, greedy tokens equal: {acc['greedy_equal']} (first divergence at "
                     f"{acc['first_divergence']})")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
