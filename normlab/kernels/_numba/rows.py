"""The ``rows`` layout: x (M, D), one statistic per row. LayerNorm/RMSNorm rows (parameters
per element, w and b of length D) and GroupNorm/InstanceNorm on NCHW inputs: a row is one
(sample, group) block of D / seg channel segments of ``seg`` (= HW) elements each, row i's
segment c being channel (i % K) * (D / seg) + c with K = len(w) / (D / seg). The 16-bit kernels
take ``seg = 0`` for per-element parameters (``cpu._seg``).

Forward: ``y = ((x - shift) - delta) * (rstd w) + b``. Backward, with means ``<.>`` over the
row: ``dx = rstd (g w - <g w> - xhat <g w xhat>)`` (no ``<g w>`` when not centered),
``dw = sum g xhat``, ``db = sum g`` over rows: per-block partials (``blocks`` fixed by the
caller) joined in order in float64.

Kernels are split by path (per-element parameters, residual, per-channel segments) so that a
first call compiles only what it runs: the first LayerNorm forward took 7 s with one kernel
holding all three paths (helpers inlined into it), 3-4 s once split on the 2-core VM (about 1 s
of it Numba's one-time setup). Later processes load the kernels from Numba's on-disk cache.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .arith import grad_moments, join_blocks, moments, row_grads, store_stats
from .half import narrow, widen
from .jit import Kernel, guard_caches, jit

# pragma: no cover throughout: compiled code is not seen by coverage.


@jit
def _row_stats(row, eps, centered, stats, i):  # pragma: no cover
    """Statistics of one row into stats[:, i]; returns (shift, delta, rstd) in row's dtype."""
    d = row.shape[0]
    s = row[0] if centered else row.dtype.type(0)
    s1, s2 = moments(row, s)
    store_stats(stats, i, s, s1, s2, d, eps, centered)
    return stats[0, i], stats[1, i], stats[2, i]  # rounded to x's dtype


@jit
def _row(row, w, b, eps, centered, out, stats, i):  # pragma: no cover
    """One LayerNorm/RMSNorm row: statistics into stats[:, i], then out."""
    sh, de, r = _row_stats(row, eps, centered, stats, i)
    for j in range(row.shape[0]):
        out[j] = ((row[j] - sh) - de) * (r * w[j]) + b[j]


