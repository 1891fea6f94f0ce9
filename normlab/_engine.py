r"""The one statistics engine behind every normalization in normlab.

Every normalization is the same computation over a different set of elements. A
:class:`Reduction` says which elements share one mean and one variance, and which axes the
affine parameters vary along; the engine does the rest:

.. math::

    \mu = \frac{1}{m}\sum_{i \in S} x_i, \qquad
    \sigma^2 = \frac{1}{m}\sum_{i \in S} (x_i - \mu)^2, \qquad
    \hat x_i = (x_i - \mu)\,(\sigma^2 + \epsilon)^{-1/2}, \qquad
    y_i = \gamma\,\hat x_i + \beta

over each statistics set :math:`S` of :math:`m` elements. RMSNorm is the uncentered case
(:math:`\mu := 0`, so :math:`\sigma^2` is the mean square).

Numerics policy (one place for all norms):

* statistics accumulate in float32, or float64 for float64 inputs, whatever the input dtype,
  so float16 inputs whose squares overflow float16 still normalize correctly;
* the variance is computed in two passes, the second over :math:`x - \mu`, never as
  :math:`E[x^2] - E[x]^2` (which cancels catastrophically for inputs such as 1e4 + N(0, 1));
* the output has the input's dtype, shape and memory layout.

Backward (written out, not traced). With :math:`g = \gamma\,\partial L/\partial y` and means
:math:`\langle\cdot\rangle` taken over each statistics set,

.. math::

    \frac{\partial L}{\partial x} = \mathrm{rstd}\,\bigl(g - \langle g\rangle
        - \hat x\,\langle g\,\hat x\rangle\bigr)

(drop :math:`\langle g\rangle` for RMSNorm; when the statistics are given constants, as in
BatchNorm's eval mode, it is just :math:`\mathrm{rstd}\; g`), and
:math:`\partial L/\partial\gamma = \sum \partial L/\partial y\,\hat x`,
:math:`\partial L/\partial\beta = \sum \partial L/\partial y` over every axis the parameters do
not vary along. Only ``x``, ``weight``, ``rstd`` and the mean (as the forward's two centring
offsets) are saved. The backward is itself differentiable: under ``create_graph=True`` it
recomputes the statistics from ``x`` with autograd on, so second derivatives are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reduction:
    """Which elements of an input share statistics, in a view of the input.

    Attributes:
        view: shape the input is viewed as (GroupNorm splits C into (G, C/G); others keep it).
        dims: axes of ``view`` reduced for one statistic; the others index the statistics.
        affine: shape that ``weight`` and ``bias`` are viewed as, broadcasting against ``view``.
        centered: subtract the mean (every norm but RMSNorm).
        keeps_channels_last: the output keeps a channels_last input's format (see
            :func:`output_like`).
        averaged: the variance (mean square) is a mean over each set; False: a sum, so that
            ``rstd`` is the inverse L2 norm of the (centered) set (ScaleNorm).
        clamp_eps: ``rstd = 1 / max(sqrt(var), eps)`` instead of ``(var + eps)^{-1/2}``.
    """

    view: tuple[int, ...]
    dims: tuple[int, ...]
    affine: tuple[int, ...]
    centered: bool = True
    keeps_channels_last: bool = False
    averaged: bool = True
    clamp_eps: bool = False

    def rstd(self, var: torch.Tensor, eps: float) -> torch.Tensor:
        r""":math:`(\sigma^2 + \epsilon)^{-1/2}`, or :math:`1/\max(\sigma, \epsilon)` with
        ``clamp_eps``."""
        if self.clamp_eps:
            return var.sqrt().clamp_min(eps).reciprocal()
        return (var + eps).rsqrt()

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The variance's reduction of ``t`` over each set: a mean, or a sum when not
        ``averaged``."""
        return t.mean(self.dims, keepdim=True) if self.averaged else t.sum(self.dims, keepdim=True)

    @property
    def count(self) -> int:
        """Number of elements that share one statistic (m above)."""
        return math.prod([self.view[d] for d in self.dims])  # a list: dynamo traces it

    @property
    def param_dims(self) -> tuple[int, ...]:
        """Axes the affine parameters are constant along: summed for their gradients."""
        return tuple(d for d, size in enumerate(self.affine) if size == 1)

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """Shape of mean and variance (``view`` with the reduced axes kept as size 1)."""
        return tuple(1 if d in self.dims else s for d, s in enumerate(self.view))


