"""What the Triton channel-norm kernels of :mod:`.triton_channels` share: the type of their launch
sizes, the kernels' view of x (:func:`channels_last`), small launch helpers, and the fixed-order
batch sum of per-sample dw, db partials that both grid schemes end with."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import triton
import triton.language as tl

from .._engine import compute_dtype as acc_dtype  # noqa: F401  (the statistics dtype)


@dataclass
class Tuning:
    """Launch sizes. Tile sizes are powers of two."""

    tile: int  # elements per tile of the streaming kernels
    max_block_c: int  # channels per tile, channels-last
    max_block_s: int  # positions per tile, NCHW
    programs: int  # programs the split grids aim at; 0: 4 per SM of the device
    fused_max: int  # NCHW groups of at most this many elements always run one program each
    combine_tile: int  # partials per tile of the combine kernels
    combine_stats: int  # statistics per program of the combine kernels
    num_warps: int  # at most, per program


np2 = triton.next_power_of_2
_SMS: dict[int, int] = {}


def program_count(t: Tuning, x: torch.Tensor) -> int:
    if t.programs:
        return t.programs
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SMS[index]


def spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def channels_last(x: torch.Tensor) -> bool:
    """The kernels' view of x: False for NCHW (contiguous with S > 1), True for channels-last
    dense (``x.movedim(1, -1)`` contiguous; any input with S = 1)."""
    if x.is_contiguous() and spatial(x) > 1:
        return False
    assert x.movedim(1, -1).is_contiguous(), "x must be contiguous or channels-last dense"
    return True


def like_layout(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t (dy) in the kernels' layout of x, copied only if it is not."""
    if cl:
        return t if t.movedim(1, -1).is_contiguous() else \
            t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def warps(elems: int, t: Tuning) -> int:
    """Warps for a tile of ``elems`` elements: at least 8 elements per thread, at most
    ``t.num_warps``."""
    return max(1, min(t.num_warps, elems // 256))


def vec(p: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter as the kernels read it (contiguous), or a placeholder pointer."""
    return fallback if p is None else p.reshape(-1).contiguous()


def full_nan(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype, device=device)


@triton.jit
def _sum_rows_kernel(IN, OUT, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[i, c] = sum over r of IN[i, r, c] (IN is (K, R, C)), rows in a fixed order."""
    cb = tl.program_id(0)
    i = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=OUT.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < R)[:, None] & mask_c[None, :]
        acc += tl.load(IN + i * R * C + offs_r[:, None] * C + offs_c[None, :], mask=mask,
                       other=0.0)
    tl.store(OUT + i * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)


def sum_rows(dwb: torch.Tensor, t: Tuning) -> torch.Tensor:
    """(2, R, C) -> (2, C), rows summed in a fixed order."""
    _, r, c = dwb.shape
    if r == 1:
        return dwb[:, 0]
    out = torch.empty((2, c), dtype=dwb.dtype, device=dwb.device)
    block_c = min(np2(c), 128)
    block_r = max(1, min(np2(r), t.combine_tile // block_c))
    _sum_rows_kernel[(triton.cdiv(c, block_c), 2)](
        dwb, out, r, c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps(block_r * block_c, t))
    return out
