"""Llama 2 / Llama 3 post-training in miniature, on a task whose true reward is known in code.

    python scripts/post_train.py                        # the default run (≤ 10 min on 2 CPU cores)
    python scripts/post_train.py --rounds 1 --smoke     # every stage, tiny sizes: seconds
    python scripts/post_train.py --dpo-loss ipo --nll-alpha 0 --seed 1 --out runs/ipo

The task is sorting digits ("Sort: 3947\\nAnswer:" -> "3479", `peft.training.data`), and the true reward r* is the
fraction of digits in the right place (`peft.training.oracle`), so every stage is measured exactly, as in the DPO
paper's controlled-sentiment experiment. Stages, in Llama 3's order (arXiv 2407.21783 §4: RM -> RS -> SFT -> DPO):

  round 0   base  a tiny LLaMA pre-trained on the task's format: prompts followed by a random permutation of their
                  digits (it learns the format, the length and to stop, not the answer)
            sft   SFT on an imperfect teacher (the answer with 0-3 adjacent swaps; Llama 2 §3.1). This policy is
                  π_ref, the reference of every KL below
  round r   reward model  initialised from the current policy π, one epoch (Llama 2 §3.2.2) over all pairs so far
                  (Llama 3); each round adds pairs of π's own samples labelled by simulated annotators
                  (Bradley–Terry on r*, noise τ) with Llama 2 ratings
            rs    rejection sampling: K samples per fresh prompt from π, the reward model's best kept, and π
                  fine-tuned on them with the SFT loss (Llama 2 §3.2.3)
            dpo   DPO from the rs policy on fresh annotated pairs of its own samples (on-policy, Llama 3 §4.1.4),
                  pairs rated similar dropped, one epoch, β = 0.1, cDPO ε = 0.1 (about the annotators' flip rate),
                  + 0.2·NLL on the chosen response, the EOS (termination token) masked out of the DPO log-probs;
                  LoRA, with the reference = the same model with its adapter switched off. The adapter is then
                  merged, and the result is the next round's π

Measured per stage on held-out prompts from T = 1 samples (the policy's own distribution): mean true reward,
exact-match rate, and KL(π ‖ π_ref), estimated as the mean of log π(y|x) − log π_ref(y|x) over those samples; per
round, the reward model's held-out accuracy overall and per rating (with the Bayes ceiling of the noisy labels), and
the best-of-K curve (Llama 2 Fig. 7) with the best-of-K KL bound log K − (K−1)/K.

Writes into --out: results.json (`stages`, `reward_model` and the details), results.md (the tables),
post_training.png (best-of-K curves; true reward vs KL), data/round<r>.jsonl (every training example with its
provenance).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

import llama  # noqa: E402
from llama.formats.io import atomic_write_bytes  # noqa: E402
import peft  # noqa: E402
from peft.training import data as D  # noqa: E402
from peft.training import oracle  # noqa: E402
from peft.training.dpo import DPOConfig, DPOLoss, precompute_reference, response_logps  # noqa: E402
from peft.training.loop import TrainConfig, train  # noqa: E402
from peft.training.pairs import Pair, encode_pairs  # noqa: E402
from peft.training.preference import MARGINS, RATINGS  # noqa: E402
from peft.training.prompts import Prompt, PromptPool  # noqa: E402
from peft.training.recipe import apply_method  # noqa: E402
from peft.training.rejection import (best_of_k, check_k, check_prompt_lengths, expected_best_of_k,  # noqa: E402
                                     kl_bound, sample_responses)
from peft.training.reward_model import RewardLoss, evaluate_pairs, reward_model, score_sequences  # noqa: E402
from scripts._cli import UsageError, experiment_parser, positive, run_cli, start  # noqa: E402

LORA = {"name": "lora", "r": 8, "alpha": 16.0, "target_modules": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


@dataclass
class Config:
    tasks: tuple = ("sort",)  # capability tags: synthetic tasks with a known answer
    rounds: int = 3
    # the model: a tiny Llama 3 (GQA), its BPE tokenizer trained on the task's text
    dim: int = 64
    n_layers: int = 2
    vocab_size: int = 300
    max_seq_len: int = 32
    max_new_tokens: int = 10
    # round 0
    pretrain_steps: int = 300
    sft_examples: int = 4000
    sft_steps: int = 1200
    teacher_swaps: int = 3
    # simulated annotators
    tau: float = 0.1  # Bradley–Terry label noise on r*
    pair_samples: int = 8  # samples per prompt shown to them, two distinct ones per pair
    # reward model
    rm_prompts: int = 4096  # per round
    rm_method: str = "full"  # "full", "lora" or "qlora" (LoRA r = 8 on all block linears, NF4 base for qlora)
    rm_lr: float = 1e-3
    rm_epochs: int = 1
    margin: Optional[str] = None  # None (Llama 3) | "small" | "large" (Llama 2)
    # rejection sampling
    rs_prompts: int = 1024
    k: int = 8
    temperature: float = 1.0
    rs_steps: int = 200
    rs_lr: float = 3e-4
    # DPO
    dpo_prompts: int = 4096
    dpo_method: str = "lora"  # "lora" (reference: adapters off) or "full" (reference: precomputed)
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    label_smoothing: float = 0.1  # cDPO's ε: about the annotators' flip rate on these pairs
    nll_alpha: float = 0.2
    mask_eos: bool = True
    dpo_epochs: int = 1
    dpo_lr: float = 1e-3
    # everything else
    batch_size: int = 32
    lr: float = 3e-3  # pre-training and SFT
    eval_prompts: int = 512
    eval_samples: int = 4
    bok_prompts: int = 128  # held-out prompts for the best-of-K curve (K_max = k samples each)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in D.TASKS]
        if unknown or not self.tasks:
            raise UsageError(f"unknown task(s) {unknown or list(self.tasks)}; choose from {sorted(D.TASKS)}")
        check_k(self.k)
        DPOConfig(beta=self.beta, loss_type=self.dpo_loss, label_smoothing=self.label_smoothing,
                  nll_alpha=self.nll_alpha)  # beta > 0, a known loss, ε in [0, 0.5)
        if self.margin is not None and self.margin not in MARGINS:
            raise UsageError(f"unknown margin table {self.margin!r}; use one of {sorted(MARGINS)} or none")
        if self.rm_method not in ("full", "lora", "qlora"):
            raise UsageError(f"--rm-method must be 'full', 'lora' or 'qlora', got {self.rm_method!r}")
        if self.dpo_method not in ("lora", "full"):
            raise UsageError(f"--dpo-method must be 'lora' or 'full', got {self.dpo_method!r}")
        if not self.tau >= 0 or not self.temperature > 0:
            raise UsageError(f"--tau must be >= 0 and --temperature > 0, got {self.tau}, {self.temperature}")


def _say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# =====================================================================================================================
# The miniature's world: tokenizer, prompts, model
# =====================================================================================================================

def build_tokenizer(cfg: Config):
    """A SentencePiece BPE trained on the tasks' text (cached; digits are single pieces)."""
    docs = [e.prompt + " " + e.response for t in cfg.tasks for e in D.task_examples(t, 2000, "train", seed=cfg.seed)]
    return D.builtin_tokenizer(vocab_size=cfg.vocab_size, documents=docs)


