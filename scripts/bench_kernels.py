"""Benchmark of the Triton kernels (kernels/) on LLaMA projection shapes, against eager PyTorch, torch.compile and
bitsandbytes where installed.

On a CUDA device:
  * machine anchors, measured first: copy bandwidth (device-to-device copy of 1 GiB) and the bf16 GEMM rate
    (torch.matmul 8192^3); every result is also given as a fraction of these;
  * NF4 dequantisation (bf16 out): Triton one-launch kernel / eager reference / torch.compile(reference) /
    bitsandbytes `dequantize_4bit`; GB/s counts packed + absmax codes + absmax2 + offset read and bf16 written;
  * fused LoRA linear x Wᵀ + s (x Aᵀ) Bᵀ: Triton / eager / torch.compile / bare bf16 GEMM x Wᵀ (cuBLAS) / the same
    Triton GEMM kernel without the LoRA term; TFLOP/s = 2MNK(1 + r/N + r/K) / t; forward, and forward+backward;
  * QLoRA linear: fused NF4 GEMM / Triton dequantise-then-GEMM / eager dequantise-then-matmul / torch.compile /
    bitsandbytes dequantise + eager LoRA;
  * the issue's targets, each marked met / missed.
Every time is given twice (LEGEND): the median of `triton.testing.do_bench` on the plain Python call (L2 flushed
before every call; includes the host's launch path whenever the GPU waits for it) and the median of `do_bench` on
the replay of a CUDA graph holding one call (device time without host overhead; captured after a warm-up, so
compilation and autotuning happen outside the capture; autograd ops captured forward-only under no_grad).
Bandwidth / TFLOP/s fractions and the targets are computed from both. Outputs are checked against the references
before timing. Prints tables; writes <out>.json and <out>.md.

Without a CUDA device it says so and runs a small correctness smoke of every kernel (Triton interpreter) and the
CPU ratio "pure-PyTorch NF4 quantise + dequantise vs bitsandbytes on CPU" instead.

    python scripts/bench_kernels.py --seed 0 --out bench_kernels              # full sweep
    python scripts/bench_kernels.py --quick --budget-s 200 --out bench_kernels  # the headline cases only
    python scripts/bench_kernels.py --simulate                                # GPU code path on CPU, toy sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

# LLaMA projection weights [out, in] (Llama-2-7B and Llama-3-8B released shapes).
SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "14336x4096": (14336, 4096),
          "28672x8192": (28672, 8192)}
SHAPE_NOTES = {"4096x4096": "q/o, Llama 2 7B / Llama 3 8B", "11008x4096": "gate/up, Llama 2 7B",
               "14336x4096": "gate/up, Llama 3 8B", "28672x8192": "gate/up, Llama 3 70B"}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
RANKS = [8, 16, 64]
DTYPE = torch.bfloat16
SCALE = 2.0  # alpha / r


# ---- timing -----------------------------------------------------------------------------------------------

class Timer:
    """Median seconds per call: do_bench on CUDA (L2 flushed per call), a wall-clock loop on CPU (--simulate)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench
            warmup, rep = (10, 40) if self.quick else (25, 100)
            return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median") * 1e-3
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


    def graph(self, fn):
        """Median seconds per replay of a CUDA graph that holds one call of fn (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        from triton.testing import do_bench
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):             # warm-up on a side stream (compile, autotune, caches)
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        warmup, rep = (5, 25) if self.quick else (25, 100)
        t = do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") * 1e-3
        del graph
        return t


LEGEND = ("Each time cell: do_bench us / CUDA-graph us. do_bench = median of the plain Python call with L2 flushed "
          "(includes host launch overhead when the GPU waits for the host); graph = median replay of a CUDA graph "
          "holding one call (device time only). Rates and fractions: 'plain' from do_bench, 'graph' from the graph.")


def measure(timer, fn, **kw):
    """(seconds, None) or (None, error text): one failing column never stops the benchmark."""
    try:
        return timer(fn, **kw), None
    except Exception as e:  # noqa: BLE001 - report and go on
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def measure_graph(timer, fn):
    """(seconds or None, error text or None) for the CUDA-graph replay of fn."""
    try:
        return timer.graph(fn), None
    except Exception as e:  # noqa: BLE001 - e.g. an op that synchronises cannot be captured
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def cell(t, err, g, gerr) -> dict:
    """One timing cell: plain and graph microseconds with their errors."""
    return {"us": None if t is None else t * 1e6, "error": err,
            "graph_us": None if g is None else g * 1e6, "graph_error": gerr}


def checked(fn):
    """fn()'s value, or its error as text: a failing correctness check is recorded, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def compiled(fn):
    """torch.compile(fn), or None when compilation is unavailable."""
    try:
        return torch.compile(fn)
    except Exception:  # noqa: BLE001
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- anchors ----------------------------------------------------------------------------------------------

