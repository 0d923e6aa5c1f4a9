"""Fused LoRA linear, forward and backward, with the base weight frozen (LoRA, arXiv 2106.09685).

Shapes: M tokens, N out features, K in features, r rank, R = r padded to a power of two >= 16.
    x [M, K]   W [N, K] (frozen)   A [r, K] (lora_A.weight)   B [N, r] (lora_B.weight)   s = alpha / r
    S = x Aᵀ [M, r]   y, dY [M, N]   BM, BN, BK: tile sizes

What it computes. §4.1, Eq. 3 writes the adapted layer as h = W0 x + ΔW x = W0 x + B A x for one input column x,
and "we then scale ΔWx by α/r". With tokens as rows:
    forward (Eq. 3):   y  = x Wᵀ + s · (x Aᵀ) Bᵀ = x Wᵀ + s · S Bᵀ
    backward:          dB = s · dYᵀ S      dS = s · dY B      dA = dSᵀ x      dX = dY W + dS A      (no dW)

How (LoRAFusion arXiv 2510.00206, `CentML/lorafusion`: split the work around the small tensor S):
  * forward: S = x Aᵀ by torch (a skinny GEMM cuBLAS does well, and backward reuses it), then ONE GEMM kernel
    whose float32 accumulator starts at s · S_tile B_tileᵀ before the loop over K adds x_tile W_tileᵀ. The expand
    and the add cost no extra pass over y (PEFT's eager form writes and re-reads y three times).
  * backward: ONE pass over dY computes both dS and dB per [BM, BN] tile of dY, summed into float32 buffers with
    atomic adds; dA = dSᵀ x by torch; dX = dY W + dS A by the forward's GEMM kernel, with W's two strides swapped
    (W read as Wᵀ) and the accumulator started at dS A.
The GEMM kernel computes C = X Wᵀ + scale · P Q for any strides; ranks below 16 are zero-padded by masked loads.

Reading order: the GEMM kernel `_lora_gemm_kernel` (one program per output tile) and the gradient kernel
`_lora_grad_kernel` -> their launchers `lora_gemm`, `lora_grad_dS_dB` -> the autograd wrapper `LoRAMatmul`
(`lora_forward_triton`, `lora_backward_triton`) -> the reference `lora_matmul_reference`.
Other schedules of the same GEMM tile (TMA loads, persistent programs) are autotuning candidates too; they live in
`kernels/schedules.py`. Argument checks and the choice of path: the public op `kernels.lora_matmul` (ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import autotune, empty, grouped_tile, launch, mma, pow2, rank_block, sm_count, to_output, upcast
from .schedules import PERSISTENT_SCHEDULES, TMA_SCHEDULES, lora_gemm_configs, lora_gemm_schedule, tma_ok

# The one configuration interpreted launches use (autotuning needs a GPU timer).
INTERPRETER_GEMM_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SCHEDULE="tile")
INTERPRETER_GRAD_META = dict(BLOCK_M=32, BLOCK_N=32)


@triton.jit
def _lora_gemm_kernel(
    # pointers: C [M, N] = X [M, K] Wᵀ + scale · P [M, r] Q [r, N]
    x_ptr, w_ptr, p_ptr, q_ptr, c_ptr,
    # sizes
    M, N, K, RANK, scale,
    # strides: how far a pointer moves for one step along a dimension. W is addressed as w[n * stride_wn +
    # k * stride_wk], so passing W's strides swapped reads Wᵀ (the dX GEMM).
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn,
    M_BUCKET,                    # autotuning key only (power of two >= M)
    HAS_LORA: tl.constexpr,      # False: the plain GEMM C = X Wᵀ (the benchmark's same-tile baseline)
    BLOCK_R: tl.constexpr,       # R
    UPCAST: tl.constexpr,        # bfloat16 in the interpreter: compute on float32 copies (`_triton.mma`)
    IEEE: tl.constexpr,          # float32 inputs: full float32 products, not TF32
    W_K_MAJOR: tl.constexpr,     # for the TMA schedules: stride_wk == 1 (the forward) or stride_wn == 1 (dX)
    TMA_OK: tl.constexpr,        # for the TMA schedules: x and W can be read by TMA (`schedules.tma_ok`)
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCHEDULE: tl.constexpr,      # "tile": one program per output tile, below; the others: kernels/schedules.py
):
    """C = X Wᵀ + scale · P Q, one [BM, BN] tile of C per program."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_R >= 16)  # tl.dot on a GPU
    if SCHEDULE != "tile":
        lora_gemm_schedule(x_ptr, w_ptr, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn,
                           stride_cm, stride_cn, HAS_LORA, W_K_MAJOR, TMA_OK, BLOCK_R, UPCAST, IEEE,
                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SCHEDULE)
    else:
        # ---- 1. which tile: grouped order, so GROUP_M row-tiles share each column of W while it is in L2 -------
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                         # [BM]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                         # [BN]
        rows_in = rows % M                                                     # wrapped: loads stay in bounds,
        cols_in = cols % N                                                     # the store drops the extra rows
        r = tl.arange(0, BLOCK_R)                                              # [R]

        # ---- 2. LoRA term first (Eq. 3): acc = scale · P_tile Q_tile, ranks beyond r read as zeros -------------
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < RANK,
                        other=0.0)                                             # [BM, R]
            q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK,
                        other=0.0)                                             # [R, BN]
            acc = mma(p.to(q.dtype), q, acc, UPCAST, IEEE) * scale

        # ---- 3. base term: acc += X_tile W_tileᵀ, one BK slice of the reduction at a time (masked tail) ---------
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)                                     # [BK]
            x = tl.load(x_ptr + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < K,
                        other=0.0)                                             # [BM, BK]
            w = tl.load(w_ptr + cols_in[None, :] * stride_wn + k[:, None] * stride_wk, mask=k[:, None] < K,
                        other=0.0)                                             # [BK, BN] = Wᵀ tile
            acc = mma(x, w, acc, UPCAST, IEEE)

        # ---- 4. one rounding to the output dtype, store the rows and columns that exist -------------------------
        out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _lora_grad_kernel(
    # pointers: dY [M, N], B [N, r], S [M, r] in; dS [M, r], dB [N, r] float32 accumulators out
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, RANK, scale,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dbn,
    M_BUCKET,                    # autotuning key only
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dS += s · dY_tile B_tile and dB += s · dY_tileᵀ S_tile for one [BM, BN] tile of dY (float32 atomics)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_R >= 16)
    # ---- 1. this program's tile of dY: tokens `rows`, output features `cols` -------------------------------------
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                  # [BN]
    r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    r_ok = r < RANK

    # ---- 2. load the dY tile once, with the B rows of its columns and the S rows of its tokens -----------------
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)            # [BM, BN]
    b = tl.load(b_ptr + cols[:, None] * stride_bn + r[None, :] * stride_br,
                mask=col_ok[:, None] & r_ok[None, :], other=0.0)               # [BN, R]
    s = tl.load(s_ptr + rows[:, None] * stride_sm + r[None, :] * stride_sr,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)               # [BM, R]

    # ---- 3. both products from it: dS = s · dY B (summed over N tiles), dB = s · dYᵀ S (summed over M tiles) ---
    ds = mma(dy, b.to(dy.dtype), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), UPCAST, IEEE) * scale
    db = mma(tl.trans(dy), s.to(dy.dtype), tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), UPCAST, IEEE) * scale

    # ---- 4. add this tile's share into the float32 accumulators ------------------------------------------------
    tl.atomic_add(ds_ptr + rows[:, None] * stride_dsm + r[None, :], ds, mask=row_ok[:, None] & r_ok[None, :])
    tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + r[None, :], db, mask=col_ok[:, None] & r_ok[None, :])


