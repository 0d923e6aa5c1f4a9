"""NF4 storage with double quantisation, bit-compatible with bitsandbytes (QLoRA, arXiv 2305.14314 §3).

Shapes: n = numel of the weight, nb = ceil(n / blocksize) first-level blocks, nb2 = ceil(nb / 256); in the
        device functions W [.., W_K] is the weight as rows, R rows and COLS columns of a tile, BK x BN a GEMM tile.

The format (bitsandbytes `quantize_4bit(..., quant_type="nf4", compress_statistics=True)`; bitsandbytes
`functional.py`, `csrc/kernels.cu`; QLoRA arXiv 2305.14314 §2-3, App. E):
  1. Flatten the weight row-major and cut it into blocks of `blocksize` (64) consecutive values. Blocks run across
     rows when the row length is not a multiple of the block size. A final partial block is NOT padded in
     storage: its absmax covers only the real values.
  2. absmax_b = max |w| over block b (float32); each w / absmax_b goes to the nearest of the 16 NF4 values.
  3. Two 4-bit indices per byte: element 2i in the HIGH nibble, element 2i+1 in the low nibble. For odd n the
     last low nibble is padding; it holds index 7 (the code of 0.0) and is never read.
     packed: uint8 [(n+1)//2, 1], byte for byte bitsandbytes' tensor.
  4. Double quantisation (§3 "Double Quantization"): offset = mean(absmax) (float32 scalar); absmax - offset is
     quantised in blocks of 256 to uint8 codes of the signed 8-bit "dynamic" code book; absmax2 holds the
     float32 absmax of each group of 256. Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter
     (4 + 32/64 = 4.5 without double quantisation); see `storage_bits_per_param`.
Dequantisation: w = NF4[q] * absmax_b in float32, one cast to the output dtype, with
  absmax_b = code2[c_b] * absmax2[b // 256] + offset   (float32; multiply, round, then add, as bitsandbytes).
The device functions at the end of this file read the format inside a kernel (values, tiles, absmax); the
dequantisation kernel (`kernels.nf4_dequant`) and the fused NF4 + LoRA GEMM (`kernels.qlora`) are built on them.

Quantisation here reproduces bitsandbytes' CPU path exactly (tests/test_nf4_bnb_parity.py): the NF4 level is its
pure-PyTorch default (nearest code by midpoints, ties to the lower code) and the absmax level is its C++ CPU
quantiser, which looks codes up in a 65536-bin table over [-1, 1] instead of searching the code book. On CUDA,
bitsandbytes quantises with its own kernels, which may round a few near-tie values differently; dequantising a
state that bitsandbytes produced is exact on every device either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ._triton import SUPPORTED_DTYPES, cached_on

# The 16 NF4 values (QLoRA App. E; bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1), rescaled to [-1, 1],
# 7 negative, an exact 0 and 8 positive. Hard-coded as published; regenerating them differs in the last digits.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_INDEX = 7
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256  # second-level block size of double quantisation


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 code book, float32 [16]."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit "dynamic" code book (Dettmers, arXiv 1511.04561) that stores absmax codes, float32 [256].

    Magnitudes span seven decades: decade i (i = 0..6) contributes 2^i values +-10^(i-6) * m, where m runs over
    the midpoints of linspace(0.1, 1, 2^i + 1). 127 positive + 127 negative values + 0 + 1.0 = 256, sorted.
    Built in float32 exactly as bitsandbytes' `create_dynamic_map(signed=True)`, so the tables are bit-identical.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        values += ((10.0 ** (i - 6)) * midpoints).tolist()
        values += ((-(10.0 ** (i - 6))) * midpoints).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass(eq=False)
class NF4Weight:
    """A frozen weight in NF4: the packed codes and everything needed to decode them (module docstring).

    Field names follow bitsandbytes' `QuantState` (absmax, code, blocksize, shape, dtype, offset; `absmax2`,
    `code2`, `blocksize2` are its `state2.absmax`, `state2.code`, `state2.blocksize`).
    """

    packed: torch.Tensor                  # uint8 [(n+1)//2, 1], two codes per byte, element 2i high nibble
    absmax: torch.Tensor                  # uint8 [nb] codes into code2 (double quant) or float32 [nb]
    shape: torch.Size                     # shape of the original weight, e.g. [N, K]
    dtype: torch.dtype                    # dtype of the original weight: the default dequantisation dtype
    blocksize: int = 64
    code: Optional[torch.Tensor] = None   # float32 [16], the NF4 code book (filled in when None)
    absmax2: Optional[torch.Tensor] = None  # float32 [nb2]; double quantisation only
    code2: Optional[torch.Tensor] = None    # float32 [256], the dynamic code book; double quantisation only
    offset: Optional[torch.Tensor] = None   # float32 [], mean of the original absmax; double quantisation only
    blocksize2: int = ABSMAX_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = cached_on(self.packed.device, "nf4_code", nf4_code)
        _check_state(self)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
                         move(self.absmax2), move(self.code2), move(self.offset), self.blocksize2)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' packed tensor and `QuantState` (no copies). Any `quant_storage` dtype is accepted."""
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(f"quant_state.quant_type is {getattr(quant_state, 'quant_type', None)!r}; only 'nf4' "
                             f"is supported (quantise with bitsandbytes' quant_type='nf4')")
        packed = packed.view(torch.uint8).reshape(-1, 1)
        state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
        return cls(packed=packed, absmax=quant_state.absmax, shape=quant_state.shape, dtype=quant_state.dtype,
                   blocksize=quant_state.blocksize, code=quant_state.code,
                   absmax2=None if state2 is None else state2.absmax,
                   code2=None if state2 is None else state2.code,
                   offset=None if state2 is None else quant_state.offset,
                   blocksize2=ABSMAX_BLOCKSIZE if state2 is None else state2.blocksize)

    def to_bnb(self):
        """(packed, bitsandbytes `QuantState`) sharing our tensors; needs bitsandbytes installed."""
        try:
            from bitsandbytes.functional import QuantState
        except ImportError as e:
            raise ImportError("NF4Weight.to_bnb needs bitsandbytes; install it with `pip install bitsandbytes` "
                              "(the NF4 format itself needs only PyTorch)") from e
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return self.packed, state


