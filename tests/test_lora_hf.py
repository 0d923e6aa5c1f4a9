"""LoRA parity with Hugging Face PEFT on `LlamaForCausalLM`, and `peft.export_hf` loaded by HF PEFT.

HF PEFT runs in a subprocess without this repository on its path (tests/reference/hf_peft.py).

Per case, the subprocess:
  1. builds `LlamaForCausalLM` in float64 from the same base weights (Meta -> HF names, q/k rows permuted here),
  2. wraps it with HF's `get_peft_model(LoraConfig(...))`, copies in our LoRA tensors (lora_B / DoRA magnitude rows
     permuted for q_proj/k_proj), and returns its logits;
  3. loads our `export_hf` folder with `PeftModel.from_pretrained` onto a fresh base and returns those logits.
Both are compared with our model's float64 logits and with its last hidden state before the final norm (which
rounds to float32 in every LLaMA implementation, so the logits alone would hide differences below ~1e-8).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft
from tests.reference.hf_peft import hf_peft_folder, run_isolated
from tests.reference.paper_peft import forward_with_hidden, make_model, max_rel_error, tokens


@pytest.fixture(scope="module")
def hf_peft_dir() -> Path:
    return hf_peft_folder()


HF_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    hf_dir, works = Path(sys.argv[1]), [Path(w) for w in sys.argv[2:]]
    import peft as hf_peft
    assert Path(hf_peft.__file__).resolve().is_relative_to(hf_dir.resolve()), hf_peft.__file__
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM


    def base_model(work, case):
        model = LlamaForCausalLM(LlamaConfig(**case["hf_config"])).to(torch.float64)
        model.load_state_dict(load_file(str(work / "base.safetensors")), strict=True)
        return model.eval()


    def logits_and_hidden(model, tokens):
        """Logits and the last hidden state before the final norm (the norm rounds to float32; this does not)."""
        seen = []
        norm = model.get_base_model().model.norm
        handle = norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        with torch.no_grad():
            logits = model(tokens).logits
        handle.remove()
        return logits.contiguous(), seen[-1].contiguous()


    def run(work):
        case = json.loads((work / "case.json").read_text())
        tokens = load_file(str(work / "tokens.safetensors"))["tokens"]

        # 1. HF PEFT's own LoRA with our tensors copied in
        c = case["lora"]
        model = get_peft_model(base_model(work, case), LoraConfig(
            r=c["r"], lora_alpha=c["alpha"], target_modules=c["hf_targets"], use_rslora=c["use_rslora"],
            use_dora=c["use_dora"], layers_to_transform=c["layers"], lora_dropout=0.0))
        ours = load_file(str(work / "lora.safetensors"))  # HF module path -> tensors, rows already in HF order
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in ours.items():
                params[key].copy_(value)
        logits_hf_lora, hidden_hf_lora = logits_and_hidden(model, tokens)

        # 2. our export_hf folder, loaded by HF PEFT
        loaded = PeftModel.from_pretrained(base_model(work, case), str(work / "export"))
        logits_export, hidden_export = logits_and_hidden(loaded, tokens)
        n_lora = sum(1 for n, _ in loaded.named_parameters() if "lora_" in n)
        save_file({"hf_lora": logits_hf_lora, "export": logits_export, "hf_lora_hidden": hidden_hf_lora,
                   "export_hidden": hidden_export}, str(work / "logits.safetensors"))
        (work / "info.json").write_text(json.dumps({"n_lora_tensors_loaded": n_lora,
                                                    "peft_version": hf_peft.__version__}))


    for work in works:
        run(work)
''')

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
    """Prepare every case, then run HF once (one interpreter start for all cases)."""
    root = tmp_path_factory.mktemp("hf_parity")
    cases = {case: prepare(case, root / case) for case in CASES}
    done = run_isolated(HF_SCRIPT, [hf_peft_dir, *(c["work"] for c in cases.values())], hf_peft_dir, root)
    assert done.returncode == 0, done.stderr[-3000:]
    for c in cases.values():
        c["hf"] = load_file(str(c["work"] / "logits.safetensors"))
        c["info"] = json.loads((c["work"] / "info.json").read_text())
    return cases


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_hf_peft(hf_results, case):
    r = hf_results[case]
    assert max_rel_error(r["ours"], r["frozen"]) > 1e-3  # the adapter matters, so equality below means something
    assert r["info"]["n_lora_tensors_loaded"] == r["n_tensors"]  # export_hf: every tensor found its module
    err_hf = max(max_rel_error(r["ours"], r["hf"]["hf_lora"]), max_rel_error(r["hidden"], r["hf"]["hf_lora_hidden"]))
    err_export = max(max_rel_error(r["ours"], r["hf"]["export"]), max_rel_error(r["hidden"], r["hf"]["export_hidden"]))
    print(f"{case}: vs HF PEFT LoRA rel. error {err_hf:.2e}; export_hf loaded by HF PEFT rel. error {err_export:.2e}")
    assert err_hf < 1e-12 and err_export < 1e-12
