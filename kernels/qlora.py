"""QLoRA linear: LoRA on an NF4 base weight, decoded tile by tile inside the GEMM (QLoRA, arXiv 2305.14314 §3).

Shapes: M tokens, N out features, K in features, r rank, R = r padded to a power of two >= 16.
    x [M, K]   W [N, K] stored as NF4 (`NF4Weight`)   A [r, K]   B [N, r]   S = x Aᵀ [M, r]   y [M, N]
    BM, BN, BK: tile sizes

What it computes (§3, Eq. 5, with tokens as rows; L1 L2 = Aᵀ Bᵀ and the LoRA scale s = alpha / r):
    forward:    y = x · doubleDequant(c1, c2, W_NF4)ᵀ + s · (x Aᵀ) Bᵀ
    backward:   dX = dY · doubleDequant(W) + dS A;   dS, dA, dB as in LoRA (kernels/lora.py; W frozen, and no
                dequantised W is saved for the backward)

Two paths; the public op (`kernels.qlora_matmul`, ops.py) picks one per call from the token count:
  * fused (few tokens): one GEMM kernel reads the packed 4-bit weight and decodes each [BK, BN] tile in registers
    (byte -> nibble -> NF4 table -> times the restored absmax), then feeds it to `tl.dot`. At a few tokens the
    GEMM is memory-bound and this reads 0.52 bytes per weight instead of 2 (bf16) plus a decode pass.
  * dequantise-then-GEMM (otherwise): decode W once into a buffer with the one-launch NF4 kernel, run the fused
    LoRA GEMM, drop the buffer. At training-size M the GEMM is compute-bound, and the in-kernel decode, repeated
    for every M tile, would cost more than one 2.5 bytes-per-weight pass.

Reading order: the fused kernel `_qlora_gemm_kernel` (one program per output tile) -> its launcher `qlora_gemm`
-> the autograd wrapper `QLoRAMatmul` (`qlora_forward_triton`) -> the reference `qlora_matmul_reference`.
At few tokens the launcher splits the reduction over more programs (split-K, `kernels/schedules.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import autotune, empty, grouped_tile, launch, mma, pow2, rank_block, to_output, upcast
from .lora import lora_gemm, lora_grad_dS_dB, lora_matmul_reference
from .nf4 import NF4Weight, nf4_gemm_tile
from .nf4_dequant import nf4_dequantize_reference, nf4_dequantize_triton
from .schedules import qlora_split_k_kernel, split_k

# The one configuration interpreted launches use (autotuning needs a GPU timer).
INTERPRETER_META = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, TREE=False)


@triton.jit
def _qlora_gemm_kernel(
    # pointers: X, the NF4Weight's tensors (code2 / absmax2 / offset unused without double quantisation), P, Q, C
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, p_ptr, q_ptr, c_ptr,
    # sizes: C [M, N] = X [M, K] · op(W) [K, N] + scale · P [M, r] Q [r, N]; W has W_K columns
    M, N, K, W_K, RANK, scale,
    # strides (W is addressed through its packed bytes, see `nf4.nf4_gemm_tile`)
    stride_xm, stride_xk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn,
    M_BUCKET,                    # autotuning key only
    TRANSPOSED: tl.constexpr,    # False: op(W) = Wᵀ (y = x Wᵀ; N = W rows); True: op(W) = W (dX = dY W; K = W rows)
    ROW_ALIGNED: tl.constexpr,   # W_K % blocksize == 0: absmax blocks never straddle rows of W
    BLOCKSIZE: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TREE: tl.constexpr,          # NF4 lookup as a select tree (True) or a gather from the table (False)
):
    """C = X · op(W) + scale · P Q with op(W) decoded from NF4 one [BK, BN] tile at a time; one C tile per program."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_R >= 16)  # tl.dot on a GPU
    # ---- 1. which tile (grouped order, as in kernels/lora.py) ----------------------------------------------------
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                             # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    rows_in = rows % M
    cols_in = cols % N
    r = tl.arange(0, BLOCK_R)

    # ---- 2. LoRA term first (Eq. 5): acc = scale · P_tile Q_tile, ranks beyond r read as zeros ----------------
    p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < RANK, other=0.0)
    q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK, other=0.0)
    acc = mma(p.to(q.dtype), q, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, IEEE) * scale

    # ---- 3. base term: acc += X_tile · doubleDequant(W)_tile over K, each W tile decoded in registers ----------
    # Byte-wise decode when absmax blocks follow W's rows (every LLaMA shape) and the tile's W-column range lies in
    # one block; otherwise element by element.
    if TRANSPOSED:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_N <= BLOCKSIZE
    else:
        BYTEWISE: tl.constexpr = ROW_ALIGNED and BLOCK_K <= BLOCKSIZE
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                         # [BK] reduction index
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < K,
                    other=0.0)                                                 # [BM, BK]
        # past K: decode a real element (k clamped); x is 0 there, so it adds nothing
        w = nf4_gemm_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                          tl.minimum(k, K - 1), k0, cols_in, pid_n * BLOCK_N, W_K, TRANSPOSED, BYTEWISE,
                          BLOCK_K, BLOCK_N, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)   # [BK, BN] float32
        if not UPCAST:
            w = w.to(x_ptr.dtype.element_ty)     # the same rounding as dequantising W to the compute dtype
        acc = mma(x, w, acc, UPCAST, IEEE)

    # ---- 4. one rounding to the output dtype, store the rows and columns that exist ------------------------------
    out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