def measure_anchors(device, timer, simulate: bool) -> dict:
    n = (1 << 16) if simulate else (1 << 29)                 # bf16 elements: 1 GiB on a GPU
    src = torch.empty(n, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src))
    m = 256 if simulate else 8192
    a = torch.randn(m, m, dtype=DTYPE, device=device)
    b = torch.randn(m, m, dtype=DTYPE, device=device)
    t_gemm = timer(lambda: a @ b)
    anchors = {"copy_GBps": 2 * src.numel() * src.element_size() / t_copy / 1e9,
               "bf16_gemm_TFLOPs": 2 * m**3 / t_gemm / 1e12, "copy_bytes": 2 * src.numel() * 2, "gemm_size": m}
    return anchors


# ---- NF4 dequantisation -----------------------------------------------------------------------------------

def nf4_bytes(q) -> int:
    """Bytes one dequantisation moves: packed + absmax (+ absmax2 + offset) read, bf16 written."""
    read = q.packed.numel() + q.absmax.numel() * q.absmax.element_size()
    if q.double_quant:
        read += q.absmax2.numel() * 4 + 4
    return read + 2 * q.numel


def bench_dequant(shapes, device, timer, anchors, budget, compile_for, bnb) -> list[dict]:
    from kernels import nf4_quantize
    from kernels.nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton

    rows = []
    for name, (N, K) in shapes.items():
        if budget.out():
            rows.append({"shape": name, "skipped": "time budget"})
            continue
        q = nf4_quantize(torch.randn(N, K, device=device, dtype=DTYPE) * 0.02)
        reference = nf4_dequantize_reference(q, DTYPE)
        row = {"shape": name, "params": N * K, "bytes": nf4_bytes(q),
               "bit_exact_vs_reference": checked(lambda: torch.equal(nf4_dequantize_triton(q, DTYPE), reference))}
        columns = {"triton": lambda: nf4_dequantize_triton(q, DTYPE),
                   "eager": lambda: nf4_dequantize_reference(q, DTYPE)}
        if name in compile_for:
            fn = compiled(nf4_dequantize_reference)
            if fn is not None:
                columns["torch.compile"] = lambda: fn(q, DTYPE)
        if bnb is not None:
            try:
                packed, state = q.to_bnb()
                row["bnb_bit_exact_vs_ours"] = torch.equal(bnb.dequantize_4bit(packed, state), reference)
                columns["bitsandbytes"] = lambda: bnb.dequantize_4bit(packed, state)
            except Exception as e:  # noqa: BLE001
                row["bitsandbytes_error"] = f"{type(e).__name__}: {e}"[:160]
        for col, fn in columns.items():
            t, err = measure(timer, fn)
            g, gerr = measure_graph(timer, fn) if col != "eager" else (None, "not measured")
            row[col] = cell(t, err, g, gerr)
            for prefix, sec in (("", t), ("graph_", g)):
                row[col][prefix + "GBps"] = None if sec is None else row["bytes"] / sec / 1e9
                row[col][prefix + "frac_copy_bw"] = (None if sec is None
                                                     else row["bytes"] / sec / 1e9 / anchors["copy_GBps"])
        progress(row, ["triton", "eager", "torch.compile", "bitsandbytes"])
        rows.append(row)
        free(device)
    return rows


# ---- LoRA and QLoRA ---------------------------------------------------------------------------------------

def lora_eager(x, W, A, B, s):
    return x @ W.t() + s * ((x @ A.t()) @ B.t())


