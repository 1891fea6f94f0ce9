r"""Numba kernels of the ``cpu`` backend, on NumPy arrays (float32 or float64, C-contiguous;
bfloat16 and float16 as their bit patterns, see the 16-bit section at the end).

Three layouts cover the five norms (the canonical view of ``design/architecture.md``):

``rows``  ``x (M, D)``: one statistic per row. LayerNorm/RMSNorm rows; GroupNorm and
          InstanceNorm on NCHW inputs (a row is one (sample, group) or (sample, channel) block).
          A row is split into ``D / seg`` segments of one channel each: ``seg = 1`` gives
          per-element parameters (LayerNorm), ``seg = HW`` per-channel ones.
``nchw``  ``x (N, C, L)``: one statistic per channel over (N, L). BatchNorm on NCHW inputs.
``nhwc``  ``x (P, R, C)``: one statistic per (p, group of ``cpg`` adjacent channels) over R.
          BatchNorm (P = 1, R = N*HW), InstanceNorm (P = N, cpg = 1) and GroupNorm on
          channels_last inputs, and every norm with given (running) statistics. The small
          per-group work between the passes (statistics from the partial sums, per-channel
          scale and shift, k1/k2, parameter gradients) runs in the kernels' serial prologues.

Statistics are shifted sums: with ``s`` a sample of the set (its first element), ``v = x - s``
is small, and ``mean = s + sum(v)/m``, ``var = sum(v^2)/m - (sum(v)/m)^2`` lose nothing to
cancellation for inputs such as ``1e5 + N(0, 1)``. Sums run over slices of at most 1024
elements in the input's dtype (float32 for the 16-bit formats), and the slice sums join float64
totals: float64-grade accuracy at float32 speed. Normalizing computes ``((x - shift) - delta) * a + b`` in the input's dtype,
``shift`` the sample and ``delta`` the rest of the mean, never ``x * a + b'``, whose two terms
cancel at large means.

No general ``fastmath``. Reassociation would rewrite ``(x - shift) - delta`` as ``x - mean``
(measured: 4e-3 error at 1e5 + N(0, 1)); even ``contract`` alone (fused multiply-add) breaks an
exact cancellation in the backward, where ``g * w - <g w>`` must subtract the same rounded
products it averaged (measured: dx = 2e-4 instead of 0 for one-element sets with eps 1e-6). One
scoped exception: the slice sums (:func:`_chunk_moments`, :func:`_chunk_grad_moments`,
:func:`_chunk_row_grads`) carry ``reassoc`` on their accumulating adds alone (every other
operation comes from strict helpers, whose instructions keep no flags), so that LLVM vectorizes
them with accumulators in registers. The vectorized order is fixed at compile time: results are
deterministic. Parameter gradients are summed per fixed block of work and the blocks reduced in
order: no atomics, and results do not depend on the thread count.

Numba 0.68 pitfalls met here (each cost speed or correctness, found by tests and timing):

* writes inside ``prange`` through views taken *before* the loop (``shift = stats[0]``) are
  silently lost when the body also holds an inner reduction loop: index the full array;
* a computed index (``w[base + j]``) keeps Numba's negative-index wraparound in the loop and
  blocks vectorization: slice first (``wr = w[base:base + d]``), then index with ``range``;
* Numba has no float16 on the CPU (``NotImplementedError: float16``): float16 is converted with
  LLVM's own ``fpext``/``fptrunc`` on ``half`` through two ``@intrinsic``s (F16C instructions,
  exact, vectorized);
* strict (flag-free) sums in 32 lanes of a scratch array, the earlier design, keep the lanes in
  memory (LLVM cannot prove the array does not alias the data), loaded and stored every 32
  elements: 0.2 ns an element even in L1, twice the scoped-``reassoc`` slice sums;
* ``x[p, a:b].reshape(n)`` once per block of rows cost 10-20 % of an nhwc pass: reshape the
  item's whole (R, C) plane once and slice that.
"""
from __future__ import annotations

import math
import warnings
from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# pragma: no cover throughout: compiled code is not seen by coverage.


def _cache_probe():  # pragma: no cover - compiled only to find a cache location
    return 0