# ---- autotuning --------------------------------------------------------------------------------------------------

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


def _fits(configs, args):
    """Tiles no taller than the token count (this kernel runs at small M), and the float32 shared-memory limit."""
    m, elem = args["M_BUCKET"], args["x_ptr"].element_size()
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages <= 200_000]
    return kept or configs[:1]


_KEY = ["M_BUCKET", "N", "K", "RANK", "TRANSPOSED", "ROW_ALIGNED"]
_tuned_qgemm = autotune(_qgemm_configs(), key=_KEY, prune=_fits)(_qlora_gemm_kernel)
_tuned_split_k = autotune(_qgemm_configs(), key=_KEY + ["SPLIT_K"], prune=_fits)(qlora_split_k_kernel)


# ---- launcher ------------------------------------------------------------------------------------------------------

def qlora_gemm(x, q: NF4Weight, transposed: bool, p, p_times, scale: float, out) -> None:
    """out = x · Wᵀ + scale · p · p_times (transposed=False: x [M, K], out [M, N]) or
    out = x · W + scale · p · p_times (transposed=True: x [M, N], out [M, K]), W [N, K] decoded from `q`."""
    M, red = x.shape
    cols = out.shape[1]
    rank = p.shape[1]
    if M == 0 or cols == 0:
        return
    dq = q.double_quant
    absmax2, code2, offset = (q.absmax2, q.code2, q.offset) if dq else (q.absmax, q.code, q.absmax)  # unused dummies
    splits = split_k(M, cols, red, x.device)
    # One split: this file's kernel writes `out`. Several: float32 partial sums [splits, M, cols], added up below.
    target = out if splits == 1 else empty((splits, M, cols), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), splits)  # noqa: E731
    args = (x, q.packed, q.absmax, code2, absmax2, offset, q.code, p, p_times, target, M, cols, red, q.shape[1],
            rank, scale, x.stride(0), x.stride(1), p.stride(0), p.stride(1), p_times.stride(0), p_times.stride(1),
            target.stride(-2), target.stride(-1))
    meta = dict(TRANSPOSED=transposed, ROW_ALIGNED=q.shape[1] % q.blocksize == 0, BLOCKSIZE=q.blocksize,
                LOG2_BLOCKSIZE=q.blocksize.bit_length() - 1, BLOCKSIZE2=q.blocksize2, DOUBLE_QUANT=dq,
                BLOCK_R=rank_block(rank), UPCAST=upcast(x.dtype), IEEE=x.dtype == torch.float32,
                interpreter_meta=INTERPRETER_META, enable_fp_fusion=True)
    if splits == 1:
        launch(_tuned_qgemm, grid, *args, pow2(M), **meta)
    else:
        launch(_tuned_split_k, grid, *args, target.stride(0), pow2(M), SPLIT_K=splits, **meta)
        out.copy_(target.sum(0))                                                # [M, cols], one rounding


# ---- autograd ------------------------------------------------------------------------------------------------------

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


# ---- reference -----------------------------------------------------------------------------------------------------

def qlora_matmul_reference(x, qweight: NF4Weight, A, B, scale: float) -> torch.Tensor:
    """LoRA on the dequantised weight (what QLoRA computes): x W_dqᵀ + s (x Aᵀ) Bᵀ."""
    return lora_matmul_reference(x, nf4_dequantize_reference(qweight, x.dtype), A, B, scale)