def draw_prompts(cfg: Config) -> dict:
    """Every prompt of the run, drawn up front (they do not depend on the policy), so that a prompt that does not fit
    the context fails before any training. Training prompts are fresh every round; held-out ones never train."""
    pool = PromptPool()
    prompts = {"sft": pool.draw(cfg.sft_examples, 0, cfg.tasks, seed=cfg.seed)}
    for r in range(1, cfg.rounds + 1):
        for kind, n in (("rm", cfg.rm_prompts), ("rs", cfg.rs_prompts), ("dpo", cfg.dpo_prompts)):
            prompts[(r, kind)] = pool.draw(n, r, cfg.tasks, seed=cfg.seed)
    held_out = PromptPool()
    prompts["eval"] = held_out.draw(cfg.eval_prompts, 0, cfg.tasks, split="eval", seed=cfg.seed)
    prompts["rm_eval"] = held_out.draw(cfg.rm_prompts // 4, 0, cfg.tasks, split="eval", seed=cfg.seed)
    prompts["bok"] = held_out.draw(cfg.bok_prompts, 0, cfg.tasks, split="eval", seed=cfg.seed)
    return prompts


def build_model(cfg: Config, vocab_size: int) -> llama.Transformer:
    args = llama.ModelArgs.from_name("tiny-llama-3", dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=vocab_size,
                                     max_seq_len=cfg.max_seq_len)
    return llama.Transformer(args)


def sft(model, examples: list[D.Example], tokenizer, cfg: Config, steps: int, lr: float, desc: str) -> None:
    """The SFT loss (response tokens and EOS only) through the one training loop."""
    rows = D.single_rows([D.encode_sft(e, tokenizer, cfg.max_seq_len, index=i) for i, e in enumerate(examples)])
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=lr,
                     warmup_steps=max(1, steps // 10), seed=cfg.seed, progress=cfg.progress)
    train(model, rows, tc, pad_id=tokenizer.pad_id, desc=desc)


def pretrain(model, prompts: list[Prompt], tokenizer, cfg: Config) -> None:
    """Next-token training on every token of 'prompt + a random permutation of the answer's items'."""
    rng = random.Random(cfg.seed)
    docs = [p.text + " " + "".join(rng.sample(p.answer, len(p.answer))) for p in prompts]
    rows = D.single_rows(D.encode_documents(docs, tokenizer, cfg.max_seq_len))
    tc = TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size,
                     lr=cfg.lr, warmup_steps=max(1, cfg.pretrain_steps // 10), seed=cfg.seed, progress=cfg.progress)
    train(model, rows, tc, pad_id=tokenizer.pad_id, desc="r0 base")


# =====================================================================================================================
# Measuring a policy: true reward, exact match, KL to the reference
# =====================================================================================================================

def rewards_of(samples, prompts: list[Prompt]) -> torch.Tensor:
    """r* of samples [P][K] -> [P, K]."""
    return torch.tensor([[oracle.true_reward(s.text, p.answer, s.stopped) for s in row]
                         for row, p in zip(samples, prompts)], dtype=torch.float64)


def evaluate(policy, reference, prompts: list[Prompt], tokenizer, cfg: Config, seed: int) -> dict:
    samples = sample_responses(policy, tokenizer, [p.text for p in prompts], cfg.eval_samples, cfg.max_new_tokens,
                               seed=seed)
    flat = [(s, p) for row, p in zip(samples, prompts) for s in row]
    rewards = rewards_of(samples, prompts)
    exact = sum(s.stopped and D.exact_match(s.text, p.answer) for s, p in flat) / len(flat)
    seqs, prompt_lens = [s.sequence for s, _ in flat], [len(s.prompt_ids) for s, _ in flat]
    # KL(π ‖ π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)], Monte Carlo over the same samples
    kl = (response_logps(policy, seqs, prompt_lens, tokenizer.pad_id)
          - response_logps(reference, seqs, prompt_lens, tokenizer.pad_id)).mean()
    return {"true_reward": float(rewards.mean()), "exact_match": exact, "kl_to_ref": float(kl)}


# =====================================================================================================================
# Preference data, reward model, rejection sampling, DPO
# =====================================================================================================================

def usable(sample, tokenizer, cfg: Config) -> bool:
    """A sample that can become training data: it ended, it is not empty, and its text, tokenised again as training
    data is (a malformed sample, e.g. a stray byte piece, may tokenise longer), fits the context."""
    text = sample.text.strip()
    return (sample.stopped and bool(text)
            and len(sample.prompt_ids) + len(tokenizer.encode(sample.text, bos=False, eos=True)) <= cfg.max_seq_len)


def annotated_pairs(policy, prompts: list[Prompt], tokenizer, cfg: Config, rng: random.Random, seed: int,
                    source: str) -> list[Pair]:
    """`pair_samples` samples per prompt from the policy; its distinct usable responses, in sampling order, are
    shown to the simulated annotators two at a time."""
    samples = sample_responses(policy, tokenizer, [p.text for p in prompts], cfg.pair_samples, cfg.max_new_tokens,
                               seed=seed)
    pairs = []
    for row, p in zip(samples, prompts):
        distinct = list(dict.fromkeys(s.text for s in row if usable(s, tokenizer, cfg)))
        for a, b in zip(distinct[0::2], distinct[1::2]):
            pairs.append(oracle.annotate(p.text, a, b, oracle.true_reward(a, p.answer),
                                         oracle.true_reward(b, p.answer), rng, cfg.tau,
                                         {**p.provenance, "source": source}))
    return pairs


def bayes_ceiling(pairs: list[Pair], answers: dict[str, str], tau: float) -> tuple[float, dict]:
    """The best accuracy any reward model can expect on these noisy labels, overall and per rating."""
    ceil = [(p.rating, oracle.bayes_accuracy(oracle.true_reward(p.chosen, answers[p.prompt])
                                             - oracle.true_reward(p.rejected, answers[p.prompt]), tau)) for p in pairs]
    by = {r: sum(c for x, c in ceil if x == r) / n for r in RATINGS if (n := sum(x == r for x, _ in ceil))}
    return sum(c for _, c in ceil) / len(ceil), by


def train_reward_model(policy, train_pairs: list[Pair], eval_pairs: list[Pair], answers: dict, tokenizer,
                       cfg: Config, r: int) -> tuple:
    encoded = encode_pairs(train_pairs, tokenizer, cfg.max_seq_len)
    rm = reward_model(policy, {"name": "full"} if cfg.rm_method == "full" else {**LORA, "name": cfg.rm_method})
    steps = max(1, cfg.rm_epochs * len(encoded) // cfg.batch_size)
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=cfg.rm_lr,
                     warmup_steps=max(1, steps // 10), seed=cfg.seed + r, progress=cfg.progress)
    train(rm, encoded, tc, objective=RewardLoss(tokenizer.pad_id, cfg.margin), desc=f"r{r} reward model")
    accuracy, by_rating = evaluate_pairs(rm, encode_pairs(eval_pairs, tokenizer, cfg.max_seq_len), tokenizer.pad_id)
    ceiling, ceiling_by = bayes_ceiling(eval_pairs, answers, cfg.tau)
    report = {"round": r, "accuracy": accuracy, "accuracy_by_rating": by_rating, "bayes_ceiling": ceiling,
              "bayes_ceiling_by_rating": ceiling_by, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              "eval_pairs_by_rating": {x: sum(p.rating == x for p in eval_pairs) for x in RATINGS}}
    return rm, report


def rejection_sample(policy, rm, prompts: list[Prompt], tokenizer, cfg: Config, seed: int) -> list[dict]:
    """Best of K by the reward model for each prompt (prompts with no usable sample are dropped)."""
    samples = sample_responses(policy, tokenizer, [p.text for p in prompts], cfg.k, cfg.max_new_tokens,
                               cfg.temperature, seed=seed)
    scores = score_sequences(rm, [s.sequence for row in samples for s in row], tokenizer.pad_id).view(len(prompts),
                                                                                                       cfg.k)
    ok = torch.tensor([[usable(s, tokenizer, cfg) for s in row] for row in samples])
    best = best_of_k(scores, ok)
    return [{"prompt": p, "response": row[i].text, "rm_score": float(scores[j, i])}
            for j, (p, row, i) in enumerate(zip(prompts, samples, best.tolist())) if ok[j, i]]


def best_of_k_curve(policy, rm, prompts: list[Prompt], tokenizer, cfg: Config, seed: int) -> dict:
    """E[r* of the best of k] for k = 1, 2, 4, …, K, selected by the reward model and by r* itself (the oracle)."""
    samples = sample_responses(policy, tokenizer, [p.text for p in prompts], cfg.k, cfg.max_new_tokens,
                               cfg.temperature, seed=seed)
    true = rewards_of(samples, prompts)  # [P, K]
    scores = score_sequences(rm, [s.sequence for row in samples for s in row], tokenizer.pad_id).view_as(true)
    stopped = torch.tensor([[s.stopped for s in row] for row in samples])
    scores = scores.double().masked_fill(~stopped, float("-inf"))
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= cfg.k]
    return {"k": ks, "kl_bound": [kl_bound(k) for k in ks],
            "reward_model": [expected_best_of_k(scores, true, k) for k in ks],
            "oracle": [expected_best_of_k(true, true, k) for k in ks]}


def dpo(policy, pairs: list[Pair], tokenizer, cfg: Config, r: int) -> tuple[llama.Transformer, list[dict]]:
    """DPO from `policy`; returns the new policy as a plain model (a LoRA adapter merged into its weights) and the
    training log."""
    mask = (tokenizer.eos_id,) if cfg.mask_eos else ()
    encoded = encode_pairs(pairs, tokenizer, cfg.max_seq_len)
    model = copy.deepcopy(policy)
    if cfg.dpo_method == "full":  # no adapter to switch off: log π_ref computed once, before the first step
        encoded = precompute_reference(model, encoded, tokenizer.pad_id, mask)
    dc = DPOConfig(beta=cfg.beta, loss_type=cfg.dpo_loss, label_smoothing=cfg.label_smoothing,
                   nll_alpha=cfg.nll_alpha, mask_token_ids=mask,
                   reference="precomputed" if cfg.dpo_method == "full" else "adapters_off")
    model = apply_method(model, LORA if cfg.dpo_method == "lora" else {"name": "full"})
    steps = max(1, cfg.dpo_epochs * len(encoded) // cfg.batch_size)
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, lr=cfg.dpo_lr,
                     warmup_steps=max(1, steps // 10), seed=cfg.seed + r, progress=cfg.progress)
    history = train(model, encoded, tc, objective=DPOLoss(dc, tokenizer.pad_id), desc=f"r{r} dpo").history
    if abs(history[0]["rewards/margins"]) > 1e-6:  # the first step's policy is the reference: h = 0 exactly
        raise RuntimeError(f"DPO's first step saw policy != reference (margin {history[0]['rewards/margins']})")
    if cfg.dpo_method == "full":
        return model, history
    return peft.merge_and_unload(model), history  # W ← W + sBA, as a plain llama.Transformer


# =====================================================================================================================
# The pipeline
# =====================================================================================================================

def run(cfg: Config, tokenizer, prompts: dict, out: Path) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    rng = random.Random(cfg.seed)  # the annotators and the teacher
    answers = {p.text: p.answer for group in prompts.values() for p in group}
    stages, reward_models, curves, rs_log, dpo_log, data, all_rm_pairs = [], [], [], [], [], {}, []

    def measure(r: int, stage: str, policy, reference) -> None:
        stages.append({"round": r, "stage": stage, **evaluate(policy, reference, prompts["eval"], tokenizer, cfg,
                                                                seed=cfg.seed + 7)})
        s = stages[-1]
        _say(f"round {r} {stage:>4}: true reward {s['true_reward']:.3f}, exact match {s['exact_match']:.3f}, "
             f"KL to π_ref {s['kl_to_ref']:.3f}")

    # -- round 0: pre-trained base, then SFT on the imperfect teacher: π_ref ------------------------------------------
    torch.manual_seed(cfg.seed)
    base = build_model(cfg, tokenizer.n_words)
    pretrain(base, prompts["sft"], tokenizer, cfg)
    reference = copy.deepcopy(base)
    demos = [D.Example(p.text, oracle.teacher_response(p.answer, rng, cfg.teacher_swaps)) for p in prompts["sft"]]
    data[0] = [{"prompt": e.prompt, "response": e.response, **p.provenance, "source": "teacher"}
               for e, p in zip(demos, prompts["sft"])]
    sft(reference, demos, tokenizer, cfg, cfg.sft_steps, cfg.lr, "r0 sft")
    measure(0, "base", base, reference)
    measure(0, "sft", reference, reference)
    policy = reference

    for r in range(1, cfg.rounds + 1):
        seed = cfg.seed * 1000 + 10 * r
        # -- reward model on pairs of the current policy's samples ----------------------------------------------------
        rm_pairs = annotated_pairs(policy, prompts[(r, "rm")], tokenizer, cfg, rng, seed, "policy samples (RM)")
        all_rm_pairs += rm_pairs  # Llama 3 trains each round's reward model on all the preference data so far
        eval_pairs = annotated_pairs(policy, prompts["rm_eval"], tokenizer, cfg, rng, seed + 1, "held-out")
        rm, rm_report = train_reward_model(policy, all_rm_pairs, eval_pairs, answers, tokenizer, cfg, r)
        reward_models.append(rm_report)
        _say(f"round {r} reward model: held-out accuracy {rm_report['accuracy']:.3f} (Bayes ceiling "
             f"{rm_report['bayes_ceiling']:.3f}) on {rm_report['eval_pairs']} pairs")
        curves.append({"round": r, **best_of_k_curve(policy, rm, prompts["bok"], tokenizer, cfg, seed + 2)})
        # -- rejection sampling, then SFT on the selected samples -----------------------------------------------------
        selected = rejection_sample(policy, rm, prompts[(r, "rs")], tokenizer, cfg, seed + 3)
        rs_log.append({"round": r, "prompts": cfg.rs_prompts, "selected": len(selected), "selected_true_reward":
                       sum(oracle.true_reward(s["response"], s["prompt"].answer) for s in selected) / len(selected)})
        policy = copy.deepcopy(policy)
        sft(policy, [D.Example(s["prompt"].text, s["response"]) for s in selected], tokenizer, cfg, cfg.rs_steps,
            cfg.rs_lr, f"r{r} rs")
        measure(r, "rs", policy, reference)
        # -- DPO on fresh pairs of the rs policy's own samples --------------------------------------------------------
        dpo_pairs = [p for p in annotated_pairs(policy, prompts[(r, "dpo")], tokenizer, cfg, rng, seed + 4,
                                                "policy samples (DPO)")
                     if p.rating != "negligibly better"]  # pairs rated similar are dropped (Llama 3 §4.1.2)
        policy, history = dpo(policy, dpo_pairs, tokenizer, cfg, r)
        flipped = sum(oracle.true_reward(p.chosen, answers[p.prompt])
                      < oracle.true_reward(p.rejected, answers[p.prompt]) for p in dpo_pairs)
        dpo_log.append({"round": r, "pairs": len(dpo_pairs), "flipped_labels": flipped / len(dpo_pairs),
                        "first_step": history[0], "last_step": history[-1]})
        measure(r, "dpo", policy, reference)
        data[r] = ([{"kind": "reward_model_pair", **dataclasses.asdict(p)} for p in rm_pairs]
                   + [{"kind": "rejection_sampled", "prompt": s["prompt"].text, "response": s["response"],
                       "rm_score": s["rm_score"], **s["prompt"].provenance, "source": f"best of {cfg.k} (RM round {r})"}
                      for s in selected]
                   + [{"kind": "dpo_pair", **dataclasses.asdict(p)} for p in dpo_pairs])

    for r, examples in data.items():
        (out / "data").mkdir(exist_ok=True)
        atomic_write_bytes(out / "data" / f"round{r}.jsonl", "".join(json.dumps(e) + "\n" for e in examples).encode())
    last = reward_models[-1]
    return {"stages": stages,
            "reward_model": {"accuracy": last["accuracy"], "accuracy_by_rating": last["accuracy_by_rating"]},
            "reward_models": reward_models, "best_of_k": curves, "rejection_sampling": rs_log, "dpo": dpo_log,
            "goals": goals(stages, reward_models),
            "config": dataclasses.asdict(cfg), "wall_time_s": time.perf_counter() - t0,
            "cpu_time_s": time.process_time() - cpu0, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def goals(stages: list[dict], reward_models: list[dict]) -> dict:
    """The issue's goals, per round (index r − 1 is round r): held-out reward-model accuracy ≥ 0.75, and higher on
    "significantly better" pairs than on "negligibly better" ones (Llama 2 Table 8); rejection sampling beats SFT
    alone (round 0's sft); DPO beats the SFT policy it starts from (the round's rs) and SFT alone."""
    get = {(s["round"], s["stage"]): s["true_reward"] for s in stages}
    rounds = range(1, len(reward_models) + 1)
    by = [m["accuracy_by_rating"] for m in reward_models]
    return {
        "reward_model_accuracy_at_least_0.75": [m["accuracy"] >= 0.75 for m in reward_models],
        "accuracy_significantly_above_negligibly": [b.get("significantly better", 0.0) > b.get("negligibly better", 1.0)
                                                    for b in by],
        "rs_beats_sft_alone": [get[(r, "rs")] > get[(0, "sft")] for r in rounds],
        "dpo_beats_its_sft_policy": [get[(r, "dpo")] > get[(r, "rs")] for r in rounds],
        "dpo_beats_sft_alone": [get[(r, "dpo")] > get[(0, "sft")] for r in rounds],
    }


def format_tables(report: dict) -> str:
    lines = ["| round | stage | true reward | exact match | KL to π_ref |", "|" + " --- |" * 5]
    for s in report["stages"]:
        lines.append(f"| {s['round']} | {s['stage']} | {s['true_reward']:.3f} | {s['exact_match']:.3f} | "
                     f"{s['kl_to_ref']:.3f} |")
    short = {"significantly better": "sig.", "better": "better", "slightly better": "slightly",
             "negligibly better": "negl."}
    lines += ["", "| round | RM accuracy (ceiling) | " + " | ".join(f"{short[x]} (ceiling, n)" for x in RATINGS) + " |",
              "|" + " --- |" * (2 + len(RATINGS))]
    for m in report["reward_models"]:
        cells = [f"{m['accuracy_by_rating'][x]:.3f} ({m['bayes_ceiling_by_rating'][x]:.3f}, "
                 f"{m['eval_pairs_by_rating'][x]})" if x in m["accuracy_by_rating"] else "–" for x in RATINGS]
        lines.append(f"| {m['round']} | {m['accuracy']:.3f} ({m['bayes_ceiling']:.3f}) | " + " | ".join(cells) + " |")
    lines += ["", "| round | K | KL bound | E[r*] best of K by RM | by r* (oracle) |", "|" + " --- |" * 5]
    for c in report["best_of_k"]:
        for i, k in enumerate(c["k"]):
            lines.append(f"| {c['round']} | {k} | {c['kl_bound'][i]:.3f} | {c['reward_model'][i]:.3f} | "
                         f"{c['oracle'][i]:.3f} |")
    lines += ["", "| goal | " + " | ".join(f"round {r}" for r in range(1, len(report["reward_models"]) + 1)) + " |",
              "|" + " --- |" * (1 + len(report["reward_models"]))]
    for name, met in report["goals"].items():
        lines.append(f"| {name} | " + " | ".join("yes" if m else "NO" for m in met) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, c in enumerate(report["best_of_k"]):
        color = f"C{i}"
        left.plot(c["k"], c["reward_model"], "o-", color=color, label=f"round {c['round']}: best by the reward model")
        left.plot(c["k"], c["oracle"], "s--", color=color, label=f"round {c['round']}: best by r* (oracle)")
    left.set_xscale("log", base=2)
    left.set_xlabel("K (samples per prompt)")
    left.set_ylabel("true reward r* of the selected sample")
    left.set_title("Rejection sampling headroom (cf. Llama 2 Fig. 7)")
    left.legend(fontsize=7)
    shown = [s for s in report["stages"] if s["stage"] != "base"]  # the base sits far right (see results.md)
    for s in shown:
        right.scatter(s["kl_to_ref"], s["true_reward"], color="C0" if s["stage"] == "sft" else
                      "C1" if s["stage"] == "rs" else "C2")
        right.annotate(f"r{s['round']} {s['stage']}", (s["kl_to_ref"], s["true_reward"]), fontsize=8,
                       xytext=(3, 3), textcoords="offset points")
    first = report["best_of_k"][0]  # round 1 samples from π_ref itself, so its best-of-K KL bound is to π_ref
    right.plot(first["kl_bound"], first["reward_model"], "k:", label="round 1 best of K by RM (at its KL bound)")
    right.set_xlabel("KL(π ‖ π_ref) (nats per response)")
    right.set_ylabel("true reward r* (held-out, T = 1)")
    right.set_title("True reward vs KL to the reference (base not shown)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================================
# Command line
# =====================================================================================================================

SMOKE = dict(rounds=1, pretrain_steps=20, sft_examples=256, sft_steps=20, pair_samples=4, rm_prompts=64,
             rs_prompts=64, k=4, rs_steps=10, dpo_prompts=64, eval_prompts=32, eval_samples=2, bok_prompts=16)

parser = experiment_parser(__doc__, "post_train")
_defaults = Config()
for _f in dataclasses.fields(Config):
    if _f.name in ("seed", "progress", "tasks", "margin", "mask_eos"):
        continue
    _value = getattr(_defaults, _f.name)
    _kind = type(_value)
    _zero_ok = _f.name in ("tau", "nll_alpha", "label_smoothing")  # 0: deterministic annotators; no NLL; DPO
    parser.add_argument("--" + _f.name.replace("_", "-"), default=_value,
                        type=positive(_kind) if _kind in (int, float) and not _zero_ok else _kind)
parser.add_argument("--tasks", nargs="+", default=list(_defaults.tasks), help="capability tags (task names)")
parser.add_argument("--margin", default=None, choices=sorted(MARGINS), help="Llama 2 margin table (none: Llama 3)")
parser.add_argument("--no-mask-eos", action="store_true", help="keep the EOS in the DPO log-probs")
parser.add_argument("--smoke", action="store_true", help="tiny sizes for every stage (seconds; overrides flags)")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
              if f.name not in ("progress", "mask_eos")}
    fields.update(progress=not args.no_progress, mask_eos=not args.no_mask_eos, **(SMOKE if args.smoke else {}))
    cfg = Config(**fields)  # every bad value fails here, before anything is trained or written
    tokenizer = build_tokenizer(cfg)
    prompts = draw_prompts(cfg)
    probe = build_model(cfg, tokenizer.n_words)
    for group in prompts.values():
        check_prompt_lengths(probe, tokenizer, [p.text for p in group], cfg.max_new_tokens)
    out = start(args)
    report = run(cfg, tokenizer, prompts, out)
    table = format_tables(report)
    atomic_write_bytes(out / "results.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "results.md", (table + "\n").encode())
    plot(report, out / "post_training.png")
    print(table)
    print(f"\nwall time {report['wall_time_s']:.0f} s, CPU time {report['cpu_time_s']:.0f} s "
          f"({report['threads']} thread(s)); results in {out}/")
    return report


if __name__ == "__main__":
    run_cli(main)
