r"""Numba kernels of the ``cpu`` backend, on NumPy arrays (float32 or float64, C-contiguous).

Three layouts cover the five norms (the canonical view of ``design/architecture.md``):

``rows``  ``x (M, D)``: one statistic per row. LayerNorm/RMSNorm rows; GroupNorm and
          InstanceNorm on NCHW inputs (a row is one (sample, group) or (sample, channel) block).
          A row is split into ``D / seg`` segments of one channel each: ``seg = 1`` gives
          per-element parameters (LayerNorm), ``seg = HW`` per-channel ones.
``nchw``  ``x (N, C, L)``: one statistic per channel over (N, L). BatchNorm on NCHW inputs.
``nhwc``  ``x (P, R, C)``: one statistic per (p, group of ``cpg`` adjacent channels) over R.
          BatchNorm (P = 1, R = N*HW), InstanceNorm (P = N, cpg = 1) and GroupNorm on
          channels_last inputs, and every norm with given (running) statistics.

Statistics are shifted sums: with ``s`` a sample of the set (its first element), ``v = x - s``
is small, and ``mean = s + sum(v)/m``, ``var = sum(v^2)/m - (sum(v)/m)^2`` lose nothing to
cancellation for inputs such as ``1e5 + N(0, 1)``. Sums run in 32 independent lanes of the
input's dtype over blocks of 256 elements (an elementwise inner loop, which LLVM vectorizes
without reassociating), and the block sums join float64 totals: float64-grade accuracy at
float32 speed. Normalizing computes ``((x - shift) - delta) * a + b`` in the input's dtype,
``shift`` the sample and ``delta`` the rest of the mean, never ``x * a + b'``, whose two terms
cancel at large means.

No ``fastmath``. Reassociation would rewrite ``(x - shift) - delta`` as ``x - mean`` (measured:
4e-3 error at 1e5 + N(0, 1)); even ``contract`` alone (fused multiply-add) breaks an exact
cancellation in the backward, where ``g * w - <g w>`` must subtract the same rounded products
it averaged (measured: dx = 2e-4 instead of 0 for one-element sets with eps 1e-6). Parameter
gradients are summed per fixed block of work and the blocks reduced in order: no atomics, and
results do not depend on the thread count.

Numba 0.68 pitfalls met here (each cost speed or correctness, found by tests and timing):

* writes inside ``prange`` through views taken *before* the loop (``shift = stats[0]``) are
  silently lost when the body also holds an inner reduction loop: index the full array;
* a computed index (``w[base + j]``) keeps Numba's negative-index wraparound in the loop and
  blocks vectorization: slice first (``wr = w[base:base + d]``), then index with ``range``;
* the lane loops vectorize only over fixed-length slices (``seg[q * 32:(q + 1) * 32]``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# pragma: no cover throughout: compiled code is not seen by coverage.


_FM = False  # no fastmath at all (see above)
_L = 32  # accumulator lanes: a multiple of the AVX width that the loop vectorizer fills
_B = 8  # lane-rows (of _L elements) summed in the input's dtype before joining a float64 total


@njit(cache=True, fastmath=_FM)
def _lane_sums(acc):  # pragma: no cover
    """(sum of lanes 0.._L-1, sum of lanes _L..2_L-1) of one block, in float64."""
    a1 = 0.0
    a2 = 0.0
    for k in range(_L):
        a1 += acc[k]
        a2 += acc[_L + k]
    return a1, a2


@njit(cache=True, fastmath=_FM)
def _moments(seg, s, acc):  # pragma: no cover
    """(sum v, sum v^2) over ``seg`` of v = seg - s, s a value of seg's dtype (its sample).

    ``acc`` (2 * _L, seg's dtype) holds _L independent partial sums: the inner loop is
    elementwise over the lanes, so LLVM vectorizes it without reassociating anything. Each
    block of _B * _L elements is summed in seg's dtype, the block sums in float64."""
    n = seg.shape[0]
    nb = n // _L
    t1 = 0.0
    t2 = 0.0
    for b in range(0, nb, _B):
        acc[:] = 0
        for q in range(b, min(nb, b + _B)):
            sq = seg[q * _L:(q + 1) * _L]  # a fixed-length slice: this loop vectorizes
            for k in range(_L):
                v = sq[k] - s
                acc[k] += v
                acc[_L + k] += v * v
        a1, a2 = _lane_sums(acc)
        t1 += a1
        t2 += a2
    for j in range(nb * _L, n):
        v = np.float64(seg[j] - s)
        t1 += v
        t2 += v * v
    return t1, t2


@njit(cache=True, fastmath=_FM)
def _grad_moments(seg, g, sh, de, r, acc):  # pragma: no cover
    """(sum g * xhat, sum g) over one segment, xhat = ((seg - sh) - de) * r; lanes and
    blocks as in :func:`_moments`."""
    n = seg.shape[0]
    nb = n // _L
    t1 = 0.0
    t2 = 0.0
    for b in range(0, nb, _B):
        acc[:] = 0
        for q in range(b, min(nb, b + _B)):
            sq, gq = seg[q * _L:(q + 1) * _L], g[q * _L:(q + 1) * _L]
            for k in range(_L):
                gj = gq[k]
                acc[k] += gj * (((sq[k] - sh) - de) * r)
                acc[_L + k] += gj
        a1, a2 = _lane_sums(acc)
        t1 += a1
        t2 += a2
    for j in range(nb * _L, n):
        t1 += np.float64(g[j] * (((seg[j] - sh) - de) * r))
        t2 += np.float64(g[j])
    return t1, t2


@njit(cache=True, fastmath=_FM)
def _row_grads(row, g, w, sh, de, r, dwt, dbt, acc):  # pragma: no cover
    """LayerNorm-style row (per-element parameters): add g * xhat and g into ``dwt``/``dbt``
    (the block's partial parameter gradients) and return (sum g w xhat, sum g w) in float64;
    lanes and blocks as in :func:`_moments`."""
    n = row.shape[0]
    nb = n // _L
    t1 = 0.0
    t2 = 0.0
    for b in range(0, nb, _B):
        acc[:] = 0
        for q in range(b, min(nb, b + _B)):
            lo, hi = q * _L, (q + 1) * _L
            xq, gq, wq, dwq, dbq = row[lo:hi], g[lo:hi], w[lo:hi], dwt[lo:hi], dbt[lo:hi]
            for k in range(_L):
                xh = ((xq[k] - sh) - de) * r
                gj = gq[k]
                dwq[k] += gj * xh
                dbq[k] += gj
                gw = gj * wq[k]
                acc[k] += gw * xh
                acc[_L + k] += gw
        a1, a2 = _lane_sums(acc)
        t1 += a1
        t2 += a2
    for j in range(nb * _L, n):
        xh = ((row[j] - sh) - de) * r
        dwt[j] += g[j] * xh
        dbt[j] += g[j]
        gw = g[j] * w[j]
        t1 += np.float64(gw * xh)
        t2 += np.float64(gw)
    return t1, t2


# --- rows: one statistic per row of x (M, D); parameters per channel, D / seg channels a row


@njit(cache=True, fastmath=_FM)
def _row_stats(row, eps, centered, stats, i, acc):  # pragma: no cover
    """Statistics of one row into stats[:, i]; returns (shift, delta, rstd) in row's dtype."""
    d = row.shape[0]
    s = row[0] if centered else row.dtype.type(0)
    s1, s2 = _moments(row, s, acc)
    mu = s1 / d if centered else 0.0
    v = max(s2 / d - mu * mu, 0.0)
    stats[0, i] = s
    stats[1, i] = mu
    stats[2, i] = 1.0 / math.sqrt(v + eps)
    stats[3, i] = v
    return stats[0, i], stats[1, i], stats[2, i]  # rounded to x's dtype


# Kernels are split by path (per-element parameters, residual, per-channel segments) so that a
# first call compiles only what it runs: the first LayerNorm forward took 7 s with one kernel
# holding all three paths (helpers inlined into it), 3-4 s now on the 2-core VM (about 1 s of it
# Numba's one-time setup). Later processes load the kernels from Numba's on-disk cache.


@njit(cache=True, fastmath=_FM)
def _row(row, w, b, eps, centered, out, stats, i, acc):  # pragma: no cover
    """One LayerNorm/RMSNorm row: statistics into stats[:, i], then out."""
    sh, de, r = _row_stats(row, eps, centered, stats, i, acc)
    for j in range(row.shape[0]):
        out[j] = ((row[j] - sh) - de) * (r * w[j]) + b[j]


@njit(cache=True, fastmath=_FM)
def _segments(row, w, b, seg, eps, out, stats, i, acc):  # pragma: no cover
    """One row of D / seg channel segments (w, b: this row's channels): stats, then out."""
    sh, de, r = _row_stats(row, eps, True, stats, i, acc)
    for c in range(row.shape[0] // seg):
        a, bb = r * w[c], b[c]
        # slices, then indices straight from range(): Numba's negative-index handling of a
        # computed index (c * seg + j) would stop LLVM from vectorizing
        xc, oc = row[c * seg:(c + 1) * seg], out[c * seg:(c + 1) * seg]
        for j in range(seg):
            oc[j] = ((xc[j] - sh) - de) * a + bb


@njit(cache=True, fastmath=_FM)
def _row_backward(row, g, w, stats, i, centered, out, dwt, dbt, acc, cs):  # pragma: no cover
    """dx of one LayerNorm/RMSNorm row into out; g xhat and g added into dwt, dbt."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1, c2 = _row_grads(row, g, w, sh, de, r, dwt, dbt, acc)
    cs[0] = c1 / d
    cs[1] = c2 / d if centered else 0.0
    k1, k2 = cs[0], cs[1]  # x's dtype
    for j in range(d):
        out[j] = r * (g[j] * w[j] - k2 - (((row[j] - sh) - de) * r) * k1)


@njit(cache=True, fastmath=_FM)
def _segments_backward(row, g, w, seg, stats, i, out, dwt, dbt, acc, cs):  # pragma: no cover
    """dx of one row of channel segments (w, dwt, dbt: this row's channels)."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1 = 0.0
    c2 = 0.0
    for c in range(d // seg):
        p1, p2 = _grad_moments(row[c * seg:(c + 1) * seg], g[c * seg:(c + 1) * seg],
                               sh, de, r, acc)
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


@njit(parallel=True, cache=True, fastmath=_FM)
def rows_forward(x, w, b, eps, centered, y, stats):  # pragma: no cover
    """LayerNorm/RMSNorm rows x (M, D), parameters per element (w, b of length D).
    stats (4, M) receives shift, delta, rstd, var (the mean square when not centered)."""
    m, d = x.shape
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            _row(x[i], w, b, eps, centered, y[i], stats, i, acc)


@njit(parallel=True, cache=True, fastmath=_FM)
def rows_add_forward(x, res, w, b, eps, centered, y, h, stats):  # pragma: no cover
    """:func:`rows_forward` of h = x + res, h written in the same pass."""
    m, d = x.shape
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            xr, rr, hr = x[i], res[i], h[i]
            for j in range(d):
                hr[j] = xr[j] + rr[j]
            _row(hr, w, b, eps, centered, y[i], stats, i, acc)


@njit(parallel=True, cache=True, fastmath=_FM)
def segments_forward(x, w, b, seg, eps, y, stats):  # pragma: no cover
    """GroupNorm/InstanceNorm on NCHW: rows x (M, D) of D / seg channels of seg elements each;
    row i, segment c has channel (i % K) * (D / seg) + c, K = len(w) / (D / seg)."""
    m, d = x.shape
    cpr = d // seg
    kk = w.shape[0] // cpr
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            base = (i % kk) * cpr
            _segments(x[i], w[base:base + cpr], b[base:base + cpr], seg, eps, y[i], stats, i,
                      acc)


@njit(parallel=True, cache=True, fastmath=_FM)
def rows_backward(x, w, dy, dh, stats, centered, dx, dw_part, db_part):  # pragma: no cover
    """dx = rstd (g w - <g w> - xhat <g w xhat>) per row (no <g w> when not centered), plus
    ``dh`` (M, D) when given (the residual stream's own gradient; else shape (0, 0));
    dw_part/db_part (blocks, D) receive per-block sums of g xhat and g."""
    m, d = x.shape
    blocks = dw_part.shape[0]
    per = (m + blocks - 1) // blocks
    add = dh.shape[0] > 0
    for t in prange(blocks):
        acc = np.empty(2 * _L, x.dtype)
        cs = np.empty(2, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            out = dx[i]
            _row_backward(x[i], dy[i], w, stats, i, centered, out, dw_part[t], db_part[t], acc,
                          cs)
            if add:
                hr = dh[i]
                for j in range(d):
                    out[j] += hr[j]


@njit(parallel=True, cache=True, fastmath=_FM)
def segments_backward(x, w, dy, stats, seg, dx, dw_part, db_part):  # pragma: no cover
    """The backward of :func:`segments_forward`; dw_part/db_part (blocks, len(w))."""
    m, d = x.shape
    cpr = d // seg
    kk = w.shape[0] // cpr
    blocks = dw_part.shape[0]
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, x.dtype)
        cs = np.empty(2, x.dtype)
        for i in range(t * per, min(m, (t + 1) * per)):
            lo, hi = (i % kk) * cpr, (i % kk) * cpr + cpr
            _segments_backward(x[i], dy[i], w[lo:hi], seg, stats, i, dx[i], dw_part[t, lo:hi],
                               db_part[t, lo:hi], acc, cs)


# --- bfloat16 rows: each row is widened to float32 in a cache-resident scratch row, run through
# the float32 row routines, and rounded back; no full-size float32 copy of x, dy, y or dx.

_U16 = np.uint32(16)


@njit(cache=True)
def _widen(src, bits):  # pragma: no cover
    """bfloat16 bit patterns (uint16) -> float32, written through ``bits`` (a uint32 view)."""
    for j in range(src.shape[0]):
        bits[j] = np.uint32(src[j]) << _U16


@njit(cache=True)
def _narrow(bits, dst):  # pragma: no cover
    """float32 (as uint32 bits) -> bfloat16 bits, round to nearest even; NaN stays NaN."""
    for j in range(dst.shape[0]):
        v = bits[j]
        r = (v + np.uint32(0x7FFF) + ((v >> _U16) & np.uint32(1))) >> _U16
        nan = (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        dst[j] = np.uint16(0x7FC0) if nan else np.uint16(r)


@njit(parallel=True, cache=True, fastmath=_FM)
def rows_forward_bf16(x, w, b, seg, eps, centered, y, stats):  # pragma: no cover
    """:func:`rows_forward` (seg = 0) or :func:`segments_forward` on bfloat16 bits x, y."""
    m, d = x.shape
    cpr = d // seg if seg > 0 else d
    kk = w.shape[0] // cpr
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, np.float32)
        xf, yf = np.empty(d, np.float32), np.empty(d, np.float32)
        xb, yb = xf.view(np.uint32), yf.view(np.uint32)
        for i in range(t * per, min(m, (t + 1) * per)):
            _widen(x[i], xb)
            if seg > 0:
                base = (i % kk) * cpr
                _segments(xf, w[base:base + cpr], b[base:base + cpr], seg, eps, yf, stats, i,
                          acc)
            else:
                _row(xf, w, b, eps, centered, yf, stats, i, acc)
            _narrow(yb, y[i])


@njit(parallel=True, cache=True, fastmath=_FM)
def rows_backward_bf16(x, w, dy, stats, seg, centered, dx, dw_part, db_part):  # pragma: no cover
    """:func:`rows_backward` (seg = 0) or :func:`segments_backward` on bfloat16 bits x, dy,
    dx (float32 partials)."""
    m, d = x.shape
    cpr = d // seg if seg > 0 else d
    kk = w.shape[0] // cpr
    blocks = dw_part.shape[0]
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        acc = np.empty(2 * _L, np.float32)
        cs = np.empty(2, np.float32)
        xf, gf, of = np.empty(d, np.float32), np.empty(d, np.float32), np.empty(d, np.float32)
        xb, gb, ob = xf.view(np.uint32), gf.view(np.uint32), of.view(np.uint32)
        for i in range(t * per, min(m, (t + 1) * per)):
            _widen(x[i], xb)
            _widen(dy[i], gb)
            if seg > 0:
                lo, hi = (i % kk) * cpr, (i % kk) * cpr + cpr
                _segments_backward(xf, gf, w[lo:hi], seg, stats, i, of, dw_part[t, lo:hi],
                                   db_part[t, lo:hi], acc, cs)
            else:
                _row_backward(xf, gf, w, stats, i, centered, of, dw_part[t], db_part[t], acc, cs)
            _narrow(ob, dx[i])


# --- nchw: one statistic per channel of x (N, C, L), over N and L (BatchNorm)


@njit(parallel=True, cache=True, fastmath=_FM)
def nchw_stats(x, stats, eps):  # pragma: no cover
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        acc = np.empty(2 * _L, x.dtype)
        s = x[0, ch, 0]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            a, q = _moments(x[i, ch], s, acc)
            s1 += a
            s2 += q
        mu = s1 / count
        v = max(s2 / count - mu * mu, 0.0)
        stats[0, ch] = s
        stats[1, ch] = mu
        stats[2, ch] = 1.0 / math.sqrt(v + eps)
        stats[3, ch] = v


@njit(parallel=True, cache=True, fastmath=_FM)
def nchw_affine(x, sh, de, a, b, y):  # pragma: no cover
    """y = ((x - sh[c]) - de[c]) * a[c] + b[c] over x (N, C, L)."""
    n, c, l = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        s0, d0, a0, b0 = sh[ch], de[ch], a[ch], b[ch]
        xr, yr = x[i, ch], y[i, ch]
        for j in range(l):
            yr[j] = ((xr[j] - s0) - d0) * a0 + b0


@njit(parallel=True, cache=True, fastmath=_FM)
def nchw_grad_sums(x, dy, stats, sum_g_xhat, sum_g):  # pragma: no cover
    """Per channel: sum of dy * xhat and of dy over (N, L), in float64."""
    n, c, l = x.shape
    for ch in prange(c):
        acc = np.empty(2 * _L, x.dtype)
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            p1, p2 = _grad_moments(x[i, ch], dy[i, ch], sh, de, r, acc)
            s1 += p1
            s2 += p2
        sum_g_xhat[ch] = s1
        sum_g[ch] = s2


@njit(parallel=True, cache=True, fastmath=_FM)
def nchw_dx(x, dy, stats, a, k1, k2, dx):  # pragma: no cover
    """dx = a[c] (dy - k2[c] - xhat k1[c]) over x (N, C, L); a = weight * rstd."""
    n, c, l = x.shape
    for k in prange(n * c):
        i, ch = k // c, k % c
        sh, de, r, a0, c1, c2 = stats[0, ch], stats[1, ch], stats[2, ch], a[ch], k1[ch], k2[ch]
        xr, gr, out = x[i, ch], dy[i, ch], dx[i, ch]
        for j in range(l):
            out[j] = a0 * (gr[j] - c2 - (((xr[j] - sh) - de) * r) * c1)


# --- nhwc: x (P, R, C), channels innermost. Work items are (p, chunk of R); per-channel sums
# run in x's dtype over _ROWS rows at a time, then join float64 partials (P, T, C).

_ROWS = 64


@njit(parallel=True, cache=True, fastmath=_FM)
def nhwc_moments(x, sh, s1, s2):  # pragma: no cover
    """s1, s2 (P, T, C) float64 (zeroed) receive sum(v), sum(v^2) of v = x - sh[p, c] over
    chunk t of R (T = s1.shape[1]); sh (P, C) has x's dtype."""
    p_, r_, c_ = x.shape
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        acc = np.empty((2, c_), x.dtype)
        stop = min(r_, (t + 1) * per)
        for r0 in range(t * per, stop, _ROWS):
            for c in range(c_):
                acc[0, c] = 0
                acc[1, c] = 0
            for r in range(r0, min(stop, r0 + _ROWS)):
                xr, shp, a1, a2 = x[p, r], sh[p], acc[0], acc[1]
                for c in range(c_):
                    v = xr[c] - shp[c]
                    a1[c] += v
                    a2[c] += v * v
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@njit(parallel=True, cache=True, fastmath=_FM)
def nhwc_affine(x, sh, de, a, b, chunks, y):  # pragma: no cover
    """y = ((x - sh[p, c]) - de[p, c]) * a[p, c] + b[p, c] over x (P, R, C); the (P, C)
    arrays may have one row (P = 1 broadcast)."""
    p_, r_, c_ = x.shape
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        q = p if sh.shape[0] > 1 else 0
        shp, dep, ap, bp = sh[q], de[q], a[q], b[q]
        for r in range(t * per, min(r_, (t + 1) * per)):
            xr, yr = x[p, r], y[p, r]
            for c in range(c_):
                yr[c] = ((xr[c] - shp[c]) - dep[c]) * ap[c] + bp[c]


@njit(parallel=True, cache=True, fastmath=_FM)
def nhwc_grad_moments(x, dy, sh, de, r, s1, s2):  # pragma: no cover
    """s1, s2 (P, T, C) float64 (zeroed) receive sum(dy * xhat), sum(dy) over chunk t of R."""
    p_, r_, c_ = x.shape
    chunks = s1.shape[1]
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        q = p if sh.shape[0] > 1 else 0
        acc = np.empty((2, c_), x.dtype)
        stop = min(r_, (t + 1) * per)
        for k0 in range(t * per, stop, _ROWS):
            for c in range(c_):
                acc[0, c] = 0
                acc[1, c] = 0
            for k in range(k0, min(stop, k0 + _ROWS)):
                xr, gr, a1, a2 = x[p, k], dy[p, k], acc[0], acc[1]
                shp, dep, rp = sh[q], de[q], r[q]
                for c in range(c_):
                    g = gr[c]
                    a1[c] += g * (((xr[c] - shp[c]) - dep[c]) * rp[c])
                    a2[c] += g
            o1, o2 = s1[p, t], s2[p, t]
            for c in range(c_):
                o1[c] += acc[0, c]
                o2[c] += acc[1, c]


@njit(parallel=True, cache=True, fastmath=_FM)
def nhwc_dx(x, dy, sh, de, r, w, k1, k2, chunks, dx):  # pragma: no cover
    """dx = r (dy w - k2 - xhat k1) over x (P, R, C), every other argument (P, C) or (1, C);
    k1 = <dy w xhat> and k2 = <dy w> over each statistics set (zero for given statistics)."""
    p_, r_, c_ = x.shape
    per = (r_ + chunks - 1) // chunks
    for item in prange(p_ * chunks):
        p, t = item // chunks, item % chunks
        q = p if sh.shape[0] > 1 else 0
        shp, dep, rp, wp, c1, c2 = sh[q], de[q], r[q], w[q], k1[q], k2[q]
        for k in range(t * per, min(r_, (t + 1) * per)):
            xr, gr, out = x[p, k], dy[p, k], dx[p, k]
            for c in range(c_):
                xh = ((xr[c] - shp[c]) - dep[c]) * rp[c]
                out[c] = rp[c] * (gr[c] * wp[c] - c2[c] - xh * c1[c])
