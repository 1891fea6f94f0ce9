r"""The ``cpu`` backend: fused Numba kernels for all five norms, forward and backward.

Three operators of the family described in :mod:`._fused` (which also gives them autograd, an
eager path and the backend object), registered with :mod:`torch.library` so that
``torch.compile(fullgraph=True)`` traces through them (each has a fake implementation giving
output shapes, strides and dtypes) and ``torch.library.opcheck`` passes:

``normlab::cpu_norm(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps)``
    ``-> (y, stats)``: the norm given by ``normalized_ndim, groups, centered`` (:mod:`._plan`).
    With ``mean``/``var`` given the input is normalized by them (BatchNorm and InstanceNorm in
    eval). ``stats`` is ``(4, S)``: shift, delta (the mean is ``shift + delta``), rstd and the
    biased variance of each of the ``S`` statistics, in float32 (float64 for float64 inputs).
``normlab::cpu_add_norm(x, residual, weight, bias, normalized_ndim, centered, eps)``
    ``-> (y, h, stats)``: LayerNorm/RMSNorm of ``h = x + residual``, one pass (float32/float64
    pairs of one dtype).
``normlab::cpu_norm_backward(dy, dh, x, weight, stats, normalized_ndim, groups, centered,``
``input_stats, need_dx) -> (dx, dweight, dbias)``: with :math:`g = \gamma\,dy` and means over
    each statistics set,
    :math:`dx = \mathrm{rstd}\,(g - \langle g\rangle - \hat x\,\langle g\hat x\rangle)`
    (no :math:`\langle g\rangle` for RMSNorm, only :math:`\mathrm{rstd}\,g` for given
    statistics), :math:`d\gamma = \sum dy\,\hat x`, :math:`d\beta = \sum dy`; ``dh`` (or None)
    is a gradient reaching ``x`` directly (the add variant's residual output), added to dx.

Layouts (a :class:`~._plan.Plan`'s ``layout``): contiguous inputs run as rows (LayerNorm,
RMSNorm, and GroupNorm/InstanceNorm whose (sample, group) blocks are contiguous) or as
``(N, C, L)`` (BatchNorm); channels-last inputs (any input whose ``movedim(1, -1)`` is
contiguous, e.g. ``channels_last`` 4-D or a transposed ``(N, L, C)`` sequence) run as ``(P, R, C)`` without a copy and give channels-last outputs.
Other strides are copied to contiguous first. bfloat16 and float16 inputs are read and written
in place in every layout by the ``*_16`` kernels (their bit patterns: bfloat16 as uint16,
float16 as int16), widened to float32 a cache-resident slice at a time; statistics, parameters
and parameter gradients are float32, outputs in the input's dtype and layout. (The one
exception: the backward of the fused residual add, float32/float64 only, takes copies.)

Kernels compile on first use (``cache=True`` keeps them on disk); importing normlab compiles
nothing. Numba's threads follow ``torch.get_num_threads()`` at each call. A second derivative
(``create_graph=True``) is taken through the reference engine's differentiable formulas.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Optional

import numba
import numpy as np
import torch
from numba.np.ufunc import parallel as _nparallel

from .. import _engine as E
from . import _numba as K
from . import _plan as P
from ._fused import FusedBackend, Ops

_NONE = {np.dtype(np.float32): np.empty((0, 0), np.float32),  # "no array" for the kernels
         np.dtype(np.float64): np.empty((0, 0), np.float64)}
_EMPTY = {dt: np.empty(0, dt) for dt in _NONE}  # the same, 1-D
_EMPTY3 = np.empty((0, 0, 0))  # "no partial sums" (given statistics)
_BLOCKS = 64  # parameter-gradient partial sums per call: fixed, so results ignore thread count
_BLOCK_ROWS = 16  # rows per partial sum at least (fewer, smaller partials for small inputs)
_CHUNKS = 64  # nhwc work items (P * chunks of R) aimed at, fixed for the same reason
_CHUNK_MIN = 8192  # elements of an nhwc chunk at least (each has a (C,) float64 partial)


# --- threads: which version of a kernel runs (see _numba.jit.Kernel)
#
# The design: every kernel exists as a parallel and a serial version, and each call picks one.
# Serial when the call is small (below _MIN_PARALLEL elements of work: a parallel region's
# wake-up, and its wait for a thread the OS descheduled when a neighbour process holds the other
# core, cost more than the work), when torch runs one thread (DataLoader workers, a
# torch.set_num_threads(1) made for fork), and in any process forked after Numba's thread pool
# started, for good. That last rule is what makes the kernels fork-safe: GNU OpenMP (Numba's
# "omp" threading layer on Linux) does not survive fork, and Numba terminates a forked child at
# its first parallel region ("fork() called from a process already using GNU OpenMP"), whatever
# its thread count (torch's own ops hang in such a child unless it sets one thread). The other
# designs were rejected: Numba's "workqueue" layer survives fork but aborts when two Python
# threads launch kernels at once (its queues are unprotected globals), "tbb" needs the tbb
# package, and resetting GNU OpenMP after fork is not supported by it. A child of a fork runs the
# serial kernels (as torch runs its DataLoader workers on one thread); spawn and forkserver
# children are fresh processes and use threads again.
#
# _MIN_PARALLEL, measured on the 2-core VM (forward and forward+backward of LayerNorm,
# BatchNorm, GroupNorm NCHW and channels_last, 4K to 1M elements): parallel/serial time was
# 0.86-1.24 below 32K elements, 0.76-1.01 at 32K-64K and 0.61-0.92 from 128K; beside a process
# busy on the other core the parallel version took 1.1-3.5x the serial one up to 64K elements.

_MIN_PARALLEL = 1 << 16  # elements of work below which the serial version runs
_pool_started = False
_forked = False  # this process was forked after Numba's (not fork-safe) pool had started
_set: dict[int, int] = {}  # calling thread -> the torch thread count Numba's was last set from


def uses_threads(work: int) -> bool:
    """Whether a call over ``work`` elements runs the parallel kernels (no side effects)."""
    return work >= _MIN_PARALLEL and not _forked and torch.get_num_threads() > 1


def _threads(work: int) -> int:
    """The number of threads a call over ``work`` elements runs on: 1 (the serial kernels) or
    torch's intra-op thread count, which Numba's pool is set to. Numba's count is per calling
    thread, so it is set only when torch's count or the calling thread changed
    (``numba.set_num_threads`` costs about 2 us). ``forced_threads`` overrides the choice in
    one thread (the background warm-up of :mod:`.auto` compiles the version a call will run)."""
    forced = _forced_threads.get()
    if forced is not None:
        n = forced
    elif work < _MIN_PARALLEL or _forked:
        return 1
    else:
        n = torch.get_num_threads()
    if n < 2 or _forked:
        return 1
    if not _pool_started:
        _start_pool()
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    me = threading.get_ident()
    if _set.get(me) != n:
        numba.set_num_threads(n)
        _set[me] = n
    return n


_forced_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "normlab_cpu_threads", default=None)


@contextlib.contextmanager
def forced_threads(n: int):
    """Run every cpu-backend call in this block (this thread only) on ``n`` threads: the serial
    kernels for 1, the parallel ones for more, whatever the input size."""
    token = _forced_threads.set(n)
    try:
        yield
    finally:
        _forced_threads.reset(token)


def start_pool() -> None:
    """Start Numba's thread pool now (once; see :func:`_start_pool`), where the parallel kernels
    can run: in the calling thread, before a background thread runs them."""
    if not _pool_started and not _forked:
        _start_pool()


def _start_pool() -> None:
    """Start Numba's thread pool with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    Numba's OpenMP runtime is not torch's (two libgomp copies, two pools). Workers that spin
    after a parallel region take the cores the other pool's threads need: on 2 cores, torch's
    own LayerNorm ran 3x slower next to an actively waiting Numba pool. The variable is set only
    while Numba's runtime loads (it reads it once), so torch and child processes don't see it.
    """
    global _pool_started
    key = "OMP_WAIT_POLICY"
    chosen = key in os.environ
    if not chosen:
        os.environ[key] = "PASSIVE"
    torch_threads = torch.get_num_threads()
    try:
        _nparallel._launch_threads()
    finally:
        if not chosen:
            del os.environ[key]
    # Launching the pool resets torch's intra-op thread count to the core count (measured: a
    # torch.set_num_threads(1) made before the first cpu-backend call was lost): restore it.
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _pool_started = True


def _numba_pool_started() -> bool:
    """Whether Numba's thread pool is started in this process (by normlab or by other code) with
    a threading layer that does not survive fork (any but TBB)."""
    return bool(getattr(_nparallel, "_is_initialized", False)) and \
        getattr(_nparallel, "_threading_layer", None) != "tbb"


def _after_fork_in_child() -> None:
    """``os.register_at_fork`` hook: a child forked after the pool started runs the serial
    kernels, and so does every process forked from it."""
    global _forked
    if _forked or _numba_pool_started():
        _forked = True
    _set.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


_NP = {torch.float32: np.float32, torch.float64: np.float64}
_HALF = (torch.bfloat16, torch.float16)  # computed in the kernels on their bit patterns
_LAST = {d: (0, *range(2, d), 1) for d in range(3, 9)}  # axes of movedim(1, -1)


_CONST: dict[tuple, np.ndarray] = {}  # (n, fill, dtype) -> the "no parameter" array
_VIEWS: dict[tuple, np.ndarray] = {}  # (address, n, dtype) -> a NumPy view of that memory
_MAX_VIEWS = 1024


def _vec(p: torch.Tensor | None, n: int, fill: float, acc: torch.dtype) -> np.ndarray:
    """A parameter or statistic as a flat ``acc``-dtype NumPy array for the kernels to read.

    A contiguous tensor of dtype ``acc`` is viewed, not copied, and the view is kept, keyed by
    (address, length, dtype): a view is nothing but that memory read as that many elements, so
    it is the right view of any tensor that has them, later tensors at a reused address
    included (parameters and buffers keep their address across calls; making a view costs
    about 1.5 us). ``None`` is a kept array of ``fill`` (the kernels never write these)."""
    if p is None:
        key = (n, fill, acc)
        v = _CONST.get(key)
        if v is None:
            v = _CONST[key] = np.full(n, fill, dtype=_NP[acc])
        return v
    if p.dtype is acc and p.is_contiguous():
        key = (p.data_ptr(), n, acc)
        v = _VIEWS.get(key)
        if v is None:
            if len(_VIEWS) >= _MAX_VIEWS:
                _VIEWS.clear()
            v = _VIEWS[key] = p.detach().numpy().reshape(n)
        return v
    return p.detach().reshape(n).to(acc).contiguous().numpy()


def _kernel_array(t: torch.Tensor, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """A NumPy view of t (dense in the layout's order) shaped for the kernels; 16-bit floats as
    their bit patterns, bfloat16 as uint16 and float16 as int16 (what the 16-bit kernels take)."""
    if t.dtype in _HALF:
        if layout == "nhwc" and t.dim() >= 3:
            t = t.movedim(1, -1)
        bits = t.view(torch.int16).reshape(shape).numpy()
        return bits.view(np.uint16) if t.dtype is torch.bfloat16 else bits
    if layout == "nhwc" and t.dim() >= 3:  # NumPy's transpose costs a fraction of torch's movedim
        return t.numpy().transpose(_LAST[t.dim()]).reshape(shape)
    if t.is_contiguous():  # NumPy's reshape of the view costs a tenth of torch's
        return t.numpy().reshape(shape)
    return t.reshape(shape).numpy()


def _same_layout(t: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """t (e.g. dy) in ``like``'s dtype and memory order (``like`` is dense)."""
    if t.dtype is not like.dtype:
        t = t.to(like.dtype)
    if t.stride() == like.stride():
        return t
    if layout == "nhwc" and t.dim() >= 3:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _outputs(x: torch.Tensor, xk: torch.Tensor, plan: P.Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output, where the kernels write it): torch's layout (:func:`~normlab._engine.
    output_like`: contiguous, channels-last kept by the channel norms); the kernels write xk's
    layout (a scratch copied over when they differ)."""
    out = E.output_like(x, plan.keeps_channels_last)
    if out.stride() == xk.stride():
        return out, out
    return out, torch.empty_like(xk)


def _fuse_channels(c: int, threads: int) -> bool:
    """Whether the one-region nchw kernels (a channel's two passes by one thread) take C
    channels: when they balance over the threads (fewer channels: stats, then the pass)."""
    return c >= 4 * threads


def _chunks(p: int, r: int, c: int) -> int:
    """Chunks of R per p in the nhwc kernels: _CHUNKS work items over P, each chunk of
    _CHUNK_MIN elements at least (fixed by the shape alone: results ignore the thread count)."""
    return max(1, min(r, _CHUNKS // max(p, 1), r * c // _CHUNK_MIN))


# --- the forward operator


@torch.library.custom_op("normlab::cpu_norm", mutates_args=(), device_types="cpu")
def cpu_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mean: Optional[torch.Tensor], var: Optional[torch.Tensor], normalized_ndim: int,
             groups: int, centered: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    nt = _threads(x.numel())
    acc = P.ACC[x.dtype]
    xk = P.dense(x, normalized_ndim > 0)
    plan = P.plan(xk, normalized_ndim, groups, centered)
    layout, shape, sets, npar = plan.layout, plan.shape, plan.sets, plan.params
    y, yk = _outputs(x, xk, plan)
    st = np.empty((4, sets), _NP[acc])
    xs, ys = _kernel_array(xk, layout, shape), _kernel_array(yk, layout, shape)
    half = x.dtype in _HALF
    w, b = _vec(weight, npar, 1.0, acc), _vec(bias, npar, 0.0, acc)
    if layout == "rows":
        if half:
            K.rows_forward_16.pick(nt)(xs, w, b, plan.seg, eps, centered, ys, st)
        elif plan.rows:
            K.rows_forward.pick(nt)(xs, w, b, eps, centered, ys, st)
        else:
            K.segments_forward.pick(nt)(xs, w, b, plan.seg, eps, ys, st)
    elif layout == "nhwc":  # batch statistics per (p, group), or given ones per channel
        p, r, c = shape
        cpg, t = plan.cpg, _chunks(p, r, c)
        sh = np.empty((p, c), st.dtype)
        if var is None:
            m = v = _EMPTY[st.dtype]
            s1, s2 = np.zeros((p, t, c)), np.zeros((p, t, c))
            (K.nhwc_moments_16 if half else K.nhwc_moments).pick(nt)(xs, cpg, sh, s1, s2)
        else:
            m, v = _vec(mean, npar, 0.0, acc), _vec(var, npar, 1.0, acc)
            s1 = s2 = _EMPTY3
        (K.nhwc_affine_16 if half else K.nhwc_affine).pick(nt)(
            xs, sh, s1, s2, w, b, m, v, cpg, eps, t, st, ys)
    elif var is not None and not half:  # given statistics, per channel (nchw)
        K.nchw_given.pick(nt)(xs, w, b, _vec(mean, npar, 0.0, acc), _vec(var, npar, 1.0, acc),
                              eps, st, ys)
    elif var is not None:
        st[0] = _vec(mean, npar, 0.0, acc)
        st[1] = 0
        st[3] = _vec(var, npar, 1.0, acc)
        st[2] = 1.0 / np.sqrt(st[3] + eps)
        _affine(xs, st, w, b, ys, nt, half)
    elif half and _fuse_channels(shape[1], nt):
        K.nchw_forward_16.pick(nt)(xs, w, b, eps, st, ys)
    else:
        (K.nchw_stats_16 if half else K.nchw_stats).pick(nt)(xs, st, eps)
        _affine(xs, st, w, b, ys, nt, half)
    if yk is not y:
        y.copy_(yk)
    return y, torch.from_numpy(st)


@cpu_norm.register_fake
def _(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps):
    sets, _ = P.counts(x, normalized_ndim, groups)
    return (P.output_for(x, normalized_ndim, centered),
            x.new_empty((4, sets), dtype=E.compute_dtype(x.dtype)))


def _affine(xs, st, w, b, ys, nt, half) -> None:
    """ys = ((xs - shift) - delta) * rstd * w + b with st's per-channel statistics (nchw)."""
    (K.nchw_affine_16 if half else K.nchw_affine).pick(nt)(xs, st[0], st[1], st[2] * w, b, ys)


# --- the backward operator


@torch.library.custom_op("normlab::cpu_norm_backward", mutates_args=(), device_types="cpu")
def cpu_norm_backward(dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor,
                      weight: Optional[torch.Tensor], stats: torch.Tensor, normalized_ndim: int,
                      groups: int, centered: bool, input_stats: bool, need_dx: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nt = _threads(x.numel())
    acc = P.ACC[x.dtype]
    half = x.dtype in _HALF and dh is None  # (the 16-bit kernels take no dh)
    xk = P.dense(x, normalized_ndim > 0)
    if not half and xk.dtype is not acc:
        xk = xk.to(acc)
    plan = P.plan(xk, normalized_ndim, groups, centered)
    layout, shape, npar = plan.layout, plan.shape, plan.params
    gk = _same_layout(dy, xk, layout)
    xs, gs, st = _kernel_array(xk, layout, shape), _kernel_array(gk, layout, shape), stats.numpy()
    fdt = np.float32 if half else xs.dtype
    if need_dx:
        dx, dxk = _outputs(x, xk, plan)
        if dxk.dtype is not xk.dtype:
            dxk = torch.empty_like(xk)
        dxs = _kernel_array(dxk, layout, shape)
    else:
        dx = dxk = x.new_empty(0)
        dxs = np.empty((0,) * len(shape), xs.dtype)
    w = _vec(weight, npar, 1.0, acc)
    if layout == "rows":
        # per-block partials in the kernels' dtype (up to a few hundred rows each, at least
        # _BLOCK_ROWS: summing the partials costs as much as a block), joined in float64
        blocks = max(1, min(_BLOCKS, shape[0] // _BLOCK_ROWS))
        dw, db = np.empty(npar, fdt), np.empty(npar, fdt)
        out = dxs if need_dx else np.empty(shape, xs.dtype)
        if half:
            K.rows_backward_16.pick(nt)(xs, w, gs, st, plan.seg, centered, blocks, out, dw, db)
        elif plan.rows:
            dhs = _NONE[xs.dtype] if dh is None else \
                _same_layout(dh, xk, layout).view(shape).numpy()
            K.rows_backward.pick(nt)(xs, w, gs, dhs, st, centered, blocks, out, dw, db)
        else:
            K.segments_backward.pick(nt)(xs, w, gs, st, plan.seg, blocks, out, dw, db)
    elif layout == "nhwc":
        p, r, c = shape
        cpg, t = plan.cpg, _chunks(p, r, c)
        s1, s2 = np.zeros((p, t, c)), np.zeros((p, t, c))
        dw, db = np.empty(npar, fdt), np.empty(npar, fdt)
        (K.nhwc_grad_moments_16 if half else K.nhwc_grad_moments).pick(nt)(
            xs, gs, st, cpg, s1, s2)
        (K.nhwc_dx_16 if half else K.nhwc_dx).pick(nt)(
            xs, gs, st, w, s1, s2, cpg, input_stats, t, dxs, dw, db)
    elif half and _fuse_channels(shape[1], nt):
        dw, db = np.empty(npar), np.empty(npar)
        K.nchw_backward_16.pick(nt)(xs, gs, st, w, input_stats, dxs, dw, db)
    else:
        dw, db = np.empty(npar), np.empty(npar)
        (K.nchw_grad_sums_16 if half else K.nchw_grad_sums).pick(nt)(xs, gs, st, dw, db)
        if need_dx:
            count = shape[0] * shape[2]
            k1 = (dw / count if input_stats else np.zeros(npar)).astype(fdt)
            k2 = (db / count if input_stats else np.zeros(npar)).astype(fdt)
            (K.nchw_dx_16 if half else K.nchw_dx).pick(nt)(xs, gs, st, st[2] * w, k1, k2, dxs)
    if need_dx and dxk is not dx:
        dx.copy_(dxk)
    if dw.dtype != fdt:
        dw, db = dw.astype(fdt), db.astype(fdt)
    return dx, torch.from_numpy(dw), torch.from_numpy(db)


@cpu_norm_backward.register_fake
def _(dy, dh, x, weight, stats, normalized_ndim, groups, centered, input_stats, need_dx):
    _, npar = P.counts(x, normalized_ndim, groups)
    acc = E.compute_dtype(x.dtype)
    dx = P.output_for(x, normalized_ndim, centered) if need_dx else x.new_empty(0)
    return dx, x.new_empty(npar, dtype=acc), x.new_empty(npar, dtype=acc)


# --- residual add fused with LayerNorm / RMSNorm


@torch.library.custom_op("normlab::cpu_add_norm", mutates_args=(), device_types="cpu")
def cpu_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], normalized_ndim: int, centered: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, stats) with h = x + residual and y = norm(h), in one pass; float32/float64 x and
    residual of one dtype."""
    nt = _threads(x.numel())
    x, residual = x.contiguous(), residual.contiguous()
    plan = P.plan(x, normalized_ndim, 0, centered)
    shape, m, npar = plan.shape, plan.sets, plan.params
    y, h = torch.empty_like(x), torch.empty_like(x)
    st = np.empty((4, m), _NP[x.dtype])
    K.rows_add_forward.pick(nt)(
        x.numpy().reshape(shape), residual.numpy().reshape(shape),
        _vec(weight, npar, 1.0, x.dtype), _vec(bias, npar, 0.0, x.dtype), eps, centered,
        y.numpy().reshape(shape), h.numpy().reshape(shape), st)
    return y, h, torch.from_numpy(st)


@cpu_add_norm.register_fake
def _(x, residual, weight, bias, normalized_ndim, centered, eps):
    m, _ = P.counts(x, normalized_ndim, 0)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((4, m)))


# --- autograd, the eager path and the backend


def _given(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of a forward's stats (4, S): shift + delta, var. (In eager mode
    through NumPy: the same IEEE sum in stats' dtype, at a fraction of torch's per-call cost.)"""
    if torch.compiler.is_compiling():
        return stats[0] + stats[1], stats[3]
    st = stats.numpy()
    return torch.from_numpy(st[0] + st[1]), stats[3]


def _update_running(stats: torch.Tensor, running_mean, running_var, count: int,
                    momentum: float) -> bool:
    """BatchNorm's running statistics updated from a forward's stats in one Numba call, when
    the given buffers are contiguous CPU tensors of the statistics' dtype (float32 for float32
    inputs, float64 for float64); False (nothing done) otherwise, or under torch.compile."""
    if torch.compiler.is_compiling() or count == 0:
        return False
    dt = stats.dtype
    for b in (running_mean, running_var):
        if b is not None and (b.dtype is not dt or not b.is_cpu or not b.is_contiguous()
                              or b.requires_grad):
            return False
    n = stats.shape[1]
    none = _EMPTY[np.dtype(_NP[dt])]
    K.running_update(stats.numpy(), none if running_mean is None else _vec(running_mean, n, 0, dt),
                     none if running_var is None else _vec(running_var, n, 1, dt), momentum,
                     count / (count - 1) if count > 1 else 1.0)
    return True


def _fuses_add(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """The one-pass add + norm kernel takes float32/float64 pairs of one dtype."""
    return residual.device == x.device and residual.dtype == x.dtype \
        and x.dtype in (torch.float32, torch.float64)


OPS = Ops(cpu_norm, cpu_norm_backward, cpu_add_norm, _given)
BACKEND = FusedBackend(
    "cpu", OPS, runs=lambda x: x.is_cpu and x.dtype in P.ACC and x.numel() > 0,
    fuses_add=_fuses_add, batch_stats=_given, update_running=_update_running)
