"""Long sequences: (chunked) causal attention without a T×T mask, checked for values and for memory.

Values: `llama.attention.causal_attention` (query pieces, no dense mask) against attention written out here with a
dense bool mask from the pattern's definition. Memory: the peak resident set of a whole-model forward, measured in a
fresh subprocess; a dense float32 T×T mask alone would be T²·4 bytes (256 MiB at 8k, 4 GiB at 32k).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.attention import causal_attention, chunked_causal_mask
from tests.reference.tolerance import forward_tolerance, relative_error


def pattern(T: int, start: int, chunk) -> torch.Tensor:
    """Key j visible to query i (absolute position start+i) iff j <= start+i and, with chunks, same chunk."""
    S = start + T
    keep = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = start + i
        for j in range(S):
            keep[i, j] = j <= p and (chunk is None or j // chunk == p // chunk)
    return keep


def dense_attention(q, k, v, keep):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("T, start, chunk", [(37, 0, None), (37, 0, 8), (37, 0, 37), (37, 0, 64), (9, 20, 8),
                                             (1, 23, 8), (1, 24, 8), (16, 8, 8), (30, 5, None), (30, 5, 7)])
@pytest.mark.parametrize("implementation, block", [("sdpa", 1024), ("math", 1024), ("math", 5)])
def test_causal_attention_equals_the_dense_pattern(T, start, chunk, implementation, block):
    g = torch.Generator().manual_seed(T + start)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, start + T, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keep = pattern(T, start, chunk)
    assert torch.equal(chunked_causal_mask(T, start, chunk, "cpu"), keep)
    out = causal_attention(q, k, v, start, chunk, implementation, query_block=block)
    assert torch.allclose(out, dense_attention(q, k, v, keep), rtol=1e-12, atol=1e-12)


def test_chunked_mask_by_hand():
    m = chunked_causal_mask(3, 3, 4, "cpu").int().tolist()  # queries at 3, 4, 5; chunk 4: {0..3}, {4..7}
    assert m == [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_causal_attention_rejects_mismatched_lengths():
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 5, 8)
    with pytest.raises(ValueError, match="keys cover 5 positions but queries end at position 4"):
        causal_attention(q, k, k, 0, None, "sdpa")


def test_long_prefix_logits_do_not_depend_on_later_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-llama-4-scout", max_seq_len=4096,
                                            attention_chunk_size=512, floor_scale=256.0)).eval()
    x = torch.randint(0, 256, (1, 3000))
    with torch.no_grad():
        full, prefix = model(x), model(x[:, :1300])  # the prefix ends inside the third chunk
    # the same float32 computation on 3000 and 1300 tokens: only the blocking of the reductions differs
    assert relative_error(full[:, :1300], prefix) <= forward_tolerance(model.args, x.shape[1], torch.float32)


MEASURE = textwrap.dedent("""
    import resource, sys, torch
    from llama import ModelArgs, Transformer
    T = int(sys.argv[1])
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-llama-4-scout", max_seq_len=T, attention_chunk_size=8192)).eval()
    x = torch.randint(0, 256, (1, T))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        logits = model(x)
    assert bool(torch.isfinite(logits).all())
    print(before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in KiB
""")


def peak_rss(T: int) -> tuple[int, int]:
    """(bytes before the forward, peak bytes) of a fresh process running a tiny Llama 4 over T tokens."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", MEASURE, str(T)], capture_output=True, text=True, check=True,
                         cwd=root, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    before, peak = map(int, out.stdout.split())
    return before, peak


def test_8k_forward_stays_far_below_a_dense_mask():
    before, peak = peak_rss(8192)
    assert peak - before < 128 * 2**20  # a dense float32 8k×8k mask alone would add 256 MiB


@pytest.mark.slow
def test_32k_forward_fits_in_a_few_hundred_mib():
    """Measured: ~230 MiB before, ~380 MiB peak (2 CPU cores, torch 2.13)."""
    before, peak = peak_rss(32768)
    assert peak - before < 512 * 2**20  # a dense float32 32k×32k mask alone would add 4 GiB
    assert peak < 2 * 2**30


