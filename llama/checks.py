"""Argument checks shared by the entry points (`ModelArgs`, `llama.load`, `llama.save`, `python -m llama.convert`).

Every check runs before anything is built, read or written, and its message names the field, what it got and what
to write instead. The forward passes then assume valid arguments and read as the math.

Numbers typed as strings ("4096" in a JSON file or on a command line) are refused rather than converted: a file
that quotes its numbers was written by something else than the tool that reads it, and the message says which
field to fix. bool is not accepted as a number (True == 1 in Python).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch


class ConfigError(ValueError):
    """An invalid configuration value; `field` is the name it was given under (for readers to translate)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _describe(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} ({type(value).__name__})"


def _string_hint(value) -> str:
    return " (written as a string: remove the quotes)" if isinstance(value, str) else ""


def check_int(field: str, value, *, minimum: Optional[int] = 1, optional: bool = False) -> Optional[int]:
    """`value` as an int >= minimum (None passes when optional); ConfigError naming `field` otherwise."""
    if value is None and optional:
        return None
    what = "an integer" if minimum is None else "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(field, f"{field} must be {what}, got {_describe(value)}{_string_hint(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"{field} must be {what}, got {value}")
    return int(value)


def check_real(field: str, value, *, minimum: Optional[float] = None, strict: bool = True,
               optional: bool = False) -> Optional[float]:
    """`value` as a finite float above `minimum` (at or above it with strict=False); ConfigError otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(field, f"{field} must be a number, got {_describe(value)}{_string_hint(value)}")
    if not math.isfinite(value):
        raise ConfigError(field, f"{field} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(field, f"{field} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def check_bool(field: str, value) -> bool:
    """`value` if it is True or False: the string "false" is truthy, so strings are refused."""
    if not isinstance(value, bool):
        hint = " (a string: write true or false without quotes)" if isinstance(value, str) else ""
        raise ConfigError(field, f"{field} must be true or false, got {_describe(value)}{hint}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# dtypes and devices, in the spellings users type

FLOAT_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: Union[str, torch.dtype, None], field: str = "dtype") -> Optional[torch.dtype]:
    """A floating-point torch dtype from a dtype or a name ("bf16", "bfloat16", "torch.float16", ...); None passes.

    Checkpoints hold floating-point weights: integer and boolean dtypes are refused (int8 weights come from
    `llama.quantize_int8` after loading, not from a cast that would truncate every weight to zero)."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = FLOAT_DTYPES.get(value.strip().lower().removeprefix("torch."))
        if dtype is None:
            raise ConfigError(field, f"{field}={value!r} is not a floating-point dtype name; use one of "
                                     f"{', '.join(FLOAT_DTYPES)} (or a torch.dtype)")
    else:
        raise ConfigError(field, f"{field} must be a torch.dtype or a name such as 'bfloat16', got "
                                 f"{_describe(value)}")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(field, f"{field}={dtype} is not a floating-point dtype; checkpoint weights are float32, "
                                 f"bfloat16, float16 or float64 (for int8 weights call llama.quantize_int8(model) "
                                 f"after loading)")
    return dtype


def parse_device(value: Union[str, torch.device], field: str = "device") -> torch.device:
    """A torch.device that exists on this machine, from a device or a name ("cpu", "cuda", "cuda:1", "mps")."""
    if isinstance(value, str) and value.strip().lower() in ("gpu", "gpu:0"):
        raise ConfigError(field, f"{field}={value!r} is not a torch device name; use 'cuda' (or 'cuda:0') for an "
                                 f"NVIDIA or AMD GPU, 'mps' on Apple silicon")
    if not isinstance(value, (str, torch.device)):
        raise ConfigError(field, f"{field} must be a torch.device or a name such as 'cpu' or 'cuda', got "
                                 f"{_describe(value)}")
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise ConfigError(field, f"{field}={value!r} is not a device ({str(e).splitlines()[0]}); use 'cpu', "
                                 f"'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{field}={value!r}: no CUDA device is available on this machine "
                                     f"(torch.cuda.is_available() is False); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(field, f"{field}={value!r}: this machine has {torch.cuda.device_count()} CUDA "
                                     f"device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(field, f"{field}={value!r}: the MPS backend is not available here; use device='cpu'")
    return device
