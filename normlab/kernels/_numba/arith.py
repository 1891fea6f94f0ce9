"""Arithmetic shared by the layouts: strict helpers, the slice sums, statistics from shifted
sums, and the in-order joins of partial sums.

With ``s`` a sample of a set and ``v = x - s``: ``sum v`` and ``sum v^2`` over slices of at most
:data:`S` elements in the slice's dtype (float32 for the 16-bit formats), joined in float64;
then ``mean = s + sum(v)/m``, ``var = sum(v^2)/m - (sum(v)/m)^2``, kept as ``shift = s`` and
``delta = sum(v)/m``, and ``xhat = ((x - shift) - delta) * rstd``.
"""
from __future__ import annotations

import math

import numpy as np

from .jit import guard_caches, jit

# pragma: no cover throughout: compiled code is not seen by coverage.

S = 1024  # elements of one slice sum (and of a float32 scratch slice of the 16-bit kernels)

# Strict helpers: every operation outside the accumulating adds. They carry no fastmath flag,
# and inlined into a ``reassoc`` function their instructions keep none, so nothing can be
# reassociated across them: no ``(acc + x) - s`` from ``acc + (x - s)``, no contraction.


@jit
def _dev(x, s):  # pragma: no cover
    return x - s


@jit
def _sq(v):  # pragma: no cover
    return v * v


@jit
def _mul(a, b):  # pragma: no cover
    return a * b


@jit
def _xhat(x, sh, de, r):  # pragma: no cover
    return ((x - sh) - de) * r


@jit
def _g_xhat(g, x, sh, de, r):  # pragma: no cover
    return g * (((x - sh) - de) * r)


# Slice sums: the one place with a fastmath flag, ``reassoc`` on the accumulating adds alone, so
# that LLVM keeps vector accumulators in registers (the vectorized order is fixed at compile
# time: deterministic). Each runs over one slice of at most S elements in the slice's dtype.
# (Strict sums in 32 lanes of a scratch array, the earlier design, kept the lanes in memory:
# 0.75 against 0.4 ns an element in cache.)


@jit(fastmath={"reassoc"})
def chunk_moments(xf, s):  # pragma: no cover
    """(sum v, sum v^2) over the slice xf, v = xf - s, in xf's dtype; returned as float64."""
    a = xf.dtype.type(0)
    q = xf.dtype.type(0)
    for j in range(xf.shape[0]):
        v = _dev(xf[j], s)
        a += v
        q += _sq(v)
    return np.float64(a), np.float64(q)


@jit(fastmath={"reassoc"})
def chunk_grad_moments(xf, gf, sh, de, r):  # pragma: no cover
    """(sum g xhat, sum g) over the slice xf (gf: as long or longer), in xf's dtype."""
    a = xf.dtype.type(0)
    q = xf.dtype.type(0)
    for j in range(xf.shape[0]):
        g = gf[j]
        a += _g_xhat(g, xf[j], sh, de, r)
        q += g
    return np.float64(a), np.float64(q)


@jit(fastmath={"reassoc"})
def _chunk_row_grads(xq, gq, wq, dwq, dbq, sh, de, r):  # pragma: no cover
    """:func:`row_grads` over one slice: dwq += g xhat, dbq += g (elementwise, strict
    products), and (sum g w xhat, sum g w) in xq's dtype."""
    a = xq.dtype.type(0)
    q = xq.dtype.type(0)
    for k in range(xq.shape[0]):
        xh = _xhat(xq[k], sh, de, r)
        gj = gq[k]
        dwq[k] += _mul(gj, xh)
        dbq[k] += gj
        gw = _mul(gj, wq[k])
        a += _mul(gw, xh)
        q += gw
    return np.float64(a), np.float64(q)


@jit
def moments(seg, s):  # pragma: no cover
    """(sum v, sum v^2) of v = seg - s in float64 (s of seg's dtype): slice sums joined."""
    n = seg.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, S):
        a, q = chunk_moments(seg[j0:min(n, j0 + S)], s)
        t1 += a
        t2 += q
    return t1, t2


@jit
def grad_moments(seg, g, sh, de, r):  # pragma: no cover
    """(sum g xhat, sum g) over one segment in float64, xhat = ((seg - sh) - de) * r."""
    n = seg.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, S):
        j1 = min(n, j0 + S)
        a, q = chunk_grad_moments(seg[j0:j1], g[j0:j1], sh, de, r)
        t1 += a
        t2 += q
    return t1, t2


@jit
def row_grads(row, g, w, sh, de, r, dwt, dbt):  # pragma: no cover
    """A row with per-element parameters: dwt += g xhat, dbt += g (the block's partial
    parameter gradients); returns (sum g w xhat, sum g w) in float64."""
    n = row.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, S):
        j1 = min(n, j0 + S)
        a, q = _chunk_row_grads(row[j0:j1], g[j0:j1], w[j0:j1], dwt[j0:j1], dbt[j0:j1],
                                sh, de, r)
        t1 += a
        t2 += q
    return t1, t2


@jit
def store_stats(stats, i, s, s1, s2, count, eps, centered):  # pragma: no cover
    """stats[:, i] = (shift, delta, rstd, var) of ``count`` values from their shifted sums
    s1 = sum(x - s), s2 = sum((x - s)^2); not centered: delta 0 and var the mean square."""
    mu = s1 / count if centered else 0.0
    v = max(s2 / count - mu * mu, 0.0)
    stats[0, i] = s
    stats[1, i] = mu
    stats[2, i] = 1.0 / math.sqrt(v + eps)
    stats[3, i] = v


@jit
def join_blocks(dw_part, db_part, dw, db):  # pragma: no cover
    """dw, db = the per-block partials (T, n) summed over the blocks in order, in float64."""
    for j in range(dw.shape[0]):
        u1 = 0.0
        u2 = 0.0
        for t in range(dw_part.shape[0]):
            u1 += dw_part[t, j]
            u2 += db_part[t, j]
        dw[j] = u1
        db[j] = u2


@jit
def running_update(stats, rm, rv, momentum, unbias):  # pragma: no cover
    """BatchNorm's running-statistics update in place, the formula of torch's CPU BatchNorm in
    the buffers' dtype (stats' dtype): ``r = m * new + (1 - m) * r`` per channel, with the
    batch mean ``stats[0] + stats[1]`` and the unbiased variance ``stats[3] * unbias``
    (``unbias`` = n / (n - 1), or 1 for n = 1). An empty rm or rv is not updated."""
    m = stats.dtype.type(momentum)
    k = stats.dtype.type(1) - m
    u = stats.dtype.type(unbias)
    for c in range(rm.shape[0]):
        rm[c] = m * (stats[0, c] + stats[1, c]) + k * rm[c]
    for c in range(rv.shape[0]):
        rv[c] = m * (stats[3, c] * u) + k * rv[c]


guard_caches(globals())
