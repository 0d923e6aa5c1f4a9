"""Fused LoRA linear, forward and backward with the base weight frozen (LoRA, arXiv 2106.09685 §4.1).

Shapes: M tokens, N out features, K in features, r rank, R = r padded to a power of two >= 16.
    x [M, K]   W [N, K] (frozen)   A [r, K] (lora_A.weight)   B [N, r] (lora_B.weight)   s = alpha / r
    S = x Aᵀ [M, r]   y [M, N]

    §4.1, Eq. 3:  y = x Wᵀ + s · (x Aᵀ) Bᵀ
    backward:     dB = s · dYᵀ S      dS = s · dY B      dA = dSᵀ x      dX = dY W + dS A      (no dW)

Reading order: `LoRAMatmul` (autograd) -> launchers `lora_forward_triton`, `lora_backward_triton`, `lora_gemm` ->
kernels `_lora_gemm_kernel`, `_lora_grad_kernel` -> reference `lora_matmul_reference` (+ argument checks).

Design (LoRAFusion arXiv 2510.00206, `CentML/lorafusion`: a split around the small tensor S):
  * forward: S = x Aᵀ by torch (a skinny GEMM that cuBLAS does well and that backward reuses), then ONE GEMM
    kernel whose float32 accumulator starts at s · S_tile B_tileᵀ before the loop over K adds x_tile W_tileᵀ.
    The expand and the add cost no extra pass over y (PEFT's eager form writes and re-reads y three times).
  * backward: ONE pass over dY computes both dS = s·dY B and dB = s·dYᵀ S per [BM, BN] tile of dY, summed
    into float32 buffers with atomic adds (so their last bits vary run to run on a GPU, except under
    `torch.use_deterministic_algorithms(True)`, see `lora_grad_dS_dB`); dA = dSᵀ x by torch;
    dX = dY W + dS A by the forward's GEMM kernel with W read transposed and the accumulator started at dS A.
The GEMM kernel computes C = X Wᵀ + scale · P Q for any strides, so "W read transposed" is only a swap of
W's two strides. S and A/B ranks below 16 are zero-padded inside the kernel (masked loads), never copied.
Its autotuner chooses among three schedules of the same tile code (`_lora_gemm_tile`): one program per output
tile with pointer loads, the same with Hopper TMA loads, and persistent (one program per SM looping over tiles,
with or without TMA; added after the H200 run 2 measured the per-tile kernel 1.13-1.16x slower than cuBLAS at
4096x4096x4096, not yet timed on a GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import (autotune, backend_forced, empty, grouped_tile, launch, mma, pow2, rank_block, sm_count,
                      to_output, upcast)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128  # R is held in registers next to the output tile; larger ranks use the reference
# Dispatch rule of the public op (docs/kernels.md, "Dispatch rules"): below this many tokens cuBLAS's GEMM plus two
# skinny LoRA GEMMs (eager) beat the fused Triton GEMM on the H200 (M = 16 and 256 on 4096x4096: eager 83 us, fused
# 174-179 us); from 4096 tokens on the fused kernel wins or ties. KERNELS_BACKEND=triton forces the kernel at any M.
FUSED_MIN_TOKENS = 1024
INTERPRETER_GEMM_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, TMA=False, PERSISTENT=False)  # on CPU
INTERPRETER_GRAD_META = dict(BLOCK_M=32, BLOCK_N=32)


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


def use_fused_lora(tokens: int) -> bool:
    """The dispatch rule: the fused kernel from FUSED_MIN_TOKENS tokens on, or always under KERNELS_BACKEND=triton."""
    return tokens >= FUSED_MIN_TOKENS or backend_forced() == "triton"


def lora_forward_triton(x, W, A, B, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], S [M, r]) for 2-D x [M, K]; S is kept for the backward pass."""
    S = x @ A.t()                                                               # [M, r], the shrink
    y = empty((x.shape[0], W.shape[0]), x.dtype, x.device)
    # y = x Wᵀ + s · S Bᵀ: W as [N, K] with its own strides, Q = Bᵀ [r, N].
    lora_gemm(x, W, W.stride(0), W.stride(1), S, B.t(), scale, y)
    return y, S


