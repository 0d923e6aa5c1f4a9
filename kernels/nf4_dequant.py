"""NF4 dequantisation in one launch, double-quantised absmax restored inside the kernel (as LoRAFusion does).

Shapes: n values, nb = ceil(n / blocksize) absmax blocks, HB = blocksize // 2 packed bytes per block,
        G blocks per chunk (one program per chunk, or a few programs per SM looping over chunks).

Reading order: launcher `nf4_dequantize_triton` -> kernel `_nf4_dequant_kernel` (`_nf4_dequant_chunk`) -> device
helpers, also used by the fused QLoRA GEMM (`nf4_decode_rows`, `nf4_decode`, `restore_absmax`, `nf4_lookup`) ->
reference `nf4_dequantize_reference`.

Design. Each program owns G whole absmax blocks, viewed as a [G, HB] tile of packed bytes, so every absmax is
fetched (and, with double quantisation, restored: code2[c] * absmax2[b // 256] + offset) once and broadcast over
its row. Each byte gives two values (high nibble first): look both up in the 16-entry table, multiply by the
block's absmax in float32, interleave to [G, blocksize], cast once, store. bitsandbytes needs two launches and an
add for the same work (its CUDA path restores the absmax in a separate kernel).
Bit-exactness: floating-point contraction is switched off for this kernel (`enable_fp_fusion=False`), otherwise
the compiler fuses the restore's multiply and add into one FMA and the absmax differs in the last bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import autotune, empty, launch, sm_count, to_output, upcast
from .nf4 import _CHUNK, FLOAT_DTYPES, NF4Weight

# Interpreter: one program per 64 absmax blocks (4096 values at blocksize 64); cost there is per program.
INTERPRETER_META = dict(BLOCKS=64, TREE=False, PER_SM=0)


def nf4_dequantize_triton(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode `q` to a dense tensor of `q.shape` in `dtype` (default: the weight's original dtype)."""
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot dequantise to {dtype}; use one of {FLOAT_DTYPES}")
    out = empty(q.shape, dtype, q.device)
    n = q.numel
    if n == 0:
        return out
    if n >= 2**31:
        raise ValueError(f"weight has {n} values; the kernel indexes with int32 absmax-block counts up to 2^31 "
                         f"values, split the weight")
    half_block = q.blocksize // 2
    dq = q.double_quant
    absmax2, code2, offset = (q.absmax2, q.code2, q.offset) if dq else (q.absmax, q.code, q.absmax)  # unused dummies
    programs = sm_count(q.device)

    def grid(meta):  # one program per chunk of BLOCKS absmax blocks, or PER_SM programs per SM looping over them
        chunks = triton.cdiv(q.n_blocks, meta["BLOCKS"])
        return (min(chunks, meta["PER_SM"] * programs) if meta["PER_SM"] else chunks,)

    launch(_tuned_dequant(half_block), grid,
           q.packed, q.absmax, code2, absmax2, offset, q.code, out, n, q.packed.numel(), q.n_blocks,
           HALF_BLOCK=half_block, BLOCKSIZE2=q.blocksize2, DOUBLE_QUANT=dq, ROUND_BF16=upcast(dtype, q.device),
           device=q.device, interpreter_meta=INTERPRETER_META,
           enable_fp_fusion=False)
    return out


@functools.lru_cache(maxsize=None)
def _tuned_dequant(half_block: int):
    """The kernel autotuned over packed bytes per chunk (2-8 KB), warps, the table lookup, and the schedule (one
    program per chunk, or a few programs per SM looping over chunks: no partly filled last wave of programs), for
    one block size."""
    schedules = [  # (packed bytes per chunk, warps, programs per SM: 0 = one program per chunk)
        (2048, 4, 0), (4096, 4, 0), (4096, 8, 0), (8192, 8, 0),
        # persistent, added after H200 run 2 (79.4% of copy bandwidth at 11008x4096 with one program per chunk)
        (2048, 4, 8), (4096, 4, 4), (4096, 8, 2), (8192, 8, 2),
    ]
    configs = [triton.Config({"BLOCKS": max(1, nbytes // half_block), "TREE": tree, "PER_SM": per_sm},
                             num_warps=warps) for nbytes, warps, per_sm in schedules for tree in (False, True)]
    return autotune(configs, key=["n_bytes"])(_nf4_dequant_kernel)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
    n, n_bytes, n_blocks,
    HALF_BLOCK: tl.constexpr,    # packed bytes per absmax block (blocksize // 2)
    BLOCKSIZE2: tl.constexpr,    # absmax values per second-level block (256)
    DOUBLE_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr,    # interpreter only: round float32 -> bfloat16 by hand
    BLOCKS: tl.constexpr,        # G: absmax blocks per chunk
    TREE: tl.constexpr,          # table lookup as a select tree (True) or a gather from global memory (False)
    PER_SM: tl.constexpr,        # 0: one program per chunk; else programs loop over chunks i, i + P, i + 2P, ...
):
    if PER_SM:
        for chunk in tl.range(tl.program_id(0), tl.cdiv(n_blocks, BLOCKS), tl.num_programs(0)):
            _nf4_dequant_chunk(chunk, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
                               n, n_bytes, n_blocks, HALF_BLOCK, BLOCKSIZE2, DOUBLE_QUANT, ROUND_BF16, BLOCKS, TREE)
    else:
        _nf4_dequant_chunk(tl.program_id(0), packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                           out_ptr, n, n_bytes, n_blocks, HALF_BLOCK, BLOCKSIZE2, DOUBLE_QUANT, ROUND_BF16, BLOCKS,
                           TREE)


@triton.jit
def _nf4_dequant_chunk(
    chunk, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n, n_bytes, n_blocks,
    HALF_BLOCK: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCKS: tl.constexpr, TREE: tl.constexpr,
):
    """Decode absmax blocks chunk * G ... chunk * G + G - 1 (those that exist)."""
    block = chunk * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)                 # [G] absmax-block index (int64)
    byte = block[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]      # [G, HB] packed-byte index
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first")

    # Blocks past the end (last chunk) read block nb - 1; their values are never stored.
    scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, tl.minimum(block, n_blocks - 1),
                           BLOCKSIZE2, DOUBLE_QUANT)                             # [G] float32
    # value = NF4[code] * absmax in float32 (QLoRA §3: dequant(c, W) = W_NF4 * c); element 2i is the high nibble.
    high = nf4_lookup(code_ptr, (packed >> 4).to(tl.int32), TREE) * scale[:, None]      # [G, HB]
    low = nf4_lookup(code_ptr, (packed & 0xF).to(tl.int32), TREE) * scale[:, None]      # [G, HB]
    values = tl.interleave(high, low)                                                    # [G, 2*HB]

    index = block[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]   # [G, blocksize]
    tl.store(out_ptr + index, to_output(values, out_ptr.dtype.element_ty, ROUND_BF16), mask=index < n,
             eviction_policy="evict_first")


