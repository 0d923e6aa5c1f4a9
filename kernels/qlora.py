"""QLoRA linear: LoRA on an NF4 base weight decoded tile by tile inside the GEMM (QLoRA, arXiv 2305.14314 §3).

Shapes: M tokens, N out features, K in features, r rank, R = r padded to a power of two >= 16.
    x [M, K]   W [N, K] stored as NF4 (`NF4Weight`)   A [r, K]   B [N, r]   S = x Aᵀ [M, r]   y [M, N]

    §3, Eq. 5:  Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + s · X L1 L2      (L1 L2 = Aᵀ Bᵀ here)
    backward:   dX = dY · doubleDequant(W) + dS A;   dA, dB as in LoRA (W frozen; no dequantised W is saved)

Reading order: `QLoRAMatmul` (autograd) -> dispatch rule `use_fused` -> launcher `qlora_gemm` -> kernel
`_qlora_gemm_kernel` -> reference `qlora_matmul_reference`.

Two paths, chosen per call by the token count M and the weight size N·K (`use_fused`, the documented rule):
  * fused (few tokens, weights up to 14336x4096): one GEMM kernel reads the packed 4-bit weight and decodes each
    [BK, BN] tile in registers (byte -> nibble -> NF4 table -> times the restored absmax), then feeds it to
    `tl.dot`. At a few tokens the GEMM is memory-bound and this reads 0.52 bytes per weight instead of 2 (bf16) +
    the decode pass.
  * dequantise-then-GEMM (otherwise): decode W once into a bf16 buffer with the one-launch NF4 kernel, run the
    fused LoRA GEMM, drop the buffer. At training-size M the GEMM is compute-bound and the in-kernel decode,
    repeated for every M tile, would cost more than one 2.5 bytes-per-weight pass (our own cost estimate).
The thresholds come from the H200 benchmark (`scripts/bench_kernels.py`, docs/kernels.md); they are module
constants so they can be re-measured on other GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import autotune, empty, grouped_tile, launch, mma, pow2, rank_block, sm_count, to_output, upcast
from .lora import lora_gemm, lora_grad_dS_dB, lora_matmul_reference
from .nf4 import NF4Weight
from .nf4_dequant import nf4_decode, nf4_decode_rows, nf4_dequantize_reference, nf4_dequantize_triton

# The dispatch rule, from the H200 benchmark run 2 (docs/kernels.md, "Measured on H200"; times include the Python
# launch path, as real calls do): fused won on 4096x4096 at 1, 16 and 64 tokens (71/113/80 us vs 111/167/123 us for
# dequantise-then-GEMM) and lost at 256 tokens there, and at every token count on 14336x4096 and 28672x8192 (K and N
# large: the in-register decode, not the memory traffic, limits it). Measured before split-K (below): re-derive.
FUSED_MAX_TOKENS = 64                # fused decode-in-GEMM up to this many tokens...
FUSED_MAX_PARAMS = 4096 * 4096       # ...and only for weights up to this many values
# Split-K of the fused kernel (added after run 2, not yet timed on a GPU). Run 2 timed the one-split kernel at 48 us
# (CUDA graph) for 4096x4096 at M = 1, against ~2 us to read its 8.4 MB: with BLOCK_N = 64 it runs only 64 programs,
# each a serial loop of 64 decode-and-dot steps, so latency, not bandwidth, sets the time. Splitting the reduction
# over K gives SPLIT_WAVES programs per SM (each split at least MIN_K_PER_SPLIT long, at most MAX_SPLIT_K splits);
# float32 partial sums go to a [splits, M, N] buffer and are added up in a fixed order (deterministic).
SPLIT_WAVES = 4
MIN_K_PER_SPLIT = 256
MAX_SPLIT_K = 16
INTERPRETER_META = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, TREE=False)  # the one config on CPU


def use_fused(tokens: int, n: int, k: int) -> bool:
    """The dispatch rule for M tokens and an [N, K] NF4 weight: fused decode-in-GEMM, else dequantise-then-GEMM."""
    return n * k <= FUSED_MAX_PARAMS and tokens <= FUSED_MAX_TOKENS


class QLoRAMatmul(torch.autograd.Function):
    """y = x Wᵀ + s (x Aᵀ) Bᵀ with W in NF4, on 2-D x; gradients for x, A, B."""

    @staticmethod
    def forward(ctx, x, qweight: NF4Weight, A, B, scale: float, fused: bool):
        y, S = qlora_forward_triton(x, qweight, A, B, scale, fused)
        ctx.save_for_backward(x, A, B, S)
        ctx.qweight, ctx.scale, ctx.fused = qweight, scale, fused
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, S = ctx.saved_tensors
        dS, dB = lora_grad_dS_dB(dy, S, B, ctx.scale)                           # float32 [M, r], [N, r]
        dA = dS.t().to(x.dtype) @ x                                             # [r, K]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = empty(x.shape, x.dtype, x.device)
            if ctx.fused:
                qlora_gemm(dy, ctx.qweight, True, dS, A, 1.0, dx)               # dX = dY W + dS A
            else:
                W = nf4_dequantize_triton(ctx.qweight, x.dtype)
                lora_gemm(dy, W, W.stride(1), W.stride(0), dS, A, 1.0, dx)
        return dx, None, dA.to(A.dtype), dB.to(B.dtype), None, None


def qlora_forward_triton(x, qweight: NF4Weight, A, B, scale: float, fused: bool):
    """(y [M, N], S [M, r]) for 2-D x [M, K], by the fused kernel or dequantise-then-GEMM."""
    S = x @ A.t()                                                               # [M, r]
    y = empty((x.shape[0], qweight.shape[0]), x.dtype, x.device)
    if fused:
        qlora_gemm(x, qweight, False, S, B.t(), scale, y)                      # y = x Wᵀ + s S Bᵀ
    else:
        W = nf4_dequantize_triton(qweight, x.dtype)                             # [N, K], freed on return
        lora_gemm(x, W, W.stride(0), W.stride(1), S, B.t(), scale, y)
    return y, S


def qlora_gemm(x, q: NF4Weight, transposed: bool, p, p_times, scale: float, out) -> None:
    """out = x · Wᵀ + scale · p · p_times (transposed=False: x [M, K], out [M, N]) or
    out = x · W + scale · p · p_times (transposed=True: x [M, N], out [M, K]), W [N, K] decoded from `q`."""
    M, red = x.shape
    cols = out.shape[1]
    rank = p.shape[1]
    if M == 0 or cols == 0:
        return
    w_k = q.shape[1]
    dq = q.double_quant
    absmax2, code2, offset = (q.absmax2, q.code2, q.offset) if dq else (q.absmax, q.code, q.absmax)  # unused dummies
    splits = split_k(M, cols, red, x.device)
    # One split: the kernel writes `out`. Several: float32 partial sums [splits, M, cols], added up below.
    target = out if splits == 1 else empty((splits, M, cols), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_tuned_qgemm, grid,
           x, q.packed, q.absmax, code2, absmax2, offset, q.code, p, p_times, target,
           M, cols, red, w_k, rank, scale,
           x.stride(0), x.stride(1), p.stride(0), p.stride(1), p_times.stride(0), p_times.stride(1),
           target.stride(-2), target.stride(-1), target.stride(0) if splits > 1 else 0, pow2(M),
           SPLIT_K=splits, TRANSPOSED=transposed, ROW_ALIGNED=w_k % q.blocksize == 0, BLOCKSIZE=q.blocksize,
           LOG2_BLOCKSIZE=q.blocksize.bit_length() - 1,
           BLOCKSIZE2=q.blocksize2, DOUBLE_QUANT=dq, BLOCK_R=rank_block(rank), UPCAST=upcast(x.dtype, x.device),
           IEEE=x.dtype == torch.float32, device=x.device,
           interpreter_meta=INTERPRETER_META, enable_fp_fusion=True)
    if splits > 1:
        out.copy_(target.sum(0))                                                # [M, cols], one rounding


def split_k(tokens: int, n: int, k: int, device: torch.device) -> int:
    """How many splits of the reduction (length k) the fused kernel uses for a [tokens, n] output: doubling while
    the programs (counted at 16-row, 64-column tiles) stay below SPLIT_WAVES per SM and each split keeps at least
    MIN_K_PER_SPLIT values."""
    programs = triton.cdiv(tokens, 16) * triton.cdiv(n, 64)
    splits = 1
    while (splits < MAX_SPLIT_K and programs * splits < SPLIT_WAVES * sm_count(device)
           and k // (2 * splits) >= MIN_K_PER_SPLIT):
        splits *= 2
    return splits


@triton.jit
def _qlora_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, p_ptr, q_ptr, c_ptr,
    M, N, K, W_K, RANK, scale,
    stride_xm, stride_xk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn, stride_cs,
    M_BUCKET,                    # autotuning key only
    SPLIT_K: tl.constexpr,       # programs along K (grid axis 1); > 1: C is float32 partial sums [SPLIT_K, M, N]
    TRANSPOSED: tl.constexpr,    # False: C = X Wᵀ (N = W rows, K = W cols); True: C = X W (N = W cols, K = W rows)
    ROW_ALIGNED: tl.constexpr,   # W_K % blocksize == 0: absmax blocks never straddle rows of W
    BLOCKSIZE: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TREE: tl.constexpr,
):
    """C[M, N] = X[M, K] · op(W)[K, N] + scale · P[M, r] Q[r, N], op(W) decoded from NF4 one [BK, BN] tile at a time;
    program (tile, s) sums K range s of SPLIT_K (whole BK steps) and, for s = 0, adds the LoRA term."""
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

    # LoRA term first: acc = scale · P_tile Q_tile (ranks beyond r read as zeros; zero in splits after the first).
    rank = tl.where(split == 0, RANK, 0)
    p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < rank, other=0.0)
    q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK, other=0.0)
    acc = mma(p.to(q.dtype), q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE) * scale

    # Fast path when absmax blocks follow W's rows (W_K % blocksize == 0, every LLaMA shape) and the tile's W-column
    # range fits in one block: decode byte-wise with one absmax per W row (`nf4_decode_rows`). Otherwise decode
    # element by element (`nf4_decode`).
    if TRANSPOSED:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_N <= BLOCKSIZE
    else:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_K <= BLOCKSIZE
    for k0 in range(k_first, k_last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                         # [BK] reduction index
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < k_last,
                    other=0.0)
        k_in = tl.minimum(k, K - 1)              # past K: decode a real element; x is 0 there, so it adds nothing
        if TRANSPOSED:   # tile [BK, BN] of W itself: W rows k, W columns cols (dX = dY W)
            if BYTEWISE:
                w = nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                                    k_in, pid_n * BLOCK_N, W_K, BLOCK_N, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
            else:
                w = nf4_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                               k_in[:, None] * W_K + cols_in[None, :], LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
        else:            # tile [BK, BN] of Wᵀ: W rows cols, W columns k (y = x Wᵀ)
            if BYTEWISE:
                w = tl.trans(nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                                             cols_in, k0, W_K, BLOCK_K, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT,
                                             TREE))
            else:
                w = nf4_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                               cols_in[None, :] * W_K + k_in[:, None], LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
        if not UPCAST:
            w = w.to(x_ptr.dtype.element_ty)     # the same rounding as dequantising W to the compute dtype
        acc = mma(x, w, acc, UPCAST, IEEE)

    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K > 1:
        tl.store(c_ptr + split * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc, mask=inside)
    else:
        out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=inside)


def _fits(configs, args):
    """Tiles no taller than the token count (this kernel runs at small M), and the float32 shared-memory limit."""
    m, elem = args["M_BUCKET"], args["x_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages <= 200_000]
    return kept or configs[:1]


def _qgemm_configs():
    # BLOCK_N, BLOCK_K <= 64 keep both orientations on the byte-wise decode at blocksize 64; narrow BLOCK_N gives
    # more programs when M is tiny (N / BLOCK_N programs in all). BLOCK_M stays <= 32: with 64 (Hopper's warpgroup
    # MMA) the byte-wise decode in the transposed orientation crashes Triton 3.9's sm_90 compiler
    # (TritonGPUOptimizeDotOperands), and this kernel is meant for a few tokens anyway.
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, TREE); first = the default when autotuning is off
        (16, 64, 64, 3, 4, False), (16, 64, 64, 3, 4, True), (16, 32, 64, 4, 4, False), (16, 32, 64, 4, 4, True),
        (16, 16, 64, 4, 2, False), (16, 16, 64, 4, 2, True), (32, 64, 64, 3, 4, False), (32, 32, 64, 4, 4, True),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "TREE": tree},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w, tree in shapes]


_tuned_qgemm = autotune(_qgemm_configs(), key=["M_BUCKET", "N", "K", "RANK", "SPLIT_K", "TRANSPOSED", "ROW_ALIGNED"],
                        prune=_fits)(_qlora_gemm_kernel)


def qlora_matmul_reference(x, qweight: NF4Weight, A, B, scale: float) -> torch.Tensor:
    """LoRA on the dequantised weight (what QLoRA computes): x W_dqᵀ + s (x Aᵀ) Bᵀ."""
    return lora_matmul_reference(x, nf4_dequantize_reference(qweight, x.dtype), A, B, scale)
