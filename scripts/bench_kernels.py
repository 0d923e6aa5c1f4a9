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
before timing. Prints a line as each case starts and one with its times when it ends (autotuning and torch.compile
can take a minute on one case), then the tables; writes OUT/results.json (after every stage, so a run stopped from
outside keeps what it measured) and OUT/results.md (the tables); OUT defaults to runs/bench_kernels/<timestamp>.

Without a CUDA device it says so and runs a small correctness smoke of every kernel (Triton interpreter) and the
CPU ratio "pure-PyTorch NF4 quantise + dequantise vs bitsandbytes on CPU" instead.
Targets, tables and the saved files: _bench_kernels_report.py; the CPU-only mode: _bench_kernels_cpu.py.

    python scripts/bench_kernels.py --seed 0 --out runs/bench_kernels/full       # full sweep
    python scripts/bench_kernels.py --quick --budget-s 200                       # the headline cases only
    python scripts/bench_kernels.py --simulate                                   # GPU code path on CPU, toy sizes
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `scripts`, `kernels`
# Without a CUDA device the kernels run in Triton's interpreter, which has to be chosen before triton is first
# imported (kernels/_triton.py); an explicit TRITON_INTERPRET wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scripts._bench_kernels_cpu import cpu_only  # noqa: E402
from scripts._bench_kernels_report import (LEGEND, evaluate_targets, print_table, progress, rel_err,  # noqa: E402
                                           save, starting, tables)