def lora_backward_triton(dy, x, W, A, B, S, scale: float, need_dx: bool = True):
    """(dx [M, K] or None, dA [r, K], dB [N, r]) for the forward above."""
    dS, dB = lora_grad_dS_dB(dy, S, B, scale)                                   # float32 [M, r], [N, r]
    dA = (dS.t().to(x.dtype) @ x)                                               # [r, K]
    dx = None
    if need_dx:
        dx = empty(x.shape, x.dtype, x.device)
        # dX = dY W + dS A: the same GEMM with W viewed as Wᵀ [K, N] (strides swapped), P = dS, Q = A, scale 1.
        lora_gemm(dy, W, W.stride(1), W.stride(0), dS, A, 1.0, dx)
    return dx, dA.to(A.dtype), dB.to(B.dtype)


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

    def grid(meta):  # one program per output tile, or at most one per SM for the persistent schedule
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, programs) if meta["PERSISTENT"] else tiles,)

    launch(_tuned_gemm, grid,
           x, w, p, q, out, M, N, K, rank, scale,
           x.stride(0), x.stride(1), stride_wn, stride_wk, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
           out.stride(0), out.stride(1), pow2(M),
           HAS_LORA=has_lora, W_K_MAJOR=stride_wk == 1, TMA_OK=tma_ok(x, w, stride_wn, stride_wk),
           BLOCK_R=rank_block(rank), UPCAST=upcast(x.dtype, x.device),
           IEEE=x.dtype == torch.float32, device=x.device,
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
           BLOCK_R=rank_block(rank), UPCAST=upcast(dy.dtype, dy.device), IEEE=dy.dtype == torch.float32,
           device=dy.device, interpreter_meta=INTERPRETER_GRAD_META, enable_fp_fusion=True)
    return dS, dB


def _fits(configs, args):
    """Drop tile shapes that cannot pay off or do not fit: M tiles far above the token count, tiles whose pipelined
    operand buffers exceed ~200 KB of shared memory (float32 inputs, 228 KB per SM on Hopper), and TMA tiles when
    the operands cannot be described to the TMA unit (`tma_ok`)."""
    m, elem, tma = args["M_BUCKET"], args["x_ptr"].element_size(), args["TMA_OK"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, m) and (m < 128 or c.kwargs["BLOCK_M"] >= 64)
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem * c.num_stages <= 200_000
            and (tma or not c.kwargs["TMA"])]
    return kept or [c for c in configs if tma or not c.kwargs["TMA"]][-1:]  # nothing fits: the last usable one


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


def _gemm_configs():
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); first = the default when autotuning is off
        (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 8), (64, 128, 64, 4, 4), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 3, 4),
    ]
    tma_shapes = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8)]
    # Persistent candidates (large M: 4096 tokens on 4096x4096 are 512 tiles of 128x256 for 132 SMs), the shapes
    # Triton's tutorial 09 tunes over on Hopper; with and without TMA.
    persistent_shapes = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 128, 3, 8),
                         (256, 128, 64, 3, 8)]
    variants = ([(shape, False, False) for shape in shapes] + [(shape, True, False) for shape in tma_shapes]
                + [(shape, tma, True) for tma in (True, False) for shape in persistent_shapes])
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "TMA": tma,
                           "PERSISTENT": persistent}, num_stages=s, num_warps=w)
            for (bm, bn, bk, s, w), tma, persistent in variants]


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, p_ptr, q_ptr, c_ptr,
    M, N, K, RANK, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn, stride_cm, stride_cn,
    M_BUCKET,                    # autotuning key only (power of two >= M)
    HAS_LORA: tl.constexpr,
    W_K_MAJOR: tl.constexpr,     # stride_wk == 1 (W [N, K] row-major: the forward); else stride_wn == 1 (dX)
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_OK: tl.constexpr,        # the operands allow TMA (`tma_ok`); part of the autotuning key
    TMA: tl.constexpr,           # read x and W tiles through tensor descriptors (Hopper TMA) instead of pointers
    PERSISTENT: tl.constexpr,    # a few programs (one per SM) loop over the output tiles; else one program per tile
):
    """C[M, N] = X[M, K] Wᵀ + scale · P[M, r] Q[r, N]   (W addressed as w[n * stride_wn + k * stride_wk])."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_R >= 16)  # tl.dot on a GPU
    tl.static_assert(TMA_OK or not TMA)
    # With TMA the copy engine fetches the x and W tiles (zero-filled past the edges, so no masks); the descriptors
    # are built once per program. W's descriptor follows its memory order.
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
    if PERSISTENT:
        # Persistent schedule (Triton tutorial 09): program i computes tiles i, i + P, i + 2P, ... Flattening the
        # tile loop with the K loop lets the loads of the next tile start while this tile's result is stored.
        n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
            _lora_gemm_tile(tile, x_src, w_src, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr, stride_qr, stride_qn,
                            stride_cm, stride_cn, HAS_LORA, W_K_MAJOR, BLOCK_R, UPCAST, IEEE,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA)
    else:  # a straight call, not a one-trip loop: the per-tile kernels compile exactly as H200 run 2 timed them
        _lora_gemm_tile(tl.program_id(0), x_src, w_src, p_ptr, q_ptr, c_ptr, M, N, K, RANK, scale,
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
    """Output tile number `tile` ([BM, BN]); x_src / w_src are tensor descriptors with TMA, base pointers without."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                             # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    rows_in = rows % M                                                         # wrapped: loads stay in bounds,
    cols_in = cols % N                                                         # the store drops the extra rows
    r = tl.arange(0, BLOCK_R)

    # LoRA term first (Eq. 3): acc = scale · P_tile Q_tile, ranks beyond r read as zeros.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        p = tl.load(p_ptr + rows_in[:, None] * stride_pm + r[None, :] * stride_pr, mask=r[None, :] < RANK, other=0.0)
        q = tl.load(q_ptr + r[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=r[:, None] < RANK, other=0.0)
        acc = mma(p.to(q.dtype), q, acc, UPCAST, IEEE) * scale

    # Base term: acc += X_tile W_tileᵀ over K (with TMA the [BN, BK] tile of a K-major W is transposed in place).
    for k0 in range(0, K, BLOCK_K):
        if TMA:
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
        acc = mma(x, w, acc, UPCAST, IEEE)                                     # [BM, BK] @ [BK, BN]

    out = to_output(acc, c_ptr.dtype.element_ty, UPCAST)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _lora_grad_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, RANK, scale,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dbn,
    M_BUCKET,                    # autotuning key only
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dS += scale · dY_tile B_tile and dB += scale · dY_tileᵀ S_tile for one [BM, BN] tile of dY (float32 atomics)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_R >= 16)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                  # [BM] token index
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                  # [BN] output feature
    r = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    r_ok = r < RANK

    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)            # [BM, BN]
    b = tl.load(b_ptr + cols[:, None] * stride_bn + r[None, :] * stride_br,
                mask=col_ok[:, None] & r_ok[None, :], other=0.0)               # [BN, R]
    s = tl.load(s_ptr + rows[:, None] * stride_sm + r[None, :] * stride_sr,
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)               # [BM, R]

    zeros_ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    zeros_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    ds = mma(dy, b.to(dy.dtype), zeros_ds, UPCAST, IEEE) * scale               # [BM, R]  dS = s · dY B
    db = mma(tl.trans(dy), s.to(dy.dtype), zeros_db, UPCAST, IEEE) * scale     # [BN, R]  dB = s · dYᵀ S
    tl.atomic_add(ds_ptr + rows[:, None] * stride_dsm + r[None, :], ds, mask=row_ok[:, None] & r_ok[None, :])
    tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + r[None, :], db, mask=col_ok[:, None] & r_ok[None, :])