def _cache_available() -> bool:
    """Whether Numba has a cache location for this file (its ``__pycache__``, the user-wide
    cache or ``NUMBA_CACHE_DIR``): without one, ``cache=True`` raises at decoration (every
    kernel import would), so the kernels compile uncached in each process, warned once."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        _cache_warning(e)
        return False
    return True


_warned = []


def _cache_warning(e: BaseException) -> None:
    if not _warned:
        _warned.append(e)
        warnings.warn(f"normlab: Numba's cache cannot be used here ({type(e).__name__}: {e}); "
                      "the cpu kernels compile in this process without it (set NUMBA_CACHE_DIR"
                      " to a writable folder to keep them across processes)", RuntimeWarning,
                      stacklevel=3)


class _SafeCache:
    """A kernel's Numba cache where a damaged file (a truncated or foreign ``.nbi``/``.nbc``,
    which Numba unpickles and raises on at every call) or a failed write is a cache miss: the
    kernel compiles, with one warning per process."""

    def __init__(self, cache):
        self._inner = cache

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load_overload(self, sig, target_context):
        try:
            return self._inner.load_overload(sig, target_context)
        except Exception as e:  # noqa: BLE001 - any damage: compile instead
            _cache_warning(e)
            return None

    def save_overload(self, sig, data):
        try:
            self._inner.save_overload(sig, data)
        except Exception as e:  # noqa: BLE001
            _cache_warning(e)


def _guard_caches(namespace: dict) -> None:
    """Wrap the cache of every dispatcher in ``namespace`` (and of each Kernel's two)."""
    for v in list(namespace.values()):
        for d in ((v.parallel, v.serial) if isinstance(v, Kernel) else (v,)):
            cache = getattr(d, "_cache", None)
            if cache is not None and hasattr(cache, "load_overload") \
                    and not isinstance(cache, _SafeCache):
                d._cache = _SafeCache(cache)


_CACHE = _cache_available()
_FM = False  # no fastmath, except the scoped ``reassoc`` of the slice sums (see above)
# IEEE division, as torch's: 1 / sqrt(var + eps) with var + eps == 0 (eps=0 on a constant row) is
# inf and the output NaN. Numba's default ("python") raises ZeroDivisionError inside the kernel
# instead, which surfaced as "SystemError: CPUDispatcher(...) returned a result with an
# exception set".
_EM = "numpy"
_S = 1024  # elements of one slice sum (and of a float32 scratch slice of the 16-bit kernels)


class Kernel:
    """One kernel, compiled on first use in two versions from the same Python function:

    ``parallel``  ``prange`` loops run on Numba's thread pool (``parallel=True``);
    ``serial``    ``prange`` is ``range``: no parallel region, no thread pool at all.

    The caller picks (:mod:`.cpu`): serial for small inputs (no thread wake-up, nothing to wait
    for when a neighbour process holds the other core), with one torch thread, and in a process
    forked after Numba's OpenMP pool started (GNU OpenMP is not fork-safe: Numba terminates such
    a child at its first parallel region). The loop bodies are the same code and every reduction
    runs over fixed blocks, so both versions give bitwise the same results (tested).

    The serial version is compiled from a copy of the function under another qualified name:
    Numba's on-disk cache files are named after the function and keyed by its signature and
    bytecode, not by ``parallel``, so the two would otherwise overwrite each other's cache."""

    def __init__(self, fn):
        self.__name__, self.__doc__, self.__wrapped__ = fn.__name__, fn.__doc__, fn
        self.parallel = njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model=_EM)(fn)
        twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                            fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__doc__ = fn.__doc__
        self.serial = njit(cache=_CACHE, fastmath=_FM, error_model=_EM)(twin)

    def pick(self, threads: int):
        """The version to run on ``threads`` threads: serial for 1."""
        return self.parallel if threads > 1 else self.serial

    def __call__(self, *args):
        """The parallel version (what a direct call of a ``parallel=True`` kernel runs)."""
        return self.parallel(*args)

    def __repr__(self) -> str:
        return f"<normlab kernel {self.__name__} (parallel and serial)>"