@jit
def _segments(row, w, b, seg, eps, out, stats, i):  # pragma: no cover
    """One row of D / seg channel segments (w, b: this row's channels): stats, then out."""
    sh, de, r = _row_stats(row, eps, True, stats, i)
    for c in range(row.shape[0] // seg):
        a, bb = r * w[c], b[c]
        # slices, then indices straight from range(): Numba's negative-index handling of a
        # computed index (c * seg + j) would stop LLVM from vectorizing
        xc, oc = row[c * seg:(c + 1) * seg], out[c * seg:(c + 1) * seg]
        for j in range(seg):
            oc[j] = ((xc[j] - sh) - de) * a + bb


@jit
def _row_backward(row, g, w, stats, i, centered, out, dwt, dbt, cs):  # pragma: no cover
    """dx of one LayerNorm/RMSNorm row into out; g xhat and g added into dwt, dbt."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1, c2 = row_grads(row, g, w, sh, de, r, dwt, dbt)
    cs[0] = c1 / d
    cs[1] = c2 / d if centered else 0.0
    k1, k2 = cs[0], cs[1]  # x's dtype
    for j in range(d):
        out[j] = r * (g[j] * w[j] - k2 - (((row[j] - sh) - de) * r) * k1)


@jit
def _segments_backward(row, g, w, seg, stats, i, out, dwt, dbt, cs):  # pragma: no cover
    """dx of one row of channel segments (w, dwt, dbt: this row's channels)."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1 = 0.0
    c2 = 0.0
    for c in range(d // seg):
        p1, p2 = grad_moments(row[c * seg:(c + 1) * seg], g[c * seg:(c + 1) * seg],
                               sh, de, r)
        dwt[c] += p1
        dbt[c] += p2
        c1 += w[c] * p1
        c2 += w[c] * p2
    cs[0] = c1 / d
    cs[1] = c2 / d
    k1, k2 = cs[0], cs[1]  # x's dtype
    for c in range(d // seg):
        wc = w[c]
        lo, hi = c * seg, (c + 1) * seg
        xc, gc, oc = row[lo:hi], g[lo:hi], out[lo:hi]
        for j in range(seg):
            oc[j] = r * (gc[j] * wc - k2 - (((xc[j] - sh) - de) * r) * k1)


@Kernel
def rows_forward(x, w, b, eps, centered, y, stats):  # pragma: no cover
    """LayerNorm/RMSNorm rows x (M, D), parameters per element (w, b of length D).
    stats (4, M) receives shift, delta, rstd, var (the mean square when not centered)."""
    m, d = x.shape
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        for i in range(t * per, min(m, (t + 1) * per)):
            _row(x[i], w, b, eps, centered, y[i], stats, i)


@Kernel
def rows_add_forward(x, res, w, b, eps, centered, y, h, stats):  # pragma: no cover
    """:func:`rows_forward` of h = x + res, h written in the same pass."""
    m, d = x.shape
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        for i in range(t * per, min(m, (t + 1) * per)):
            xr, rr, hr = x[i], res[i], h[i]
            for j in range(d):
                hr[j] = xr[j] + rr[j]
            _row(hr, w, b, eps, centered, y[i], stats, i)


@Kernel
def segments_forward(x, w, b, seg, eps, y, stats):  # pragma: no cover
    """GroupNorm/InstanceNorm on NCHW: rows x (M, D) of D / seg channels of seg elements each;
    row i, segment c has channel (i % K) * (D / seg) + c, K = len(w) / (D / seg)."""
    m, d = x.shape
    cpr = d // seg
    kk = w.shape[0] // cpr
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        for i in range(t * per, min(m, (t + 1) * per)):
            base = (i % kk) * cpr
            _segments(x[i], w[base:base + cpr], b[base:base + cpr], seg, eps, y[i], stats, i)



@Kernel
def rows_backward(x, w, dy, dh, stats, centered, blocks, dx, dw, db):  # pragma: no cover
    """dx = rstd (g w - <g w> - xhat <g w xhat>) per row (no <g w> when not centered), plus
    ``dh`` (M, D) when given (the residual stream's own gradient; else shape (0, 0));
    dw, db (D) receive sum g xhat and sum g: per-block partials in x's dtype (``blocks`` fixed
    by the caller), joined in order in float64."""
    m, d = x.shape
    dw_part = np.zeros((blocks, d), x.dtype)
    db_part = np.zeros((blocks, d), x.dtype)
    per = (m + blocks - 1) // blocks
    add = dh.shape[0] > 0
    for t in prange(blocks):
        cs = np.empty(2, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            out = dx[i]
            _row_backward(x[i], dy[i], w, stats, i, centered, out, dw_part[t], db_part[t], cs)
            if add:
                hr = dh[i]
                for j in range(d):
                    out[j] += hr[j]
    join_blocks(dw_part, db_part, dw, db)


@Kernel
def segments_backward(x, w, dy, stats, seg, blocks, dx, dw, db):  # pragma: no cover
    """The backward of :func:`segments_forward`; dw, db (len(w)) as :func:`rows_backward`."""
    m, d = x.shape
    cpr = d // seg
    kk = w.shape[0] // cpr
    dw_part = np.zeros((blocks, w.shape[0]), x.dtype)
    db_part = np.zeros((blocks, w.shape[0]), x.dtype)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        cs = np.empty(2, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            lo, hi = (i % kk) * cpr, (i % kk) * cpr + cpr
            _segments_backward(x[i], dy[i], w[lo:hi], seg, stats, i, dx[i], dw_part[t, lo:hi],
                               db_part[t, lo:hi], cs)
    join_blocks(dw_part, db_part, dw, db)


# 16-bit x, y, dy, dx (bit patterns, see .half): each row widened into a float32 scratch of D
# elements, run through the float32 row routines above, and the outputs rounded back.


@Kernel
def rows_forward_16(x, w, b, seg, eps, centered, y, stats):  # pragma: no cover
    """:func:`rows_forward` (seg = 0) or :func:`segments_forward` on 16-bit x, y."""
    m, d = x.shape
    cpr = d // seg if seg > 0 else d
    kk = w.shape[0] // cpr
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        xf, yf = np.empty(d, np.float32), np.empty(d, np.float32)
        for i in range(t * per, min(m, (t + 1) * per)):
            widen(x[i], xf)
            if seg > 0:
                base = (i % kk) * cpr
                _segments(xf, w[base:base + cpr], b[base:base + cpr], seg, eps, yf, stats, i)
            else:
                _row(xf, w, b, eps, centered, yf, stats, i)
            narrow(yf, y[i])


@Kernel
def rows_backward_16(x, w, dy, stats, seg, centered, blocks, dx, dw, db):  # pragma: no cover
    """:func:`rows_backward` (seg = 0) or :func:`segments_backward` on 16-bit x, dy, dx
    (float32 partials)."""
    m, d = x.shape
    cpr = d // seg if seg > 0 else d
    kk = w.shape[0] // cpr
    dw_part = np.zeros((blocks, w.shape[0]), np.float32)
    db_part = np.zeros((blocks, w.shape[0]), np.float32)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        cs = np.empty(2, np.float32)
        xf, gf, of = np.empty(d, np.float32), np.empty(d, np.float32), np.empty(d, np.float32)
        for i in range(t * per, min(m, (t + 1) * per)):
            widen(x[i], xf)
            widen(dy[i], gf)
            if seg > 0:
                lo, hi = (i % kk) * cpr, (i % kk) * cpr + cpr
                _segments_backward(xf, gf, w[lo:hi], seg, stats, i, of, dw_part[t, lo:hi],
                                   db_part[t, lo:hi], cs)
            else:
                _row_backward(xf, gf, w, stats, i, centered, of, dw_part[t], db_part[t], cs)
            narrow(of, dx[i])
    join_blocks(dw_part, db_part, dw, db)


guard_caches(globals())
