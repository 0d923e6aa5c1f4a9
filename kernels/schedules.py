"""Other schedules of the kernels' tiles: how tiles are handed to programs and how they reach registers.

Read the kernels first: `kernels/lora.py`, `kernels/nf4_dequant.py` and `kernels/qlora.py` each compute one output
tile (or chunk) per program, with plain pointer loads. The schedules here compute the same tiles from the same
products; only the order, the number of programs, the load path and (split-K) the grouping of the sum differ:

  * LoRA GEMM (`lora_gemm_schedule`), autotuning candidates beside the per-tile configs (`lora_gemm_configs`):
      "tma"             one program per output tile, x and W tiles fetched by Hopper's TMA unit (tensor descriptors,
                        zero-filled past the edges, so no masks);
      "persistent"      one program per SM, each walking tiles i, i + P, i + 2P, ... (Triton tutorial 09); the tile
                        loop is flattened with the K loop, so the next tile's loads start while this one is stored;
      "persistent_tma"  both.
    The kernel in lora.py hands over to `lora_gemm_schedule` when its SCHEDULE constexpr is not "tile".
  * NF4 dequantisation (`nf4_dequant_persistent`): PER_SM programs per SM looping over chunks, so there is no partly
    filled last wave of programs; autotuning candidates beside the one-program-per-chunk configs.
  * Fused NF4 + LoRA GEMM (`qlora_split_k_kernel`): split-K. At a few tokens that kernel has few output tiles (64
    for a 4096-wide output at BLOCK_N = 64), each a serial loop of K / BLOCK_K decode-and-dot steps, so latency, not
    bandwidth, sets its time. Splitting the reduction gives more programs; `split_k` is a rule (not timed) and
    `kernels.qlora.qlora_gemm` launches this kernel when it gives more than one split.
The autotuned ones are timed beside the per-tile configs, and the fastest for a shape is kept. Why each exists and
what was measured: docs/kernels.md ("Kernel 1-3", "Measured on H200").

Shapes as in the kernel files: x [M, K], W [N, K], P [M, r], Q [r, N], C [M, N]; BM, BN, BK tile sizes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import grouped_tile, mma, sm_count, to_output
from .nf4 import nf4_gemm_tile, nf4_lookup, restore_absmax

# ---- LoRA GEMM: TMA loads and persistent programs ------------------------------------------------------------------

TMA_SCHEDULES = ("tma", "persistent_tma")
PERSISTENT_SCHEDULES = ("persistent", "persistent_tma")


def lora_gemm_configs() -> list:
    """Autotuning candidates of the schedules above (the per-tile ones are in kernels/lora.py)."""
    tma_shapes = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8)]
    # Persistent: large M (4096 tokens on 4096x4096 are 512 tiles of 128x256 for 132 SMs); the shapes Triton's
    # tutorial 09 tunes over on Hopper.
    persistent_shapes = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 128, 3, 8),
                         (256, 128, 64, 3, 8)]
    variants = ([(shape, "tma") for shape in tma_shapes] + [(shape, "persistent_tma") for shape in persistent_shapes]
                + [(shape, "persistent") for shape in persistent_shapes])
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SCHEDULE": schedule},
                          num_stages=s, num_warps=w) for (bm, bn, bk, s, w), schedule in variants]


def tma_ok(x, w, stride_wn: int, stride_wk: int) -> bool:
    """Whether x and W can be read through Hopper's TMA: a CUDA device of compute capability >= 9, 16-byte aligned
    base addresses and row strides, and a unit stride along each tensor's row (either orientation of W)."""
    if not x.is_cuda or not _has_tma(x.device.index):
        return False
    aligned = lambda stride: stride > 0 and (stride * x.element_size()) % 16 == 0  # noqa: E731
    x_ok = x.stride(1) == 1 and aligned(x.stride(0)) and x.data_ptr() % 16 == 0
    w_ok = (((stride_wk == 1 and aligned(stride_wn)) or (stride_wn == 1 and aligned(stride_wk)))
            and w.data_ptr() % 16 == 0)
    return x_ok and w_ok


