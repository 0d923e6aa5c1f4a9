"""`python -m llama.zoo`: every preset with its parameter count, computed three ways against the published one.

The module count instantiates the real model (`llama.build`: a `Transformer`, or the multimodal module of a vision
preset) on the `meta` device (no memory is allocated), so it checks the code, not just the formula. For a
multimodal preset the architecture columns describe its text model, and `vision` names the image path.
"""

from __future__ import annotations

import argparse
import json

from .config import ModelArgs, count_active_parameters
from .registry import all_presets, build, count_parameters_of


def module_parameter_count(name: str) -> int:
    """Unique parameters of the preset's module (`llama.build`: `Transformer`, `Llama4Multimodal` or
    `MllamaTransformer`), built on the meta device (tied matrices count once)."""
    return sum(p.numel() for p in build(name, device="meta").parameters())


def zoo_table(include_tiny: bool = False) -> list[dict]:
    rows = []
    for name, preset in all_presets().items():
        if preset.published is None and not include_tiny:
            continue
        model_args = isinstance(preset.args, ModelArgs)  # text or Llama 4 (vision_args); else MllamaArgs
        a = preset.args if model_args else preset.args.text
        computed = module_parameter_count(name)
        rows.append(dict(name=name, family=preset.family, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                         n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, ffn_hidden_dim=a.ffn_hidden_dim,
                         vocab_size=a.vocab_size, rope_theta=a.rope_theta, norm_eps=a.norm_eps,
                         max_seq_len=a.max_seq_len, tied=a.tie_word_embeddings,
                         rope_scaling=a.rope_scaling.rope_type + f"x{a.rope_scaling.factor:g}" if a.rope_scaling else "-",
                         experts=a.moe_args.num_experts if a.moe_args else "-",
                         vision=vision_column(preset.args),
                         # = computed for dense models; top-1 of E for Llama 4
                         active=count_active_parameters(a) if model_args else computed,
                         computed=computed, formula=count_parameters_of(preset.args), published=preset.published,
                         exact=preset.exact, match=computed == preset.published if preset.published else None))
    return rows


def vision_column(args) -> str:
    """Encoder layers × width: Llama 4's vision_args, or Llama 3.2 Vision's local + global layers."""
    if isinstance(args, ModelArgs):
        return f"{args.vision_args.n_layers}x{args.vision_args.dim}" if args.vision_args else "-"
    v = args.vision
    return f"{v.n_layers}+{v.n_global_layers}x{v.dim}"


def format_table(rows: list[dict]) -> str:
    cols = ["name", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim", "vocab_size",
            "rope_theta", "norm_eps", "max_seq_len", "tied", "rope_scaling", "experts", "vision", "active", "computed",
            "published", "match"]
    fmt = {"active": "{:,}", "computed": "{:,}", "published": "{:,}", "rope_theta": "{:g}", "norm_eps": "{:g}"}
    cells = [[fmt.get(c, "{}").format(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    for row, r in zip(cells, rows):  # a count from the released shapes, where no exact total was published
        if r["published"] is not None and not r["exact"]:
            row[cols.index("published")] += "*"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="also list the tiny test presets")
    parser.add_argument("--json", help="write the table as JSON to this file")
    args = parser.parse_args(argv)
    rows = zoo_table(args.tiny)
    print(format_table(rows))
    released = [r for r in rows if r["published"] is not None]
    exact = [r for r in released if r["exact"]]
    shapes = [r for r in released if not r["exact"]]
    print(f"\n{sum(r['match'] for r in exact)}/{len(exact)} released presets reproduce their exact published "
          f"parameter count (Hugging Face safetensors totals)")
    print(f"{sum(r['match'] for r in shapes)}/{len(shapes)} more (* above: LLaMA 1, Code Llama, Llama 3.2 90B "
          f"Vision) reproduce the count of their released shapes; their papers and model cards publish only "
          f"rounded sizes (see each preset's `source`)")
    n_ok = sum(r["match"] for r in released)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if n_ok == len(released) else 1


if __name__ == "__main__":
    raise SystemExit(main())
