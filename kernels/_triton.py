"""What every kernel shares: the public limits, compiled or interpreted, which backend runs, how a kernel is
launched, and three device helpers (`to_output`, `grouped_tile`, `mma`).

Public limits (exported as `kernels.SUPPORTED_DTYPES`, `kernels.MAX_RANK`; defined here, nowhere else):
  * SUPPORTED_DTYPES: the compute dtypes of the kernels (and of NF4 weights and their dequantised output);
  * MAX_RANK: the largest LoRA rank the GEMM kernels take (the rank tile sits in registers beside the output tile).

Compiled or interpreted (one mode per process)
----------------------------------------------
Triton decides when `@triton.jit` runs: with TRITON_INTERPRET=1 in the environment it returns functions that run
in its interpreter (numpy, on CPU tensors; CUDA tensors are copied to the host and back), otherwise functions that
compile for the GPU. The variable has to be set before the first `import triton`, because Triton's own library
functions (`tl.cdiv`, `tl.interleave`, ...) are jit functions too; the check at the end of this file refuses a
process where ours and Triton's disagree. `tests/conftest.py` sets it for the test suite (interpreter unless a CUDA
device is present); docs/kernels.md, "Backends and the interpreter", says why this mechanism.

Interpreter caveats the kernels work around (triton-lang/triton issues #4972, #11584):
  * bfloat16 arithmetic and bfloat16 `tl.dot` are silently wrong (bf16 is held as raw uint16 bits), so kernels
    take an `UPCAST` constexpr: interpreted bf16 tiles are converted to float32 right after loading (`mma`);
  * float32 -> bfloat16 casts truncate instead of rounding to nearest even, so `to_output` rounds by hand;
  * autotuning needs a GPU timer, so interpreted launches use one fixed configuration (`interpreter_meta`).

Backend rule (used by every public op in `kernels/ops.py`):
  * default: Triton when every tensor argument lives on a CUDA device, the plain-PyTorch reference otherwise;
  * `KERNELS_BACKEND=triton` forces Triton (on CPU tensors that needs the interpreter);
  * `KERNELS_BACKEND=reference` forces the reference.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128

BACKEND_ENV = "KERNELS_BACKEND"
AUTOTUNE_ENV = "KERNELS_AUTOTUNE"  # "0": compile only the first config of each kernel (quick GPU test runs)
POISON_ENV = "KERNELS_POISON"      # "1": fill kernel outputs with NaN before each launch (finds unwritten elements)
INTERPRETER_PROGRAMS = 3           # "SMs" of the interpreter: persistent kernels there run several tiles per program


def _noop():
    pass


# What `@triton.jit` does in this process (TRITON_INTERPRET, read when the decorator runs).
INTERPRETED = isinstance(triton.jit(_noop), InterpretedFunction)


def backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'reference' for an op whose tensor arguments are `tensors` (see the module docstring)."""
    forced = backend_forced()
    if forced in ("", "auto"):
        return "triton" if tensors and all(t.is_cuda for t in tensors) else "reference"
    if forced in ("triton", "reference"):
        return forced
    raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; set it to 'triton', 'reference' or 'auto' "
                     f"(or unset it)")


def backend_forced() -> str:
    """The KERNELS_BACKEND value ('' when unset)."""
    return os.environ.get(BACKEND_ENV, "").strip().lower()


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels compute on float32 copies of their tiles: bfloat16 in the interpreter (module docstring)."""
    return dtype == torch.bfloat16 and INTERPRETED


def sm_count(device: torch.device) -> int:
    """Programs a persistent kernel launches: one per streaming multiprocessor (INTERPRETER_PROGRAMS off CUDA)."""
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def rank_block(rank: int) -> int:
    """The LoRA rank padded to a power of two >= 16 (`tl.dot` needs every dimension >= 16 on a GPU)."""
    return max(16, pow2(rank))


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); plain Python, cheaper than `triton.next_power_of_2` per launch."""
    return 1 << (n - 1).bit_length()


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer for a kernel: `torch.empty`, or NaN-filled when KERNELS_POISON=1 (debugging and tests)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV, "0").strip() == "1":
        out.fill_(float("nan"))
    return out


_TABLES: dict = {}


def cached_on(device: torch.device, name: str, make):
    """Small constant tensors (code books, lookup tables) built once per device by `make(device)`."""
    key = (str(device), name)
    if key not in _TABLES:
        _TABLES[key] = make(device)
    return _TABLES[key]


# ---- autotuning and launching ----------------------------------------------------------------------------------

def autotune(configs: list, key: list[str], prune=None, **kwargs):
    """`triton.autotune` with a short benchmark and an optional `prune(configs, args) -> configs` filter.

    `KERNELS_AUTOTUNE=0` keeps only the first config that survives pruning (no timing runs: quick GPU tests).
    """

    def early_config_prune(configs, named_args, **meta):
        kept = prune(configs, {**named_args, **meta}) if prune else configs
        return kept[:1] if os.environ.get(AUTOTUNE_ENV, "1").strip() == "0" else kept

    if "do_bench" in inspect.signature(triton.autotune).parameters:  # Triton >= 3.2; older ones use their default
        kwargs["do_bench"] = _bench_for_autotune
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_config_prune},
                           **kwargs)


