"""The ``nchw`` layout: x (N, C, L), one statistic per channel over N and L (BatchNorm on
NCHW inputs; given per-channel statistics for BatchNorm and InstanceNorm in eval).

Forward: statistics per channel (:func:`nchw_stats`), then ``y = ((x - shift) - delta) * a + b``
with ``a = rstd w`` (:func:`nchw_affine`). Backward: ``sum dy xhat`` and ``sum dy`` per channel
(:func:`nchw_grad_sums`, float64), then ``dx = a (dy - k2 - xhat k1)`` with the caller's
``k1 = <dy xhat>``, ``k2 = <dy>`` (zero for given statistics) (:func:`nchw_dx`).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .arith import S, chunk_grad_moments, chunk_moments, grad_moments, moments, store_stats
from .half import narrow, widen
from .jit import Kernel, guard_caches, jit

# pragma: no cover throughout: compiled code is not seen by coverage.


@jit
def _affine_seg(xr, s0, d0, a0, b0, yr):  # pragma: no cover
    """yr = ((xr - s0) - d0) * a0 + b0 over one slice of one channel."""
    for j in range(xr.shape[0]):
        yr[j] = ((xr[j] - s0) - d0) * a0 + b0


@jit
def _dx_seg(xr, gr, sh, de, r, a0, c1, c2, out):  # pragma: no cover
    """out = a0 (gr - c2 - xhat c1) over one slice of one channel, xhat = ((xr - sh) - de) r."""
    for j in range(xr.shape[0]):
        out[j] = a0 * (gr[j] - c2 - (((xr[j] - sh) - de) * r) * c1)


@Kernel
def nchw_stats(x, stats, eps):  # pragma: no cover
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        s = x[0, ch, 0]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            a, q = moments(x[i, ch], s)
            s1 += a
            s2 += q
        store_stats(stats, ch, s, s1, s2, count, eps, True)


@Kernel
def nchw_affine(x, sh, de, a, b, y):  # pragma: no cover
    """y = ((x - sh[c]) - de[c]) * a[c] + b[c] over x (N, C, L)."""
    n, c, l = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        s0, d0, a0, b0 = sh[ch], de[ch], a[ch], b[ch]
        _affine_seg(x[i, ch], s0, d0, a0, b0, y[i, ch])


@Kernel
def nchw_given(x, w, b, mean, var, eps, stats, y):  # pragma: no cover
    """BatchNorm/InstanceNorm with given per-channel statistics over x (N, C, L): stats (4, C)
    receives (mean, 0, rstd, var), rstd = 1 / sqrt(var + eps) in x's dtype, then
    y = ((x - mean) - 0) * (rstd w) + b, as :func:`nchw_affine`."""
    n, c, l = x.shape
    one = x.dtype.type(1)
    e = x.dtype.type(eps)
    a = np.empty(c, x.dtype)
    for ch in range(c):
        r = one / np.sqrt(var[ch] + e)
        stats[0, ch] = mean[ch]
        stats[1, ch] = 0
        stats[2, ch] = r
        stats[3, ch] = var[ch]
        a[ch] = r * w[ch]
    for k in prange(n * c):
        i, ch = k // c, k % c
        _affine_seg(x[i, ch], stats[0, ch], stats[1, ch], a[ch], b[ch], y[i, ch])


@Kernel
def nchw_grad_sums(x, dy, stats, sum_g_xhat, sum_g):  # pragma: no cover
    """Per channel: sum of dy * xhat and of dy over (N, L), in float64."""
    n, c, l = x.shape
    for ch in prange(c):
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            p1, p2 = grad_moments(x[i, ch], dy[i, ch], sh, de, r)
            s1 += p1
            s2 += p2
        sum_g_xhat[ch] = s1
        sum_g[ch] = s2


@Kernel
def nchw_dx(x, dy, stats, a, k1, k2, dx):  # pragma: no cover
    """dx = a[c] (dy - k2[c] - xhat k1[c]) over x (N, C, L); a = weight * rstd."""
    n, c, l = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        sh, de, r, a0, c1, c2 = stats[0, ch], stats[1, ch], stats[2, ch], a[ch], k1[ch], k2[ch]
        _dx_seg(x[i, ch], dy[i, ch], sh, de, r, a0, c1, c2, dx[i, ch])


# 16-bit x, y, dy, dx: each (sample, channel) row of L is processed in slices of S elements,
# widened into float32 scratch and summed by the slice sums (float32 over at most S widened
# values of 8 or 11 significant bits), joining float64 totals per slice.


@Kernel
def nchw_stats_16(x, stats, eps):  # pragma: no cover
    """:func:`nchw_stats` on 16-bit x (N, C, L); stats float32."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        xf = np.empty(min(l, S), np.float32)
        widen(x[0, ch, 0:1], xf)
        s = xf[0]  # the shift: the channel's first element
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr = x[i, ch]
            for j0 in range(0, l, S):
                k = min(S, l - j0)
                widen(xr[j0:j0 + k], xf)
                a, q = chunk_moments(xf[:k], s)
                s1 += a
                s2 += q
        store_stats(stats, ch, s, s1, s2, count, eps, True)