@functools.lru_cache(maxsize=None)
def _has_tma(device_index) -> bool:
    """Compute capability >= 9 and a Triton with in-kernel tensor descriptors (asked once per device)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9 and hasattr(tl, "make_tensor_descriptor")


@triton.jit
def lora_gemm_schedule(
    x_ptr, w_ptr, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn,
    HAS_LORA: tl.constexpr, W_K_MAJOR: tl.constexpr, TMA_OK: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCHEDULE: tl.constexpr,
):
    """The body of `kernels.lora._lora_gemm_kernel` for SCHEDULE "tma", "persistent" or "persistent_tma"."""
    TMA: tl.constexpr = (SCHEDULE == "tma") or (SCHEDULE == "persistent_tma")
    tl.static_assert(TMA_OK or not TMA)  # the launcher's pruning drops TMA schedules the operands do not allow
    # With TMA the descriptors are built once per program; W's follows its memory order (W_K_MAJOR: [N, K]
    # row-major, the forward; else Wᵀ row-major, the dX GEMM).
    if TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        if W_K_MAJOR:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_N, BLOCK_K])
        else:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                              block_shape=[BLOCK_K, BLOCK_N])
    else:
        x_src = x_ptr
        w_src = w_ptr
    if SCHEDULE == "tma":
        _lora_gemm_tile(tl.program_id(0), x_src, w_src, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn,
                        stride_cm, stride_cn, HAS_LORA, W_K_MAJOR, BLOCK_R, UPCAST, IEEE,
                        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA)
    else:  # persistent: program i computes tiles i, i + P, i + 2P, ...
        n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
            _lora_gemm_tile(tile, x_src, w_src, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn,
                            stride_cm, stride_cn, HAS_LORA, W_K_MAJOR, BLOCK_R, UPCAST, IEEE,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA)


@triton.jit
def _lora_gemm_tile(
    tile, x_src, w_src, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn,
    HAS_LORA: tl.constexpr, W_K_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr,
):
    """Output tile number `tile`, as in kernels/lora.py; x_src / w_src are tensor descriptors with TMA, base
    pointers without."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                             # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    rows_in = rows % M
    cols_in = cols % N
    r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < RANK, other=0.0)
        q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK, other=0.0)
        acc = mma(p.to(q.dtype), q, acc, UPCAST, IEEE) * scale

    for k0 in range(0, K, BLOCK_K):
        if TMA:  # the [BN, BK] tile of a K-major W is transposed in registers
            x = x_src.load([pid_m * BLOCK_M, k0])                              # [BM, BK]
            if W_K_MAJOR:
                w = tl.trans(w_src.load([pid_n * BLOCK_N, k0]))                # [BK, BN]
            else:
                w = w_src.load([k0, pid_n * BLOCK_N])                          # [BK, BN]
        else:
            k = k0 + tl.arange(0, BLOCK_K)                                     # [BK]
            x = tl.load(x_src + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < K,
                        other=0.0)
            w = tl.load(w_src + cols_in[None, :] * stride_wn + k[:, None] * stride_wk, mask=k[:, None] < K,
                        other=0.0)
        acc = mma(x, w, acc, UPCAST, IEEE)

    out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


# ---- NF4 dequantisation: persistent programs ---------------------------------------------------------------------

# (packed bytes per chunk, warps, programs per SM): autotuning candidates beside kernels/nf4_dequant.py's ones.
DEQUANT_PERSISTENT = [(2048, 4, 8), (4096, 4, 4), (4096, 8, 2), (8192, 8, 2)]


