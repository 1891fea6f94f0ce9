r"""The ``triton`` backend: Triton kernels for all five norms, forward and backward, on GPUs.

Three operators of the family described in :mod:`._fused` (which gives them autograd, second
derivatives, an eager path and the backend object), registered with :mod:`torch.library` with
fake implementations, so ``torch.compile(fullgraph=True)`` traces through them:

``normlab::triton_norm(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps)``
``-> (y, stats)``: the norm given by ``normalized_ndim, groups, centered`` (:mod:`._plan`).
    ``stats`` is ``(3, S)``: mean, rstd and biased variance of each of the ``S`` statistics
    sets, float32 (float64 for float64 inputs). The variance of rows and groups is recovered as
    :math:`\mathrm{rstd}^{-2} - \epsilon` (only InstanceNorm's running statistics read it).
``normlab::triton_norm_backward(dy, dh, x, weight, stats, normalized_ndim, groups, centered,``
``input_stats, need_dx) -> (dx, dweight, dbias)``
``normlab::triton_add_norm(x, residual, weight, bias, normalized_ndim, centered, eps)``
``-> (y, h, stats)``

The kernels live in :mod:`.triton_rows` (LayerNorm, RMSNorm and the residual add, rows of any
width) and :mod:`.triton_channels` (GroupNorm, InstanceNorm, BatchNorm; NCHW and channels-last
read in place). Other strides are copied to contiguous first; outputs have torch's layout
(:func:`normlab._engine.output_like`), as every backend's. Weight and bias gradients are per-program partial sums
reduced in a fixed order: deterministic.

The backend runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was imported (Triton's interpreter: how CI checks the kernels without a GPU). Anything
else (other devices, integer dtypes, empty inputs) goes to the reference engine.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _engine as E
from . import triton_channels as C
from . import triton_rows as R
from . import _plan as P
from ._fused import FusedBackend, Ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _runs(x: torch.Tensor) -> bool:
    on = x.is_cuda or (INTERPRET and x.device.type == "cpu")
    return on and x.dtype in P.FLOATS and x.numel() > 0


def _rows_shape(x: torch.Tensor, normalized_ndim: int) -> tuple[int, int]:
    return P.counts(x, normalized_ndim, 0)


def _flat(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else p.reshape(-1).contiguous()


def _like(t: torch.Tensor, x: torch.Tensor, nd: int, centered: bool) -> torch.Tensor:
    """``t`` (x's values) in torch's output layout for x (:func:`~normlab._engine.output_like`):
    t itself when the strides agree."""
    out = P.output_for(x, nd, centered)
    if t.stride() == out.stride():
        return t
    out.copy_(t)
    return out


def _as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (e.g. dy) with like's dtype and memory order (channels-last or contiguous)."""
    t = t.to(like.dtype)
    if P.channels_last(like):
        return t if t.movedim(1, -1).is_contiguous() else \
            t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _stats(mean, rstd, var, eps, acc) -> torch.Tensor:
    mean, rstd = mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)
    if var is None:
        var = (rstd.double().pow(-2) - eps).clamp_min(0).to(acc)
    return torch.stack([mean, rstd, var.reshape(-1).to(acc)])


# --- the operators


@torch.library.custom_op("normlab::triton_norm", mutates_args=())
def triton_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                mean: Optional[torch.Tensor], var: Optional[torch.Tensor], normalized_ndim: int,
                groups: int, centered: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    acc = E.compute_dtype(x.dtype)
    nd = normalized_ndim
    if nd:
        shape = _rows_shape(x, nd)
        y, _, mu, rstd = R.rows_forward(x.contiguous().view(shape), _flat(weight), _flat(bias),
                                        eps, centered)
        return _like(y.view(x.shape), x, nd, centered), _stats(mu, rstd, None, eps, acc)
    xd = P.dense(x, False)
    if groups:
        y, mu, rstd = C.group_forward(xd, _flat(weight), _flat(bias), groups, eps)
        v = None
    else:
        y, mu, v, rstd = C.batch_forward(xd, _flat(weight), _flat(bias), eps,
                                         _flat(mean), _flat(var))
    return _like(y, x, nd, centered), _stats(mu, rstd, v, eps, acc)


@triton_norm.register_fake
def _(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps):
    sets, _ = P.counts(x, normalized_ndim, groups)
    return (P.output_for(x, normalized_ndim, centered),
            x.new_empty((3, sets), dtype=E.compute_dtype(x.dtype)))


@torch.library.custom_op("normlab::triton_norm_backward", mutates_args=())
def triton_norm_backward(dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor,
                         weight: Optional[torch.Tensor], stats: torch.Tensor, normalized_ndim: int,
                         groups: int, centered: bool, input_stats: bool, need_dx: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = E.compute_dtype(x.dtype)
    nd = normalized_ndim
    _, npar = P.counts(x, nd, groups)
    if nd:
        shape = _rows_shape(x, nd)
        dhv = None if dh is None else dh.to(x.dtype).contiguous().view(shape)
        dx, dw, db = R.rows_backward(dy.contiguous().view(shape),
                                     x.contiguous().view(shape), _flat(weight), stats[0],
                                     stats[1], centered, dhv, need_dx=need_dx)
        dx = _like(dx.view(x.shape), x, nd, centered) if need_dx else x.new_empty(0)
    else:
        xd = P.dense(x, False)
        g = _as_layout(dy, xd)
        if groups:
            n = x.shape[0]
            dx, dw, db = C.group_backward(g, xd, _flat(weight), stats[0].view(n, groups),
                                          stats[1].view(n, groups), groups, need_dx=need_dx)
        else:
            dx, dw, db = C.batch_backward(g, xd, _flat(weight), stats[0], stats[1], input_stats,
                                          need_dx=need_dx)
        dx = _like(dx, x, nd, centered) if need_dx else x.new_empty(0)
    return dx, dw.reshape(npar).to(acc), db.reshape(npar).to(acc)


@triton_norm_backward.register_fake
def _(dy, dh, x, weight, stats, normalized_ndim, groups, centered, input_stats, need_dx):
    npar, acc = P.counts(x, normalized_ndim, groups)[1], E.compute_dtype(x.dtype)
    dx = P.output_for(x, normalized_ndim, centered) if need_dx else x.new_empty(0)
    return dx, x.new_empty(npar, dtype=acc), x.new_empty(npar, dtype=acc)


@torch.library.custom_op("normlab::triton_add_norm", mutates_args=())
def triton_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], normalized_ndim: int, centered: bool, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, stats) with h = x + residual (rounded to x's dtype) and y = norm(h), one pass."""
    shape = _rows_shape(x, normalized_ndim)
    y, h, mu, rstd = R.rows_forward(x.contiguous().view(shape), _flat(weight), _flat(bias), eps,
                                    centered, residual.contiguous().view(shape))
    return (y.view(x.shape), h.view(x.shape),
            _stats(mu, rstd, None, eps, E.compute_dtype(x.dtype)))


@triton_add_norm.register_fake
def _(x, residual, weight, bias, normalized_ndim, centered, eps):
    return (x.new_empty(x.shape), x.new_empty(x.shape),
            x.new_empty((3, _rows_shape(x, normalized_ndim)[0]), dtype=E.compute_dtype(x.dtype)))


def _given(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of a forward's stats (3, S)."""
    return stats[0], stats[2]


OPS = Ops(triton_norm, triton_norm_backward, triton_add_norm, _given)
BACKEND = FusedBackend(
    "triton", OPS, runs=_runs,
    fuses_add=lambda x, r: r.device == x.device and r.dtype == x.dtype, batch_stats=_given)
