r"""The fused scheme of :mod:`.triton_channels`: NCHW GroupNorm and InstanceNorm with one
program per (sample, group), used when the group is small or there are enough groups to fill
the device. The group is the contiguous block of ``C / groups`` rows of S; the forward loops
over it twice (shifted sums, then normalize), the backward twice (group sums, then dx and
per-(sample, channel) dw, db partials, summed over the batch in fixed order).
:mod:`.triton_channels` describes the math, numerics, layouts and grids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_channels_common import (
    Tuning, acc_dtype, np2, program_count, spatial, sum_rows, vec, warps,
)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _group(C, S, G, CPG):
    """Program j = n * G + g: sample n, group g, and the offset of the group (CPG rows of S)
    from the start of x."""
    j = tl.program_id(0)
    n = j // G
    g = j - n * G
    return j, n, g, n.to(tl.int64) * C * S + g * CPG * S


@triton.jit
def _scale(W, g, CPG, offs_c, mask_c, rstd, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
           acc_ty: tl.constexpr):
    """rstd * w for the group's channels offs_c ([BLOCK_C]; rstd alone without weight)."""
    scale = tl.zeros([BLOCK_C], dtype=acc_ty) + rstd
    if HAS_W:
        scale = scale * tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(acc_ty)
    return scale


@triton.jit
def _group_forward_fused_kernel(X, Y, W, B, STATS, NSTAT, C, S, G, CPG, count, eps,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fused NCHW forward, one program per (sample, group): shifted sums over the group's CPG
    rows of S, then y = ((x - shift) - delta) * rstd * w + b. Writes mean and rstd."""
    j, n, g, base = _group(C, S, G, CPG)
    acc_ty = STATS.dtype.element_ty
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
        scale = _scale(W, g, CPG, offs_c, mask_c, rstd, HAS_W, BLOCK_C, acc_ty)
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
    j, n, g, base = _group(C, S, G, CPG)
    acc_ty = DWB.dtype.element_ty
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
        alpha = _scale(W, g, CPG, offs_c, mask_c, rstd, HAS_W, BLOCK_C, acc_ty)
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


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _fused_blocks(cpg: int, s: int, t: Tuning) -> tuple[int, int]:
    block_s = min(np2(s), t.max_block_s)
    return block_s, max(1, min(np2(cpg), t.tile // block_s))


def applies(x: torch.Tensor, cl: bool, groups: int, t: Tuning) -> bool:
    """Whether this scheme runs GroupNorm of x (NCHW, ``cl`` False): small groups, or enough
    of them to fill the device."""
    cpg = x.shape[1] // groups
    return not cl and (cpg * spatial(x) <= t.fused_max
                       or x.shape[0] * groups >= program_count(t, x))


def forward(x, y, weight, bias, groups: int, eps: float, t: Tuning):
    """Fused forward into y; returns mean, rstd (N, groups)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    acc = acc_dtype(x.dtype)
    cpg = c // groups
    stats = torch.empty((2, n * groups), dtype=acc, device=x.device)
    block_s, block_c = _fused_blocks(cpg, s, t)
    _group_forward_fused_kernel[(n * groups,)](
        x, y, vec(weight, x), vec(bias, x), stats, n * groups, c, s, groups, cpg,
        float(cpg * s), eps, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps(block_s * block_c, t))
    return stats[0].view(n, groups), stats[1].view(n, groups)


def backward(dy, x, weight, mean, rstd, groups: int, need_dx: bool, t: Tuning):
    """Fused backward from the flat mean and rstd (dy in x's layout): (dx or None, dw, db)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    acc = acc_dtype(x.dtype)
    cpg = c // groups
    dx = torch.empty_like(x) if need_dx else None
    dwb = torch.empty((2, n, c), dtype=acc, device=x.device)
    block_s, block_c = _fused_blocks(cpg, s, t)
    _group_backward_fused_kernel[(n * groups,)](
        x, dy, dx if need_dx else x, vec(weight, x), mean, rstd, dwb, n * c, c, s, groups,
        cpg, float(cpg * s), HAS_W=weight is not None, NEED_DX=need_dx, BLOCK_S=block_s,
        BLOCK_C=block_c, num_warps=warps(block_s * block_c, t))
    dw_db = sum_rows(dwb, t)
    return dx, dw_db[0], dw_db[1]