# --- the reductions of the five norms, for an input of shape (N, C, *spatial) or (*, *normalized)


def per_channel(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Affine shape for per-channel parameters of an (N, C, *spatial) input."""
    return (1, shape[1]) + (1,) * (len(shape) - 2)


def batch_reduction(shape: tuple[int, ...]) -> Reduction:
    """BatchNorm: one statistic per channel, over the batch and every spatial position."""
    return Reduction(tuple(shape), (0,) + tuple(range(2, len(shape))), per_channel(shape),
                     keeps_channels_last=True)


def instance_reduction(shape: tuple[int, ...]) -> Reduction:
    """InstanceNorm: one statistic per (sample, channel), over the spatial positions."""
    return Reduction(tuple(shape), tuple(range(2, len(shape))), per_channel(shape))


def group_reduction(shape: tuple[int, ...], groups: int) -> Reduction:
    """GroupNorm: one statistic per (sample, group), over the group's channels and positions."""
    n, c, *spatial = shape
    view = (n, groups, c // groups, *spatial)
    return Reduction(view, tuple(range(2, len(view))), (1, groups, c // groups) + (1,) * len(spatial),
                     keeps_channels_last=True)


def row_reduction(shape: tuple[int, ...], normalized_ndim: int, centered: bool = True) -> Reduction:
    """LayerNorm (centered) and RMSNorm (not): one statistic per leading index, over the
    trailing ``normalized_ndim`` axes, with parameters per element of those axes."""
    lead = len(shape) - normalized_ndim
    return Reduction(
        tuple(shape), tuple(range(lead, len(shape))), (1,) * lead + tuple(shape[lead:]), centered,
        keeps_channels_last=not centered,
    )


def output_like(x: torch.Tensor, keeps_channels_last: bool) -> torch.Tensor:
    """An empty output for a norm of ``x`` in torch's layout: contiguous, except that BatchNorm,
    GroupNorm and RMSNorm (``keeps_channels_last``) keep a ``channels_last`` (4-D) or
    ``channels_last_3d`` (5-D) input's format. (InstanceNorm and LayerNorm outputs are
    contiguous whatever the input's strides, as torch's; an empty input's strides are kept by
    the channels_last keepers, which cannot tell its format otherwise.) The backends allocate
    here."""
    if keeps_channels_last and not x.numel():
        return torch.empty_like(x)
    if keeps_channels_last and not x.is_contiguous():
        d = x.dim()
        fmt = torch.channels_last if d == 4 else torch.channels_last_3d if d == 5 else None
        if fmt is not None and x.is_contiguous(memory_format=fmt):
            return torch.empty_like(x, memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --- the engine


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype for an input dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_view(t: torch.Tensor, red: Reduction) -> torch.Tensor:
    """``t`` viewed as ``red.view``, in the compute dtype."""
    return t.reshape(red.view).to(compute_dtype(t.dtype))


def moments(
    x: torch.Tensor, red: Reduction
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Statistics of each set as ``(shift, delta, var)``, in the compute dtype, shaped
    :attr:`Reduction.stats_shape`; the mean is ``shift + delta``.

    The corrected two-pass algorithm (Chan, Golub & LeVeque, 1983): a first pass gives
    ``shift``, the rounded mean; ``x - shift`` is then exact (Sterbenz), and its mean ``delta``
    recovers what rounding lost. Normalizing with ``(x - shift) - delta`` keeps fp32 outputs
    accurate to ~1e-6 even for 1e5 + N(0, 1), where one fp32 mean is already off by 4e-3.
    Not centered (RMSNorm): ``(None, None, mean square)``.
    """
    xa = as_view(x, red)
    if not red.centered:
        return None, None, red.reduce(xa.square())
    shift = xa.mean(red.dims, keepdim=True)
    xc = xa - shift
    delta = xc.mean(red.dims, keepdim=True)
    return shift, delta, red.reduce((xc - delta).square())


def center(xa: torch.Tensor, *offsets: torch.Tensor) -> torch.Tensor:
    """``xa`` minus each offset in turn (``(x - shift) - delta``: see :func:`moments`)."""
    for offset in offsets:
        xa = xa - offset
    return xa


def param(p: torch.Tensor | None, red: Reduction, dtype: torch.dtype) -> torch.Tensor | None:
    """A parameter (or None) viewed as ``red.affine``, in ``dtype``."""
    return None if p is None else p.reshape(red.affine).to(dtype)


def _sum_over(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # t.sum(()) would sum over every axis: no axes means nothing to sum (unbatched LayerNorm).
    return t.sum(dims, keepdim=True) if dims else t


class _Normalize(torch.autograd.Function):
    """y = x_hat * weight + bias, with statistics from x (``input_stats``) or given constants.
    ``set_means`` (or None): the means over each statistics set in backward when the sets extend
    beyond x (see :func:`normalize_sets`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, red, eps, offsets, var, input_stats, set_means):
        acc = compute_dtype(x.dtype)
        rstd = red.rstd(var, eps)
        y = center(as_view(x, red), *offsets) * rstd
        w, b = param(weight, red, acc), param(bias, red, acc)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        ctx.red, ctx.input_stats, ctx.eps, ctx.set_means = red, input_stats, eps, set_means
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        # The centring offsets (shift, delta), not their rounded sum: backward keeps the
        # forward's accuracy at large means.
        ctx.save_for_backward(x, weight, rstd, *offsets)
        # A fresh tensor in x's dtype and layout, not a view of y: outputs of a custom Function
        # that are views cannot be modified in place (nn.ReLU(inplace=True) after a norm).
        out = output_like(x, red.keeps_channels_last)
        out.view(red.view).copy_(y)
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.set_means is not None:  # statistics of other processes: no second derivative
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy):
    x, weight, rstd, *offsets = ctx.saved_tensors
    red = ctx.red
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() and ctx.input_stats and ctx.set_means is None:
        # create_graph=True (double backward, gradient penalties): recompute the statistics
        # from x with autograd on, so this formula is differentiated through them too.
        shift, delta, var = moments(x, red)
        offsets = [] if shift is None else [shift, delta]
        rstd = red.rstd(var, ctx.eps)
    g = as_view(dy, red)
    xhat = center(as_view(x, red), *offsets) * rstd
    dx = dw = db = None
    if need_w:
        dw = _sum_over(g * xhat, red.param_dims).reshape(weight.shape).to(weight.dtype)
    if need_b:
        shape, dtype = ctx.bias_meta
        db = _sum_over(g, red.param_dims).reshape(shape).to(dtype)
    if need_x:
        w = param(weight, red, g.dtype)
        gw = g * w if w is not None else g
        if ctx.input_stats:  # the statistics depend on x: project out their directions
            if ctx.set_means is not None:
                sums = torch.stack([gw.sum(red.dims), (gw * xhat).sum(red.dims)])
                mean_g, inner = ctx.set_means(sums).reshape(2, *red.stats_shape).unbind(0)
            else:
                mean_g = gw.mean(red.dims, keepdim=True) if red.centered else None
                inner = red.reduce(gw * xhat)
            if red.clamp_eps:  # where max(sigma, eps) = eps, rstd does not depend on x
                inner = inner * (rstd * ctx.eps < 1)
            if red.centered:
                gw = gw - mean_g
            gw = gw - xhat * inner
        dx = (gw * rstd).to(x.dtype).reshape(x.shape)
    return dx, dw, db, None, None, None, None, None, None


_backward_once = torch.autograd.function.once_differentiable(_backward)


def normalize(
    x: torch.Tensor,
    red: Reduction,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalize ``x`` over ``red``; differentiable in ``x``, ``weight`` and ``bias``.

    With ``var=None`` the statistics are computed from ``x`` (training mode). Otherwise ``mean``
    (ignored when not centered) and ``var`` are constants broadcastable against ``red.view``,
    e.g. BatchNorm's running statistics in eval mode; they get no gradient.

    Returns ``(y, mean, var)``: the output and the statistics used, in the compute dtype
    (float32, or float64 for float64 input), shaped for broadcasting, detached.
    """
    acc = compute_dtype(x.dtype)
    input_stats = var is None
    with torch.no_grad():
        if input_stats:
            shift, delta, var = moments(x, red)
            offsets = () if shift is None else (shift, delta)  # subtracted in this order
            mean = None if shift is None else shift + delta
        else:
            var = var.detach().to(acc)
            mean = mean.detach().to(acc) if red.centered else None
            offsets = () if mean is None else (mean,)
    y = _Normalize.apply(x, weight, bias, red, float(eps), offsets, var, input_stats, None)
    return y, mean, var


def normalize_sets(
    x: torch.Tensor,
    red: Reduction,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    offsets: tuple[torch.Tensor, ...],
    var: torch.Tensor,
    set_means,
) -> torch.Tensor:
    r"""Normalize ``x`` by statistics of sets that extend beyond it (SyncBatchNorm: each
    channel's set is the batch of every process), with the backward of batch statistics.

    ``offsets`` (``(shift, delta)``, as :func:`moments` splits the mean) and ``var`` are the
    statistics of the whole sets, shaped ``red.stats_shape``. In backward,
    ``set_means(sums)`` receives this part's ``(2, *stats)`` sums
    :math:`(\sum \gamma g, \sum \gamma g\hat x)` and returns the means over the whole sets
    (an ``all_reduce`` and a division by the global count), which the formula of the module
    docstring subtracts. The result is differentiable once in ``x``, ``weight`` and ``bias``."""
    with torch.no_grad():
        var = var.detach()
    return _Normalize.apply(x, weight, bias, red, float(eps), tuple(offsets), var, True,
                            set_means)


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    r"""torch's running-statistics update, in place.

    .. math::

        \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu, \qquad
        \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\frac{n}{n - 1}\,\sigma^2

    ``momentum`` :math:`m` weights the *new* value and the running variance is *unbiased*
    (:math:`n` = ``count`` elements per statistic), as in torch; flax and keras weight the old
    value and keep the biased variance. ``mean`` and ``var`` hold one value per buffer entry
    (any shape of that many elements). Nothing happens for an empty batch (``count == 0``).
    """
    if count == 0:
        return
    if mean.requires_grad or var.requires_grad:
        with torch.no_grad():
            return update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                        count, momentum)
    # (each torch call costs microseconds: no-op reshapes and conversions are skipped, and
    # float32/float64 CPU buffers are updated together by _foreach ops, bitwise the same as
    # their per-tensor mul_ and add_ there; not for 16-bit buffers)
    bufs, new = [], []
    if running_mean is not None:
        bufs.append(running_mean)
        new.append(_like(mean, running_mean))
    if running_var is not None:
        bufs.append(running_var)
        new.append(_like(var * (count / (count - 1)) if count > 1 else var, running_var))
    if len(bufs) == 2 and all(b.device.type == "cpu" and b.dtype in (torch.float32, torch.float64)
                              for b in bufs):
        torch._foreach_mul_(bufs, 1 - momentum)
        torch._foreach_add_(bufs, new, alpha=momentum)
        return
    for buf, v in zip(bufs, new):
        buf.mul_(1 - momentum).add_(v, alpha=momentum)


def _like(t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """t with buf's shape and dtype (itself when it has them)."""
    if t.shape != buf.shape:
        t = t.reshape(buf.shape)
    return t if t.dtype == buf.dtype else t.to(buf.dtype)
