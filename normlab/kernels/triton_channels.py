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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["group_forward", "group_backward", "batch_forward", "batch_backward",
           "Tuning", "GPU_TUNING", "CPU_TUNING"]


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


GPU_TUNING = Tuning(tile=2048, max_block_c=128, max_block_s=1024, programs=0, fused_max=16384,
                    combine_tile=1024, combine_stats=4, num_warps=4)
CPU_TUNING = Tuning(tile=4096, max_block_c=256, max_block_s=4096, programs=1,
                    fused_max=1 << 62, combine_tile=4096, combine_stats=256, num_warps=1)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_offs(offs_s, offs_c, C, S, CL: tl.constexpr):
    """Offsets of the tile [positions, channels] within a sample (added to the sample's base
    pointer, ``n * C * S`` in int64)."""
    if CL:
        return offs_s[:, None] * C + offs_c[None, :]
    else:
        return offs_s[:, None] + offs_c[None, :] * S


@triton.jit
def _stats_kernel(X, PART, PLANE, C, S, CHUNK, SPLIT,
                  CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split forward (1): shifted sums of a chunk of positions of BLOCK_C channels of sample n."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    acc_ty = PART.dtype.element_ty
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_start = k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, S)
    X += n.to(tl.int64) * C * S
    first = _tile_offs(s_start + tl.arange(0, 1), offs_c, C, S, CL)
    shift = tl.sum(tl.load(X + first, mask=mask_c[None, :], other=0.0).to(acc_ty), axis=0)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < S)[:, None] & mask_c[None, :]
        x = tl.load(X + _tile_offs(offs_s, offs_c, C, S, CL), mask=mask, other=0.0)
        d = tl.where(mask, x.to(acc_ty) - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    out = (n * SPLIT + k) * C + offs_c
    tl.store(PART + out, shift, mask=mask_c)
    tl.store(PART + PLANE + out, tl.sum(acc1, axis=0), mask=mask_c)
    tl.store(PART + 2 * PLANE + out, tl.sum(acc2, axis=0), mask=mask_c)


@triton.jit
def _partial_cols(j, G, R, Q, C):
    """Offset of partial (row 0, column 0) of statistics j = p * G + g: sample block p holds
    R rows of C columns; statistic g owns columns g*Q .. g*Q + Q - 1."""
    p = j // G
    return p * R * C + (j - p * G) * Q


@triton.jit
def _combine_stats_kernel(PART, STATS, PLANE, NSTAT, G, R, Q, C, SPLIT, S, CHUNK, count, eps,
                          BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    """Split forward (2): Chan merge of the partials of BLOCK_J statistics, each over its rows
    r < R (stride C, chunk r % SPLIT) and its Q columns; tiles [rows, columns, statistics].
    Writes mean, var, rstd, ref, delta (rows of STATS)."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = j < NSTAT
    acc_ty = STATS.dtype.element_ty
    col = _partial_cols(j, G, R, Q, C)
    ref = tl.load(PART + col, mask=mask_j, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_Q, BLOCK_J], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        cnt = tl.minimum(CHUNK, S - (offs_r % SPLIT) * CHUNK).to(acc_ty)[:, None, None]
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask = ((offs_r < R)[:, None, None] & (offs_q < Q)[None, :, None]
                    & mask_j[None, None, :])
            ptr = PART + col[None, None, :] + offs_r[:, None, None] * C + offs_q[None, :, None]
            sh = tl.load(ptr, mask=mask, other=0.0)
            s1 = tl.load(ptr + PLANE, mask=mask, other=0.0)
            acc += tl.where(mask, s1 + cnt * (sh - ref[None, None, :]), 0.0)
    delta = tl.sum(tl.sum(acc, axis=0), axis=0) / count
    acc = tl.zeros([BLOCK_R, BLOCK_Q, BLOCK_J], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        cnt = tl.minimum(CHUNK, S - (offs_r % SPLIT) * CHUNK).to(acc_ty)[:, None, None]
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            mask = ((offs_r < R)[:, None, None] & (offs_q < Q)[None, :, None]
                    & mask_j[None, None, :])
            ptr = PART + col[None, None, :] + offs_r[:, None, None] * C + offs_q[None, :, None]
            sh = tl.load(ptr, mask=mask, other=0.0)
            s1 = tl.load(ptr + PLANE, mask=mask, other=0.0)
            s2 = tl.load(ptr + 2 * PLANE, mask=mask, other=0.0)
            dev = (sh - ref[None, None, :]) + s1 / cnt - delta[None, None, :]
            acc += tl.where(mask, (s2 - s1 * s1 / cnt) + cnt * dev * dev, 0.0)
    var = tl.sum(tl.sum(acc, axis=0), axis=0) / count
    var = tl.where(var < 0.0, 0.0, var)  # not tl.maximum: a NaN variance stays NaN
    tl.store(STATS + j, ref + delta, mask=mask_j)
    tl.store(STATS + NSTAT + j, var, mask=mask_j)
    tl.store(STATS + 2 * NSTAT + j, tl.rsqrt(var + eps), mask=mask_j)
    tl.store(STATS + 3 * NSTAT + j, ref, mask=mask_j)
    tl.store(STATS + 4 * NSTAT + j, delta, mask=mask_j)


@triton.jit
def _normalize_kernel(X, Y, W, B, REF, DELTA, RSTD, VAR, STAT_N, C, S, CHUNK, CPG, eps,
                      CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      GIVEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split forward (3): y = (x - ref) * s + t, s = rstd * w, t = b - delta * s, per channel.
    GIVEN: ref = the given mean, delta = 0, rstd from the given var (written by the programs of
    sample 0, chunk 0)."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    acc_ty = RSTD.dtype.element_ty
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    j = n * STAT_N + offs_c // CPG
    ref = tl.load(REF + j, mask=mask_c, other=0.0).to(acc_ty)
    if GIVEN:
        rstd = tl.rsqrt(tl.load(VAR + j, mask=mask_c, other=1.0).to(acc_ty) + eps)
        # written once, by the programs of sample 0, chunk 0 (the condition as a vector: the
        # interpreter rejects a scalar in a mask)
        tl.store(RSTD + j, rstd, mask=mask_c & (offs_c * 0 + n + k == 0))
        scale = rstd
        t = tl.zeros([BLOCK_C], dtype=acc_ty)
    else:
        rstd = tl.load(RSTD + j, mask=mask_c, other=0.0)
        scale = rstd
        t = -tl.load(DELTA + j, mask=mask_c, other=0.0) * rstd
    if HAS_W:
        w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(acc_ty)
        scale = scale * w
        t = t * w
    if HAS_B:
        t += tl.load(B + offs_c, mask=mask_c, other=0.0).to(acc_ty)
    sample = n.to(tl.int64) * C * S
    X += sample
    Y += sample
    s_start = k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < S)[:, None] & mask_c[None, :]
        ptrs = _tile_offs(offs_s, offs_c, C, S, CL)
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty)
        y = (x - ref[None, :]) * scale[None, :] + t[None, :]
        tl.store(Y + ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(X, DY, MEAN, PART, PLANE, STAT_N, C, S, CHUNK, SPLIT, CPG,
                      CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split backward (1): sum dy, sum dy (x - mu), sum (x - mu) of a chunk of positions of
    BLOCK_C channels of sample n."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    acc_ty = PART.dtype.element_ty
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(MEAN + n * STAT_N + offs_c // CPG, mask=mask_c, other=0.0).to(acc_ty)
    a_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_gx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_x = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    sample = n.to(tl.int64) * C * S
    X += sample
    DY += sample
    s_start = k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < S)[:, None] & mask_c[None, :]
        ptrs = _tile_offs(offs_s, offs_c, C, S, CL)
        xc = tl.where(mask, tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty) - mean[None, :],
                      0.0)
        dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(acc_ty)
        a_g += dy
        a_gx += dy * xc
        a_x += xc
    out = (n * SPLIT + k) * C + offs_c
    tl.store(PART + out, tl.sum(a_g, axis=0), mask=mask_c)
    tl.store(PART + PLANE + out, tl.sum(a_gx, axis=0), mask=mask_c)
    tl.store(PART + 2 * PLANE + out, tl.sum(a_x, axis=0), mask=mask_c)


@triton.jit
def _column_sums(PART, PLANE, col, mask_j, offs_q, R, Q, C, BLOCK_R: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr, acc_ty: tl.constexpr):
    """Sums over the rows r < R (stride C) of the three planes of PART: [columns, statistics]."""
    a_g = tl.zeros([BLOCK_R, BLOCK_Q, BLOCK_J], dtype=acc_ty)
    a_gx = tl.zeros([BLOCK_R, BLOCK_Q, BLOCK_J], dtype=acc_ty)
    a_x = tl.zeros([BLOCK_R, BLOCK_Q, BLOCK_J], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = ((offs_r < R)[:, None, None] & (offs_q < Q)[None, :, None]
                & mask_j[None, None, :])
        ptr = PART + col[None, None, :] + offs_r[:, None, None] * C + offs_q[None, :, None]
        a_g += tl.load(ptr, mask=mask, other=0.0)
        a_gx += tl.load(ptr + PLANE, mask=mask, other=0.0)
        a_x += tl.load(ptr + 2 * PLANE, mask=mask, other=0.0)
    return tl.sum(a_g, axis=0), tl.sum(a_gx, axis=0), tl.sum(a_x, axis=0)


@triton.jit
def _combine_grads_kernel(PART, W, RSTD, COEF, DWB, PLANE, NSTAT, DPLANE, G, R, Q, C, count,
                          HAS_W: tl.constexpr, INPUT_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
    """Split backward (2), BLOCK_J statistics j = p * G + g (partials as in the forward
    combine): the coefficients beta, t of dx = rstd w dy + beta (x - mu) + t into COEF, and
    each sample block's dw, db partials per channel into DWB (2, P, C)."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = j < NSTAT
    acc_ty = COEF.dtype.element_ty
    col = _partial_cols(j, G, R, Q, C)
    chan = (j % G) * Q  # first channel of each statistic
    out = (j // G) * C + chan  # its dw, db partials (row p of DWB)
    rstd = tl.load(RSTD + j, mask=mask_j, other=0.0).to(acc_ty)
    sum_wg = tl.zeros([BLOCK_J], dtype=acc_ty)
    sum_wgx = tl.zeros([BLOCK_J], dtype=acc_ty)
    sum_x = tl.zeros([BLOCK_J], dtype=acc_ty)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        s_g, s_gx, s_x = _column_sums(PART, PLANE, col, mask_j, offs_q, R, Q, C,
                                      BLOCK_R, BLOCK_Q, BLOCK_J, acc_ty)
        if HAS_W:
            mask = (offs_q < Q)[:, None] & mask_j[None, :]
            w = tl.load(W + chan[None, :] + offs_q[:, None], mask=mask, other=0.0).to(acc_ty)
            s_g = s_g * w
            s_gx = s_gx * w
        sum_wg += tl.sum(s_g, axis=0)
        sum_wgx += tl.sum(s_gx, axis=0)
        sum_x += tl.sum(s_x, axis=0)
    if INPUT_STATS:
        m3 = sum_x / count  # <x - mu>: the rounding of the saved mean, removed here
        inner = sum_wgx - m3 * sum_wg  # sum of w dy (x - mu - m3)
        beta = -rstd * rstd * rstd * inner / count
        t = -rstd * sum_wg / count - beta * m3
    else:
        m3 = tl.zeros([BLOCK_J], dtype=acc_ty)
        beta = m3
        t = m3
    tl.store(COEF + j, beta, mask=mask_j)
    tl.store(COEF + NSTAT + j, t, mask=mask_j)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        s_g, s_gx, s_x = _column_sums(PART, PLANE, col, mask_j, offs_q, R, Q, C,
                                      BLOCK_R, BLOCK_Q, BLOCK_J, acc_ty)
        mask = (offs_q < Q)[:, None] & mask_j[None, :]
        ptr = DWB + out[None, :] + offs_q[:, None]
        tl.store(ptr, rstd[None, :] * (s_gx - m3[None, :] * s_g), mask=mask)
        tl.store(ptr + DPLANE, s_g, mask=mask)


@triton.jit
def _dx_kernel(X, DY, DX, W, MEAN, RSTD, COEF, NSTAT, STAT_N, C, S, CHUNK, CPG,
               CL: tl.constexpr, HAS_W: tl.constexpr, INPUT_STATS: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split backward (3): dx = rstd w dy + beta (x - mu) + t (given statistics: rstd w dy)."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    acc_ty = COEF.dtype.element_ty
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    j = n * STAT_N + offs_c // CPG
    alpha = tl.load(RSTD + j, mask=mask_c, other=0.0).to(acc_ty)
    if HAS_W:
        alpha = alpha * tl.load(W + offs_c, mask=mask_c, other=0.0).to(acc_ty)
    mean = tl.load(MEAN + j, mask=mask_c, other=0.0).to(acc_ty)
    beta = tl.load(COEF + j, mask=mask_c, other=0.0)
    t = tl.load(COEF + NSTAT + j, mask=mask_c, other=0.0)
    sample = n.to(tl.int64) * C * S
    X += sample
    DY += sample
    DX += sample
    s_start = k * CHUNK
    s_end = tl.minimum(s_start + CHUNK, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < S)[:, None] & mask_c[None, :]
        ptrs = _tile_offs(offs_s, offs_c, C, S, CL)
        dx = tl.load(DY + ptrs, mask=mask, other=0.0).to(acc_ty) * alpha[None, :]
        if INPUT_STATS:
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty)
            dx += (x - mean[None, :]) * beta[None, :] + t[None, :]
        tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_forward_fused_kernel(X, Y, W, B, STATS, NSTAT, C, S, G, CPG, count, eps,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fused NCHW forward, one program per (sample, group): shifted sums over the group's CPG
    rows of S, then y = ((x - shift) - delta) * rstd * w + b. Writes mean and rstd."""
    j = tl.program_id(0)
    n = j // G
    g = j - n * G
    acc_ty = STATS.dtype.element_ty
    base = n.to(tl.int64) * C * S + g * CPG * S  # the group: CPG rows of S
    X += base
    Y += base
    shift = tl.load(X).to(acc_ty)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < S)[:, None] & (offs_c < CPG)[None, :]
            x = tl.load(X + offs_s[:, None] + offs_c[None, :] * S, mask=mask, other=0.0)
            d = tl.where(mask, x.to(acc_ty) - shift, 0.0)
            acc1 += d
            acc2 += d * d
    delta = tl.sum(acc1) / count
    var = tl.sum(acc2) / count - delta * delta
    var = tl.where(var < 0.0, 0.0, var)  # not tl.maximum: a NaN variance stays NaN
    rstd = tl.rsqrt(var + eps)
    tl.store(STATS + j, shift + delta)
    tl.store(STATS + NSTAT + j, rstd)
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        scale = tl.zeros([BLOCK_C], dtype=acc_ty) + rstd
        if HAS_W:
            scale = scale * tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(acc_ty)
        t = -delta * scale
        if HAS_B:
            t += tl.load(B + g * CPG + offs_c, mask=mask_c, other=0.0).to(acc_ty)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < S)[:, None] & mask_c[None, :]
            ptrs = offs_s[:, None] + offs_c[None, :] * S
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty)
            y = (x - shift) * scale[None, :] + t[None, :]
            tl.store(Y + ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_backward_fused_kernel(X, DY, DX, W, MEAN, RSTD, DWB, DPLANE, C, S, G, CPG, count,
                                 HAS_W: tl.constexpr, NEED_DX: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fused NCHW backward, one program per (sample, group): group sums of w dy (x - mu),
    w dy and x - mu; then dx and this sample's dw, db per channel into DWB (2, N, C)."""
    j = tl.program_id(0)
    n = j // G
    g = j - n * G
    acc_ty = DWB.dtype.element_ty
    base = n.to(tl.int64) * C * S + g * CPG * S  # the group: CPG rows of S
    X += base
    DY += base
    DX += base
    mean = tl.load(MEAN + j).to(acc_ty)
    rstd = tl.load(RSTD + j).to(acc_ty)
    a_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_gx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_x = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        if HAS_W:
            w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(acc_ty)
        else:
            w = tl.where(mask_c, 1.0, 0.0).to(acc_ty)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < S)[:, None] & mask_c[None, :]
            ptrs = offs_s[:, None] + offs_c[None, :] * S
            xc = tl.where(mask, tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty) - mean, 0.0)
            gw = tl.load(DY + ptrs, mask=mask, other=0.0).to(acc_ty) * w[None, :]
            a_g += gw
            a_gx += gw * xc
            a_x += xc
    m3 = tl.sum(a_x) / count  # <x - mu>: the rounding of the saved mean, removed here
    sum_g = tl.sum(a_g)
    inner = tl.sum(a_gx) - m3 * sum_g
    beta = -rstd * rstd * rstd * inner / count
    t = -rstd * sum_g / count - beta * m3
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        alpha = tl.zeros([BLOCK_C], dtype=acc_ty) + rstd
        if HAS_W:
            alpha = alpha * tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(acc_ty)
        c_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        c_gx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < S)[:, None] & mask_c[None, :]
            ptrs = offs_s[:, None] + offs_c[None, :] * S
            xc = tl.where(mask, tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty) - mean, 0.0)
            dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(acc_ty)
            c_g += dy
            c_gx += dy * xc
            if NEED_DX:
                dx = dy * alpha[None, :] + xc * beta + t
                tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        out = n * C + g * CPG + offs_c
        sg = tl.sum(c_g, axis=0)
        tl.store(DWB + out, rstd * (tl.sum(c_gx, axis=0) - m3 * sg), mask=mask_c)
        tl.store(DWB + DPLANE + out, sg, mask=mask_c)


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


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

