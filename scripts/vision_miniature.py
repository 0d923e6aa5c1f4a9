"""Vision miniature: teach a tiny Llama 3.2 Vision-style model to answer questions about drawn images, with LoRA,
LLaMA-Adapter V2's visual branch and LLaMA-Excitor's visual variant, and compare accuracy with trainable parameters.

    python scripts/vision_miniature.py                       # the default run (≤ 10 min on 2 idle CPU cores)
    python scripts/vision_miniature.py --steps 20 --n-train 64 --n-eval 32    # smoke test
    python scripts/vision_miniature.py --seed 1 --threads 2 --out runs/vision1

Data (drawn in code, seeded): a 28×28 black image with one shape (circle, square, triangle, diamond) in one colour
(red, green, blue, yellow) in one quadrant (upper-left, upper-right, lower-left, lower-right), with jittered size and
place. Each image comes with three multiple-choice questions, "<|image|> colour red green blue yellow ?",
"<|image|> shape circle square triangle diamond ?", "<|image|> where upper-left upper-right lower-left lower-right ?",
answered by one word; the loss and the accuracy are on that word (argmax over the whole vocabulary). Without the
image the best answer is a guess: 25%. Listing the options lets a method that only re-weights attention (Excitor)
answer by attending to the right option, as in the papers' multiple-choice evaluations (ScienceQA).

Model: a tiny 3.2-Vision-style `MllamaTransformer` (text: 4 layers of width 64; vision: 7-px patches, width 32, 3
local + 1 global layers, intermediate features of layers 1 and 2; two cross-attention blocks) with its gates at 0,
as when Meta first inserts the blocks into a trained text model. Nothing is pre-trained here: every weight is random,
drawn N(0, 1/fan-in) so that activations keep their scale through the layers (as a trained network's do) and the
frozen encoder's features carry the image the way random features do; the encoder's position table is drawn N(0, 1)
so that where a patch lies weighs as much as what it shows. Every method trains only its own parameters
through the project's one training loop (`peft.training.train`), with the same data, order, steps and learning rate.

Methods:
    lora                LoRA r=8 on the trunk's wq, wv; the cross-attention gates stay 0, so the image cannot reach
                        the text: the image-blind baseline
    lora+gates          the same, plus the 4 gate scalars of the two blocks (tanh(g) opens the frozen blocks)
    adapter_v2_early    Adapter V2 with the paper's early fusion (20 visual prompts at layer 0; prompts of length 10
                        in the last 3 layers; bias/scale/norms)
    adapter_v2_late     Adapter V2 with the released code's fusion (image added to the prompts of every adapted layer)
    excitor             LLaMA-Excitor, multimodal (image tokens stacked below 10 prompts in the top 3 layers)

Writes results.json (config, accuracies per question type, trainable parameters, loss curves, wall times),
results.md (the table) and accuracy_vs_params.png into --out.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

import peft  # noqa: E402
from llama import ModelArgs, build  # noqa: E402
from llama import MllamaArgs, MllamaVisionArgs  # noqa: E402
from llama.vision.mllama_preprocess import preprocess  # noqa: E402
from peft.training.data import IGNORE_INDEX, Row  # noqa: E402
from peft.training.loop import TrainConfig, train  # noqa: E402
from scripts._ablation import readable_log_axis, variant_colors  # noqa: E402
from scripts._cli import experiment_parser, positive, run_cli, start  # noqa: E402

# -- the task ---------------------------------------------------------------------------------------------------------
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = ("upper-left", "upper-right", "lower-left", "lower-right")
QUESTIONS = {"colour": tuple(COLOURS), "shape": SHAPES, "where": PLACES}
WORDS = ["<pad>", "<bos>", "?", *QUESTIONS, *COLOURS, *SHAPES, *PLACES]
VOCAB = {w: i for i, w in enumerate(WORDS)}
TEXT_VOCAB = 32  # rows of the text embedding (WORDS fill the first 19); the <|image|> id is the first one above
IMAGE_SIZE = 28

METHODS = ("lora", "lora+gates", "adapter_v2_early", "adapter_v2_late", "excitor")


def draw(colour: str, shape: str, place: str, rng: random.Random) -> torch.Tensor:
    """uint8 [3, 28, 28]: one filled shape of half-size 4–6 px centred in its quadrant ±2 px, on black."""
    r = rng.uniform(4.0, 6.0)
    cy = (7.0 if place.startswith("upper") else 21.0) + rng.uniform(-2, 2)
    cx = (7.0 if place.endswith("left") else 21.0) + rng.uniform(-2, 2)
    y, x = torch.meshgrid(torch.arange(IMAGE_SIZE) + 0.5, torch.arange(IMAGE_SIZE) + 0.5, indexing="ij")
    if shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
    elif shape == "square":
        inside = ((y - cy).abs() <= r * 0.85) & ((x - cx).abs() <= r * 0.85)
    elif shape == "triangle":  # apex at the top, base at the bottom
        inside = (y >= cy - r) & (y <= cy + r) & ((x - cx).abs() <= (y - (cy - r)) / 2)
    else:  # a diamond: a square standing on a corner
        inside = (y - cy).abs() + (x - cx).abs() <= r
    img = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    img[:, inside] = torch.tensor(COLOURS[colour], dtype=torch.uint8)[:, None]
    return img


def make_rows(n_images: int, vision: MllamaVisionArgs, image_token: int, seed: int) -> list[Row]:
    """Three question rows per image: [<bos>, <|image|>, question, the 4 options, ?], target = the answer after '?'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_images):
        scene = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "where": rng.choice(PLACES)}
        image = draw(scene["colour"], scene["shape"], scene["where"], rng)
        inputs = {k: v[0] for k, v in preprocess([[image]], vision).items() if k != "num_tiles"}  # one row's tensors
        for question, answer in scene.items():
            tokens = [VOCAB["<bos>"], image_token, VOCAB[question], *(VOCAB[o] for o in QUESTIONS[question]),
                      VOCAB["?"]]
            targets = [IGNORE_INDEX] * (len(tokens) - 1) + [VOCAB[answer]]
            rows.append(Row(tokens, targets, inputs=inputs))
    return rows


