r"""The split scheme of :mod:`.triton_channels`: three kernels over the grid ``(N, channel
blocks, SPLIT)``, each program a chunk of ``CHUNK`` positions of ``BLOCK_C`` channels of one
sample: (1) per-chunk partial sums, (2) a fixed-order combine per statistic, (3) normalize (or
dx). BatchNorm (statistics per channel) always runs here, GroupNorm and InstanceNorm
(statistics per (sample, group)) when channels-last (the groups are strided across the channels
of each position) or NCHW with groups too large for one program each while ``N * groups``
programs would not fill the device. :mod:`.triton_channels` describes the math, numerics,
layouts and grids.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton_channels_common import (
    Tuning, acc_dtype, channels_last, np2, program_count, spatial, sum_rows, vec, warps,
)


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
def _tile(s0, offs_c, mask_c, C, S, CL: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (as :func:`_tile_offs`) and mask of the tile of positions s0 .. s0 + BLOCK_S - 1
    and channels offs_c."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask = (offs_s < S)[:, None] & mask_c[None, :]
    return _tile_offs(offs_s, offs_c, C, S, CL), mask


@triton.jit
def _program(C, S, CHUNK, BLOCK_C: tl.constexpr):
    """What program (n, cb, k) of the split grid covers: sample n, chunk k (positions s_start
    .. s_end - 1) and channels cb * BLOCK_C + [0, BLOCK_C) (offsets, mask)."""
    n = tl.program_id(0)
    cb = tl.program_id(1)
    k = tl.program_id(2)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_start = k * CHUNK
    return n, k, s_start, tl.minimum(s_start + CHUNK, S), offs_c, mask_c


@triton.jit
def _stats_kernel(X, PART, PLANE, C, S, CHUNK, SPLIT,
                  CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split forward (1): shifted sums of a chunk of positions of BLOCK_C channels of sample n."""
    n, k, s_start, s_end, offs_c, mask_c = _program(C, S, CHUNK, BLOCK_C)
    acc_ty = PART.dtype.element_ty
    X += n.to(tl.int64) * C * S
    first = _tile_offs(s_start + tl.arange(0, 1), offs_c, C, S, CL)
    shift = tl.sum(tl.load(X + first, mask=mask_c[None, :], other=0.0).to(acc_ty), axis=0)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for s0 in range(s_start, s_end, BLOCK_S):
        ptrs, mask = _tile(s0, offs_c, mask_c, C, S, CL, BLOCK_S)
        x = tl.load(X + ptrs, mask=mask, other=0.0)
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
def _merge_pass(PART, PLANE, col, mask_j, ref, delta, R, Q, C, SPLIT, S, CHUNK,
                BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
                acc_ty: tl.constexpr, SQUARES: tl.constexpr):
    """One pass of the Chan merge over the partials of BLOCK_J statistics (rows r < R of stride
    C, chunk r % SPLIT; Q columns from col): per statistic, the sum of x - ref, or (SQUARES) of
    (x - ref - delta)^2 (delta is not read without SQUARES)."""
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
            if SQUARES:
                s2 = tl.load(ptr + 2 * PLANE, mask=mask, other=0.0)
                dev = (sh - ref[None, None, :]) + s1 / cnt - delta[None, None, :]
                acc += tl.where(mask, (s2 - s1 * s1 / cnt) + cnt * dev * dev, 0.0)
            else:
                acc += tl.where(mask, s1 + cnt * (sh - ref[None, None, :]), 0.0)
    return tl.sum(tl.sum(acc, axis=0), axis=0)


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
    delta = _merge_pass(PART, PLANE, col, mask_j, ref, ref, R, Q, C, SPLIT, S, CHUNK,
                        BLOCK_R, BLOCK_Q, BLOCK_J, acc_ty, SQUARES=False) / count
    var = _merge_pass(PART, PLANE, col, mask_j, ref, delta, R, Q, C, SPLIT, S, CHUNK,
                      BLOCK_R, BLOCK_Q, BLOCK_J, acc_ty, SQUARES=True) / count
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
    n, k, s_start, s_end, offs_c, mask_c = _program(C, S, CHUNK, BLOCK_C)
    acc_ty = RSTD.dtype.element_ty
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
    for s0 in range(s_start, s_end, BLOCK_S):
        ptrs, mask = _tile(s0, offs_c, mask_c, C, S, CL, BLOCK_S)
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty)
        y = (x - ref[None, :]) * scale[None, :] + t[None, :]
        tl.store(Y + ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(X, DY, MEAN, PART, PLANE, STAT_N, C, S, CHUNK, SPLIT, CPG,
                      CL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split backward (1): sum dy, sum dy (x - mu), sum (x - mu) of a chunk of positions of
    BLOCK_C channels of sample n."""
    n, k, s_start, s_end, offs_c, mask_c = _program(C, S, CHUNK, BLOCK_C)
    acc_ty = PART.dtype.element_ty
    mean = tl.load(MEAN + n * STAT_N + offs_c // CPG, mask=mask_c, other=0.0).to(acc_ty)
    a_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_gx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    a_x = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    sample = n.to(tl.int64) * C * S
    X += sample
    DY += sample
    for s0 in range(s_start, s_end, BLOCK_S):
        ptrs, mask = _tile(s0, offs_c, mask_c, C, S, CL, BLOCK_S)
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
    n, k, s_start, s_end, offs_c, mask_c = _program(C, S, CHUNK, BLOCK_C)
    acc_ty = COEF.dtype.element_ty
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
    for s0 in range(s_start, s_end, BLOCK_S):
        ptrs, mask = _tile(s0, offs_c, mask_c, C, S, CL, BLOCK_S)
        dx = tl.load(DY + ptrs, mask=mask, other=0.0).to(acc_ty) * alpha[None, :]
        if INPUT_STATS:
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(acc_ty)
            dx += (x - mean[None, :]) * beta[None, :] + t[None, :]
        tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


class Grid(NamedTuple):
    """The split grid: (N, n_cblk, split) programs, each CHUNK positions of BLOCK_C channels."""

    block_s: int
    block_c: int
    n_cblk: int
    split: int
    chunk: int
    num_warps: int


def split_grid(x: torch.Tensor, cl: bool, t: Tuning) -> Grid:
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    if cl:
        block_c = min(np2(c), t.max_block_c)
        block_s = max(1, min(np2(s), t.tile // block_c))
    else:
        block_s = min(np2(s), t.max_block_s)
        block_c = max(1, min(np2(c), t.tile // block_s))
    n_cblk = triton.cdiv(c, block_c)
    s_blocks = triton.cdiv(s, block_s)
    want = max(1, triton.cdiv(program_count(t, x), n * n_cblk))
    chunk = triton.cdiv(s_blocks, min(s_blocks, want)) * block_s
    return Grid(block_s, block_c, n_cblk, triton.cdiv(s, chunk), chunk,
                warps(block_s * block_c, t))


def _combine_blocks(rows: int, cols: int, nstat: int, t: Tuning) -> dict:
    """BLOCK_R, BLOCK_Q, BLOCK_J (the combine kernels' [rows, columns, statistics] tiles) and
    num_warps."""
    block_q = min(np2(cols), 16, t.combine_tile)
    block_j = max(1, min(np2(nstat), t.combine_stats, t.combine_tile // block_q))
    block_r = max(1, min(np2(rows), t.combine_tile // (block_q * block_j)))
    return dict(BLOCK_R=block_r, BLOCK_Q=block_q, BLOCK_J=block_j,
                num_warps=warps(block_r * block_q * block_j, t))


def forward(x, y, weight, bias, eps, per_sample: bool, groups: int, t: Tuning):
    """Split forward; returns STATS (5, P * G): mean, var, rstd, ref, delta."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    cl = channels_last(x)
    acc = acc_dtype(x.dtype)
    gr = split_grid(x, cl, t)
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
    _normalize_kernel[grid](x, y, vec(weight, x), vec(bias, x), stats[3], stats[4], stats[2],
                            stats[1], groups if per_sample else 0, c, s, gr.chunk, cpg, eps,
                            CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, GIVEN=False,
                            BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    return stats


def normalize_given(x, y, weight, bias, mean, var, eps, t: Tuning) -> torch.Tensor:
    """BatchNorm with the given (C,) mean and var: kernel (3) alone into y; returns rstd (C,)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    cl = channels_last(x)
    rstd = torch.empty(c, dtype=acc_dtype(x.dtype), device=x.device)
    gr = split_grid(x, cl, t)
    _normalize_kernel[(n, gr.n_cblk, gr.split)](
        x, y, vec(weight, x), vec(bias, x), mean, mean, rstd, var, 0, c, s, gr.chunk, 1, eps,
        CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, GIVEN=True,
        BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    return rstd


def backward(dy, x, weight, mean, rstd, per_sample, groups, input_stats, need_dx, t):
    """Split backward: (dx or None, dw, db)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    cl = channels_last(x)
    acc = acc_dtype(x.dtype)
    gr = split_grid(x, cl, t)
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
        part, vec(weight, x), rstd, coef, dwb, plane, nstat, p * c, groups, rows, cpg, c,
        float(cpg * s if per_sample else n * s), HAS_W=weight is not None,
        INPUT_STATS=input_stats, **blocks)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _dx_kernel[grid](x, dy, dx, vec(weight, x), mean, rstd, coef, nstat, stat_n, c, s,
                         gr.chunk, cpg, CL=cl, HAS_W=weight is not None, INPUT_STATS=input_stats,
                         BLOCK_S=gr.block_s, BLOCK_C=gr.block_c, num_warps=gr.num_warps)
    dw_db = sum_rows(dwb, t)
    return dx, dw_db[0], dw_db[1]
