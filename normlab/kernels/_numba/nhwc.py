"""The ``nhwc`` layout: x (P, R, C), channels innermost; one statistic per (p, group of
``cpg`` adjacent channels) over R. BatchNorm (P = 1, R = N*HW), InstanceNorm (P = N, cpg = 1)
and GroupNorm on channels-last inputs, BatchNorm on (N, C), and every norm with given (running)
statistics.

Work items are (p, chunk of R), ``chunks`` per p fixed by the caller; per-channel sums run in
x's dtype over _ROWS rows at a time, then join float64 partials (P, T, C). The work on a block
of rows is in the ``_rows_*`` routines, shared by the float and 16-bit kernels.

Forward: :func:`nhwc_moments` (shifted sums), then :func:`nhwc_affine` (statistics in its serial
prologue, then ``y = ((x - shift) - delta) * (rstd w) + b``). Backward:
:func:`nhwc_grad_moments` (``sum dy xhat``, ``sum dy``), then :func:`nhwc_dx` (dw, db, k1, k2 in
its prologue, then ``dx = rstd (dy w - k2 - xhat k1)``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .arith import S
from .half import h2f, narrow, widen
from .jit import Kernel, guard_caches, jit

# pragma: no cover throughout: compiled code is not seen by coverage.

_ROWS = 64  # rows of one per-channel partial sum in x's dtype


@jit
def _rows_moments(xb, shp, a1, a2):  # pragma: no cover
    """a1, a2 (C) += sum(v), sum(v^2) over the rows of xb (k, C), v = x - shp."""
    for r in range(xb.shape[0]):
        xr = xb[r]
        for c in range(xr.shape[0]):
            v = xr[c] - shp[c]
            a1[c] += v
            a2[c] += v * v


@jit
def _rows_affine(xb, shp, dep, ap, bp, yb):  # pragma: no cover
    """yb = ((xb - shp) - dep) * ap + bp over a block of rows (k, C)."""
    for r in range(xb.shape[0]):
        xr, yr = xb[r], yb[r]
        for c in range(xr.shape[0]):
            yr[c] = ((xr[c] - shp[c]) - dep[c]) * ap[c] + bp[c]


@jit
def _rows_grad_moments(xb, gb, shp, dep, rp, a1, a2):  # pragma: no cover
    """a1, a2 (C) += sum(g * xhat), sum(g) over a block of rows (k, C)."""
    for r in range(xb.shape[0]):
        xr, gr = xb[r], gb[r]
        for c in range(xr.shape[0]):
            g = gr[c]
            a1[c] += g * (((xr[c] - shp[c]) - dep[c]) * rp[c])
            a2[c] += g


@jit
def _rows_dx(xb, gb, shp, dep, rp, wp, c1, c2, ob):  # pragma: no cover
    """ob = r (g w - c2 - xhat c1) over a block of rows (k, C)."""
    for r in range(xb.shape[0]):
        xr, gr, out = xb[r], gb[r], ob[r]
        for c in range(xr.shape[0]):
            xh = ((xr[c] - shp[c]) - dep[c]) * rp[c]
            out[c] = rp[c] * (gr[c] * wp[c] - c2[c] - xh * c1[c])


# The small per-(p, group) and per-channel work between the nhwc passes (joining the chunk
# partials, statistics, per-channel scale and shift, k1/k2, parameter gradients) runs in the
# serial prologue of the kernels, in fixed sequential order: a pass is one Numba call, not a
# dozen NumPy calls. (Not in separate @njit drivers calling the parallel kernels: a caller links
# and re-optimizes its callees' code, which made the first call's compilation 3-4x slower.)


@jit
def _join_chunks(s1, s2, u1, u2):  # pragma: no cover
    """u1, u2 (C) = s1, s2 (T, C) summed over the chunks, in chunk order, one row at a time."""
    u1[:] = 0.0
    u2[:] = 0.0
    for t in range(s1.shape[0]):
        a, q = s1[t], s2[t]
        for c in range(u1.shape[0]):
            u1[c] += a[c]
            u2[c] += q[c]


@jit
def _nhwc_finish(s1, s2, sh, w, b, mean, var, cpg, count, eps, st):  # pragma: no cover
    """Statistics into st (4, P*G) from the chunk partials s1, s2 (P, T, C) float64 and the
    shifts sh (P, C) (or from the given per-channel ``mean``/``var`` when they are not empty:
    P = 1, cpg = 1), and the
    per-channel (P, C) arrays of the normalizing pass: (delta, rstd w, b); given statistics
    also fill sh (with the mean). ``count``: elements per statistics set."""
    p_, c_ = sh.shape
    t_ = s1.shape[1]
    g_ = c_ // cpg
    de, a, bb = np.empty_like(sh), np.empty_like(sh), np.empty_like(sh)
    given = var.shape[0] > 0
    u1 = np.empty(c_)
    u2 = np.empty(c_)
    for p in range(p_):
        if not given:  # per-channel totals over the chunks, in chunk order (rows of s1: C apart)
            _join_chunks(s1[p], s2[p], u1, u2)
        for g in range(g_):
            i = p * g_ + g
            if given:
                st[0, i] = mean[g]
                st[1, i] = 0
                st[3, i] = var[g]
                st[2, i] = 1.0 / math.sqrt(np.float64(var[g]) + eps)
                sh[p, g] = st[0, i]
            else:
                t1 = 0.0
                t2 = 0.0
                for k in range(cpg):
                    t1 += u1[g * cpg + k]
                    t2 += u2[g * cpg + k]
                m = t1 / count
                v = t2 / count - m * m
                if v < 0.0:  # (nan stays nan: inf inputs give nan statistics, as elsewhere)
                    v = 0.0
                st[0, i] = sh[p, g * cpg]
                st[1, i] = m
                st[2, i] = 1.0 / math.sqrt(v + eps)
                st[3, i] = v
            for k in range(cpg):
                c = g * cpg + k
                de[p, c] = st[1, i]
                a[p, c] = st[2, i] * w[c]
                bb[p, c] = b[c]
    return de, a, bb


@jit
def _nhwc_unpack(st, p_, c_, cpg):  # pragma: no cover
    """stats (4, P*G) -> shift, delta, rstd as (P, C) arrays, repeated over each group."""
    sh = np.empty((p_, c_), st.dtype)
    de, r = np.empty_like(sh), np.empty_like(sh)
    g_ = c_ // cpg
    for p in range(p_):
        for c in range(c_):
            i = p * g_ + c // cpg
            sh[p, c], de[p, c], r[p, c] = st[0, i], st[1, i], st[2, i]
    return sh, de, r


@jit
def _nhwc_grad_finish(s1, s2, w, cpg, count, input_stats, dw, db):  # pragma: no cover
    """From the chunk partials s1, s2 (P, T, C) of sum(dy xhat), sum(dy): dw, db (C) (summed
    over P), and the (P, C) arrays w, k1 = <dy w xhat>, k2 = <dy w> over each (p, group) of
    the dx pass (k1 = k2 = 0 for given statistics)."""
    p_, t_, c_ = s1.shape
    g_ = c_ // cpg
    gx = np.zeros((p_, c_))
    gs = np.zeros((p_, c_))
    for p in range(p_):
        _join_chunks(s1[p], s2[p], gx[p], gs[p])
    for c in range(c_):
        u1 = 0.0
        u2 = 0.0
        for p in range(p_):
            u1 += gx[p, c]
            u2 += gs[p, c]
        dw[c] = u1
        db[c] = u2
    wp = np.empty((p_, c_), w.dtype)
    k1, k2 = np.zeros_like(wp), np.zeros_like(wp)
    for p in range(p_):
        for g in range(g_):
            u1 = 0.0
            u2 = 0.0
            for k in range(cpg):
                c = g * cpg + k
                wp[p, c] = w[c]
                u1 += gx[p, c] * w[c]
                u2 += gs[p, c] * w[c]
            if input_stats:
                for k in range(cpg):
                    k1[p, g * cpg + k] = u1 / count
                    k2[p, g * cpg + k] = u2 / count
    return wp, k1, k2


@Kernel
def nhwc_moments(x, cpg, sh, s1, s2):  # pragma: no cover
    """s1, s2 (P, T, C) float64 (zeroed) receive sum(v), sum(v^2) of v = x - sh[p, c] over
    chunk t of R (T = s1.shape[1]); sh (P, C), x's dtype, receives the shifts first: each
    group's first element repeated over its cpg channels (so that per-channel partial sums add
    up exactly to the group's)."""
    p_, r_, c_ = x.shape
    for p in range(p_):
        for c in range(c_):
            sh[p, c] = x[p, 0, (c // cpg) * cpg]
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        acc = np.empty((2, c_), x.dtype)
        stop = min(r_, (t + 1) * per)
        for r0 in range(t * per, stop, _ROWS):
            acc[:] = 0
            _rows_moments(x[p, r0:min(stop, r0 + _ROWS)], sh[p], acc[0], acc[1])
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@Kernel
def nhwc_affine(x, sh, s1, s2, w, b, mean, var, cpg, eps, chunks, st, y):  # pragma: no cover
    """Statistics into st from :func:`nhwc_moments`' sh, s1, s2 (or the given ``mean``/``var``,
    see :func:`_nhwc_finish`), then y = ((x - sh[p, c]) - de[p, c]) * a[p, c] + bb[p, c] over
    x (P, R, C), with a = rstd w."""
    p_, r_, c_ = x.shape
    de, a, bb = _nhwc_finish(s1, s2, sh, w, b, mean, var, cpg, r_ * cpg, eps, st)
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        lo, hi = t * per, min(r_, (t + 1) * per)
        _rows_affine(x[p, lo:hi], sh[p], de[p], a[p], bb[p], y[p, lo:hi])


@Kernel
def nhwc_grad_moments(x, dy, st, cpg, s1, s2):  # pragma: no cover
    """s1, s2 (P, T, C) float64 (zeroed) receive sum(dy * xhat), sum(dy) over chunk t of R,
    with the statistics st (4, P*G) of groups of cpg channels."""
    p_, r_, c_ = x.shape
    sh, de, r = _nhwc_unpack(st, p_, c_, cpg)
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        acc = np.empty((2, c_), x.dtype)
        stop = min(r_, (t + 1) * per)
        for k0 in range(t * per, stop, _ROWS):
            acc[:] = 0
            k1 = min(stop, k0 + _ROWS)
            _rows_grad_moments(x[p, k0:k1], dy[p, k0:k1], sh[p], de[p], r[p], acc[0], acc[1])
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@Kernel
def nhwc_dx(x, dy, st, w, s1, s2, cpg, input_stats, chunks, dx, dw, db):  # pragma: no cover
    """dw, db (C) from :func:`nhwc_grad_moments`' s1, s2, then (dx of size 0: skipped)
    dx = r (dy w - k2 - xhat k1) over x (P, R, C); k1 = <dy w xhat> and k2 = <dy w> over each
    statistics set (zero for given statistics: ``input_stats`` False)."""
    p_, r_, c_ = x.shape
    sh, de, r = _nhwc_unpack(st, p_, c_, cpg)
    wp, k1, k2 = _nhwc_grad_finish(s1, s2, w, cpg, r_ * cpg, input_stats, dw, db)
    per = (r_ + chunks - 1) // chunks
    items = p_ * chunks if dx.shape[0] > 0 else 0
    for item in prange(items):
        p, t = item // chunks, item % chunks
        lo, hi = t * per, min(r_, (t + 1) * per)
        _rows_dx(x[p, lo:hi], dy[p, lo:hi], sh[p], de[p], r[p], wp[p], k1[p], k2[p],
                 dx[p, lo:hi])


# 16-bit x, y, dy, dx: blocks of `_sub(C)` rows (at most _ROWS, about S elements) are widened at
# once; the per-channel sums run over the same _ROWS-row groups as the float kernels.


@jit
def _sub(c):  # pragma: no cover
    return max(1, min(_ROWS, S // max(c, 1)))


@Kernel
def nhwc_moments_16(x, cpg, sh, s1, s2):  # pragma: no cover
    """:func:`nhwc_moments` on 16-bit x (P, R, C); sh float32."""
    p_, r_, c_ = x.shape
    for p in range(p_):
        for c in range(c_):
            sh[p, c] = h2f(x[p, 0, (c // cpg) * cpg])
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    sub = _sub(c_)
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        acc = np.empty((2, c_), np.float32)
        xf = np.empty(sub * c_, np.float32)
        x2 = xf.reshape((sub, c_))
        xp = x[p].reshape(r_ * c_)  # flat: a block of rows is a 1-D slice
        stop = min(r_, (t + 1) * per)
        for r0 in range(t * per, stop, _ROWS):
            acc[:] = 0
            r1 = min(stop, r0 + _ROWS)
            for k0 in range(r0, r1, sub):
                k = min(sub, r1 - k0)
                widen(xp[k0 * c_:(k0 + k) * c_], xf)
                _rows_moments(x2[:k], sh[p], acc[0], acc[1])
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@Kernel
def nhwc_affine_16(x, sh, s1, s2, w, b, mean, var, cpg, eps, chunks, st,
                   y):  # pragma: no cover
    """:func:`nhwc_affine` on 16-bit x, y (P, R, C); sh, w, b, mean, var, st float32."""
    p_, r_, c_ = x.shape
    de, a, bb = _nhwc_finish(s1, s2, sh, w, b, mean, var, cpg, r_ * cpg, eps, st)
    per = (r_ + chunks - 1) // chunks
    sub = _sub(c_)
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        xf, yf = np.empty(sub * c_, np.float32), np.empty(sub * c_, np.float32)
        x2, y2 = xf.reshape((sub, c_)), yf.reshape((sub, c_))
        xp, yp = x[p].reshape(r_ * c_), y[p].reshape(r_ * c_)
        stop = min(r_, (t + 1) * per)
        for k0 in range(t * per, stop, sub):
            k = min(sub, stop - k0)
            widen(xp[k0 * c_:(k0 + k) * c_], xf)
            _rows_affine(x2[:k], sh[p], de[p], a[p], bb[p], y2)
            narrow(yf, yp[k0 * c_:(k0 + k) * c_])


@Kernel
def nhwc_grad_moments_16(x, dy, st, cpg, s1, s2):  # pragma: no cover
    """:func:`nhwc_grad_moments` on 16-bit x, dy (P, R, C)."""
    p_, r_, c_ = x.shape
    sh, de, r = _nhwc_unpack(st, p_, c_, cpg)
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    sub = _sub(c_)
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        acc = np.empty((2, c_), np.float32)
        xf, gf = np.empty(sub * c_, np.float32), np.empty(sub * c_, np.float32)
        x2, g2 = xf.reshape((sub, c_)), gf.reshape((sub, c_))
        xp, gp = x[p].reshape(r_ * c_), dy[p].reshape(r_ * c_)
        stop = min(r_, (t + 1) * per)
        for r0 in range(t * per, stop, _ROWS):
            acc[:] = 0
            r1 = min(stop, r0 + _ROWS)
            for k0 in range(r0, r1, sub):
                k = min(sub, r1 - k0)
                widen(xp[k0 * c_:(k0 + k) * c_], xf)
                widen(gp[k0 * c_:(k0 + k) * c_], gf)
                _rows_grad_moments(x2[:k], g2, sh[p], de[p], r[p], acc[0], acc[1])
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@Kernel
def nhwc_dx_16(x, dy, st, w, s1, s2, cpg, input_stats, chunks, dx, dw,
               db):  # pragma: no cover
    """:func:`nhwc_dx` on 16-bit x, dy, dx (P, R, C); st, w, dw, db float32."""
    p_, r_, c_ = x.shape
    sh, de, r = _nhwc_unpack(st, p_, c_, cpg)
    wp, k1, k2 = _nhwc_grad_finish(s1, s2, w, cpg, r_ * cpg, input_stats, dw, db)
    per = (r_ + chunks - 1) // chunks
    sub = _sub(c_)
    items = p_ * chunks if dx.shape[0] > 0 else 0
    for item in prange(items):
        p, t = item // chunks, item % chunks
        xf, gf, of = (np.empty(sub * c_, np.float32), np.empty(sub * c_, np.float32),
                      np.empty(sub * c_, np.float32))
        x2, g2, o2 = xf.reshape((sub, c_)), gf.reshape((sub, c_)), of.reshape((sub, c_))
        xp, gp, op = x[p].reshape(r_ * c_), dy[p].reshape(r_ * c_), dx[p].reshape(r_ * c_)
        stop = min(r_, (t + 1) * per)
        for k0 in range(t * per, stop, sub):
            k = min(sub, stop - k0)
            widen(xp[k0 * c_:(k0 + k) * c_], xf)
            widen(gp[k0 * c_:(k0 + k) * c_], gf)
            _rows_dx(x2[:k], g2, sh[p], de[p], r[p], wp[p], k1[p], k2[p], o2)
            narrow(of, op[k0 * c_:(k0 + k) * c_])


guard_caches(globals())