from scripts._cli import experiment_parser, positive, run_cli, start  # noqa: E402

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
    from kernels.nf4_dequant import _tuned_dequant, nf4_dequantize_reference, nf4_dequantize_triton

    rows = []
    for name, (N, K) in shapes.items():
        if budget.out():
            rows.append({"shape": name, "skipped": "time budget"})
            continue
        starting(shape=name)
        q = nf4_quantize(torch.randn(N, K, device=device, dtype=DTYPE) * 0.02)
        reference = nf4_dequantize_reference(q, DTYPE)
        tuned = _tuned_dequant(q.blocksize // 2)
        tuned.configs_timings = None                    # set again only if this case's first call tunes a new key
        row = {"shape": name, "params": N * K, "bytes": nf4_bytes(q),
               "bit_exact_vs_reference": checked(lambda: torch.equal(nf4_dequantize_triton(q, DTYPE), reference)),
               "triton_candidates": candidate_times(tuned)}
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


def lora_cublas_addmm(x, W, A, B, s):
    """The best unfused composition: cuBLAS GEMM, then the rank-r update added in place (one more pass over y)."""
    return (x @ W.t()).addmm_(x @ A.t(), B.t(), alpha=s)


def lora_flops(M, N, K, r) -> float:
    return 2.0 * M * N * K * (1 + r / N + r / K)


def candidate_times(tuned) -> list:
    """[[config, us], ...] fastest first: the autotuner's own timing of every candidate for the key it tuned last
    (its short do_bench, L2 not flushed); [] when the last call found its key tuned already."""
    timings = getattr(tuned, "configs_timings", None)
    if not isinstance(timings, dict):  # None, or the list form of Triton's on-disk autotuning cache
        return []

    def label(c):
        kw = dict(c.kwargs)
        if "BLOCK_K" in kw:  # the GEMM: tile BMxBNxBK
            tile = f"{kw.pop('BLOCK_M')}x{kw.pop('BLOCK_N')}x{kw.pop('BLOCK_K')} "
            kw.pop("GROUP_M", None)
        else:
            tile = ""
        return tile + " ".join(f"{k}={v}" for k, v in kw.items()) + f" stages={c.num_stages} warps={c.num_warps}"

    rows = [[label(c), 1e3 * (t[0] if isinstance(t, (list, tuple)) else t)] for c, t in timings.items()]
    return sorted(rows, key=lambda row: row[1])


def bench_lora(cases, device, timer, anchors, budget, compile_for) -> list[dict]:
    from kernels import lora as lora_mod
    from kernels.lora import LoRAMatmul, lora_forward_triton, lora_gemm

    rows = []
    for name, M, r, backward in cases:
        N, K = SHAPES[name] if name in SHAPES else SIM_SHAPES[name]
        if budget.out():
            rows.append({"shape": name, "tokens": M, "rank": r, "skipped": "time budget"})
            continue
        starting(shape=name, tokens=M, rank=r)
        x = torch.randn(M, K, device=device, dtype=DTYPE)
        W = torch.randn(N, K, device=device, dtype=DTYPE) / K**0.5
        A = torch.randn(r, K, device=device, dtype=DTYPE) / K**0.5
        B = torch.randn(N, r, device=device, dtype=DTYPE) / r**0.5
        out = torch.empty(M, N, device=device, dtype=DTYPE)
        lora_mod._tuned_gemm.configs_timings = None     # set again only if this case's first call tunes a new key
        row = {"shape": name, "tokens": M, "rank": r, "flops": lora_flops(M, N, K, r),
               "rel_err_vs_float32": checked(lambda: rel_err(lora_forward_triton(x, W, A, B, SCALE)[0], lora_eager(
                   x.float(), W.float(), A.float(), B.float(), SCALE))),
               "triton_candidates": candidate_times(lora_mod._tuned_gemm)}
        columns = {"triton": lambda: lora_forward_triton(x, W, A, B, SCALE),
                   "eager": lambda: lora_eager(x, W, A, B, SCALE),
                   "cublas_addmm": lambda: lora_cublas_addmm(x, W, A, B, SCALE),
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
        progress(row, ["triton", "eager", "cublas_addmm", "bf16_gemm", "triton_gemm_no_lora", "torch.compile"])
        rows.append(row)
        free(device)
    return rows


def bench_qlora(cases, device, timer, anchors, budget, compile_for, bnb) -> list[dict]:
    from kernels import nf4_quantize, qlora_matmul
    from kernels import qlora as qlora_mod
    from kernels import schedules
    from kernels.nf4_dequant import nf4_dequantize_reference

    rows = []
    quantised = {}
    for name, M, r in cases:
        N, K = SHAPES[name] if name in SHAPES else SIM_SHAPES[name]
        if budget.out():
            rows.append({"shape": name, "tokens": M, "rank": r, "skipped": "time budget"})
            continue
        starting(shape=name, tokens=M, rank=r)
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
            row["fused_split_k"] = schedules.split_k(M, N, K, device)
            fused_kernel = qlora_mod._tuned_split_k if row["fused_split_k"] > 1 else qlora_mod._tuned_qgemm
            row["fused_config"] = str(getattr(fused_kernel, "best_config", ""))
            columns = {"triton_fused": lambda: qlora_matmul(x, q, A, B, SCALE, fused=True),
                       "triton_fused_one_split": one_split(schedules, lambda: qlora_matmul(x, q, A, B, SCALE,
                                                                                         fused=True)),
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
        progress(row, ["triton_fused", "triton_fused_one_split", "triton_dequant_gemm", "eager_dequant_matmul",
                       "bnb_dequant_matmul"])
        rows.append(row)
        free(device)
    return rows


def one_split(schedules, fn):
    """fn run with the fused kernel's split-K switched off (the kernel as run 2 timed it), for comparison."""
    def run():
        saved, schedules.MAX_SPLIT_K = schedules.MAX_SPLIT_K, 1
        try:
            return fn()
        finally:
            schedules.MAX_SPLIT_K = saved
    return run


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def out(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


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


parser = experiment_parser(__doc__, "bench_kernels")
parser.add_argument("--quick", action="store_true", help="headline cases only (about 3 minutes on an H200)")
parser.add_argument("--budget-s", type=positive(float), default=float("inf"),
                    help="stop starting new cases after this many seconds (the rest are marked skipped)")
parser.add_argument("--simulate", action="store_true",
                    help="run the GPU code path on CPU at toy sizes (checks the script, not the speed)")


def main(argv=None):
    args = parser.parse_args(argv)
    out = start(args)
    began = time.perf_counter()

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
            result["elapsed_s"] = time.perf_counter() - began
            save(result, out)  # after every stage: a run stopped from outside keeps what it measured
    if bnb is None:
        try:
            import bitsandbytes
            bnb_version = bitsandbytes.__version__
        except Exception:  # noqa: BLE001
            pass
    result.update(torch=torch.__version__, triton=triton_version, bitsandbytes=bnb_version, seed=args.seed,
                  quick=args.quick, python=platform.python_version(), elapsed_s=time.perf_counter() - began)
    if "anchors" in result:
        print("\n" + LEGEND)
        for title, header, body in tables(result):   # the targets table is the last one printed
            print_table(title, header, body)
    save(result, out)
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'results.md'}" if "anchors" in result else "")
          + f" ({result['elapsed_s']:.0f} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    run_cli(main)