_tuned_gemm = autotune(_gemm_configs(), key=["M_BUCKET", "N", "K", "RANK", "HAS_LORA", "W_K_MAJOR", "TMA_OK"],
                       prune=_fits)(_lora_gemm_kernel)


def _grad_fits(configs, args):
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, args["M_BUCKET"])] or configs[:1]


_tuned_grad = autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=1, num_warps=w)
     for bm, bn, w in ((128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4), (32, 128, 4), (32, 64, 4))],
    key=["M_BUCKET", "N", "RANK"], prune=_grad_fits, reset_to_zero=["ds_ptr", "db_ptr"])(_lora_grad_kernel)


def lora_matmul_reference(x, W, A, B, scale: float) -> torch.Tensor:
    """PEFT's eager form, Eq. 3: x Wᵀ + s · (x Aᵀ) Bᵀ (autograd gives every gradient)."""
    return x @ W.t() + scale * ((x @ A.t()) @ B.t())


def check_lora_args(x, W, A, B, scale, w_name: str = "W", w_shape=None, w_dtype=None, w_device=None) -> None:
    """The argument checks shared by both backends of lora_matmul / qlora_matmul; errors name the fix."""
    for name, t in (("x", x), (w_name, W), ("A", A), ("B", B)):
        if name != w_name and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number (alpha / r), got {type(scale).__name__}")
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale is {scale}; pass a finite alpha / r")
    w_shape = tuple(W.shape) if w_shape is None else tuple(w_shape)
    w_dtype = W.dtype if w_dtype is None else w_dtype
    w_device = W.device if w_device is None else w_device
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; use one of {FLOAT_DTYPES}")
    for name, dtype in ((w_name, w_dtype), ("A", A.dtype), ("B", B.dtype)):
        if dtype != x.dtype:
            raise TypeError(f"{name} is {dtype} but x is {x.dtype}; cast them to one compute dtype "
                            f"(e.g. {name}.to(x.dtype))")
    for name, device in ((w_name, w_device), ("A", A.device), ("B", B.device)):
        if device != x.device:
            raise ValueError(f"{name} is on {device} but x is on {x.device}; move them to one device")
    if len(w_shape) != 2:
        raise ValueError(f"{w_name} must be 2-D [N, K], got shape {w_shape}")
    N, K = w_shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but {w_name} expects {K} input features in the last "
                         f"dimension")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"A and B must be 2-D (A [r, K], B [N, r]), got {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"A has rank {A.shape[0]} (shape {tuple(A.shape)}) but B has rank {B.shape[1]} "
                         f"(shape {tuple(B.shape)}); pass A [r, K] and B [N, r] of one adapter")
    if A.shape[0] < 1:
        raise ValueError("the LoRA rank is 0; pass A [r, K] and B [N, r] with r >= 1")
    if A.shape[1] != K:
        raise ValueError(f"A has shape {tuple(A.shape)} but must be [r, {K}] ([rank, in_features])")
    if B.shape[0] != N:
        raise ValueError(f"B has shape {tuple(B.shape)} but must be [{N}, r] ([out_features, rank])")