# Strict helpers: every operation outside the accumulating adds. They carry no fastmath flag, and
# inlined into a ``reassoc`` function their instructions keep none, so nothing can be
# reassociated across them: no ``(acc + x) - s`` from ``acc + (x - s)``, no contraction.


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _dev(x, s):  # pragma: no cover
    return x - s


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _sq(v):  # pragma: no cover
    return v * v


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _mul(a, b):  # pragma: no cover
    return a * b


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _xhat(x, sh, de, r):  # pragma: no cover
    return ((x - sh) - de) * r


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _g_xhat(g, x, sh, de, r):  # pragma: no cover
    return g * (((x - sh) - de) * r)


# Slice sums: the one place with a fastmath flag, ``reassoc`` on the accumulating adds alone, so
# that LLVM keeps vector accumulators in registers. Each runs over one slice of at most _S
# elements in the slice's dtype (float32, or float64 for float64 inputs); the slices join float64
# totals. (The earlier strict version kept 32 lanes in a memory array and joined them in float64
# every 256 elements: 2x slower in cache, 0.75 against 0.4 ns an element.)


@njit(cache=_CACHE, fastmath={"reassoc"}, error_model=_EM)
def _chunk_moments(xf, s):  # pragma: no cover
    """(sum v, sum v^2) over the slice xf, v = xf - s, in xf's dtype."""
    a = xf.dtype.type(0)
    q = xf.dtype.type(0)
    for j in range(xf.shape[0]):
        v = _dev(xf[j], s)
        a += v
        q += _sq(v)
    return np.float64(a), np.float64(q)


@njit(cache=_CACHE, fastmath={"reassoc"}, error_model=_EM)
def _chunk_grad_moments(xf, gf, sh, de, r):  # pragma: no cover
    """(sum g xhat, sum g) over the slice xf (gf: as long or longer), in xf's dtype."""
    a = xf.dtype.type(0)
    q = xf.dtype.type(0)
    for j in range(xf.shape[0]):
        g = gf[j]
        a += _g_xhat(g, xf[j], sh, de, r)
        q += g
    return np.float64(a), np.float64(q)


