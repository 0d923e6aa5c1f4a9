"""`python -m peft.count`: trainable parameters of each method on LLaMA-7B and 65B, next to the papers' figures.

Every count is measured, not computed from a formula: the real model (`llama.build`: a `Transformer`, or Llama 3.2
Vision for the visual branches) is built on the `meta` device (no memory), the method is attached with
`peft.apply`, and `peft.trainable_parameters` is read off.

The visual branches have no published count for this base: the papers put a 768-wide CLIP feature through their
projection, Llama 3.2 Vision's encoder gives 7680 features per token, so the projection alone is 7680·4096 + 4096
at 11B (~31.5M, most of each visual row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from llama.formats.io import atomic_write_bytes
from llama.registry import build

from .adapter_v1 import AdapterV1Config
from .adapter_v2 import AdapterV2Config
from .adapter_v2_visual import AdapterV2VisualConfig
from .api import apply, trainable_parameters
from .excitor import ExcitorConfig
from .excitor_visual import ExcitorVisualConfig
from .lora_core import LoraConfig
from .targets import BLOCK_LINEARS

# (label, model, config, paper figure, exact published count if any, source of the figure)
ROWS = [
    ("LoRA r=8 wq,wv", "llama-7b", LoraConfig(r=8, alpha=16, target_modules=("wq", "wv")), "4.2M", 4_194_304,
     "LLaMA-Adapter Tab. 3 (Alpaca-LoRA); 2·32·4096·8·2"),
    ("LoRA r=8 wq,wv", "llama-65b", LoraConfig(r=8, alpha=16, target_modules=("wq", "wv")), None, None, ""),
    ("QLoRA r=64 all block linears", "llama-7b", LoraConfig(r=64, alpha=16, target_modules=BLOCK_LINEARS),
     None, None, "Guanaco recipe; no paper figure (computed: 159.9M)"),
    ("QLoRA r=64 all block linears", "llama-65b", LoraConfig(r=64, alpha=16, target_modules=BLOCK_LINEARS),
     None, None, ""),
    ("Adapter V1 K=10 L=30", "llama-7b", AdapterV1Config(), "1.2M", None, "LLaMA-Adapter §4.1, Tab. 3"),
    ("Adapter V1 K=10 L=30", "llama-65b", AdapterV1Config(), None, None, ""),
    ("Adapter V2 (defaults: prompts L=31, out-scale)", "llama-7b", AdapterV2Config(), None, None,
     "lit-llama's ~4.3M also adapts the fused QKV and lm_head"),
    ("Adapter V2 (defaults: prompts L=31, out-scale)", "llama-65b", AdapterV2Config(adapter_layers=31), None, None,
     ""),
    ("Adapter V2 bias+scale(input)+norms, no prompts", "llama-7b",
     AdapterV2Config(adapter_layers=0, scale_side="input"), None, None, "chat65b form applied to 7B"),
    ("Adapter V2 bias+scale(input)+norms, no prompts", "llama-65b",
     AdapterV2Config(adapter_layers=0, scale_side="input"), "14M", None,
     "LLaMA-Adapter V2 Fig. 5 / §5 (65B chat model); chat65b code"),
    ("Excitor K=30 r=16 L=30", "llama-7b", ExcitorConfig(), "7.6M", None,
     "secondary summary of the paper (emergentmind)"),
    ("Excitor K=30 r=16 L=30", "llama-65b", ExcitorConfig(), None, None, ""),
    ("Adapter V2 visual, early fusion (paper)", "llama-3.2-11b-vision", AdapterV2VisualConfig(), None, None,
     "V2 Tab. 1 reports 14M with CLIP ViT-L/14 on 7B"),
    ("Adapter V2 visual, late fusion (code)", "llama-3.2-11b-vision",
     AdapterV2VisualConfig(visual_fusion="late"), None, None, "released multimodal-7B code"),
    ("Excitor visual K=30 r=16 L=30", "llama-3.2-11b-vision", ExcitorVisualConfig(), None, None,
     "no multimodal count published"),
]


def measured(model_name: str, config) -> int:
    with torch.device("meta"):
        model = build(model_name)
        apply(model, config)
    return trainable_parameters(model)


def table() -> list[dict]:
    rows = []
    for label, model_name, config, paper, exact, source in ROWS:
        count = measured(model_name, config)
        rows.append(dict(method=label, model=model_name, trainable=count, paper=paper, paper_exact=exact,
                         exact_match=None if exact is None else count == exact, source=source))
    return rows


def _fmt(count: int) -> str:
    return f"{count:,} ({count / 1e6:.2f}M)"


def format_table(rows: list[dict]) -> str:
    cols = [("method", lambda r: r["method"]), ("model", lambda r: r["model"]),
            ("trainable (ours)", lambda r: _fmt(r["trainable"])),
            ("paper", lambda r: r["paper"] or "-"),
            ("exact", lambda r: {None: "-", True: "yes", False: "NO"}[r["exact_match"]]),
            ("source of the paper figure", lambda r: r["source"])]
    cells = [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _) in enumerate(cols)]
    lines = ["  ".join(name.ljust(w) for (name, _), w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    rows = table()
    print(format_table(rows))
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(rows, indent=2) + "\n").encode())
    return 0 if all(r["exact_match"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
