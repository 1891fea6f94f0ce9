r"""Numba kernels of the ``cpu`` backend, on NumPy arrays: float32 or float64, C-contiguous;
bfloat16 and float16 as their bit patterns (:mod:`.half`), computed in float32.

Three layouts cover the five norms (``cpu._plan`` maps a call to one), a module each:

:mod:`.rows`  ``x (M, D)``: one statistic per row. LayerNorm/RMSNorm rows (per-element
              parameters); GroupNorm and InstanceNorm on NCHW inputs (a row is one (sample,
              group) block of ``D / seg`` channel segments of ``seg = HW`` elements each).
:mod:`.nchw`  ``x (N, C, L)``: one statistic per channel over (N, L). BatchNorm on NCHW.
:mod:`.nhwc`  ``x (P, R, C)``: one statistic per (p, group of ``cpg`` adjacent channels) over R.
              BatchNorm (P = 1, R = N*HW), InstanceNorm (P = N, cpg = 1) and GroupNorm on
              channels_last inputs, and every norm with given (running) statistics.

:mod:`.arith` holds the arithmetic they share, :mod:`.jit` the compilation (flags, cache,
:class:`Kernel`: a parallel and a serial version of each kernel).

Statistics are shifted sums: with ``s`` a sample of the set (its first element), ``v = x - s``
is small, and ``mean = s + sum(v)/m``, ``var = sum(v^2)/m - (sum(v)/m)^2`` lose nothing to
cancellation for inputs such as ``1e5 + N(0, 1)``. Sums run over slices of at most 1024
elements in the input's dtype (float32 for the 16-bit formats), and the slice sums join
float64 totals: float64-grade accuracy at float32 speed. Normalizing computes
``((x - shift) - delta) * a + b`` in the input's dtype, ``shift`` the sample and ``delta`` the
rest of the mean, never ``x * a + b'``, whose two terms cancel at large means.

No general ``fastmath``. Reassociation would rewrite ``(x - shift) - delta`` as ``x - mean``
(measured: 4e-3 error at 1e5 + N(0, 1)); even ``contract`` alone (fused multiply-add) breaks an
exact cancellation in the backward, where ``g * w - <g w>`` must subtract the same rounded
products it averaged (measured: dx = 2e-4 instead of 0 for one-element sets with eps 1e-6). One
scoped exception: the slice sums of :mod:`.arith` carry ``reassoc`` on their accumulating adds
alone (every other operation comes from strict helpers, whose instructions keep no flags), so
that LLVM vectorizes them with accumulators in registers. The vectorized order is fixed at
compile time: results are deterministic. Parameter gradients are summed per fixed block of work
and the blocks reduced in order: no atomics, and results do not depend on the thread count.

Numba 0.68 pitfalls met here (each cost speed or correctness, found by tests and timing):

* writes inside ``prange`` through views taken *before* the loop (``shift = stats[0]``) are
  silently lost when the body also holds an inner reduction loop: index the full array;
* a computed index (``w[base + j]``) keeps Numba's negative-index wraparound in the loop and
  blocks vectorization: slice first (``wr = w[base:base + d]``), then index with ``range``;
* Numba has no float16 on the CPU: :mod:`.half` converts with LLVM's own ``fpext``/``fptrunc``
  on ``half`` (F16C instructions, exact, vectorized);
* strict (flag-free) sums in 32 lanes of a scratch array, the earlier design, keep the lanes in
  memory (LLVM cannot prove the array does not alias the data), loaded and stored every 32
  elements: 0.2 ns an element even in L1, twice the scoped-``reassoc`` slice sums;
* ``x[p, a:b].reshape(n)`` once per block of rows cost 10-20 % of an nhwc pass: reshape the
  item's whole (R, C) plane once and slice that.

The names below are what :mod:`..cpu` (and the tests) call as ``K.<name>``.
"""
from .arith import running_update
from .half import narrow as _narrow, widen as _widen
from .jit import Kernel
from .nchw import (nchw_affine, nchw_affine_16, nchw_backward_16, nchw_dx, nchw_dx_16,
                   nchw_forward_16, nchw_given, nchw_grad_sums, nchw_grad_sums_16, nchw_stats,
                   nchw_stats_16)
from .nhwc import (nhwc_affine, nhwc_affine_16, nhwc_dx, nhwc_dx_16, nhwc_grad_moments,
                   nhwc_grad_moments_16, nhwc_moments, nhwc_moments_16)
from .rows import (rows_add_forward, rows_backward, rows_backward_16, rows_forward,
                   rows_forward_16, segments_backward, segments_forward)

__all__ = [
    "Kernel", "running_update",
    "rows_forward", "rows_add_forward", "segments_forward", "rows_backward",
    "segments_backward", "rows_forward_16", "rows_backward_16",
    "nchw_stats", "nchw_affine", "nchw_given", "nchw_grad_sums", "nchw_dx", "nchw_stats_16",
    "nchw_affine_16", "nchw_grad_sums_16", "nchw_dx_16", "nchw_forward_16", "nchw_backward_16",
    "nhwc_moments", "nhwc_affine", "nhwc_grad_moments", "nhwc_dx", "nhwc_moments_16",
    "nhwc_affine_16", "nhwc_grad_moments_16", "nhwc_dx_16",
]