def lora_flops(M, N, K, r) -> float:
    return 2.0 * M * N * K * (1 + r / N + r / K)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_lora(cases, device, timer, anchors, budget, compile_for) -> list[dict]:
    from kernels import lora as lora_mod
    from kernels.lora import LoRAMatmul, lora_forward_triton, lora_gemm

    rows = []
    for name, M, r, backward in cases:
        N, K = SHAPES[name] if name in SHAPES else SIM_SHAPES[name]
        if budget.out():
            rows.append({"shape": name, "tokens": M, "rank": r, "skipped": "time budget"})
            continue
        x = torch.randn(M, K, device=device, dtype=DTYPE)
        W = torch.randn(N, K, device=device, dtype=DTYPE) / K**0.5
        A = torch.randn(r, K, device=device, dtype=DTYPE) / K**0.5
        B = torch.randn(N, r, device=device, dtype=DTYPE) / r**0.5
        out = torch.empty(M, N, device=device, dtype=DTYPE)
        row = {"shape": name, "tokens": M, "rank": r, "flops": lora_flops(M, N, K, r),
               "rel_err_vs_float32": checked(lambda: rel_err(lora_forward_triton(x, W, A, B, SCALE)[0], lora_eager(
                   x.float(), W.float(), A.float(), B.float(), SCALE)))}
        columns = {"triton": lambda: lora_forward_triton(x, W, A, B, SCALE),
                   "eager": lambda: lora_eager(x, W, A, B, SCALE),
                   "bf16_gemm": lambda: x @ W.t(),
                   "triton_gemm_no_lora": lambda: lora_gemm(x, W, W.stride(0), W.stride(1), None, None, 1.0, out)}
        for col, fn in columns.items():
            t, err = measure(timer, fn)
            g, gerr = measure_graph(timer, fn)
            flops = 2.0 * M * N * K if col in ("bf16_gemm", "triton_gemm_no_lora") else row["flops"]
            row[col] = cell(t, err, g, gerr)
            for prefix, sec in (("", t), ("graph_", g)):
                row[col][prefix + "TFLOPs"] = None if sec is None else flops / sec / 1e12
                row[col][prefix + "frac_gemm_peak"] = (None if sec is None
                                                       else flops / sec / 1e12 / anchors["bf16_gemm_TFLOPs"])
            if col == "triton":
                row["triton_config"] = str(getattr(lora_mod._tuned_gemm, "best_config", ""))
        if backward:
            xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
            dy = torch.randn(M, N, device=device, dtype=DTYPE)
            grads = [xg, Ag, Bg]
            fb = {"triton_fwd_bwd": lambda: LoRAMatmul.apply(xg, W, Ag, Bg, SCALE).backward(dy),
                  "eager_fwd_bwd": lambda: lora_eager(xg, W, Ag, Bg, SCALE).backward(dy)}
            for col, fn in fb.items():
                t, err = measure(timer, fn, grad_to_none=grads)
                row[col] = {"us": None if t is None else t * 1e6, "error": err}
        if (name, M, r) in compile_for:  # last: compiling takes seconds and must not delay the columns above
            fn = compiled(lora_eager)
            t, err = measure(timer, lambda: fn(x, W, A, B, SCALE)) if fn is not None else (None, "unavailable")
            row["torch.compile"] = cell(t, err, None, "not measured")
            row["torch.compile"]["TFLOPs"] = None if t is None else row["flops"] / t / 1e12
        progress(row, ["triton", "eager", "bf16_gemm", "triton_gemm_no_lora", "torch.compile"])
        rows.append(row)
        free(device)
    return rows