def _bench_for_autotune(kernel_call, quantiles):
    """Time one autotuning candidate: shorter than Triton's default (25 ms warm-up + 100 ms per config), and a
    candidate that fails to compile (a compiler crash, not only the out-of-resources errors Triton's autotuner
    already skips) is ranked last instead of aborting the launch. If every candidate fails, the launch with the
    chosen one raises the error."""
    try:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
    except RuntimeError as e:
        if "PassManager" not in str(e) and "compil" not in str(e).lower():
            raise
        return [float("inf")] * len(quantiles) if quantiles else float("inf")


def launch(tuned, grid, *args, interpreter_meta: dict, **kwargs) -> None:
    """Run an autotuned kernel: compiled, or in the interpreter with the one config `interpreter_meta`.

    Host time matters at small shapes (the GPU idles while Python prepares a launch), so the compiled path skips
    Triton's `Autotuner.run` once a key is tuned: that builds a dict of every argument, filters it against a list
    and collects dtypes on each call (docs/kernels.md, "Host overhead"). Instead the chosen config's meta-parameters
    are remembered under our own key (the autotuning key values, the tensor dtypes and KERNELS_AUTOTUNE) and the
    jit function is called directly, as the autotuner itself does after its lookup. A new key goes through the
    autotuner once (benchmark, pruning hook), then takes the short path.
    """
    if INTERPRETED:
        tuned.fn[grid](*args, **interpreter_meta, **kwargs)
        return
    ensure_allocator()
    key = _tuning_key(tuned, args, kwargs)
    meta = _CHOSEN.get(key)
    if meta is None:
        tuned[grid](*args, **kwargs)             # Triton's autotuner: times the candidates once for this key
        _CHOSEN[key] = tuned.best_config.all_kwargs()
    else:
        tuned.fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)


_CHOSEN: dict = {}       # (autotuner id, key values, tensor dtypes, KERNELS_AUTOTUNE) -> config meta-parameters
_KEY_SLOTS: dict = {}    # autotuner id -> ((position or name) of each key argument, ...)


def _tuning_key(tuned, args, kwargs) -> tuple:
    """What Triton's autotuner keys its cache on (key arguments + dtypes of tensor arguments), built cheaply."""
    slots = _KEY_SLOTS.get(id(tuned))
    if slots is None:
        names = tuned.fn.arg_names
        slots = _KEY_SLOTS[id(tuned)] = tuple(names.index(k) if names.index(k) < len(args) else k
                                              for k in tuned.keys)
    values = tuple(args[s] if type(s) is int else kwargs[s] for s in slots)
    dtypes = tuple(a.dtype for a in args if type(a) is torch.Tensor)
    return (id(tuned), values, dtypes, os.environ.get(AUTOTUNE_ENV, "1"))


def ensure_allocator() -> None:
    """Give Triton (>= 3.3) an allocator for the scratch memory of in-kernel TMA descriptors, once per thread.

    Triton keeps the allocator in a ContextVar, and a new thread starts with an empty context: autograd runs CUDA
    backward passes on its own device thread, so setting it once per process is not enough ("no allocator was
    set" in the backward). A thread-local flag (not a set of thread ids, which the OS reuses) marks the threads done.
    """
    if not getattr(_THREAD, "allocator_set", False):
        if hasattr(triton, "set_allocator"):
            triton.set_allocator(_cuda_scratch)
        _THREAD.allocator_set = True


_THREAD = threading.local()


def _cuda_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


# ---- device helpers ---------------------------------------------------------------------------------------------

@triton.jit
def to_output(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast a float32 tile to the output dtype; with ROUND_BF16, round to nearest even by hand.

    The interpreter's float32 -> bfloat16 cast truncates. Rounding by hand: add 0x7FFF plus the lowest kept bit
    to the float32 bits, keep the top 16 (ties go to the even bfloat16). Inputs here are finite.
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of output tile number `tile` in grouped order: GROUP_M row-tiles walk each column of
    weight tiles together, so that column is still in L2 when the next of them reads it (Triton tutorial 03)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (tile // (GROUP_M * tiles_n)) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * tiles_n)) % group_m, (tile % (GROUP_M * tiles_n)) // group_m


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with float32 accumulation: the one `tl.dot` call every GEMM here goes through.

    UPCAST (interpreter, bfloat16): multiply float32 copies. IEEE (float32 inputs on a GPU): full float32 products
    instead of TF32, so float32 results match torch's default float32 matmul.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# One mode per process: our jit functions and Triton's own library ones (tl.cdiv) must agree, or every interpreted
# kernel fails inside its first library call ("Cannot call @triton.jit'd outside of the scope of a kernel").
if isinstance(tl.cdiv, (JITFunction, InterpretedFunction)) and isinstance(tl.cdiv, InterpretedFunction) != INTERPRETED:
    raise ImportError(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} changed after triton was imported: "
                      f"Triton's library is {'interpreted' if not INTERPRETED else 'compiled'} but kernels would be "
                      f"{'interpreted' if INTERPRETED else 'compiled'}. Set TRITON_INTERPRET before the first "
                      f"`import triton` (in the shell, or at the top of the entry script / conftest.py)")