# -- the model and the methods ----------------------------------------------------------------------------------------
def miniature_args() -> MllamaArgs:
    text = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=TEXT_VOCAB, multiple_of=32,
                     max_seq_len=16, rope_theta=500000.0, name="vision-miniature")
    vision = MllamaVisionArgs(image_size=IMAGE_SIZE, patch_size=7, dim=32, n_layers=3, n_global_layers=1, n_heads=2,
                              ffn_hidden_dim=64, max_num_tiles=1, intermediate_layers=(1, 2))
    return MllamaArgs(text=text, vision=vision, n_cross_attention_layers=2, image_token_id=TEXT_VOCAB,
                      name="vision-miniature")


def base_model(seed: int) -> nn.Module:
    """The seeded base: gates at 0, every linear layer drawn with variance-preserving weights N(0, 1/fan-in).

    With the pre-training init (std 0.02) an untrained network's activations shrink layer after layer and its
    features barely depend on the image; at N(0, 1/fan-in) they keep their scale, as a trained network's do.
    """
    torch.manual_seed(seed)
    model = build(miniature_args())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        encoder = model.vision_model.vision_encoder  # positions as strong as the patches' content
        nn.init.normal_(encoder.positional_embedding)
    return model


def attach(model: nn.Module, method: str) -> None:
    if method in ("lora", "lora+gates"):
        peft.apply(model, peft.LoraConfig(r=8, alpha=8.0, target_modules=("wq", "wv")))
        if method == "lora+gates":
            for block in model.cross_attention_layers:
                block.gate_attn.requires_grad_(True)
                block.gate_ffwd.requires_grad_(True)
    elif method.startswith("adapter_v2"):
        fusion = method.removeprefix("adapter_v2_")
        peft.apply(model, peft.AdapterV2VisualConfig(adapter_len=10, adapter_layers=3, visual_fusion=fusion))
    elif method == "excitor":
        peft.apply(model, peft.ExcitorVisualConfig(adapter_len=10, adapter_layers=3, rank=8))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


