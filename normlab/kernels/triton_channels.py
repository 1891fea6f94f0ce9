r"""Triton kernels for the channel norms: GroupNorm, InstanceNorm (GroupNorm with ``groups = C``)
and BatchNorm, forward and backward, on NCHW and channels-last inputs.

Math. Over each statistics set of :math:`m` elements (GroupNorm: one (sample, group) of
``C / groups`` channels and all positions; BatchNorm: one channel over the batch and all
positions)

.. math::

    \mu = \tfrac1m \textstyle\sum x, \quad \sigma^2 = \tfrac1m \sum (x - \mu)^2, \quad
    \hat x = (x - \mu)\,\mathrm{rstd}, \quad \mathrm{rstd} = (\sigma^2 + \epsilon)^{-1/2}, \quad
    y = \gamma_c \hat x + \beta_c

and, with :math:`g = \gamma_c\,dy` and :math:`\langle\cdot\rangle` the mean over the set,
:math:`dx = \mathrm{rstd}\,(g - \langle g\rangle - \hat x\,\langle g \hat x\rangle)` (only
:math:`\mathrm{rstd}\,g` when the statistics are given constants),
:math:`d\gamma_c = \sum dy\,\hat x`, :math:`d\beta_c = \sum dy` over (batch, positions).

Numerics. Statistics and all arithmetic in float32 (float64 for float64 inputs). Sums are
*shifted*: each program subtracts one element of its set (``shift``) before summing
:math:`x - \text{shift}` and its square, so ``1e4 + N(0, 1)`` inputs do not cancel. Partials
of several programs are merged exactly (Chan et al.): relative to a reference shift ``ref``
(the first partial's), :math:`\delta = \langle x\rangle - \text{ref}` from the partial sums,
then :math:`M_2 = \sum_k (M_{2,k} + n_k (\bar x_k - \text{ref} - \delta)^2)`. The forward
normalizes with the pair ``(ref, delta)``, as :math:`((x - \text{ref}) - \delta)\,\mathrm{rstd}`
(``x - ref`` is exact), so fp32 outputs stay ~1e-6 accurate at large means. The backward gets
only the rounded mean; with input statistics it re-centres: it also sums :math:`x - \mu` and
uses :math:`\hat x = (x - \mu - \delta_3)\,\mathrm{rstd}` with :math:`\delta_3 = \langle x -
\mu\rangle` (zero in exact arithmetic), which removes the mean's rounding from dx and dw.

Layouts. x is viewed without a copy as (N, C, S), S = prod(spatial): NCHW (contiguous) puts
(n, c, s) at ``n*C*S + c*S + s``; channels-last dense (``x.movedim(1, -1)`` contiguous:
channels_last, channels_last_3d, a transposed (N, L, C) sequence, and any input with S = 1)
at ``n*S*C + s*C + c``. Every streaming kernel works on tiles ``[BLOCK_S, BLOCK_C]``
(positions x channels) whose unit-stride axis is the layout's, so loads and stores are
coalesced: NCHW tiles are long in S (``BLOCK_S`` up to ``max_block_s``, ``BLOCK_C`` fills the
tile), channels-last tiles are wide in C (``BLOCK_C`` up to ``max_block_c``). Per-channel
reductions run along axis 0 of the tile in both layouts. Outputs (y, dx) are
``torch.empty_like(x)``: x's layout. dy in another layout is first copied to x's.

Grids. Two schemes, no atomics anywhere (every sum has a fixed order, so results are bitwise
repeatable for a shape):

* fused, one program per (sample, group): NCHW GroupNorm/InstanceNorm when the group is small
  (``fused_max`` elements) or there are enough groups to fill the device. The group is the
  contiguous block of ``C/G`` rows of S; forward loops over it twice (shifted sums, then
  normalize: 2 reads, 1 write, the second read from cache); backward loops twice (group sums
  of ``w dy (x - mu)``, ``w dy``, ``x - mu``; then dx plus per-(sample, channel) ``dw, db``
  partials, summed over the batch in fixed order by a small kernel).
* split, three kernels over the grid ``(N, channel blocks, SPLIT)``, each program a chunk of
  ``CHUNK`` positions of ``BLOCK_C`` channels of one sample (SPLIT chosen so the grid has about
  ``programs`` programs: 4 per SM on a GPU, 1 in the interpreter): (1) per-(sample, chunk,
  channel) partials ``(shift, sum(x - shift), sum((x - shift)^2))`` (backward: ``sum dy``,
  ``sum dy (x - mu)``, ``sum (x - mu)``) into a ``(3, N, SPLIT, C)`` buffer; (2) a combine
  kernel merging each statistic's partials in fixed order, on tiles [partial rows, columns,
  statistics] (a few statistics per program): BatchNorm's channel c merges rows
  ``(n, chunk)`` of column c, GroupNorm's (n, g) the chunks of sample n in the group's C/G
  columns (backward: the dx coefficients per statistic and the per-(sample, channel)
  ``dw, db`` partials, summed over the batch by a small fixed-order kernel); (3) normalize
  (or dx) over the same grid, as ``y = (x - ref) * s + t`` with ``s, t`` per (sample,
  channel) folded from the statistics, weight and bias (dx = ``rstd w dy + beta (x - mu) +
  t``). Used for BatchNorm, channels-last GroupNorm/InstanceNorm (whose groups are strided
  across the channels of each position) and large NCHW groups with few programs. BatchNorm
  with given statistics (eval) is kernel (3) alone, which also writes rstd.

Launches: fused GroupNorm forward 1, backward 2; split forward 3, backward 3 (+1 for the
batch sum of GroupNorm's dw, db). Launch sizes come from :data:`GPU_TUNING` for CUDA tensors
(tiles of 2048 elements, 4 warps, at least 8 elements per thread; split grids of 4 programs
per SM) and :data:`CPU_TUNING` in Triton's interpreter (``TRITON_INTERPRET=1``: few large
programs, so tests are fast). Tests shrink them to run every loop and the split path.

Modules. This one holds the launch sizes and the four functions the backend calls, which pick
the scheme; the kernels and their launchers are in :mod:`._triton_channels_fused` (fused) and
:mod:`._triton_channels_split` (split), what both use in :mod:`._triton_channels_common`.
"""
from __future__ import annotations