@Kernel
def nchw_affine_16(x, sh, de, a, b, y):  # pragma: no cover
    """:func:`nchw_affine` on 16-bit x, y (N, C, L); sh, de, a, b float32."""
    n, c, l = x.shape
    m = n * c
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        xf, yf = np.empty(min(l, S), np.float32), np.empty(min(l, S), np.float32)
        for k in range(t * per, min(m, (t + 1) * per)):
            i, ch = k // c, k % c
            s0, d0, a0, b0 = sh[ch], de[ch], a[ch], b[ch]
            xr, yr = x[i, ch], y[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                _affine_seg(xf[:j1 - j0], s0, d0, a0, b0, yf)
                narrow(yf, yr[j0:j1])


@Kernel
def nchw_grad_sums_16(x, dy, stats, sum_g_xhat, sum_g):  # pragma: no cover
    """:func:`nchw_grad_sums` on 16-bit x, dy."""
    n, c, l = x.shape
    for ch in prange(c):
        xf, gf = np.empty(min(l, S), np.float32), np.empty(min(l, S), np.float32)
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr, gr = x[i, ch], dy[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                widen(gr[j0:j1], gf)
                p1, p2 = chunk_grad_moments(xf[:j1 - j0], gf, sh, de, r)
                s1 += p1
                s2 += p2
        sum_g_xhat[ch] = s1
        sum_g[ch] = s2


@Kernel
def nchw_dx_16(x, dy, stats, a, k1, k2, dx):  # pragma: no cover
    """:func:`nchw_dx` on 16-bit x, dy, dx; a, k1, k2 float32."""
    n, c, l = x.shape
    m = n * c
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        e = min(l, S)
        xf, gf, of = np.empty(e, np.float32), np.empty(e, np.float32), np.empty(e, np.float32)
        for k in range(t * per, min(m, (t + 1) * per)):
            i, ch = k // c, k % c
            sh, de, r, a0, c1, c2 = stats[0, ch], stats[1, ch], stats[2, ch], a[ch], k1[ch], k2[ch]
            xr, gr, out = x[i, ch], dy[i, ch], dx[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                widen(gr[j0:j1], gf)
                _dx_seg(xf[:j1 - j0], gf, sh, de, r, a0, c1, c2, of)
                narrow(of, out[j0:j1])


@Kernel
def nchw_forward_16(x, w, b, eps, stats, y):  # pragma: no cover
    """:func:`nchw_stats_16` then :func:`nchw_affine_16` (a = rstd w) in one parallel region,
    channel by channel: a channel's second pass re-reads its data from L2 when it fits (N L
    elements), and the two passes cost one thread-pool wake-up instead of two. For C well above
    the thread count (else the channels don't balance over the threads)."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        xf, yf = np.empty(min(l, S), np.float32), np.empty(min(l, S), np.float32)
        widen(x[0, ch, 0:1], xf)
        s = xf[0]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr = x[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                a, q = chunk_moments(xf[:j1 - j0], s)
                s1 += a
                s2 += q
        store_stats(stats, ch, s, s1, s2, count, eps, True)
        s0, d0, a0, b0 = stats[0, ch], stats[1, ch], stats[2, ch] * w[ch], b[ch]
        for i in range(n):
            xr, yr = x[i, ch], y[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                _affine_seg(xf[:j1 - j0], s0, d0, a0, b0, yf)
                narrow(yf, yr[j0:j1])


@Kernel
def nchw_backward_16(x, dy, stats, w, input_stats, dx, sum_g_xhat, sum_g):  # pragma: no cover
    """:func:`nchw_grad_sums_16` then (dx of size 0: skipped) :func:`nchw_dx_16` in one parallel
    region, channel by channel (as :func:`nchw_forward_16`); k1, k2 are zero for given
    statistics (``input_stats`` False)."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        e = min(l, S)
        xf, gf, of = np.empty(e, np.float32), np.empty(e, np.float32), np.empty(e, np.float32)
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr, gr = x[i, ch], dy[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                widen(gr[j0:j1], gf)
                p1, p2 = chunk_grad_moments(xf[:j1 - j0], gf, sh, de, r)
                s1 += p1
                s2 += p2
        sum_g_xhat[ch] = s1
        sum_g[ch] = s2
        if dx.shape[0] == 0:
            continue
        c1 = np.float32(s1 / count) if input_stats else np.float32(0.0)
        c2 = np.float32(s2 / count) if input_stats else np.float32(0.0)
        a0 = r * w[ch]
        for i in range(n):
            xr, gr, out = x[i, ch], dy[i, ch], dx[i, ch]
            for j0 in range(0, l, S):
                j1 = min(l, j0 + S)
                widen(xr[j0:j1], xf)
                widen(gr[j0:j1], gf)
                _dx_seg(xf[:j1 - j0], gf, sh, de, r, a0, c1, c2, of)
                narrow(of, out[j0:j1])


guard_caches(globals())