def bench_qlora(cases, device, timer, anchors, budget, compile_for, bnb) -> list[dict]:
    from kernels import nf4_quantize, qlora_matmul
    from kernels import qlora as qlora_mod
    from kernels.nf4_dequant import nf4_dequantize_reference

    rows = []
    quantised = {}
    for name, M, r in cases:
        N, K = SHAPES[name] if name in SHAPES else SIM_SHAPES[name]
        if budget.out():
            rows.append({"shape": name, "tokens": M, "rank": r, "skipped": "time budget"})
            continue
        if name not in quantised:
            quantised.clear()
            free(device)
            quantised[name] = nf4_quantize(torch.randn(N, K, device=device, dtype=DTYPE) / K**0.5)
        q = quantised[name]
        x = torch.randn(M, K, device=device, dtype=DTYPE)
        A = torch.randn(r, K, device=device, dtype=DTYPE) / K**0.5
        B = torch.randn(N, r, device=device, dtype=DTYPE) / r**0.5
        with torch.no_grad():
            W_dq = nf4_dequantize_reference(q, DTYPE)
            expected = lora_eager(x.float(), W_dq.float(), A.float(), B.float(), SCALE)
            row = {"shape": name, "tokens": M, "rank": r, "flops": lora_flops(M, N, K, r),
                   "rel_err_fused": checked(lambda: rel_err(qlora_matmul(x, q, A, B, SCALE, fused=True), expected)),
                   "rel_err_dequant_gemm": checked(lambda: rel_err(qlora_matmul(x, q, A, B, SCALE, fused=False),
                                                                   expected))}
            row["fused_config"] = str(getattr(qlora_mod._tuned_qgemm, "best_config", ""))
            columns = {"triton_fused": lambda: qlora_matmul(x, q, A, B, SCALE, fused=True),
                       "triton_dequant_gemm": lambda: qlora_matmul(x, q, A, B, SCALE, fused=False),
                       "eager_dequant_matmul": lambda: lora_eager(x, nf4_dequantize_reference(q, DTYPE), A, B, SCALE),
                       "bf16_lora_unquantised": lambda: lora_eager(x, W_dq, A, B, SCALE)}
            if bnb is not None:
                packed, state = q.to_bnb()
                columns["bnb_dequant_matmul"] = lambda: lora_eager(x, bnb.dequantize_4bit(packed, state), A, B, SCALE)
            if (name, M) in compile_for:  # last: compiling takes seconds
                fn = compiled(lambda x, A, B: lora_eager(x, nf4_dequantize_reference(q, DTYPE), A, B, SCALE))
                if fn is not None:
                    columns["torch.compile"] = lambda: fn(x, A, B)
            for col, fn in columns.items():
                t, err = measure(timer, fn)
                g, gerr = (measure_graph(timer, fn) if col not in ("eager_dequant_matmul", "torch.compile")
                           else (None, "not measured"))
                row[col] = cell(t, err, g, gerr)
                row[col]["TFLOPs"] = None if t is None else row["flops"] / t / 1e12
        progress(row, ["triton_fused", "triton_dequant_gemm", "eager_dequant_matmul", "bnb_dequant_matmul"])
        rows.append(row)
        free(device)
    return rows