import torch

from . import _triton_channels_fused as fused
from . import _triton_channels_split as split
from ._triton_channels_common import (
    Tuning, acc_dtype, channels_last, full_nan, like_layout, spatial,
)

__all__ = ["group_forward", "group_backward", "batch_forward", "batch_backward",
           "Tuning", "GPU_TUNING", "CPU_TUNING"]

GPU_TUNING = Tuning(tile=2048, max_block_c=128, max_block_s=1024, programs=0, fused_max=16384,
                    combine_tile=1024, combine_stats=4, num_warps=4)
CPU_TUNING = Tuning(tile=4096, max_block_c=256, max_block_s=4096, programs=1,
                    fused_max=1 << 62, combine_tile=4096, combine_stats=256, num_warps=1)


def _tuning(x: torch.Tensor) -> Tuning:
    return GPU_TUNING if x.is_cuda else CPU_TUNING


def _no_grads(x, need_dx: bool):
    """The backward of an x without elements: (empty dx or None, zero dw, zero db)."""
    zeros = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
    return (torch.empty_like(x) if need_dx else None), zeros, zeros.clone()


def _backward_inputs(dy, x, cl: bool, mean, rstd):
    """What the backward kernels read besides x: dy in x's layout (copied only if it is not),
    mean and rstd flat and contiguous in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    return (like_layout(dy, cl), mean.reshape(-1).to(acc).contiguous(),
            rstd.reshape(-1).to(acc).contiguous())


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


def group_forward(x, weight, bias, groups: int, eps: float):
    """GroupNorm (InstanceNorm is groups = C): statistics per (sample, group of C/groups
    channels) over the group's channels and all spatial positions.

    weight, bias: (C,) or None. Returns (y, mean, rstd): y like x (same memory layout);
    mean, rstd (N, groups) float32 (float64 for float64 x).
    """
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    if n * s == 0 or c == 0:
        return y, full_nan((n, groups), acc, x.device), full_nan((n, groups), acc, x.device)
    cl = channels_last(x)
    t = _tuning(x)
    if fused.applies(x, cl, groups, t):
        mean, rstd = fused.forward(x, y, weight, bias, groups, eps, t)
        return y, mean, rstd
    stats = split.forward(x, y, weight, bias, eps, True, groups, t)
    return y, stats[0].view(n, groups), stats[2].view(n, groups)


def group_backward(dy, x, weight, mean, rstd, groups: int, *, need_dx=True):
    """GroupNorm backward from the forward's mean and rstd.

    Returns (dx or None, dw (C,), db (C,)), dw and db float32 (float64 for float64 x):
    dx = rstd * (g - <g> - xhat <g xhat>) with g = weight[c] * dy and means over each
    (sample, group); dw[c] = sum over samples and positions of dy * xhat; db[c] = sum of dy.
    """
    if x.numel() == 0:
        return _no_grads(x, need_dx)
    cl = channels_last(x)
    t = _tuning(x)
    dy, mean, rstd = _backward_inputs(dy, x, cl, mean, rstd)
    if fused.applies(x, cl, groups, t):
        return fused.backward(dy, x, weight, mean, rstd, groups, need_dx, t)
    return split.backward(dy, x, weight, mean, rstd, True, groups, True, need_dx, t)


def batch_forward(x, weight, bias, eps: float, mean=None, var=None):
    """BatchNorm: statistics per channel over (N, spatial), or the given (C,) ``mean`` and
    ``var`` (eval mode; also InstanceNorm with running statistics).

    Returns (y, mean (C,), var (C,) biased, rstd (C,)): y like x (same memory layout),
    statistics float32 (float64 for float64 x); given statistics are returned converted.
    """
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    given = var is not None
    if given:
        mean = mean.detach().reshape(-1).to(acc).contiguous()
        var = var.detach().reshape(-1).to(acc).contiguous()
    if n * s == 0 or c == 0:
        if given:
            return y, mean, var, torch.rsqrt(var + eps)
        return (y, full_nan((c,), acc, x.device), full_nan((c,), acc, x.device),
                full_nan((c,), acc, x.device))
    t = _tuning(x)
    if not given:
        stats = split.forward(x, y, weight, bias, eps, False, c, t)
        return y, stats[0], stats[1], stats[2]
    return y, mean, var, split.normalize_given(x, y, weight, bias, mean, var, eps, t)


def batch_backward(dy, x, weight, mean, rstd, input_stats: bool, *, need_dx=True):
    """BatchNorm backward from the forward's (C,) mean and rstd.

    Returns (dx or None, dw (C,), db (C,)), dw and db float32 (float64 for float64 x).
    input_stats=True (training): dx = rstd * (g - <g> - xhat <g xhat>), g = weight[c] * dy,
    means over (N, spatial) per channel; input_stats=False (given statistics): dx = rstd * g.
    """
    if x.numel() == 0:
        return _no_grads(x, need_dx)
    dy, mean, rstd = _backward_inputs(dy, x, channels_last(x), mean, rstd)
    return split.backward(dy, x, weight, mean, rstd, False, x.shape[1], bool(input_stats),
                          need_dx, _tuning(x))