_np2 = triton.next_power_of_2
_SMS: dict[int, int] = {}


def _tuning(x: torch.Tensor) -> Tuning:
    return GPU_TUNING if x.is_cuda else CPU_TUNING


def _programs(t: Tuning, x: torch.Tensor) -> int:
    if t.programs:
        return t.programs
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SMS[index]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _channels_last(x: torch.Tensor) -> bool:
    """The kernels' view of x: False for NCHW (contiguous with S > 1), True for channels-last
    dense (``x.movedim(1, -1)`` contiguous; any input with S = 1)."""
    if x.is_contiguous() and _spatial(x) > 1:
        return False
    assert x.movedim(1, -1).is_contiguous(), "x must be contiguous or channels-last dense"
    return True


def _like_layout(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t (dy) in the kernels' layout of x, copied only if it is not."""
    if cl:
        return t if t.movedim(1, -1).is_contiguous() else \
            t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _warps(elems: int, t: Tuning) -> int:
    """Warps for a tile of ``elems`` elements: at least 8 elements per thread, at most
    ``t.num_warps``."""
    return max(1, min(t.num_warps, elems // 256))


def _vec(p: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter as the kernels read it (contiguous), or a placeholder pointer."""
    return fallback if p is None else p.reshape(-1).contiguous()


class _Grid(NamedTuple):
    """The split grid: (N, n_cblk, split) programs, each CHUNK positions of BLOCK_C channels."""

    block_s: int
    block_c: int
    n_cblk: int
    split: int
    chunk: int
    num_warps: int


def _split_grid(x: torch.Tensor, cl: bool, t: Tuning) -> _Grid:
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    if cl:
        block_c = min(_np2(c), t.max_block_c)
        block_s = max(1, min(_np2(s), t.tile // block_c))
    else:
        block_s = min(_np2(s), t.max_block_s)
        block_c = max(1, min(_np2(c), t.tile // block_s))
    n_cblk = triton.cdiv(c, block_c)
    s_blocks = triton.cdiv(s, block_s)
    want = max(1, triton.cdiv(_programs(t, x), n * n_cblk))
    chunk = triton.cdiv(s_blocks, min(s_blocks, want)) * block_s
    return _Grid(block_s, block_c, n_cblk, triton.cdiv(s, chunk), chunk,
                 _warps(block_s * block_c, t))


def _combine_blocks(rows: int, cols: int, nstat: int, t: Tuning) -> dict:
    """BLOCK_R, BLOCK_Q, BLOCK_J (the combine kernels' [rows, columns, statistics] tiles) and
    num_warps."""
    block_q = min(_np2(cols), 16, t.combine_tile)
    block_j = max(1, min(_np2(nstat), t.combine_stats, t.combine_tile // block_q))
    block_r = max(1, min(_np2(rows), t.combine_tile // (block_q * block_j)))
    return dict(BLOCK_R=block_r, BLOCK_Q=block_q, BLOCK_J=block_j,
                num_warps=_warps(block_r * block_q * block_j, t))


def _fused_blocks(cpg: int, s: int, t: Tuning) -> tuple[int, int]:
    block_s = min(_np2(s), t.max_block_s)
    return block_s, max(1, min(_np2(cpg), t.tile // block_s))


def _use_fused(x: torch.Tensor, cl: bool, groups: int, t: Tuning) -> bool:
    cpg = x.shape[1] // groups
    return not cl and (cpg * _spatial(x) <= t.fused_max
                       or x.shape[0] * groups >= _programs(t, x))


def _split_forward(x, y, weight, bias, eps, per_sample: bool, groups: int, t: Tuning):
    """Split forward; returns STATS (5, P * G): mean, var, rstd, ref, delta."""
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    cl = _channels_last(x)
    acc = _acc(x.dtype)
    gr = _split_grid(x, cl, t)
    plane = n * gr.split * c
    part = torch.empty((3, plane), dtype=acc, device=x.device)
    grid = (n, gr.n_cblk, gr.split)
    _stats_kernel[grid](x, part, plane, c, s, gr.chunk, gr.split, CL=cl, BLOCK_S=gr.block_s,
                        BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    cpg = c // groups
    nstat = n * groups if per_sample else c
    rows = gr.split if per_sample else n * gr.split
    stats = torch.empty((5, nstat), dtype=acc, device=x.device)
    blocks = _combine_blocks(rows, cpg, nstat, t)
    _combine_stats_kernel[(triton.cdiv(nstat, blocks["BLOCK_J"]),)](
        part, stats, plane, nstat, groups, rows, cpg, c, gr.split, s, gr.chunk,
        float(cpg * s if per_sample else n * s), eps, **blocks)
    _normalize_kernel[grid](x, y, _vec(weight, x), _vec(bias, x), stats[3], stats[4], stats[2],
                            stats[1], groups if per_sample else 0, c, s, gr.chunk, cpg, eps,
                            CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, GIVEN=False,
                            BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    return stats


def _sum_rows(dwb: torch.Tensor, t: Tuning) -> torch.Tensor:
    """(2, R, C) -> (2, C), rows summed in a fixed order."""
    _, r, c = dwb.shape
    if r == 1:
        return dwb[:, 0]
    out = torch.empty((2, c), dtype=dwb.dtype, device=dwb.device)
    block_c = min(_np2(c), 128)
    block_r = max(1, min(_np2(r), t.combine_tile // block_c))
    _sum_rows_kernel[(triton.cdiv(c, block_c), 2)](
        dwb, out, r, c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c, t))
    return out


def _split_backward(dy, x, weight, mean, rstd, per_sample, groups, input_stats, need_dx, t):
    """Split backward: (dx or None, dw, db)."""
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    cl = _channels_last(x)
    acc = _acc(x.dtype)
    gr = _split_grid(x, cl, t)
    grid = (n, gr.n_cblk, gr.split)
    plane = n * gr.split * c
    cpg = c // groups
    stat_n = groups if per_sample else 0
    part = torch.empty((3, plane), dtype=acc, device=x.device)
    _grad_sums_kernel[grid](x, dy, mean, part, plane, stat_n, c, s, gr.chunk, gr.split, cpg,
                            CL=cl, BLOCK_S=gr.block_s, BLOCK_C=gr.block_c,
                            num_warps=gr.num_warps)
    nstat = n * groups if per_sample else c
    rows = gr.split if per_sample else n * gr.split
    p = n if per_sample else 1
    coef = torch.empty((2, nstat), dtype=acc, device=x.device)
    dwb = torch.empty((2, p, c), dtype=acc, device=x.device)
    blocks = _combine_blocks(rows, cpg, nstat, t)
    _combine_grads_kernel[(triton.cdiv(nstat, blocks["BLOCK_J"]),)](
        part, _vec(weight, x), rstd, coef, dwb, plane, nstat, p * c, groups, rows, cpg, c,
        float(cpg * s if per_sample else n * s), HAS_W=weight is not None,
        INPUT_STATS=input_stats, **blocks)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _dx_kernel[grid](x, dy, dx, _vec(weight, x), mean, rstd, coef, nstat, stat_n, c, s,
                         gr.chunk, cpg, CL=cl, HAS_W=weight is not None, INPUT_STATS=input_stats,
                         BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    dw_db = _sum_rows(dwb, t)
    return dx, dw_db[0], dw_db[1]


def _nan(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


def group_forward(x, weight, bias, groups: int, eps: float):
    """GroupNorm (InstanceNorm is groups = C): statistics per (sample, group of C/groups
    channels) over the group's channels and all spatial positions.

    weight, bias: (C,) or None. Returns (y, mean, rstd): y like x (same memory layout);
    mean, rstd (N, groups) float32 (float64 for float64 x).
    """
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    acc = _acc(x.dtype)
    y = torch.empty_like(x)
    if n * s == 0 or c == 0:
        return y, _nan((n, groups), acc, x.device), _nan((n, groups), acc, x.device)
    cl = _channels_last(x)
    t = _tuning(x)
    cpg = c // groups
    if _use_fused(x, cl, groups, t):
        stats = torch.empty((2, n * groups), dtype=acc, device=x.device)
        block_s, block_c = _fused_blocks(cpg, s, t)
        _group_forward_fused_kernel[(n * groups,)](
            x, y, _vec(weight, x), _vec(bias, x), stats, n * groups, c, s, groups, cpg,
            float(cpg * s), eps, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=_warps(block_s * block_c, t))
        return y, stats[0].view(n, groups), stats[1].view(n, groups)
    stats = _split_forward(x, y, weight, bias, eps, True, groups, t)
    return y, stats[0].view(n, groups), stats[2].view(n, groups)


def group_backward(dy, x, weight, mean, rstd, groups: int, *, need_dx=True):
    """GroupNorm backward from the forward's mean and rstd.

    Returns (dx or None, dw (C,), db (C,)), dw and db float32 (float64 for float64 x):
    dx = rstd * (g - <g> - xhat <g xhat>) with g = weight[c] * dy and means over each
    (sample, group); dw[c] = sum over samples and positions of dy * xhat; db[c] = sum of dy.
    """
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    acc = _acc(x.dtype)
    if n * s == 0 or c == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return (torch.empty_like(x) if need_dx else None), zeros, zeros.clone()
    cl = _channels_last(x)
    t = _tuning(x)
    dy = _like_layout(dy, cl)
    mean = mean.reshape(-1).to(acc).contiguous()
    rstd = rstd.reshape(-1).to(acc).contiguous()
    if _use_fused(x, cl, groups, t):
        cpg = c // groups
        dx = torch.empty_like(x) if need_dx else None
        dwb = torch.empty((2, n, c), dtype=acc, device=x.device)
        block_s, block_c = _fused_blocks(cpg, s, t)
        _group_backward_fused_kernel[(n * groups,)](
            x, dy, dx if need_dx else x, _vec(weight, x), mean, rstd, dwb, n * c, c, s, groups,
            cpg, float(cpg * s), HAS_W=weight is not None, NEED_DX=need_dx, BLOCK_S=block_s,
            BLOCK_C=block_c, num_warps=_warps(block_s * block_c, t))
        dw_db = _sum_rows(dwb, t)
        return dx, dw_db[0], dw_db[1]
    return _split_backward(dy, x, weight, mean, rstd, True, groups, True, need_dx, t)


def batch_forward(x, weight, bias, eps: float, mean=None, var=None):
    """BatchNorm: statistics per channel over (N, spatial), or the given (C,) ``mean`` and
    ``var`` (eval mode; also InstanceNorm with running statistics).

    Returns (y, mean (C,), var (C,) biased, rstd (C,)): y like x (same memory layout),
    statistics float32 (float64 for float64 x); given statistics are returned converted.
    """
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    acc = _acc(x.dtype)
    y = torch.empty_like(x)
    given = var is not None
    if given:
        mean = mean.detach().reshape(-1).to(acc).contiguous()
        var = var.detach().reshape(-1).to(acc).contiguous()
    if n * s == 0 or c == 0:
        if given:
            return y, mean, var, torch.rsqrt(var + eps)
        return y, _nan((c,), acc, x.device), _nan((c,), acc, x.device), _nan((c,), acc, x.device)
    cl = _channels_last(x)
    t = _tuning(x)
    if not given:
        stats = _split_forward(x, y, weight, bias, eps, False, c, t)
        return y, stats[0], stats[1], stats[2]
    rstd = torch.empty(c, dtype=acc, device=x.device)
    gr = _split_grid(x, cl, t)
    _normalize_kernel[(n, gr.n_cblk, gr.split)](
        x, y, _vec(weight, x), _vec(bias, x), mean, mean, rstd, var, 0, c, s, gr.chunk, 1, eps,
        CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, GIVEN=True,
        BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    return y, mean, var, rstd


def batch_backward(dy, x, weight, mean, rstd, input_stats: bool, *, need_dx=True):
    """BatchNorm backward from the forward's (C,) mean and rstd.

    Returns (dx or None, dw (C,), db (C,)), dw and db float32 (float64 for float64 x).
    input_stats=True (training): dx = rstd * (g - <g> - xhat <g xhat>), g = weight[c] * dy,
    means over (N, spatial) per channel; input_stats=False (given statistics): dx = rstd * g.
    """
    n, c, s = x.shape[0], x.shape[1], _spatial(x)
    acc = _acc(x.dtype)
    if n * s == 0 or c == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return (torch.empty_like(x) if need_dx else None), zeros, zeros.clone()
    cl = _channels_last(x)
    dy = _like_layout(dy, cl)
    mean = mean.reshape(-1).to(acc).contiguous()
    rstd = rstd.reshape(-1).to(acc).contiguous()
    return _split_backward(dy, x, weight, mean, rstd, False, c, bool(input_stats), need_dx,
                           _tuning(x))