def progress(row, cols):
    """One line per measured case, so a log cut short still holds the numbers."""
    label = " ".join(f"{k}={row[k]}" for k in ("shape", "tokens", "rank") if k in row)
    print(f"  {label}: " + ", ".join(f"{c} {fmt_us(row, c)} us" for c in cols if c in row), flush=True)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def out(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


# ---- targets ----------------------------------------------------------------------------------------------

def us(row, col, key="us"):
    cell_ = row.get(col) or {}
    return cell_.get(key) if isinstance(cell_, dict) else None


def evaluate_targets(dequant, lora, qlora) -> list[dict]:
    """Each target evaluated on the do_bench times ('value', 'met') and on the CUDA-graph times ('graph_value',
    'graph_met')."""
    targets = []

    def add(name, compute, fmt, ok):
        entry = {"target": name, "value": "-", "met": None, "graph_value": "-", "graph_met": None}
        for prefix, key in (("", "us"), ("graph_", "graph_us")):
            value = compute(key)
            if value is not None:
                entry[prefix + "value"], entry[prefix + "met"] = fmt(value), (ok(value) if ok else None)
        if entry["value"] != "-" or entry["graph_value"] != "-":
            targets.append(entry)

    def ratio(row, num, den):
        return lambda key: (us(row, num, key) / us(row, den, key) if us(row, num, key) and us(row, den, key)
                            else None)

    for row in dequant:
        if row.get("params", 0) >= 45_000_000 and us(row, "triton"):
            add(f"NF4 dequant {row['shape']}: >= 80% of copy bandwidth",
                lambda key, row=row: row["triton"].get("frac_copy_bw" if key == "us" else "graph_frac_copy_bw"),
                lambda v: f"{100 * v:.1f}%", lambda v: v >= 0.80)
            add(f"NF4 dequant {row['shape']}: faster than bitsandbytes", ratio(row, "bitsandbytes", "triton"),
                lambda v: f"{v:.2f}x", lambda v: v > 1.0)
    for row in lora:
        if row.get("shape") == "4096x4096" and row.get("tokens") == 4096 and row.get("rank") == 16:
            add("fused LoRA fwd 4096x4096 r16 M4096: <= 1.10x bare bf16 GEMM (cuBLAS)",
                ratio(row, "triton", "bf16_gemm"), lambda v: f"{v:.3f}x", lambda v: v <= 1.10)
            add("  (for reference) vs the same Triton GEMM without LoRA", ratio(row, "triton", "triton_gemm_no_lora"),
                lambda v: f"{v:.3f}x", None)
            add("fused LoRA fwd 4096x4096 r16 M4096: >= 1.3x faster than eager", ratio(row, "eager", "triton"),
                lambda v: f"{v:.2f}x", lambda v: v >= 1.3)
    for row in qlora:
        if row.get("tokens", 1 << 30) <= 16 and us(row, "triton_fused") and us(row, "eager_dequant_matmul"):
            # eager dequant+matmul is timed plainly only (it is the slow side); the graph column uses that time
            add(f"fused NF4+LoRA {row['shape']} M{row['tokens']}: >= 2x eager dequant+matmul",
                lambda key, row=row: (us(row, "eager_dequant_matmul") / us(row, "triton_fused", key)
                                      if us(row, "triton_fused", key) else None),
                lambda v: f"{v:.1f}x", lambda v: v >= 2.0)
    return targets


# ---- output -----------------------------------------------------------------------------------------------

def fmt_us(row, col):
    """'plain / graph' microseconds (LEGEND); '-' for a column not run."""
    cell_ = row.get(col)
    if not isinstance(cell_, dict):
        return "-"
    plain = "err" if cell_.get("us") is None else f"{cell_['us']:.1f}"
    if cell_.get("graph_us") is not None:
        return f"{plain} / {cell_['graph_us']:.1f}"
    return plain if cell_.get("graph_error") in (None, "not measured") else f"{plain} / err"


def fmt_pct(cell_, key):
    return f"{100 * cell_[key]:.0f}%" if cell_.get(key) else "-"


def fmt_err(value):
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def tables(result) -> list[tuple[str, list[str], list[list[str]]]]:
    anchors = result["anchors"]
    out = [("Machine anchors", ["quantity", "value"],
            [["device", result["device"]], ["copy bandwidth (GB/s)", f"{anchors['copy_GBps']:.0f}"],
             ["bf16 GEMM (TFLOP/s)", f"{anchors['bf16_gemm_TFLOPs']:.0f}"]])]
    cols = ["triton", "eager", "torch.compile", "bitsandbytes"]
    body = []
    for row in result["dequant"]:
        if "skipped" in row:
            body.append([row["shape"], "skipped"] + [""] * 8)
            continue
        t = row["triton"]
        body.append([row["shape"], f"{row['params'] / 1e6:.1f}M"] + [fmt_us(row, c) for c in cols]
                    + [f"{t['GBps']:.0f}" if t.get("GBps") else "-", fmt_pct(t, "frac_copy_bw"),
                       f"{t['graph_GBps']:.0f}" if t.get("graph_GBps") else "-", fmt_pct(t, "graph_frac_copy_bw"),
                       str(row.get("bit_exact_vs_reference")), str(row.get("bnb_bit_exact_vs_ours", "-"))])
    out.append(("NF4 dequantisation to bf16 (us, do_bench / graph; GB/s and % of copy bandwidth for Triton, plain "
                "and graph)",
                ["shape", "params"] + cols + ["GB/s plain", "% copy BW plain", "GB/s graph", "% copy BW graph",
                                              "bit-exact vs ref", "bnb == ours"], body))
    cols = ["triton", "eager", "torch.compile", "bf16_gemm", "triton_gemm_no_lora"]
    body = []
    for row in result["lora"]:
        if "skipped" in row:
            body.append([row["shape"], str(row["tokens"]), str(row["rank"]), "skipped"] + [""] * 9)
            continue
        t = row["triton"]
        ratio = " / ".join(f"{us(row, 'triton', k) / us(row, 'bf16_gemm', k):.3f}"
                           if us(row, "triton", k) and us(row, "bf16_gemm", k) else "-" for k in ("us", "graph_us"))
        body.append([row["shape"], str(row["tokens"]), str(row["rank"])] + [fmt_us(row, c) for c in cols]
                    + [f"{t['TFLOPs']:.0f}" if t.get("TFLOPs") else "-", fmt_pct(t, "frac_gemm_peak"),
                       f"{t['graph_TFLOPs']:.0f}" if t.get("graph_TFLOPs") else "-", fmt_pct(t, "graph_frac_gemm_peak"),
                       ratio,
                       fmt_us(row, "triton_fwd_bwd") + " / " + fmt_us(row, "eager_fwd_bwd"),
                       fmt_err(row.get("rel_err_vs_float32"))])
    out.append(("Fused LoRA linear, forward (us, do_bench / graph); fwd+bwd Triton / eager (us, do_bench); rel. "
                "error vs float32 eager",
                ["shape", "M", "r"] + cols + ["TFLOP/s plain", "% GEMM peak plain", "TFLOP/s graph",
                                              "% GEMM peak graph", "triton / bf16 GEMM (plain / graph)", "fwd+bwd",
                                              "rel err"], body))
    cols = ["triton_fused", "triton_dequant_gemm", "eager_dequant_matmul", "torch.compile", "bnb_dequant_matmul",
            "bf16_lora_unquantised"]
    body = []
    for row in result["qlora"]:
        if "skipped" in row:
            body.append([row["shape"], str(row["tokens"]), str(row["rank"]), "skipped"] + [""] * 6)
            continue
        faster = " / ".join(
            ("-" if not (us(row, "triton_fused", k) and us(row, "triton_dequant_gemm", k))
             else "fused" if us(row, "triton_fused", k) < us(row, "triton_dequant_gemm", k) else "dequant+GEMM")
            for k in ("us", "graph_us"))
        body.append([row["shape"], str(row["tokens"]), str(row["rank"])] + [fmt_us(row, c) for c in cols]
                    + [faster, fmt_err(row.get("rel_err_fused")) + " / " + fmt_err(row.get("rel_err_dequant_gemm"))])
    out.append(("QLoRA linear, forward (us, do_bench / graph); rel. error fused / dequant+GEMM vs float32 LoRA on W_dq",
                ["shape", "M", "r"] + cols + ["faster Triton path (plain / graph)", "rel err"], body))
    met = {True: "yes", False: "NO", None: ""}
    out.append(("Targets (do_bench: plain Python call; graph: CUDA-graph replay, device time only)",
                ["target", "do_bench value", "met", "graph value", "met (graph)"],
                [[t["target"], t["value"], met[t["met"]], t.get("graph_value", "-"), met[t.get("graph_met")]]
                 for t in result["targets"]]))
    return out


def print_table(title, header, body):
    """Aligned plain-text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for line in body:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))


def markdown(result) -> str:
    lines = [f"# Kernel benchmark ({result['device']})", "",
             f"torch {result['torch']}, triton {result['triton']}, bitsandbytes {result['bitsandbytes']}; "
             f"seed {result['seed']}; {'quick' if result['quick'] else 'full'} sweep; "
             f"{result['elapsed_s']:.0f} s.", "", LEGEND, ""]
    for title, header, body in tables(result):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)


# ---- CPU-only mode ----------------------------------------------------------------------------------------

def cpu_only(args) -> dict:
    """Correctness smoke of every kernel in the Triton interpreter, and the CPU NF4 ratio vs bitsandbytes."""
    from kernels import lora_matmul, nf4_dequantize, nf4_quantize, qlora_matmul
    from kernels.lora import lora_matmul_reference
    from kernels.nf4_dequant import nf4_dequantize_reference
    from kernels.qlora import qlora_matmul_reference

    print("No CUDA device: no GPU timings. Running a correctness smoke of the kernels (Triton interpreter) and the "
          "CPU ratio of pure-PyTorch NF4 quantise + dequantise vs bitsandbytes instead.")
    smoke = []
    os.environ["KERNELS_BACKEND"] = "triton"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, 70).to(dtype)
        W = (torch.randn(48, 70) / 8).to(dtype)
        A, B = (torch.randn(8, 70) / 8).to(dtype), torch.randn(48, 8).to(dtype)
        q = nf4_quantize(W)
        checks = {
            "nf4_dequantize bit-exact": torch.equal(nf4_dequantize(q, dtype), nf4_dequantize_reference(q, dtype)),
            "lora_matmul rel err": rel_err(lora_matmul(x, W, A, B, 0.5), lora_matmul_reference(
                x.double(), W.double(), A.double(), B.double(), 0.5)),
            "qlora_matmul rel err": rel_err(qlora_matmul(x, q, A, B, 0.5), qlora_matmul_reference(
                x.double(), q, A.double(), B.double(), 0.5)),
        }
        smoke.append({"dtype": str(dtype).replace("torch.", ""), **checks})
    os.environ.pop("KERNELS_BACKEND")

    # Each side is timed in its own fresh process, alternating, best of all rounds: loading bitsandbytes' native
    # library (its own OpenMP runtime) changes the speed of PyTorch's CPU ops in the same process, and a shared
    # host's load drifts during a run.
    timings = {"ours_quantise_s": float("inf"), "ours_dequantise_s": float("inf"),
               "bnb_quantise_s": float("inf"), "bnb_dequantise_s": float("inf")}
    for _ in range(3):
        for side in ("ours", "bnb"):
            measured = _time_nf4_cpu(side)
            if measured is None:
                timings["bitsandbytes"] = "not installed"
                continue
            for key, value in measured.items():
                timings[key] = min(timings[key], value) if isinstance(value, float) else value
    if timings["bnb_quantise_s"] == float("inf"):
        for key in ("bnb_quantise_s", "bnb_dequantise_s"):
            timings.pop(key)
    else:
        timings["ratio_bnb_over_ours"] = ((timings["bnb_quantise_s"] + timings["bnb_dequantise_s"])
                                          / (timings["ours_quantise_s"] + timings["ours_dequantise_s"]))
    print_table("Correctness smoke (interpreter vs float64 references)", ["dtype", "dequant bit-exact",
                "lora rel err", "qlora rel err"],
                [[s["dtype"], str(s["nf4_dequantize bit-exact"]), f"{s['lora_matmul rel err']:.1e}",
                  f"{s['qlora_matmul rel err']:.1e}"] for s in smoke])
    body = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in timings.items()]
    print_table("NF4 quantise + dequantise of a 4096x4096 bf16 weight on CPU (s, best of 3 fresh processes x 5 "
                "runs); ratio > 1: ours faster",
                ["quantity", "value"], body)
    return {"device": "cpu (no CUDA device)", "smoke": smoke, "cpu_nf4": timings, "threads": torch.get_num_threads()}


_NF4_CPU_TIMING = """
import json, sys, time, torch
torch.manual_seed(0)
w = torch.randn(4096, 4096, dtype=torch.bfloat16) * 0.02
def best(fn, n=5):
    times = []
    for _ in range(n):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)
