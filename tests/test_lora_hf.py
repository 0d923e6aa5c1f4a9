"""LoRA parity with Hugging Face PEFT on `LlamaForCausalLM`, and `peft.export_hf` loaded by HF PEFT.

Our top-level `peft` package shadows Hugging Face's, so HF PEFT is installed outside the project's site-packages
(`pip install --target <dir> --no-deps peft accelerate`, or the folder named by $HF_PEFT_DIR) and driven from a
reference process (tests/reference/isolation.py) whose import path puts that folder first; the HF side is
tests/reference/outside/hf_peft.py.

Per case, the reference process:
  1. builds `LlamaForCausalLM` in float64 from the same base weights (Meta -> HF names, q/k rows permuted here),
  2. wraps it with HF's `get_peft_model(LoraConfig(...))`, copies in our LoRA tensors (lora_B / DoRA magnitude rows
     permuted for q_proj/k_proj), and returns its logits;
  3. loads our `export_hf` folder with `PeftModel.from_pretrained` onto a fresh base and returns those logits.
Both are compared with our model's float64 logits and with its last hidden state before the final norm (which
rounds to float32 in every LLaMA implementation, so the logits alone would hide differences below ~1e-8).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peft
from tests.reference.isolated_install import hf_peft_folder
from tests.reference.isolation import reference
from tests.reference.paper_peft import forward_with_hidden, make_model, max_rel_error, tokens


@pytest.fixture(scope="module")
def hf_peft_dir() -> Path:
    """A folder holding HF `peft` (and `accelerate`), never the project's own environment."""
    return hf_peft_folder()


HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
              "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows -> HF's half-split rows, per head: reshape (n, D/2, 2, …), swap axes 1 and 2."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def hf_base_state_dict(model) -> dict[str, torch.Tensor]:
    a = model.args
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for meta, hf in HF_MODULES.items():
            parent = layer.attention if meta in ("wq", "wk", "wv", "wo") else layer.feed_forward
            w = getattr(parent, meta).weight
            if meta in ("wq", "wk"):
                w = to_hf_rows(w, a.n_heads if meta == "wq" else a.n_kv_heads)
            sd[p + hf + ".weight"] = w
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def hf_lora_tensors(model) -> dict[str, torch.Tensor]:
    """Our LoRA tensors under HF PEFT's parameter names (inside a PeftModel), rows permuted for q/k."""
    a = model.args
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        short = name.rsplit(".", 1)[-1]
        prefix = "base_model.model.lm_head" if name == "output" else \
            f"base_model.model.model.layers.{name.split('.')[1]}.{HF_MODULES[short]}"
        heads = {"wq": a.n_heads, "wk": a.n_kv_heads}.get(short)
        B, m = module.lora_B.detach(), getattr(module, "lora_magnitude", None)
        out[prefix + ".lora_A.default.weight"] = module.lora_A.detach().clone()
        out[prefix + ".lora_B.default.weight"] = (to_hf_rows(B, heads) if heads else B).clone()
        if m is not None:
            m = m.detach()
            out[prefix + ".lora_magnitude_vector.default.weight"] = (to_hf_rows(m, heads) if heads else m).clone()
    return {k: v.contiguous() for k, v in out.items()}


CASES = {
    "mha-all-linears": ("mha", peft.LoraConfig(r=3, alpha=5.0, target_modules=("wq", "wk", "wv", "wo", "w1", "w2",
                                                                            "w3", "output"))),
    "gqa-rslora-layer1": ("gqa", peft.LoraConfig(r=4, alpha=8.0, target_modules=("wq", "wk", "wv", "w3"),
                                                 use_rslora=True, layers=(1,))),
    "tied-dora": ("tied", peft.LoraConfig(r=2, alpha=4.0, target_modules=("wq", "wk", "wo", "w2", "output"),
                                          use_dora=True)),
}


def prepare(case: str, work: Path) -> dict:
    """Our adapted model's logits, plus everything the HF side needs, written into `work`."""
    kind, config = CASES[case]
    model = make_model(kind)
    a = model.args
    base = hf_base_state_dict(model)
    toks = tokens(a, B=2, T=10)
    with torch.no_grad():
        frozen = model(toks)
    peft.apply(model, config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(p * (1 + 0.3 * noise) if name.endswith("magnitude") else 0.5 * noise)
        ours, hidden = forward_with_hidden(model, toks)
    work.mkdir(parents=True)
    save_file(base, str(work / "base.safetensors"))
    save_file(hf_lora_tensors(model), str(work / "lora.safetensors"))
    save_file({"tokens": toks}, str(work / "tokens.safetensors"))
    peft.export_hf(model, work / "export")
    hf_targets = sorted({"lm_head" if t == "output" else HF_MODULES[t].split(".")[1] for t in config.target_modules})
    hf_config = dict(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
                     num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                     head_dim=a.head_dim, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
                     tie_word_embeddings=a.tie_word_embeddings, hidden_act="silu", attention_bias=False,
                     mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                     attn_implementation="sdpa")
    (work / "case.json").write_text(json.dumps({"hf_config": hf_config, "lora": {
        "r": config.r, "alpha": config.alpha, "hf_targets": hf_targets, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "layers": list(config.layers) if config.layers else None}}))
    n_adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    return dict(ours=ours, hidden=hidden, frozen=frozen, work=work,
                n_tensors=n_adapted * (3 if config.use_dora else 2))


@pytest.fixture(scope="module")
def hf_results(tmp_path_factory, hf_peft_dir) -> dict:
    """Prepare every case, then run each through HF PEFT in the reference process (HF peft first on its path)."""
    root = tmp_path_factory.mktemp("hf_parity")
    cases = {case: prepare(case, root / case) for case in CASES}
    hf = reference(path=[hf_peft_dir])
    for c in cases.values():
        c["hf"] = hf.call("hf_peft.run_case", str(c["work"]), str(hf_peft_dir))
    return cases


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_hf_peft(hf_results, case):
    r = hf_results[case]
    assert max_rel_error(r["ours"], r["frozen"]) > 1e-3  # the adapter matters, so equality below means something
    assert r["hf"]["n_lora_tensors_loaded"] == r["n_tensors"]  # export_hf: every tensor found its module
    err_hf = max(max_rel_error(r["ours"], r["hf"]["hf_lora"]), max_rel_error(r["hidden"], r["hf"]["hf_lora_hidden"]))
    err_export = max(max_rel_error(r["ours"], r["hf"]["export"]), max_rel_error(r["hidden"], r["hf"]["export_hidden"]))
    print(f"{case}: vs HF PEFT LoRA rel. error {err_hf:.2e}; export_hf loaded by HF PEFT rel. error {err_export:.2e}")
    assert err_hf < 1e-12 and err_export < 1e-12