# ---- autotuning --------------------------------------------------------------------------------------------------

def _gemm_configs():
    """One program per output tile, pointer loads (first: the default when autotuning is off); then the schedules
    of kernels/schedules.py."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
        (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 8), (64, 128, 64, 4, 4), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 3, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SCHEDULE": "tile"},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w in shapes] + lora_gemm_configs()


def _gemm_fits(configs, args):
    """Drop tile shapes that cannot pay off or do not fit: M tiles far above the token count, tiles whose pipelined
    operand buffers exceed ~200 KB of shared memory (float32 inputs, 228 KB per SM on Hopper), and TMA schedules
    when the operands cannot be described to the TMA unit."""
    m, elem = args["M_BUCKET"], args["x_ptr"].element_size()
    usable = [c for c in configs if args["TMA_OK"] or c.kwargs["SCHEDULE"] not in TMA_SCHEDULES]
    kept = [c for c in usable
            if c.kwargs["BLOCK_M"] <= max(16, m) and (m < 128 or c.kwargs["BLOCK_M"] >= 64)
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages <= 200_000]
    return kept or usable[-1:]  # nothing fits: the last usable one


def _grad_fits(configs, args):
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, args["M_BUCKET"])] or configs[:1]


_tuned_gemm = autotune(_gemm_configs(), key=["M_BUCKET", "N", "K", "RANK", "HAS_LORA", "W_K_MAJOR", "TMA_OK"],
                       prune=_gemm_fits)(_lora_gemm_kernel)
_tuned_grad = autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=1, num_warps=w)
     for bm, bn, w in ((128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4), (32, 128, 4), (32, 64, 4))],
    key=["M_BUCKET", "N", "RANK"], prune=_grad_fits, reset_to_zero=["ds_ptr", "db_ptr"])(_lora_grad_kernel)


# ---- launchers -----------------------------------------------------------------------------------------------------

def lora_gemm(x, w, stride_wn: int, stride_wk: int, p, q, scale: float, out) -> None:
    """out[M, N] = x[M, K] · w_viewᵀ + scale · p[M, r] · q[r, N], where w_view[n, k] = w[n*stride_wn + k*stride_wk].

    p = q = None gives the plain GEMM out = x · w_viewᵀ from the same kernel (the benchmark's same-tile baseline).
    """
    M, K = x.shape
    N = out.shape[1]
    has_lora = p is not None
    p, q = (p, q) if has_lora else (x, x)                    # dummies, never read without the LoRA term
    rank = p.shape[1] if has_lora else 1
    if M == 0 or N == 0:
        return
    if K == 0:  # nothing to reduce over (and x may have no storage to point at): only the LoRA term remains
        out.copy_(scale * (p.float() @ q.float()) if has_lora else torch.zeros_like(out))
        return
    programs = sm_count(x.device)

    def grid(meta):  # one program per output tile, or at most one per SM for a persistent schedule
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, programs) if meta["SCHEDULE"] in PERSISTENT_SCHEDULES else tiles,)

    launch(_tuned_gemm, grid,
           x, w, p, q, out, M, N, K, rank, scale,
           x.stride(0), x.stride(1), stride_wn, stride_wk, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
           out.stride(0), out.stride(1), pow2(M),
           HAS_LORA=has_lora, BLOCK_R=rank_block(rank), UPCAST=upcast(x.dtype), IEEE=x.dtype == torch.float32,
           W_K_MAJOR=stride_wk == 1, TMA_OK=tma_ok(x, w, stride_wn, stride_wk),
           interpreter_meta=INTERPRETER_GEMM_META, enable_fp_fusion=True)


def lora_grad_dS_dB(dy, S, B, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s · dY B [M, r] and dB = s · dYᵀ S [N, r], float32, from one pass over dY [M, N].

    The kernel sums tiles with float32 atomics, so the last bits vary from run to run on a GPU. Under PyTorch's
    own switch for that, `torch.use_deterministic_algorithms(True)`, both come from two float32 matrix products
    instead (the same every run; one more pass over dY and a float32 copy of it).
    """
    if torch.are_deterministic_algorithms_enabled():
        dy32 = dy.float()                                                       # [M, N]
        return scale * (dy32 @ B.float()), scale * (dy32.t() @ S.float())      # [M, r], [N, r]
    M, N = dy.shape
    rank = S.shape[1]
    dS = torch.zeros(M, rank, dtype=torch.float32, device=dy.device)
    dB = torch.zeros(N, rank, dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0:
        return dS, dB
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    launch(_tuned_grad, grid,
           dy, B, S, dS, dB, M, N, rank, scale,
           dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), S.stride(0), S.stride(1),
           dS.stride(0), dB.stride(0), pow2(M),
           BLOCK_R=rank_block(rank), UPCAST=upcast(dy.dtype), IEEE=dy.dtype == torch.float32,
           interpreter_meta=INTERPRETER_GRAD_META, enable_fp_fusion=True)
    return dS, dB


# ---- autograd ------------------------------------------------------------------------------------------------------

class LoRAMatmul(torch.autograd.Function):
    """y = x Wᵀ + s (x Aᵀ) Bᵀ on 2-D x; gradients for x, A, B (W is frozen and gets none)."""

    @staticmethod
    def forward(ctx, x, W, A, B, scale: float):
        y, S = lora_forward_triton(x, W, A, B, scale)
        ctx.save_for_backward(x, W, A, B, S)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, S = ctx.saved_tensors
        dx, dA, dB = lora_backward_triton(dy, x, W, A, B, S, ctx.scale, need_dx=ctx.needs_input_grad[0])
        return dx, None, dA, dB, None


def lora_forward_triton(x, W, A, B, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], S [M, r]) for 2-D x [M, K]; S is kept for the backward pass."""
    S = x @ A.t()                                                               # [M, r], the shrink
    y = empty((x.shape[0], W.shape[0]), x.dtype, x.device)
    # Eq. 3: y = x Wᵀ + s · S Bᵀ, W as [N, K] with its own strides, P = S, Q = Bᵀ [r, N].
    lora_gemm(x, W, W.stride(0), W.stride(1), S, B.t(), scale, y)
    return y, S


def lora_backward_triton(dy, x, W, A, B, S, scale: float, need_dx: bool = True):
    """(dx [M, K] or None, dA [r, K], dB [N, r]) for the forward above."""
    dS, dB = lora_grad_dS_dB(dy, S, B, scale)                                   # float32 [M, r], [N, r]
    dA = dS.t().to(x.dtype) @ x                                                 # dA = dSᵀ x   [r, K]
    dx = None
    if need_dx:
        dx = empty(x.shape, x.dtype, x.device)
        # dX = dY W + dS A: the same GEMM with W viewed as Wᵀ [K, N] (strides swapped), P = dS, Q = A, scale 1.
        lora_gemm(dy, W, W.stride(1), W.stride(0), dS, A, 1.0, dx)
    return dx, dA.to(A.dtype), dB.to(B.dtype)


# ---- reference -----------------------------------------------------------------------------------------------------

def lora_matmul_reference(x, W, A, B, scale: float) -> torch.Tensor:
    """PEFT's eager form of Eq. 3: x Wᵀ + s · (x Aᵀ) Bᵀ (autograd gives every gradient)."""
    return x @ W.t() + scale * ((x @ A.t()) @ B.t())