def _check_state(q: NF4Weight) -> None:
    """Every invariant the dequantisers rely on; each error names the problem and the fix."""
    if q.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {q.blocksize} is not supported; use one of {BLOCKSIZES} (bitsandbytes' sizes)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"NF4Weight.dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {q.packed.dtype}; view other storage as bytes with "
                        f"packed.view(torch.uint8)")
    if q.packed.numel() != (q.numel + 1) // 2:
        raise ValueError(f"packed holds {q.packed.numel()} bytes but shape {tuple(q.shape)} needs "
                         f"{(q.numel + 1) // 2}; pass the packed tensor that belongs to this weight")
    tensors = {"packed": q.packed, "absmax": q.absmax, "code": q.code, "absmax2": q.absmax2, "code2": q.code2,
               "offset": q.offset}
    for name, t in tensors.items():
        if t is not None and t.device != q.packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {q.packed.device}; move the whole weight "
                             f"with NF4Weight.to(device)")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous; the kernels index it as flat memory, pass "
                             f"{name}.contiguous()")
    if q.code.dtype != torch.float32 or q.code.numel() != 16:
        raise ValueError(f"code must be the float32 [16] NF4 table, got {q.code.dtype} {tuple(q.code.shape)}")
    if q.absmax.numel() != q.n_blocks:
        raise ValueError(f"absmax has {q.absmax.numel()} entries but {q.numel} values in blocks of {q.blocksize} "
                         f"need {q.n_blocks}")
    parts = (q.absmax2, q.code2, q.offset)
    if any(p is not None for p in parts) and any(p is None for p in parts):
        raise ValueError("double quantisation needs absmax2, code2 and offset together; pass all three or none")
    if q.double_quant:
        n2 = -(-q.n_blocks // q.blocksize2)
        if q.absmax.dtype != torch.uint8:
            raise TypeError(f"with double quantisation absmax holds uint8 codes, got {q.absmax.dtype}")
        if q.blocksize2 not in BLOCKSIZES[2:]:
            raise ValueError(f"blocksize2 {q.blocksize2} is not supported; use one of {BLOCKSIZES[2:]}")
        if q.absmax2.dtype != torch.float32 or q.absmax2.numel() != n2:
            raise ValueError(f"absmax2 must be float32 with {n2} entries, got {q.absmax2.dtype} "
                             f"with {q.absmax2.numel()}")
        if q.code2.dtype != torch.float32 or q.code2.numel() != 256:
            raise ValueError(f"code2 must be the float32 [256] dynamic code book, got {q.code2.dtype} "
                             f"{tuple(q.code2.shape)}")
        if q.offset.dtype != torch.float32 or q.offset.numel() != 1:
            raise ValueError(f"offset must be one float32 value, got {q.offset.dtype} {tuple(q.offset.shape)}")
    elif q.absmax.dtype != torch.float32:
        raise TypeError(f"without double quantisation absmax must be float32, got {q.absmax.dtype}")


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Refuse NaN/inf with the position of the first one: NF4 cannot store them and absmax would be garbage."""
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), weight.shape))
        value = weight.reshape(-1)[flat].item()
        raise ValueError(f"{name}{list(index)} is {value}; NF4 can only store finite values. Fix the weight first "
                         f"(e.g. find where it diverged, or torch.nan_to_num) before quantising")


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a float weight (any shape, any device) to NF4; bit-identical to bitsandbytes on CPU (docstring)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} cannot be quantised; cast it to one of {SUPPORTED_DTYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported; use one of {BLOCKSIZES} (bitsandbytes' sizes)")
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty; there is nothing to quantise")
    flat = weight.detach().reshape(-1).float()  # [n]; float32 holds fp16/bf16 values exactly
    n = flat.numel()
    full = n - n % blocksize

    # QLoRA §2, block-wise quantisation: per-block absmax, then w / absmax. Full blocks multiply by the float32
    # reciprocal (a zero block gives 0 * 1e38 = 0 -> index 7), the partial block divides: both exactly as
    # bitsandbytes. (Its clamp to [-1, 1] is left out: every midpoint lies inside (-1, 1), so clamping never
    # changes a code.)
    blocks = flat[:full].view(-1, blocksize)                                     # [nb_full, blocksize]
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg())         # = max |w|, without an |w| copy
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().max().clamp(min=1e-38)[None]])
    if not bool(torch.isfinite(absmax).all()):  # NaN and inf both reach some block's absmax
        check_finite(weight)
    inverse = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)                 # [nb_full]

    q = torch.empty(n + n % 2, dtype=torch.uint8, device=flat.device)            # [n, +1 if odd]
    for b0 in range(0, full // blocksize, _CHUNK // blocksize):                  # chunks keep temporaries in cache
        b1 = min(b0 + _CHUNK // blocksize, full // blocksize)
        scaled = (blocks[b0:b1] * inverse[b0:b1, None]).reshape(-1)
        q[b0 * blocksize:b1 * blocksize] = _nearest_nf4_index(scaled)
    if full < n:
        q[full:n] = _nearest_nf4_index(flat[full:] / absmax[-1])
    if n % 2:
        q[n] = NF4_ZERO_INDEX                                                    # padding value 0.0 -> index 7
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)                             # [(n+1)//2, 1]
    code = cached_on(flat.device, "nf4_code", nf4_code)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize, code)
    # §3 Double Quantization: centre the (all positive) absmax values, then 8-bit blockwise quantise them.
    offset = absmax.mean()
    codes, absmax2 = _quantize_dynamic_blockwise(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Weight(packed, codes, weight.shape, weight.dtype, blocksize, code, absmax2,
                     cached_on(flat.device, "dynamic_code", dynamic_code), offset, ABSMAX_BLOCKSIZE)


# Nearest NF4 code = the number of code-book midpoints strictly below the value (a value on a midpoint takes the
# lower code), i.e. torch.bucketize(value, midpoints). Same answer, fewer passes: split [-1, 1] into 8192 cells.
# Each cell, widened by 1e-6 on both sides (more than the rounding of the cell index), contains at most one
# midpoint (neighbouring midpoints are >= 0.08 apart), so
#     index = (midpoints below the widened cell) + (value > the midpoint inside it, or +inf if none).
_CELLS = 8192
_CHUNK = 1 << 20  # values per step of the quantiser and the reference dequantiser


def _nf4_cell_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = nf4_code(device)
    midpoints = (code[:-1] + code[1:]) / 2                                                      # [15] float32
    edges = torch.arange(_CELLS + 1, dtype=torch.float64, device=device) / (_CELLS / 2) - 1     # [cells + 1]
    below = torch.searchsorted(midpoints.double(), edges[:-1] - 1e-6)                           # [cells]
    inside = torch.searchsorted(midpoints.double(), edges[1:] + 1e-6) > below                   # [cells]
    threshold = torch.where(inside, midpoints[below.clamp(max=14)], float("inf"))
    return below.to(torch.uint8), threshold


def _nearest_nf4_index(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 NF4 index of each value in `scaled` (float32 [n], roughly in [-1, 1])."""
    below, threshold = cached_on(scaled.device, "nf4_cells", _nf4_cell_tables)
    cell = (scaled * (_CELLS / 2)).add_(_CELLS / 2).to(torch.int32).clamp_(0, _CELLS - 1)     # [n]
    index = below.index_select(0, cell)
    index += scaled > threshold.index_select(0, cell)
    return index


# bitsandbytes' CPU 8-bit quantiser: values normalised to [-1, 1] fall into one of 65536 equal bins; each bin maps to
# the code whose midpoint interval contains the bin's left edge. Reproduced here to get identical absmax codes.
_BINS = 65536


def _dynamic_bin_table(device: torch.device) -> torch.Tensor:
    """uint8 [65536]: code index for each bin (number of code-book midpoints strictly below the bin value)."""
    code = dynamic_code(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bin_values = -1.0 + (2.0 * torch.arange(_BINS, dtype=torch.float32, device=device)) / (_BINS - 1)
    return torch.searchsorted(midpoints, bin_values).to(torch.uint8)


def _quantize_dynamic_blockwise(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [m] -> (uint8 codes [m] into `dynamic_code`, float32 absmax [ceil(m / blocksize)])."""
    m = x.numel()
    nb = -(-m // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - m)).view(nb, blocksize)              # zero padding: absmax unchanged
    absmax = blocks.abs().amax(dim=1)                                            # [nb]
    normed = torch.clamp(blocks * (1.0 / absmax)[:, None], -1, 1)
    bins = (((normed + 1.0) * 0.5) * (_BINS - 1) + 0.5).to(torch.int64)          # truncation, as the C++ cast
    codes = cached_on(x.device, "dynamic_bins", _dynamic_bin_table)[bins.clamp(0, _BINS - 1)]
    codes = torch.where((absmax == 0)[:, None], 0, codes)                        # bitsandbytes: zero block -> 0
    return codes.reshape(-1)[:m].contiguous(), absmax


def storage_bits_per_param(q: NF4Weight, include_code_tables: bool = False) -> float:
    """Bits of storage per weight: packed codes + absmax (+ absmax2 + offset with double quantisation).

    The code books (16 + 256 float32) are constants shared by every weight and are left out unless asked for.
    Paper figure (§3): 4 + 8/64 + 32/(64*256) = 4.127 with double quantisation, 4 + 32/64 = 4.5 without.
    """
    tensors = [q.packed, q.absmax, q.absmax2, q.offset]
    if include_code_tables:
        tensors += [q.code, q.code2]
    total_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return 8.0 * total_bytes / q.numel


# ---- reading the format inside a kernel --------------------------------------------------------------------------
# Every decoder below computes w = NF4[code] * absmax_b in float32 and leaves the one cast to its caller. Indices
# are in bounds (callers clamp or wrap them); blocks are of 2^LOG2_BLOCKSIZE values of the flattened weight.

@triton.jit
def restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block,
                   BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of `block` (any shape); double quantisation (QLoRA §3):
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
    NF4_VALUES with the index bits (15 selects, no memory traffic); the autotuner keeps whichever is faster.
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


@triton.jit
def nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, rows, col0, W_K,
                    COLS: tl.constexpr, LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, TREE: tl.constexpr):
    """float32 W[rows, col0 : col0 + COLS] as [R, COLS] for an NF4 weight W [.., W_K]: the byte-wise fast path.

    Needs W_K % blocksize == 0 and a column range inside one absmax block (col0 % COLS == 0, COLS <= blocksize):
    then each row of the tile is COLS/2 consecutive bytes under ONE absmax, decoded byte-wise like the
    dequantisation kernel (high nibble first).
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
    """float32 values of an NF4 weight at flat (row-major) indices `flat`, any tile shape: the general path.

    Absmax blocks may cross rows: value i is in byte i >> 1 (high nibble when i is even) and in absmax block
    i >> log2(blocksize), everything gathered per element.
    """
    byte = tl.load(packed_ptr + (flat >> 1))
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    scale = restore_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, flat >> LOG2_BLOCKSIZE, BLOCKSIZE2,
                           DOUBLE_QUANT)
    return nf4_lookup(code_ptr, nibble, TREE) * scale


@triton.jit
def nf4_gemm_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, k, k0, cols, n0, W_K,
                  TRANSPOSED: tl.constexpr, BYTEWISE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  LOG2_BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                  TREE: tl.constexpr):
    """The float32 [BK, BN] operand tile of a GEMM against an NF4 weight W [.., W_K], at reduction indices k [BK]
    (first k0) and output columns cols [BN] (first n0), all in bounds:
        TRANSPOSED=False:  Wᵀ[k, cols] = W[cols, k]   (y = x Wᵀ: W rows are output columns)
        TRANSPOSED=True:   W[k, cols]                 (dX = dY W: W rows are the reduction)
    BYTEWISE (absmax blocks follow W's rows and the tile's W-column range lies in one block) decodes one absmax
    per W row (`nf4_decode_rows`); otherwise every element is gathered on its own (`nf4_decode`).
    """
    if TRANSPOSED:
        if BYTEWISE:
            return nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, k, n0, W_K,
                                   BLOCK_N, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
        else:
            return nf4_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                              k[:, None] * W_K + cols[None, :], LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
    else:
        if BYTEWISE:
            return tl.trans(nf4_decode_rows(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                                            cols, k0, W_K, BLOCK_K, LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE))
        else:
            return nf4_decode(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr,
                              cols[None, :] * W_K + k[:, None], LOG2_BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, TREE)