if sys.argv[1] == "ours":
    from kernels import NF4Weight, nf4_quantize
    from kernels.nf4_dequant import nf4_dequantize_reference
    q = nf4_quantize(w)
    out = {"ours_quantise_s": best(lambda: nf4_quantize(w)), "ours_dequantise_s": best(lambda: nf4_dequantize_reference(q))}
else:
    import bitsandbytes.functional as bnb
    from kernels import NF4Weight, nf4_quantize
    from kernels.nf4_dequant import nf4_dequantize_reference
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = {"bnb_quantise_s": best(lambda: bnb.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                             quant_type="nf4")),
           "bnb_dequantise_s": best(lambda: bnb.dequantize_4bit(packed, state)),
           "bit_exact_vs_bnb": bool(torch.equal(nf4_quantize(w).packed, packed) and torch.equal(
               nf4_dequantize_reference(NF4Weight.from_bnb(packed, state)), bnb.dequantize_4bit(packed, state)))}
print("RESULT " + json.dumps(out))
"""


def _time_nf4_cpu(side: str):
    """Timings of one side ("ours" / "bnb") of the CPU NF4 comparison, measured in a fresh Python process."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, "-c", _NF4_CPU_TIMING, side], capture_output=True, text=True, env=env)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if side == "bnb" and "ModuleNotFoundError" in run.stderr:
        return None
    raise RuntimeError(f"timing subprocess ({side}) failed:\n{run.stderr[-2000:]}")


