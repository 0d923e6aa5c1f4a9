"""NF4 dequantisation in one launch, the double-quantised absmax restored inside the kernel (QLoRA, arXiv 2305.14314).

Shapes: n values of the weight, nb = ceil(n / blocksize) absmax blocks, HB = blocksize // 2 packed bytes per block,
        G absmax blocks per chunk (one program per chunk).

What it computes (QLoRA §3, format in `kernels/nf4.py`), for value i in absmax block b = i // blocksize:
    double dequantisation (the doubleDequant of §3, Eq. 5):
                                     absmax_b = code2[c_b] * absmax2[b // 256] + offset        (float32)
    block-wise dequantisation:       w_i = NF4[q_i] * absmax_b   in float32, then one cast to the output dtype

Reading order: the kernel `_nf4_dequant_kernel` -> the launcher `nf4_dequantize_triton` -> the reference
`nf4_dequantize_reference`. Argument checks are done by the public op (`kernels.nf4_dequantize`, kernels/ops.py).

Design. Each program owns G whole absmax blocks, viewed as a [G, HB] tile of packed bytes, so every absmax is
fetched (and, with double quantisation, restored) once and broadcast over its row. Each byte gives two values
(high nibble first): look both up in the 16-entry table, multiply by the block's absmax in float32, interleave to
[G, blocksize], cast once, store. bitsandbytes needs two launches and an add for the same work (its CUDA path
restores the absmax in a separate kernel). A persistent schedule (a few programs per SM looping over chunks) is
an autotuning candidate too: `kernels/schedules.py`.
Bit-exactness: floating-point contraction is switched off for this kernel (`enable_fp_fusion=False`), otherwise
the compiler fuses the restore's multiply and add into one FMA and the absmax differs in the last bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import autotune, empty, launch, sm_count, to_output, upcast
from .nf4 import _CHUNK, NF4Weight, nf4_lookup, restore_absmax
from .schedules import DEQUANT_PERSISTENT, nf4_dequant_persistent

# Interpreter: one program per 64 absmax blocks (4096 values at blocksize 64); cost there is per program.
INTERPRETER_META = dict(BLOCKS=64, TREE=False, PER_SM=0)


@triton.jit
def _nf4_dequant_kernel(
    # pointers: the NF4Weight's tensors (code2 / absmax2 / offset unused without double quantisation), the output
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
    # sizes: values, packed bytes, absmax blocks
    n, n_bytes, n_blocks,
    HALF_BLOCK: tl.constexpr,    # HB: packed bytes per absmax block (blocksize // 2)
    BLOCKSIZE2: tl.constexpr,    # absmax values per second-level block (256)
    DOUBLE_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr,    # interpreter only: round float32 -> bfloat16 by hand
    # meta-parameters
    BLOCKS: tl.constexpr,        # G: absmax blocks per chunk
    TREE: tl.constexpr,          # table lookup as a select tree (True) or a gather from global memory (False)
    PER_SM: tl.constexpr,        # 0: one program per chunk (below); else persistent programs (kernels/schedules.py)
):
    if PER_SM:
        nf4_dequant_persistent(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
                               n, n_bytes, n_blocks, HALF_BLOCK, BLOCKSIZE2, DOUBLE_QUANT, ROUND_BF16, BLOCKS, TREE)
    else:
        # ---- 1. the packed bytes of this program's G absmax blocks, as a [G, HB] tile (int64 indices) ----------
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)      # [G] absmax-block index
        byte = block[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]      # [G, HB] packed-byte index
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first")

        # ---- 2. one absmax per block, restored (blocks past the end read block nb - 1; never stored) -----------
        scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, tl.minimum(block, n_blocks - 1),
                               BLOCKSIZE2, DOUBLE_QUANT)                             # [G] float32

        # ---- 3. w = NF4[code] * absmax in float32; element 2i is the high nibble --------------------------------
        high = nf4_lookup(code_ptr, (packed >> 4).to(tl.int32), TREE) * scale[:, None]     # [G, HB]
        low = nf4_lookup(code_ptr, (packed & 0xF).to(tl.int32), TREE) * scale[:, None]     # [G, HB]
        values = tl.interleave(high, low)                                                   # [G, blocksize]

        # ---- 4. one cast, one contiguous store ----------------------------------------------------------------
        index = block[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]  # [G, blocksize]
        tl.store(out_ptr + index, to_output(values, out_ptr.dtype.element_ty, ROUND_BF16), mask=index < n,
                 eviction_policy="evict_first")


@functools.lru_cache(maxsize=None)
def _tuned_dequant(half_block: int):
    """The kernel autotuned, for one block size, over packed bytes per chunk (2-8 KB), warps, the table lookup, and
    the schedule (one program per chunk here, persistent in kernels/schedules.py)."""
    schedules = [(2048, 4, 0), (4096, 4, 0), (4096, 8, 0), (8192, 8, 0)] + DEQUANT_PERSISTENT  # (bytes, warps, PER_SM)
    configs = [triton.Config({"BLOCKS": max(1, nbytes // half_block), "TREE": tree, "PER_SM": per_sm},
                             num_warps=warps) for nbytes, warps, per_sm in schedules for tree in (False, True)]
    return autotune(configs, key=["n_bytes"])(_nf4_dequant_kernel)


def nf4_dequantize_triton(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode `q` to a dense tensor of `q.shape` in `dtype` (default: the weight's original dtype)."""
    dtype = q.dtype if dtype is None else dtype
    out = empty(q.shape, dtype, q.device)
    if q.numel == 0:
        return out
    half_block = q.blocksize // 2
    dq = q.double_quant
    absmax2, code2, offset = (q.absmax2, q.code2, q.offset) if dq else (q.absmax, q.code, q.absmax)  # unused dummies
    programs = sm_count(q.device)

    def grid(meta):  # one program per chunk of BLOCKS absmax blocks, or PER_SM programs per SM looping over them
        chunks = triton.cdiv(q.n_blocks, meta["BLOCKS"])
        return (min(chunks, meta["PER_SM"] * programs) if meta["PER_SM"] else chunks,)

    launch(_tuned_dequant(half_block), grid,
           q.packed, q.absmax, code2, absmax2, offset, q.code, out, q.numel, q.packed.numel(), q.n_blocks,
           HALF_BLOCK=half_block, BLOCKSIZE2=q.blocksize2, DOUBLE_QUANT=dq, ROUND_BF16=upcast(dtype),
           interpreter_meta=INTERPRETER_META, enable_fp_fusion=False)
    return out


