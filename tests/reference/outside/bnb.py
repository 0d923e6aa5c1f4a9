"""bitsandbytes as the reference for the NF4 format: its quantiser, its dequantisers and its code tables.

Runs in the reference process (tests/reference/isolation.py). A quantisation state crosses the process boundary as a
dict of tensors and numbers (`state_dict` / `from_state_dict`), never as a bitsandbytes object.
"""

from __future__ import annotations

import bitsandbytes
import bitsandbytes.functional as bnb
import torch
import torch._dynamo
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

# bitsandbytes wraps its pure-PyTorch dequantiser in torch.compile; compiling per odd shape costs seconds and changes
# no value (eager and compiled compute the same float32 products).
torch._dynamo.config.disable = True


def version() -> str:
    return bitsandbytes.__version__


def state_dict(packed: torch.Tensor, state) -> dict:
    nested = bool(state.nested)
    return {"packed": packed, "absmax": state.absmax, "code": state.code, "shape": list(state.shape),
            "dtype": state.dtype, "blocksize": state.blocksize, "quant_type": state.quant_type, "nested": nested,
            "offset": state.offset if nested else None, "absmax2": state.state2.absmax if nested else None,
            "code2": state.state2.code if nested else None, "blocksize2": state.state2.blocksize if nested else None}


def from_state_dict(d: dict):
    state2 = None
    if d["nested"]:
        state2 = bnb.QuantState(absmax=d["absmax2"], code=d["code2"], blocksize=d["blocksize2"], dtype=torch.float32)
    state = bnb.QuantState(absmax=d["absmax"], shape=torch.Size(d["shape"]), code=d["code"], blocksize=d["blocksize"],
                           quant_type=d["quant_type"], dtype=d["dtype"], offset=d["offset"], state2=state2)
    return d["packed"], state


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
             quant_storage=torch.uint8) -> dict:
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                                      quant_storage=quant_storage)
    return state_dict(packed, state)


def dequantize(d: dict, backend: str = "public") -> torch.Tensor:
    """bitsandbytes' public `dequantize_4bit` ("public"), or its pure-PyTorch backend ("default")."""
    packed, state = from_state_dict(d)
    if backend == "public":
        return bnb.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize, state.shape,
                                    state.dtype)


def code_tables() -> dict:
    return {"dynamic": bnb.create_dynamic_map(), "nf4": bnb.get_4bit_type("nf4", device="cpu")}