@njit(cache=_CACHE, fastmath={"reassoc"}, error_model=_EM)
def _chunk_row_grads(xq, gq, wq, dwq, dbq, sh, de, r):  # pragma: no cover
    """:func:`_row_grads` over one slice: dwq += g xhat, dbq += g (elementwise, strict
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _moments(seg, s):  # pragma: no cover
    """(sum v, sum v^2) over ``seg`` of v = seg - s, s a value of seg's dtype (its sample), in
    float64: slice sums of :func:`_chunk_moments` joined in float64."""
    n = seg.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, _S):
        a, q = _chunk_moments(seg[j0:min(n, j0 + _S)], s)
        t1 += a
        t2 += q
    return t1, t2


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _grad_moments(seg, g, sh, de, r):  # pragma: no cover
    """(sum g * xhat, sum g) over one segment, xhat = ((seg - sh) - de) * r, in float64."""
    n = seg.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, _S):
        j1 = min(n, j0 + _S)
        a, q = _chunk_grad_moments(seg[j0:j1], g[j0:j1], sh, de, r)
        t1 += a
        t2 += q
    return t1, t2


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _row_grads(row, g, w, sh, de, r, dwt, dbt):  # pragma: no cover
    """LayerNorm-style row (per-element parameters): add g * xhat and g into ``dwt``/``dbt``
    (the block's partial parameter gradients) and return (sum g w xhat, sum g w) in float64."""
    n = row.shape[0]
    t1 = 0.0
    t2 = 0.0
    for j0 in range(0, n, _S):
        j1 = min(n, j0 + _S)
        a, q = _chunk_row_grads(row[j0:j1], g[j0:j1], w[j0:j1], dwt[j0:j1], dbt[j0:j1],
                                sh, de, r)
        t1 += a
        t2 += q
    return t1, t2


# --- rows: one statistic per row of x (M, D); parameters per channel, D / seg channels a row


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _store_stats(stats, i, s, s1, s2, count, eps, centered):  # pragma: no cover
    """stats[:, i] = (shift, delta, rstd, var) of a set of ``count`` values from its shifted sums
    s1 = sum(x - s), s2 = sum((x - s)^2); not centered: delta 0 and var the mean square."""
    mu = s1 / count if centered else 0.0
    v = max(s2 / count - mu * mu, 0.0)
    stats[0, i] = s
    stats[1, i] = mu
    stats[2, i] = 1.0 / math.sqrt(v + eps)
    stats[3, i] = v


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _row_stats(row, eps, centered, stats, i):  # pragma: no cover
    """Statistics of one row into stats[:, i]; returns (shift, delta, rstd) in row's dtype."""
    d = row.shape[0]
    s = row[0] if centered else row.dtype.type(0)
    s1, s2 = _moments(row, s)
    _store_stats(stats, i, s, s1, s2, d, eps, centered)
    return stats[0, i], stats[1, i], stats[2, i]  # rounded to x's dtype


# Kernels are split by path (per-element parameters, residual, per-channel segments) so that a
# first call compiles only what it runs: the first LayerNorm forward took 7 s with one kernel
# holding all three paths (helpers inlined into it), 3-4 s now on the 2-core VM (about 1 s of it
# Numba's one-time setup). Later processes load the kernels from Numba's on-disk cache.


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _row(row, w, b, eps, centered, out, stats, i):  # pragma: no cover
    """One LayerNorm/RMSNorm row: statistics into stats[:, i], then out."""
    sh, de, r = _row_stats(row, eps, centered, stats, i)
    for j in range(row.shape[0]):
        out[j] = ((row[j] - sh) - de) * (r * w[j]) + b[j]


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _row_backward(row, g, w, stats, i, centered, out, dwt, dbt, cs):  # pragma: no cover
    """dx of one LayerNorm/RMSNorm row into out; g xhat and g added into dwt, dbt."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1, c2 = _row_grads(row, g, w, sh, de, r, dwt, dbt)
    cs[0] = c1 / d
    cs[1] = c2 / d if centered else 0.0
    k1, k2 = cs[0], cs[1]  # x's dtype
    for j in range(d):
        out[j] = r * (g[j] * w[j] - k2 - (((row[j] - sh) - de) * r) * k1)


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _segments_backward(row, g, w, seg, stats, i, out, dwt, dbt, cs):  # pragma: no cover
    """dx of one row of channel segments (w, dwt, dbt: this row's channels)."""
    d = row.shape[0]
    sh, de, r = stats[0, i], stats[1, i], stats[2, i]
    c1 = 0.0
    c2 = 0.0
    for c in range(d // seg):
        p1, p2 = _grad_moments(row[c * seg:(c + 1) * seg], g[c * seg:(c + 1) * seg],
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _join_blocks(dw_part, db_part, dw, db):  # pragma: no cover
    """dw, db = the per-block partials summed over the blocks in order, in float64."""
    for j in range(dw.shape[0]):
        u1 = 0.0
        u2 = 0.0
        for t in range(dw_part.shape[0]):
            u1 += dw_part[t, j]
            u2 += db_part[t, j]
        dw[j] = u1
        db[j] = u2


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
    _join_blocks(dw_part, db_part, dw, db)


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
    _join_blocks(dw_part, db_part, dw, db)


# --- nchw: one statistic per channel of x (N, C, L), over N and L (BatchNorm)


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _affine_seg(xr, s0, d0, a0, b0, yr):  # pragma: no cover
    """yr = ((xr - s0) - d0) * a0 + b0 over one slice of one channel."""
    for j in range(xr.shape[0]):
        yr[j] = ((xr[j] - s0) - d0) * a0 + b0


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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
            a, q = _moments(x[i, ch], s)
            s1 += a
            s2 += q
        _store_stats(stats, ch, s, s1, s2, count, eps, True)


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
            p1, p2 = _grad_moments(x[i, ch], dy[i, ch], sh, de, r)
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



# --- nhwc: x (P, R, C), channels innermost. Work items are (p, chunk of R); per-channel sums
# run in x's dtype over _ROWS rows at a time, then join float64 partials (P, T, C). The work on a
# block of rows is in the _rows_* routines, shared with the 16-bit kernels below.

_ROWS = 64


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _rows_moments(xb, shp, a1, a2):  # pragma: no cover
    """a1, a2 (C) += sum(v), sum(v^2) over the rows of xb (k, C), v = x - shp."""
    for r in range(xb.shape[0]):
        xr = xb[r]
        for c in range(xr.shape[0]):
            v = xr[c] - shp[c]
            a1[c] += v
            a2[c] += v * v


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _rows_affine(xb, shp, dep, ap, bp, yb):  # pragma: no cover
    """yb = ((xb - shp) - dep) * ap + bp over a block of rows (k, C)."""
    for r in range(xb.shape[0]):
        xr, yr = xb[r], yb[r]
        for c in range(xr.shape[0]):
            yr[c] = ((xr[c] - shp[c]) - dep[c]) * ap[c] + bp[c]


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _rows_grad_moments(xb, gb, shp, dep, rp, a1, a2):  # pragma: no cover
    """a1, a2 (C) += sum(g * xhat), sum(g) over a block of rows (k, C)."""
    for r in range(xb.shape[0]):
        xr, gr = xb[r], gb[r]
        for c in range(xr.shape[0]):
            g = gr[c]
            a1[c] += g * (((xr[c] - shp[c]) - dep[c]) * rp[c])
            a2[c] += g


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
def _join_chunks(s1, s2, u1, u2):  # pragma: no cover
    """u1, u2 (C) = s1, s2 (T, C) summed over the chunks, in chunk order, one row at a time."""
    u1[:] = 0.0
    u2[:] = 0.0
    for t in range(s1.shape[0]):
        a, q = s1[t], s2[t]
        for c in range(u1.shape[0]):
            u1[c] += a[c]
            u2[c] += q[c]


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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


@njit(cache=_CACHE, fastmath=_FM, error_model=_EM)
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



# --- 16-bit floats: bfloat16 and float16 read and written in place, computed in float32.
# The kernels take the bit patterns: bfloat16 as uint16, float16 as int16 (the dtype picks the
# conversion at compile time, so each is a separate specialization). Each contiguous slice is
# widened into a float32 scratch that stays in L1 (_S elements: a row of L in nchw, a block of
# rows of C in nhwc, a whole row in rows), run through the float32 routines above, and the
# outputs are rounded back to nearest even. Statistics and parameters are float32; no full-size
# float32 copy of x, dy, y or dx is made.


def _half(t):
    """'bf16' (uint16 bits), 'f16' (int16 bits) or None: the 16-bit format of a Numba type."""
    return {types.uint16: "bf16", types.int16: "f16"}.get(t)


@intrinsic
def _h2f(typingctx, h):  # pragma: no cover
    """16-bit bits -> float32, exact. bfloat16 (uint16): the bits shifted into the high half;
    float16 (int16): LLVM's ``fpext half`` (F16C ``vcvtph2ps``; Numba has no CPU float16)."""
    kind = _half(h)
    if kind is None:
        return None

    def codegen(context, builder, sig, args):
        if kind == "f16":
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        u = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(u, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    return types.float32(h), codegen


@intrinsic
def _f2h(typingctx, f, dt):  # pragma: no cover
    """float32 -> 16-bit bits of the format of dtype ``dt``, round to nearest even. bfloat16:
    integer ops on the bits, NaN -> 0x7FC0 (as c10::BFloat16), inf and overflow as torch;
    float16: LLVM's ``fptrunc`` to ``half`` (F16C ``vcvtps2ph``: subnormals, inf, NaN)."""
    kind = _half(getattr(dt, "dtype", None))
    if kind is None or f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        if kind == "f16":
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        i32 = ir.IntType(32)

        def k(v):
            return ir.Constant(i32, v)
        v = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(v, k(16)), k(1))
        r = builder.lshr(builder.add(builder.add(v, k(0x7FFF)), lsb), k(16))
        nan = builder.icmp_unsigned(">", builder.and_(v, k(0x7FFFFFFF)), k(0x7F800000))
        return builder.trunc(builder.select(nan, k(0x7FC0), r), ir.IntType(16))
    return dt.dtype(f, dt), codegen


@njit(cache=_CACHE, error_model=_EM)
def _widen(src, dst):  # pragma: no cover
    """16-bit bit patterns (bfloat16 uint16, float16 int16) -> float32 dst, exact; vectorizes
    (vpmovzxwd + vpslld, or vcvtph2ps)."""
    for j in range(src.shape[0]):
        dst[j] = _h2f(src[j])


@njit(cache=_CACHE, error_model=_EM)
def _narrow(src, dst):  # pragma: no cover
    """float32 src -> 16-bit bit patterns dst (bfloat16 uint16, float16 int16), as torch's
    ``.bfloat16()`` / ``.half()``: round to nearest even, NaN stays NaN. Vectorizes (the bfloat16
    NaN select is a vpblendvb; vcvtps2ph)."""
    for j in range(dst.shape[0]):
        dst[j] = _f2h(src[j], dst.dtype)


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
            _widen(x[i], xf)
            if seg > 0:
                base = (i % kk) * cpr
                _segments(xf, w[base:base + cpr], b[base:base + cpr], seg, eps, yf, stats, i)
            else:
                _row(xf, w, b, eps, centered, yf, stats, i)
            _narrow(yf, y[i])


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
            _widen(x[i], xf)
            _widen(dy[i], gf)
            if seg > 0:
                lo, hi = (i % kk) * cpr, (i % kk) * cpr + cpr
                _segments_backward(xf, gf, w[lo:hi], seg, stats, i, of, dw_part[t, lo:hi],
                                   db_part[t, lo:hi], cs)
            else:
                _row_backward(xf, gf, w, stats, i, centered, of, dw_part[t], db_part[t], cs)
            _narrow(of, dx[i])
    _join_blocks(dw_part, db_part, dw, db)


# nchw, 16-bit: each (sample, channel) row of L is processed in slices of _S elements, widened
# into float32 scratch and summed by the slice sums above (float32 over at most _S widened values
# of 8 or 11 significant bits), joining float64 totals per slice.


@Kernel
def nchw_stats_16(x, stats, eps):  # pragma: no cover
    """:func:`nchw_stats` on 16-bit x (N, C, L); stats float32."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        xf = np.empty(min(l, _S), np.float32)
        _widen(x[0, ch, 0:1], xf)
        s = xf[0]  # the shift: the channel's first element
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr = x[i, ch]
            for j0 in range(0, l, _S):
                k = min(_S, l - j0)
                _widen(xr[j0:j0 + k], xf)
                a, q = _chunk_moments(xf[:k], s)
                s1 += a
                s2 += q
        _store_stats(stats, ch, s, s1, s2, count, eps, True)


@Kernel
def nchw_affine_16(x, sh, de, a, b, y):  # pragma: no cover
    """:func:`nchw_affine` on 16-bit x, y (N, C, L); sh, de, a, b float32."""
    n, c, l = x.shape
    m = n * c
    blocks = min(m, 256)
    per = (m + blocks - 1) // blocks
    for t in prange(blocks):
        xf, yf = np.empty(min(l, _S), np.float32), np.empty(min(l, _S), np.float32)
        for k in range(t * per, min(m, (t + 1) * per)):
            i, ch = k // c, k % c
            s0, d0, a0, b0 = sh[ch], de[ch], a[ch], b[ch]
            xr, yr = x[i, ch], y[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _affine_seg(xf[:j1 - j0], s0, d0, a0, b0, yf)
                _narrow(yf, yr[j0:j1])


@Kernel
def nchw_grad_sums_16(x, dy, stats, sum_g_xhat, sum_g):  # pragma: no cover
    """:func:`nchw_grad_sums` on 16-bit x, dy."""
    n, c, l = x.shape
    for ch in prange(c):
        xf, gf = np.empty(min(l, _S), np.float32), np.empty(min(l, _S), np.float32)
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr, gr = x[i, ch], dy[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _widen(gr[j0:j1], gf)
                p1, p2 = _chunk_grad_moments(xf[:j1 - j0], gf, sh, de, r)
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
        e = min(l, _S)
        xf, gf, of = np.empty(e, np.float32), np.empty(e, np.float32), np.empty(e, np.float32)
        for k in range(t * per, min(m, (t + 1) * per)):
            i, ch = k // c, k % c
            sh, de, r, a0, c1, c2 = stats[0, ch], stats[1, ch], stats[2, ch], a[ch], k1[ch], k2[ch]
            xr, gr, out = x[i, ch], dy[i, ch], dx[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _widen(gr[j0:j1], gf)
                _dx_seg(xf[:j1 - j0], gf, sh, de, r, a0, c1, c2, of)
                _narrow(of, out[j0:j1])


@Kernel
def nchw_forward_16(x, w, b, eps, stats, y):  # pragma: no cover
    """:func:`nchw_stats_16` then :func:`nchw_affine_16` (a = rstd w) in one parallel region,
    channel by channel: a channel's second pass re-reads its data from L2 when it fits (N L
    elements), and the two passes cost one thread-pool wake-up instead of two. For C well above
    the thread count (else the channels don't balance over the threads)."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        xf, yf = np.empty(min(l, _S), np.float32), np.empty(min(l, _S), np.float32)
        _widen(x[0, ch, 0:1], xf)
        s = xf[0]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr = x[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                a, q = _chunk_moments(xf[:j1 - j0], s)
                s1 += a
                s2 += q
        _store_stats(stats, ch, s, s1, s2, count, eps, True)
        s0, d0, a0, b0 = stats[0, ch], stats[1, ch], stats[2, ch] * w[ch], b[ch]
        for i in range(n):
            xr, yr = x[i, ch], y[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _affine_seg(xf[:j1 - j0], s0, d0, a0, b0, yf)
                _narrow(yf, yr[j0:j1])


@Kernel
def nchw_backward_16(x, dy, stats, w, input_stats, dx, sum_g_xhat, sum_g):  # pragma: no cover
    """:func:`nchw_grad_sums_16` then (dx of size 0: skipped) :func:`nchw_dx_16` in one parallel
    region, channel by channel (as :func:`nchw_forward_16`); k1, k2 are zero for given
    statistics (``input_stats`` False)."""
    n, c, l = x.shape
    count = n * l
    for ch in prange(c):
        e = min(l, _S)
        xf, gf, of = np.empty(e, np.float32), np.empty(e, np.float32), np.empty(e, np.float32)
        sh, de, r = stats[0, ch], stats[1, ch], stats[2, ch]
        s1 = 0.0
        s2 = 0.0
        for i in range(n):
            xr, gr = x[i, ch], dy[i, ch]
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _widen(gr[j0:j1], gf)
                p1, p2 = _chunk_grad_moments(xf[:j1 - j0], gf, sh, de, r)
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
            for j0 in range(0, l, _S):
                j1 = min(l, j0 + _S)
                _widen(xr[j0:j1], xf)
                _widen(gr[j0:j1], gf)
                _dx_seg(xf[:j1 - j0], gf, sh, de, r, a0, c1, c2, of)
                _narrow(of, out[j0:j1])


# nhwc, 16-bit: blocks of `_sub(C)` rows (at most _ROWS, about _S elements) are widened at once;
# the per-channel sums run over the same _ROWS-row groups as the float32 kernels.


@njit(cache=_CACHE, error_model=_EM)
def _sub(c):  # pragma: no cover
    return max(1, min(_ROWS, _S // max(c, 1)))


@Kernel
def nhwc_moments_16(x, cpg, sh, s1, s2):  # pragma: no cover
    """:func:`nhwc_moments` on 16-bit x (P, R, C); sh float32."""
    p_, r_, c_ = x.shape
    for p in range(p_):
        for c in range(c_):
            sh[p, c] = _h2f(x[p, 0, (c // cpg) * cpg])
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
                _widen(xp[k0 * c_:(k0 + k) * c_], xf)
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
            _widen(xp[k0 * c_:(k0 + k) * c_], xf)
            _rows_affine(x2[:k], sh[p], de[p], a[p], bb[p], y2)
            _narrow(yf, yp[k0 * c_:(k0 + k) * c_])


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
                _widen(xp[k0 * c_:(k0 + k) * c_], xf)
                _widen(gp[k0 * c_:(k0 + k) * c_], gf)
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
            _widen(xp[k0 * c_:(k0 + k) * c_], xf)
            _widen(gp[k0 * c_:(k0 + k) * c_], gf)
            _rows_dx(x2[:k], g2, sh[p], de[p], r[p], wp[p], k1[p], k2[p], o2)
            _narrow(of, op[k0 * c_:(k0 + k) * c_])


_guard_caches(globals())
