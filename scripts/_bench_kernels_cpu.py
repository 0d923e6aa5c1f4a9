"""CPU-only mode of `bench_kernels.py` (no CUDA device): a correctness smoke of every kernel in the Triton
interpreter against float64 references, and the CPU ratio "pure-PyTorch NF4 quantise + dequantise vs bitsandbytes",
each side timed in a fresh Python process."""

from __future__ import annotations

import json
import os

import torch

from scripts._bench_kernels_report import print_table, rel_err


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
        print(f"  smoke {str(dtype).removeprefix('torch.')} (interpreter)", flush=True)
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
    for round_ in range(3):
        for side in ("ours", "bnb"):
            print(f"  NF4 quantise + dequantise on CPU, round {round_ + 1}/3: {side} (a fresh process)", flush=True)
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