@triton.jit
def nf4_dequant_persistent(
    packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n, n_bytes, n_blocks,
    HALF_BLOCK: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCKS: tl.constexpr, TREE: tl.constexpr,
):
    """The body of `kernels.nf4_dequant._nf4_dequant_kernel` for PER_SM > 0: program i decodes chunks i, i + P, ..."""
    for chunk in tl.range(tl.program_id(0), tl.cdiv(n_blocks, BLOCKS), tl.num_programs(0)):
        block = chunk * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)                  # [G]
        byte = block[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]       # [G, HB]
        packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first")
        scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, tl.minimum(block, n_blocks - 1),
                               BLOCKSIZE2, DOUBLE_QUANT)                               # [G]
        high = nf4_lookup(code_ptr, (packed >> 4).to(tl.int32), TREE) * scale[:, None]
        low = nf4_lookup(code_ptr, (packed & 0xF).to(tl.int32), TREE) * scale[:, None]
        index = block[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
        tl.store(out_ptr + index, to_output(tl.interleave(high, low), out_ptr.dtype.element_ty, ROUND_BF16),
                 mask=index < n, eviction_policy="evict_first")


# ---- fused NF4 + LoRA GEMM: split-K ------------------------------------------------------------------------------

SPLIT_WAVES = 4          # split until there are this many programs per SM...
MIN_K_PER_SPLIT = 256    # ...while each split keeps at least this many values of the reduction...
MAX_SPLIT_K = 16         # ...and at most this many splits (1 switches split-K off)


def split_k(tokens: int, n: int, k: int, device: torch.device) -> int:
    """How many splits of the reduction (length k) the fused NF4 GEMM uses for a [tokens, n] output: doubling while
    the programs (counted at 16-row, 64-column tiles) stay below SPLIT_WAVES per SM and each split keeps at least
    MIN_K_PER_SPLIT values."""
    programs = triton.cdiv(tokens, 16) * triton.cdiv(n, 64)
    splits = 1
    while (splits < MAX_SPLIT_K and programs * splits < SPLIT_WAVES * sm_count(device)
           and k // (2 * splits) >= MIN_K_PER_SPLIT):
        splits *= 2
    return splits


@triton.jit
def qlora_split_k_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, p_ptr, q_ptr, c_ptr,
    M, N, K, W_K, RANK, scale,
    stride_xm, stride_xk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn, stride_cs,
    M_BUCKET,                    # autotuning key only
    SPLIT_K: tl.constexpr,       # programs along K (grid axis 1); C is float32 partial sums [SPLIT_K, M, N]
    TRANSPOSED: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TREE: tl.constexpr,
):
    """`kernels.qlora._qlora_gemm_kernel` with the reduction split: program (tile, s) sums K range s of SPLIT_K
    (whole BK steps) into float32 partial sums; the LoRA term goes into split 0 only. The launcher adds the
    partial sums up in a fixed order (deterministic)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_R >= 16)  # tl.dot on a GPU
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K           # whole BK steps: tiles stay aligned
    k_first = split * k_per_split
    k_last = tl.minimum(K, k_first + k_per_split)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                             # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    rows_in = rows % M
    cols_in = cols % N
    r = tl.arange(0, BLOCK_R)

    rank = tl.where(split == 0, RANK, 0)                                       # LoRA term in split 0 only
    p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < rank, other=0.0)
    q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK, other=0.0)
    acc = mma(p.to(q.dtype), q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE) * scale

    if TRANSPOSED:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_N <= BLOCKSIZE
    else:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_K <= BLOCKSIZE
    for k0 in range(k_first, k_last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                         # [BK]
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < k_last,
                    other=0.0)
        w = nf4_gemm_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                          tl.minimum(k, K - 1), k0, cols_in, pid_n * BLOCK_N, W_K, TRANSPOSED, BYTEWISE,
                          BLOCK_K, BLOCK_N, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
        if not UPCAST:
            w = w.to(x_ptr.dtype.element_ty)
        acc = mma(x, w, acc, UPCAST, IEEE)

    tl.store(c_ptr + split * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))
