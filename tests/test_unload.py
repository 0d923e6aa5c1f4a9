"""`peft.merge_and_unload`: the adapter folded into a plain `llama.Transformer` that computes what the attached
adapter computed and that `llama.save` writes as a standalone checkpoint; what cannot be folded is refused untouched."""

import pytest
import torch

import llama
import peft
from llama.moe import Experts
from tests.reference.paper_peft import max_rel_error

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def trained(preset: str, config, dtype=torch.float64):
    """`preset` with `config` attached and its adapter moved away from its (identity) initialisation."""
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs.from_name(preset)).to(dtype)
    peft.apply(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.adapter_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


CASES = {
    "lora-all-linears": ("tiny-llama-2-gqa", peft.LoraConfig(r=4, target_modules=ALL + ("output",))),
    "rslora-some-layers": ("tiny-llama-3", peft.LoraConfig(r=2, use_rslora=True, target_modules=("wq", "w2"),
                                                           layers=(1,))),
    "dora": ("tiny-llama-2-gqa", peft.LoraConfig(r=4, use_dora=True, target_modules=("wq", "wv", "w1"))),
    "qlora": ("tiny-llama-2-gqa", peft.LoraConfig(r=4, quantize_base=True, target_modules=("wq", "wv", "w2"))),
    "lora-experts": ("tiny-llama-4-scout", peft.LoraConfig(r=2, target_modules=("wq", "experts"))),
    "qlora-experts": ("tiny-llama-4-scout", peft.LoraConfig(r=2, quantize_base=True, target_modules=("wv", "experts"))),
    "tied-head": ("tiny-llama-3.2", peft.LoraConfig(r=4, target_modules=("wq", "output"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_is_plain_and_computes_the_same(case, tmp_path):
    preset, config = CASES[case]
    model = trained(preset, config)
    tokens = torch.randint(0, model.args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attached = model(tokens)
    embedding = model.tok_embeddings.weight.detach().clone()
    merged = peft.merge_and_unload(model)
    assert merged is model and type(merged) is llama.Transformer and not hasattr(merged, "peft_state")
    plain = {type(m) for m in merged.modules()} - {llama.Transformer}
    assert not any(t.__module__.startswith("peft") for t in plain), plain
    assert all(type(m) is Experts for m in merged.modules() if "experts" in type(m).__name__.lower())
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        # float64, the project's parity bar: the fold W0 + ΔW is exact to rounding (NF4 values are exact)
        assert max_rel_error(merged(tokens), attached) <= 1e-10
    assert torch.equal(merged.tok_embeddings.weight, embedding)  # a tied head's LoRA never writes the embedding
    if case == "tied-head":
        assert not merged.args.tie_word_embeddings and merged.output.weight is not merged.tok_embeddings.weight
    for fmt in ("hf", "meta") if "experts" not in case else ("meta",):  # (Llama 4's HF writer takes ~10 s)
        llama.save(merged, tmp_path / fmt, format=fmt)
        with torch.no_grad():
            again = llama.load(tmp_path / fmt)(tokens)
        assert torch.equal(again, merged(tokens).detach()), fmt


@pytest.mark.parametrize("config, message", [
    (peft.AdapterV1Config(adapter_layers=1, adapter_len=2), "adapter_v1 cannot be merged"),
    (peft.ExcitorConfig(adapter_layers=1, adapter_len=2, rank=2), "excitor cannot be merged"),
    (peft.AdapterV2Config(adapter_layers=0), "learnt non-zero biases"),
    (peft.AdapterV2Config(adapter_layers=1), "adaption prompts"),
])
def test_what_cannot_be_folded_is_refused_untouched(config, message):
    model = trained("tiny-llama-2-gqa", config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        peft.merge_and_unload(model)
    assert model.peft_state is not None and not model.peft_state.merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_v2_with_zero_biases_folds():
    model = trained("tiny-llama-2-gqa", peft.AdapterV2Config(adapter_layers=0))
    with torch.no_grad():
        for name, p in peft.adapter_parameters(model).items():
            if name.endswith(".bias"):
                p.zero_()
    tokens = torch.randint(0, model.args.vocab_size, (1, 7))
    with torch.no_grad():
        attached = model(tokens)
        assert max_rel_error(peft.merge_and_unload(model)(tokens), attached) <= 1e-10


def test_a_model_without_adapter_is_an_error():
    with pytest.raises(ValueError, match="needs a model with an adapter attached"):
        peft.merge_and_unload(llama.Transformer(llama.ModelArgs.from_name("tiny-llama-1")))