@torch.no_grad()
def accuracy(model: nn.Module, rows: list[Row], batch_size: int = 96) -> dict[str, float]:
    """Share of rows whose argmax after '?' is the answer, overall and per question type."""
    model.eval()
    hits = {q: [] for q in QUESTIONS}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tokens = torch.tensor([r.tokens for r in chunk])
        inputs = {k: torch.stack([r.inputs[k] for r in chunk]) for k in chunk[0].inputs}
        predicted = model(tokens, **inputs)[:, -1].argmax(-1)
        for r, p in zip(chunk, predicted.tolist()):
            hits[WORDS[r.tokens[2]]].append(p == r.targets[-1])
    result = {q: sum(h) / len(h) for q, h in hits.items()}
    result["all"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return result


def run(args, log=print, on_progress=None) -> dict:
    t_start = time.perf_counter()
    vision = miniature_args().vision
    train_rows = make_rows(args.n_train, vision, TEXT_VOCAB, seed=args.seed)
    eval_rows = make_rows(args.n_eval, vision, TEXT_VOCAB, seed=args.seed + 10_000)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if not k.startswith("_")}, "results": {}}
    base = base_model(args.seed)
    report["base"] = {"accuracy": accuracy(base, eval_rows), "parameters": sum(p.numel() for p in base.parameters())}
    log(f"{'base (gates 0)':18s} accuracy {report['base']['accuracy']['all']:.1%}")
    for method in args.methods:
        t0 = time.perf_counter()
        model = base_model(args.seed)
        torch.manual_seed(args.seed)  # the adapter's own initialisation
        attach(model, method)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=max(1, args.steps // 10), seed=args.seed, progress=not args.no_progress)
        history = train(model, train_rows, cfg, pad_id=VOCAB["<pad>"]).history
        acc = accuracy(model, eval_rows)
        report["results"][method] = {"trainable": peft.trainable_parameters(model), "accuracy": acc,
                                     "loss_curve": [h["loss"] for h in history], "train_s": time.perf_counter() - t0}
        log(f"{method:18s} accuracy {acc['all']:.1%} (colour {acc['colour']:.0%}, shape {acc['shape']:.0%}, "
            f"where {acc['where']:.0%})  trainable {report['results'][method]['trainable']:,}  "
            f"({time.perf_counter() - t0:.0f} s)")
        if on_progress:
            on_progress(report)
    report["wall_s"] = time.perf_counter() - t_start
    return report


# -- presentation -----------------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    lines = ["| method | trainable params | % of model | accuracy | colour | shape | where | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    total = report["base"]["parameters"]
    b = report["base"]["accuracy"]
    lines.append(f"| base (gates 0, no training) | 0 | 0 | {b['all']:.1%} | {b['colour']:.0%} | {b['shape']:.0%} | "
                 f"{b['where']:.0%} | – |")
    for method, r in report["results"].items():
        a = r["accuracy"]
        lines.append(f"| {method} | {r['trainable']:,} | {100 * r['trainable'] / total:.2f} | {a['all']:.1%} | "
                     f"{a['colour']:.0%} | {a['shape']:.0%} | {a['where']:.0%} | {r['train_s']:.0f} |")
    lines.append(f"\nbase model: {total:,} parameters; guessing without the image: 25%")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = variant_colors(report["results"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for method, r in report["results"].items():
        ax.scatter(r["trainable"], 100 * r["accuracy"]["all"], s=50, color=colors[method], label=method)
        curve, ema, smooth = r["loss_curve"], None, []
        for x in curve:
            ema = x if ema is None else 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax2.plot(range(1, len(curve) + 1), smooth, color=colors[method], label=method)
    ax.axhline(25, color="k", lw=0.8, ls="--", label="guessing without the image")
    counts = [r["trainable"] for r in report["results"].values()]
    ax.set(xscale="log", xlim=(min(counts) / 1.5, max(counts) * 1.5), xlabel="trainable parameters",
           ylabel="held-out accuracy (%)", ylim=(0, 100), title="accuracy against trainable parameters")
    readable_log_axis(ax, "x")
    ax.legend(fontsize=8, loc="lower right")
    ax2.set(xlabel="step", ylabel="loss on the answer (EMA 0.9)", title="training loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------------------------
parser = experiment_parser(__doc__, "vision_miniature")
parser.add_argument("--steps", type=positive(int), default=1000, help="optimizer steps per method")
parser.add_argument("--batch-size", type=positive(int), default=48, help="rows per step")
parser.add_argument("--lr", type=positive(float), default=5e-3, help="peak learning rate (warmup + cosine)")
parser.add_argument("--n-train", type=positive(int), default=1200, help="training images (3 rows each)")
parser.add_argument("--n-eval", type=positive(int), default=300, help="held-out images (3 rows each)")
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to train")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    out = start(args)

    def save(report):  # after every method: a run cut short keeps what it finished
        (out / "results.json").write_text(json.dumps(report, indent=1))

    report = run(args, on_progress=save)
    save(report)
    table = format_table(report)
    (out / "results.md").write_text(table + "\n")
    plot(report, out / "accuracy_vs_params.png")
    print()
    print(table)
    print(f"\nwall time {report['wall_s']:.0f} s; results in {out}/ (results.json, results.md, accuracy_vs_params.png)")
    return report


if __name__ == "__main__":
    run_cli(main)
