"""Reporting for `bench_kernels.py`: the issue's targets evaluated on the measured rows, the tables (printed and
written as markdown), the per-case progress line (said as a case starts, finished when it ends), OUT/results.json
and OUT/results.md, and the relative error that the accuracy columns report.

A row is one measured case: {"shape", "tokens", "rank", <column>: cell, ...}, where a cell is
{"us", "error", "graph_us", "graph_error", rates...} (see `cell` in bench_kernels.py); a column not run is absent.
"""

from __future__ import annotations

from scripts._cli import write_results

LEGEND = ("Each time cell: do_bench us / CUDA-graph us. do_bench = median of the plain Python call with L2 flushed "
          "(includes host launch overhead when the GPU waits for the host); graph = median replay of a CUDA graph "
          "holding one call (device time only). Rates and fractions: 'plain' from do_bench, 'graph' from the graph.")


CANDIDATES_SHOWN = 8  # rows of each autotuning-candidates table


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float32: the 'rel err' columns and the CPU smoke."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def starting(**case):
    """The case being measured, said before its first call: autotuning or torch.compile can take a minute on one."""
    print("  " + " ".join(f"{k}={v}" for k, v in case.items()) + ": ", end="", flush=True)


def progress(row, cols):
    """The rest of the case's line, its times: a log cut short still holds the numbers."""
    print(", ".join(f"{c} {fmt_us(row, c)} us" for c in cols if c in row), flush=True)


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
            add("  (for reference) cuBLAS GEMM + in-place rank-r addmm / fused", ratio(row, "cublas_addmm", "triton"),
                lambda v: f"{v:.2f}x", None)
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
            body.append([row["shape"], "skipped"])
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
    cols = ["triton", "eager", "cublas_addmm", "torch.compile", "bf16_gemm", "triton_gemm_no_lora"]
    body = []
    for row in result["lora"]:
        if "skipped" in row:
            body.append([row["shape"], str(row["tokens"]), str(row["rank"]), "skipped"])
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
    for kind, row in [("NF4 dequant", row) for row in result["dequant"]] + [("Fused LoRA GEMM", row)
                                                                           for row in result["lora"]]:
        if row.get("triton_candidates"):
            case = row["shape"] + (f" M{row['tokens']} r{row['rank']}" if "tokens" in row else "")
            out.append((f"{kind} {case}: fastest autotuning candidates (the autotuner's own timing, us)",
                        ["candidate", "us", "vs fastest"],
                        [[c, f"{t:.1f}", f"{t / row['triton_candidates'][0][1]:.3f}"]
                         for c, t in row["triton_candidates"][:CANDIDATES_SHOWN]]))
    cols = ["triton_fused", "triton_fused_one_split", "triton_dequant_gemm", "eager_dequant_matmul", "torch.compile",
            "bnb_dequant_matmul", "bf16_lora_unquantised"]
    body = []
    for row in result["qlora"]:
        if "skipped" in row:
            body.append([row["shape"], str(row["tokens"]), str(row["rank"]), "-", "skipped"])
            continue
        faster = " / ".join(
            ("-" if not (us(row, "triton_fused", k) and us(row, "triton_dequant_gemm", k))
             else "fused" if us(row, "triton_fused", k) < us(row, "triton_dequant_gemm", k) else "dequant+GEMM")
            for k in ("us", "graph_us"))
        body.append([row["shape"], str(row["tokens"]), str(row["rank"]), str(row.get("fused_split_k", "-"))]
                    + [fmt_us(row, c) for c in cols]
                    + [faster, fmt_err(row.get("rel_err_fused")) + " / " + fmt_err(row.get("rel_err_dequant_gemm"))])
    out.append(("QLoRA linear, forward (us, do_bench / graph); rel. error fused / dequant+GEMM vs float32 LoRA on W_dq",
                ["shape", "M", "r", "split-K"] + cols + ["faster Triton path (plain / graph)", "rel err"], body))
    met = {True: "yes", False: "NO", None: ""}
    out.append(("Targets (do_bench: plain Python call; graph: CUDA-graph replay, device time only)",
                ["target", "do_bench value", "met", "graph value", "met (graph)"],
                [[t["target"], t["value"], met[t["met"]], t.get("graph_value", "-"), met[t.get("graph_met")]]
                 for t in result["targets"]]))
    return [(title, header, [row + [""] * (len(header) - len(row)) for row in body]) for title, header, body in out]


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


def save(result, out):
    """out/results.json, and out/results.md (the tables) once there are GPU results."""
    write_results(out, result, markdown(result) if "anchors" in result else None)