def absmax_float32(q: NF4Weight) -> torch.Tensor:
    """The float32 absmax of every block [nb]; double quantisation restored as code2[c] * absmax2[b // 256] + offset."""
    if not q.double_quant:
        return q.absmax
    values = q.code2[q.absmax.long()]                                              # [nb] float32
    groups = torch.arange(q.n_blocks, device=q.device) // q.blocksize2             # [nb] second-level block
    return values.mul_(q.absmax2[groups]).add_(q.offset)                           # multiply, round, add


def nf4_dequantize_reference(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantisation with bitsandbytes' float32 arithmetic (table * absmax, then one cast).

    Lookup is per byte: a 256-entry table maps a byte to its (high, low) value pair. float64 output works too
    (for float64 references): the float32 values are exact in it.
    """
    dtype = q.dtype if dtype is None else dtype
    n, bs = q.numel, q.blocksize
    pairs = torch.stack([q.code.repeat_interleave(16), q.code.repeat(16)], dim=1)  # [256, 2]: byte -> (hi, lo)
    absmax = absmax_float32(q)                                                     # [nb]
    packed = q.packed.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=q.device)
    step = max(1, _CHUNK // bs)                                                    # blocks per step (in cache)
    for b0 in range(0, q.n_blocks, step):
        b1 = min(b0 + step, q.n_blocks)
        values = pairs.index_select(0, packed[b0 * bs // 2: b1 * bs // 2].to(torch.int32)).reshape(-1)
        if values.numel() < (b1 - b0) * bs:                                        # last block partial
            values = torch.nn.functional.pad(values, (0, (b1 - b0) * bs - values.numel()))
        values = values.view(b1 - b0, bs).mul_(absmax[b0:b1, None]).reshape(-1)   # float32 products
        out[b0 * bs: min(b1 * bs, n)] = values[: min(b1 * bs, n) - b0 * bs]      # one cast to dtype
    return out.reshape(q.shape)