# -- the context-extension ablation (scripts/ablate_context.py) ----------------------------------------------------

import json  # noqa: E402
import random  # noqa: E402

from scripts.ablate_context import (VARIANTS, ContextAblationConfig, base_args, format_table,  # noqa: E402
                                    main, passkey_document, passkey_example, plot, run, scaling_for)
from tests.ablation_testing import toy_docs  # noqa: E402

DOCS = toy_docs(300)


@pytest.mark.parametrize("length", [56, 64, 512])
def test_passkey_document_layout(length):
    ids, key = passkey_document(random.Random(length), length)
    text = bytes(ids).decode("ascii")
    assert len(ids) == length + 1 and text.endswith(f"What is the key? #{key}")
    assert text.count(f"The key is #{key}. ") == 1 and text.count("#") == 2 and len(key) == 5 and key.isdigit()


def test_passkey_training_example_has_loss_on_the_answer_only():
    x, y = passkey_example(random.Random(0), 64)
    assert len(x) == len(y) == 64 and y[:-5] == [-100] * 59
    assert bytes(y[-5:]).decode().isdigit() and y[-5:-1] == x[-4:]  # targets are the next ids


def test_passkey_document_too_short():
    with pytest.raises(ValueError, match="needs at least"):
        passkey_document(random.Random(0), 40)


def test_variants_and_base_layouts():
    cfg = ContextAblationConfig()
    assert scaling_for("none", cfg) is None and scaling_for("irope", cfg) is None
    assert {scaling_for(v, cfg).rope_type for v in ("linear", "dynamic", "yarn", "llama3")} == \
        {"linear", "dynamic", "yarn", "llama3"}
    assert all(scaling_for(v, cfg).factor == 8 for v in ("linear", "dynamic", "yarn", "llama3"))
    irope = base_args(cfg, irope=True)
    specs = [irope.layer_spec(i) for i in range(irope.n_layers)]
    assert [s.use_rope for s in specs] == [True, True, True, False]
    assert specs[0].attention_chunk_size == cfg.seq_len and specs[3].temperature_tuning
    assert base_args(cfg, irope=False).layer_spec(3).use_rope


def test_tiny_context_run_report_table_and_plot(tmp_path):
    cfg = ContextAblationConfig(seq_len=56, max_ratio=2, dim=32, n_layers=4, n_heads=2, batch_tokens=192,
                                base_steps=2, ft_steps=1, eval_tokens=192, n_passkey=2)
    report = run(cfg, DOCS, log=lambda *a: None)
    assert list(report["results"]) == list(VARIANTS) and report["lengths"] == [56, 112]
    for res in report["results"].values():
        for stage in ("no_ft", "ft"):
            assert set(res[stage]["ppl"]) == {56, 112} and all(p > 1 for p in res[stage]["ppl"].values())
            assert all(0 <= a <= 1 for a in res[stage]["passkey"].values())
    assert len(report["curves"]["ft-yarn"]) == 1 and len(report["curves"]["base-irope"]) == 2
    assert all(v in format_table(report) for v in VARIANTS)
    plot(report, tmp_path / "ctx.png")
    assert (tmp_path / "ctx.png").stat().st_size > 10_000


@pytest.mark.parametrize("kw, message", [(dict(variants=("none", "rerope")), "unknown context variants"),
                                         (dict(seq_len=32), "seq_len must be >= 56"),
                                         (dict(max_ratio=6), "max_ratio must be a power of two")])
def test_bad_context_config(kw, message):
    with pytest.raises(ValueError, match=message):
        ContextAblationConfig(**kw)


def test_context_script_end_to_end_through_the_project_training_loop(tmp_path):
    main(["--seq-len", "56", "--max-ratio", "2", "--dim", "32", "--n-heads", "2", "--batch-tokens", "192",
                 "--base-steps", "2", "--ft-steps", "1", "--eval-tokens", "192", "--n-passkey", "2",
                 "--variants", "none", "linear", "--corpus-chars", "100000", "--threads", "1", "--seed", "5",
                 "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seed"] == 5 and set(saved["results"]) == {"none", "linear"}
    assert (tmp_path / "context_ablation.png").exists()