# ---- main -------------------------------------------------------------------------------------------------

SIM_SHAPES = {"64x96": (64, 96), "48x128": (48, 128)}


def stages(args):
    """The sweep as ordered stages (kind, cases, torch.compile set); the issue's target cases come first, so that a
    time budget cuts the extras rather than the targets."""
    if args.simulate:
        return [("dequant", dict(SIM_SHAPES), set()),
                ("lora", [("64x96", 40, 8, True), ("48x128", 5, 16, False)], set()),
                ("qlora", [("64x96", m, 8) for m in (1, 16, 40)], set())]
    if args.quick:
        return [
            ("dequant", dict(SHAPES), set()),
            ("lora", [("4096x4096", 4096, 16, False)], {("4096x4096", 4096, 16)}),
            ("qlora", [(s, m, 16) for s in ("4096x4096", "14336x4096", "28672x8192") for m in (1, 16)],
             {("4096x4096", 16)}),
            ("lora", [("14336x4096", 4096, 16, True), ("4096x4096", 16384, 16, False), ("4096x4096", 4096, 64, False),
                      ("4096x4096", 4096, 8, False), ("4096x4096", 256, 16, False), ("4096x4096", 16, 16, False),
                      ("11008x4096", 4096, 16, False), ("28672x8192", 4096, 16, False)], set()),
            ("qlora", [(s, m, 16) for s in ("4096x4096", "14336x4096") for m in (64, 256, 4096)], set()),
        ]
    return [
        ("dequant", dict(SHAPES), set(SHAPES)),
        ("lora", [(s, m, r, m == 4096 and r == 16) for s in SHAPES for r in RANKS for m in TOKENS],
         {(s, 4096, 16) for s in SHAPES}),
        ("qlora", [(s, m, 16) for s in SHAPES for m in TOKENS], {(s, m) for s in SHAPES for m in (1, 16)}),
    ]