@triton.jit
def nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, rows, col0, W_K,
                    COLS: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, TREE: tl.constexpr):
    """float32 W[rows, col0 : col0 + COLS] as [R, COLS], for an NF4 weight W [.., W_K] (the fused GEMM's fast path).

    Needs W_K % blocksize == 0 and a column range inside one absmax block (col0 % COLS == 0, COLS <= blocksize):
    then each row of the tile is COLS/2 consecutive bytes under ONE absmax, decoded byte-wise like the
    dequantisation kernel (high nibble first). Rows must be in bounds.
    """
    byte = rows[:, None] * (W_K // 2) + (col0 // 2 + tl.arange(0, COLS // 2))[None, :]     # [R, COLS/2]
    packed = tl.load(packed_ptr + byte)
    block = rows * (W_K >> LOG2_BLOCKSIZE) + (col0 >> LOG2_BLOCKSIZE)                       # [R]
    scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, BLOCKSIZE2, DOUBLE_QUANT)
    high = nf4_lookup(code_ptr, (packed >> 4).to(tl.int32), TREE) * scale[:, None]
    low = nf4_lookup(code_ptr, (packed & 0xF).to(tl.int32), TREE) * scale[:, None]
    return tl.interleave(high, low)                                                         # [R, COLS]


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, flat,
               LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
               TREE: tl.constexpr):
    """float32 values of an NF4 weight at flat (row-major) indices `flat`, any tile shape, in bounds.

    The general path (absmax blocks may cross rows): value i is in byte i >> 1 (high nibble when i is even) and in
    absmax block i >> log2(blocksize), everything gathered per element.
    """
    byte = tl.load(packed_ptr + (flat >> 1))
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, flat >> LOG2_BLOCKSIZE, BLOCKSIZE2,
                           DOUBLE_QUANT)
    return nf4_lookup(code_ptr, nibble, TREE) * scale


@triton.jit
def restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                   BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of `block` (any shape, in bounds); double quantisation (QLoRA §3):
    absmax = code2[c] * absmax2[block // 256] + offset."""
    if DOUBLE_QUANT:
        c = tl.load(absmax_ptr + block, eviction_policy="evict_last").to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, eviction_policy="evict_last")
        return tl.load(code2_ptr + c, eviction_policy="evict_last") * scale2 + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, eviction_policy="evict_last")


@triton.jit
def nf4_lookup(code_ptr, idx, TREE: tl.constexpr):
    """NF4[idx] in float32 for an int32 tile of 4-bit indices.

    TREE=False gathers from the 64-byte table in global memory (it stays in L1). TREE=True selects among the 16
    constants with the index bits (15 selects, no memory traffic); the autotuner keeps whichever is faster.
    """
    if TREE:
        b0 = (idx & 1) != 0
        b1 = (idx & 2) != 0
        b2 = (idx & 4) != 0
        b3 = (idx & 8) != 0
        v01 = tl.where(b0, -0.6961928009986877, -1.0)
        v23 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        v45 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        v67 = tl.where(b0, 0.0, -0.09105003625154495)
        v89 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        vab = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        vcd = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        vef = tl.where(b0, 1.0, 0.7229568362236023)
        v03 = tl.where(b1, v23, v01)
        v47 = tl.where(b1, v67, v45)
        v8b = tl.where(b1, vab, v89)
        vcf = tl.where(b1, vef, vcd)
        v07 = tl.where(b2, v47, v03)
        v8f = tl.where(b2, vcf, v8b)
        return tl.where(b3, v8f, v07).to(tl.float32)
    else:
        return tl.load(code_ptr + idx, eviction_policy="evict_last")


def absmax_float32(q: NF4Weight) -> torch.Tensor:
    """The float32 absmax of every block [nb]; double quantisation restored as code2[c] * absmax2[b // 256] + offset."""
    if not q.double_quant:
        return q.absmax
    values = q.code2[q.absmax.long()]                                              # [nb] float32
    groups = torch.arange(q.n_blocks, device=q.device) // q.blocksize2             # [nb] second-level block
    return values.mul_(q.absmax2[groups]).add_(q.offset)                           # multiply, round, add


def nf4_dequantize_reference(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantisation with bitsandbytes' float32 arithmetic (table * absmax, then one cast).

    Lookup is per byte: a 256-entry table maps a byte to its (high, low) value pair. float64 output is allowed
    here (for float64 references): the float32 values are exact in it.
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"cannot dequantise to {dtype}; use one of {FLOAT_DTYPES + (torch.float64,)}")
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
