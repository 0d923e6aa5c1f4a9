"""Benchmark: our `Transformer` against Hugging Face `LlamaForCausalLM` with identical weights, on CPU.

Measures, side by side in one run (alternating the two models so machine noise hits both alike):
  * training step: forward + cross-entropy + backward, tokens/s at batch 4 x 512;
  * decode: greedy generation of 128 new tokens at batch 1, tokens/s (`llama.generate` vs HF `generate`);
  * optionally (--compile) the same with `torch.compile(model)`.
Before timing it checks that both models give the same logits and the same greedy tokens.

    python scripts/bench_model.py --seed 0 --out bench_model.json
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
    """dim 512, 8 layers, 8 query heads sharing 2 KV heads (GQA), Llama 2 style otherwise."""
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


# -- the two workloads ------------------------------------------------------------------------------------------


def train_step(forward, tokens: torch.Tensor) -> float:
    """One forward + next-token cross-entropy + backward; returns seconds. `forward(tokens) -> logits`."""
    t0 = time.perf_counter()
    logits = forward(tokens[:, :-1])  # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return time.perf_counter() - t0


def decode_ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = generate(model, [prompt], n)[0]
    return time.perf_counter() - t0, out


def decode_hf(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, thread pool, lazy init)
    return [fn() for _ in range(repeats)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_model.json", help="JSON results file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median kept)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) (slow to compile)")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = Transformer(bench_args())
    hf = to_hf(model)
    gen = torch.Generator().manual_seed(args.seed)
    V = model.args.vocab_size
    tokens = torch.randint(0, V, (args.batch, args.seq + 1), generator=gen)
    prompt = torch.randint(0, V, (args.prompt_len,), generator=gen).tolist()

    # Same function? logits and greedy tokens must agree before the timings mean anything.
    with torch.no_grad():
        ours_logits, hf_logits = model(tokens[:1, :64]), hf(tokens[:1, :64]).logits
    rel_err = float((ours_logits - hf_logits).norm() / hf_logits.norm())
    _, ours_tokens = decode_ours(model, prompt, 16)
    _, hf_tokens = decode_hf(hf, prompt, 16)

    results = dict(config=model.args.to_dict(), seed=args.seed, threads=torch.get_num_threads(),
                   torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                   parity=dict(logits_rel_err=rel_err, greedy_16_equal=ours_tokens == hf_tokens), rows=[])

    def add(workload: str, impl: str, times: list[float], n_tokens: int):
        med = statistics.median(times)
        results["rows"].append(dict(workload=workload, impl=impl, seconds=times, median_s=med,
                                    tokens_per_s=n_tokens / med))
        print(f"  {workload:<22} {impl:<14} {n_tokens / med:10.1f} tok/s   (median of {len(times)}: {med:.3f} s)",
              flush=True)

    print(f"parity: logits rel. err {rel_err:.2e}, greedy tokens equal: {ours_tokens == hf_tokens}")
    n_train = args.batch * args.seq
    if not args.skip_train:
        model.train(), hf.train()
        ours_t, hf_t = [], []
        train_step(model, tokens), train_step(lambda t: hf(t).logits, tokens)  # warm-up
        for _ in range(args.repeats):  # alternate so that noise from other processes hits both
            ours_t.append(train_step(model, tokens)), model.zero_grad(set_to_none=True)
            hf_t.append(train_step(lambda t: hf(t).logits, tokens)), hf.zero_grad(set_to_none=True)
        add(f"train {args.batch}x{args.seq}", "ours", ours_t, n_train)
        add(f"train {args.batch}x{args.seq}", "hf", hf_t, n_train)
        model.eval(), hf.eval()

    ours_d, hf_d = [], []
    decode_ours(model, prompt, 8), decode_hf(hf, prompt, 8)  # warm-up
    for _ in range(args.repeats):
        ours_d.append(decode_ours(model, prompt, args.new_tokens)[0])
        hf_d.append(decode_hf(hf, prompt, args.new_tokens)[0])
    add(f"decode b1 +{args.new_tokens}", "ours", ours_d, args.new_tokens)
    add(f"decode b1 +{args.new_tokens}", "hf", hf_d, args.new_tokens)

    if args.compile:
        compile_rows(model, tokens, prompt, args, add, results)

    rows = {(r["workload"], r["impl"]): r["tokens_per_s"] for r in results["rows"]}
    ratios = {}
    for (workload, impl), tps in rows.items():
        if impl == "ours" and (workload, "hf") in rows:
            ratios[workload] = tps / rows[(workload, "hf")]
    results["ratios_ours_over_hf"] = ratios
    print_table(results)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.flush(), os.fsync(f.fileno())
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def compile_rows(model, tokens, prompt, args, add, results):
    """torch.compile(model): compile time and steady-state speed (decode uses dynamic shapes for the growing cache)."""
    compiled = torch.compile(model, dynamic=True)
    info = {}
    n_train = args.batch * args.seq
    if not args.skip_train:
        model.train()
        t0 = time.perf_counter()
        train_step(compiled, tokens), model.zero_grad(set_to_none=True)
        info["train_first_step_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            times.append(train_step(compiled, tokens)), model.zero_grad(set_to_none=True)
        add(f"train {args.batch}x{args.seq}", "ours+compile", times, n_train)
        model.eval()
    t0 = time.perf_counter()
    decode_ours(compiled, prompt, 8)
    info["decode_first_call_s"] = time.perf_counter() - t0
    times = [decode_ours(compiled, prompt, args.new_tokens)[0] for _ in range(args.repeats)]
    add(f"decode b1 +{args.new_tokens}", "ours+compile", times, args.new_tokens)
    results["compile"] = info


def print_table(results):
    rows = results["rows"]
    print(f"\n{'workload':<22} {'impl':<14} {'tokens/s':>10} {'median s':>9}")
    print("-" * 58)
    for r in rows:
        print(f"{r['workload']:<22} {r['impl']:<14} {r['tokens_per_s']:>10.1f} {r['median_s']:>9.3f}")
    for workload, ratio in results["ratios_ours_over_hf"].items():
        print(f"ours / hf, {workload}: {ratio:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