def save(result, out):
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    if "anchors" in result:
        with open(out + ".md", "w") as f:
            f.write(markdown(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_kernels", help="path stem: writes <out>.json and <out>.md")
    parser.add_argument("--quick", action="store_true", help="headline cases only (about 3 minutes on an H200)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new cases after this many seconds (the rest are marked skipped)")
    parser.add_argument("--simulate", action="store_true",
                        help="run the GPU code path on CPU at toy sizes (checks the script, not the speed)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    bnb, bnb_version = None, "not installed"
    if torch.cuda.is_available() or args.simulate:   # CPU-only mode imports it late (see cpu_only)
        try:
            import bitsandbytes
            import bitsandbytes.functional as bnb
            bnb_version = bitsandbytes.__version__
        except Exception:  # noqa: BLE001 - missing, or its native library failed to load
            bnb = None
    if not torch.cuda.is_available() and not args.simulate:
        result = cpu_only(args)
    else:
        if args.simulate:
            os.environ["KERNELS_BACKEND"] = "triton"
            device = torch.device("cpu")
            name = "cpu (simulated GPU sweep, interpreter; timings meaningless)"
        else:
            device = torch.device("cuda")
            name = torch.cuda.get_device_name(device)
        timer = Timer(device, args.quick or args.simulate)
        budget = Budget(args.budget_s)
        anchors = measure_anchors(device, timer, args.simulate)
        print(f"{name}: copy {anchors['copy_GBps']:.0f} GB/s, bf16 GEMM {anchors['bf16_gemm_TFLOPs']:.0f} TFLOP/s")
        result = {"device": name, "anchors": anchors, "dequant": [], "lora": [], "qlora": [], "targets": [],
                  "torch": torch.__version__, "triton": triton_version, "bitsandbytes": bnb_version,
                  "seed": args.seed, "quick": args.quick, "elapsed_s": 0.0}
        for kind, cases, compile_for in stages(args):
            print(f"-- {kind}", flush=True)
            if kind == "dequant":
                result[kind] += bench_dequant(cases, device, timer, anchors, budget, compile_for, bnb)
            elif kind == "lora":
                result[kind] += bench_lora(cases, device, timer, anchors, budget, compile_for)
            else:
                result[kind] += bench_qlora(cases, device, timer, anchors, budget, compile_for, bnb)
            result["targets"] = evaluate_targets(result["dequant"], result["lora"], result["qlora"])
            result["elapsed_s"] = time.perf_counter() - start
            save(result, args.out)  # after every stage: a run stopped from outside keeps what it measured
    if bnb is None:
        try:
            import bitsandbytes
            bnb_version = bitsandbytes.__version__
        except Exception:  # noqa: BLE001
            pass
    result.update(torch=torch.__version__, triton=triton_version, bitsandbytes=bnb_version, seed=args.seed,
                  quick=args.quick, python=platform.python_version(), elapsed_s=time.perf_counter() - start)
    if "anchors" in result:
        print("\n" + LEGEND)
        for title, header, body in tables(result):   # the targets table is the last one printed
            print_table(title, header, body)
    save(result, args.out)
    print(f"\nwrote {args.out}.json" + (f" and {args.out}.md" if "anchors" in result else "")
          + f" ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
