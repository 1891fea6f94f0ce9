r"""The normalization zoo: layers from the literature beyond torch's five, on normlab's engine.

=======================  ===============================================  =====================
layer                    statistics                                       computed with
=======================  ===============================================  =====================
LayerNorm2d              per (n, *spatial) position, over C               ``layer_norm``
BatchRenorm1d/2d         per channel, over (N, *); corrected by r, d      ``batch_norm``
GhostBatchNorm1d/2d      per channel, over each virtual batch             ``batch_norm``
WSConv2d                 per output channel of the *weight*               ``layer_norm``
FilterResponseNorm2d     mean square per (n, c), over (H, W)              ``rms_norm``
TLU, DyT                 none (element-wise)                              torch
AdaIN                    per (n, c) of content and of style               ``instance_norm``
PartialRMSNorm           mean square of the first ceil(p d) elements      ``rms_norm`` / engine
=======================  ===============================================  =====================

Every module checks its input and says what to do about a mistake; statistics follow the
numerics policy of :mod:`normlab._engine` (at least float32, two-pass variance); outputs have the
input's dtype and, for channel-first layers, its memory format.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, _engine
from .. import functional as F
from .._errors import ArgumentError, ShapeError
from .batchnorm import BatchNorm1d, BatchNorm2d
from .normalization import LayerNorm, RMSNorm
from ._script import Scriptable

__all__ = [
    "LayerNorm2d", "BatchRenorm1d", "BatchRenorm2d", "GhostBatchNorm1d", "GhostBatchNorm2d",
    "WSConv2d", "FilterResponseNorm2d", "TLU", "DyT", "AdaIN", "adaptive_instance_norm",
    "PartialRMSNorm",
]


# --- shared helpers


def _channels_first(fn: str, x, num_features: int, ranks: tuple[int, ...], layout: str,
                    name: str = "input") -> None:
    """``x`` is a floating ``(N, C, *)`` tensor of an accepted rank with ``num_features``
    channels in dim 1."""
    _checks.floating_tensor(fn, x, name)
    if x.dim() not in ranks:
        ranks_text = (" or ".join(f"{r}-D" for r in ranks) if len(ranks) < 4
                      else f"{ranks[0]}-D or more")
        raise ShapeError(
            f"{fn}: expected a {ranks_text} {name} of shape {layout}, got a {x.dim()}-D {name} "
            f"of shape {tuple(x.shape)}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ShapeError(
            f"{fn}: expected {num_features} channels in dim 1 of the {name} (layout {layout}), "
            f"got {name} of shape {tuple(x.shape)} with {x.shape[1]}; check num_features, or "
            "that the tensor is channels-first (permute an (N, H, W, C) tensor with "
            "x.permute(0, 3, 1, 2))"
        )


_ANY = tuple(range(2, 17))  # (N, C, *): any rank from 2


def _same_layout(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` in ``like``'s memory format (contiguous, channels_last or channels_last_3d)."""
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            if like.is_contiguous(memory_format=fmt):
                return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
        except RuntimeError:  # channels_last for a tensor that is not 4-D (or 5-D)
            continue
    return y


def _positive_int(fn: str, name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return value


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(C,)`` parameter viewed to broadcast against an ``(N, C, *)`` tensor of ``ndim`` dims."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


# --- 1. LayerNorm2d


class LayerNorm2d(LayerNorm):
    r"""Channels-first Layer Normalization, as in ConvNeXt (Liu et al., 2022, "A ConvNet for
    the 2020s"): LayerNorm over the channels of each spatial position of an ``(N, C, H, W)``
    input, without permuting it yourself.

    .. math::

        \mu_{nhw} = \frac{1}{C}\sum_c x_{nchw}, \qquad
        \sigma^2_{nhw} = \frac{1}{C}\sum_c (x_{nchw} - \mu_{nhw})^2, \qquad
        y_{nchw} = \frac{x_{nchw} - \mu_{nhw}}{\sqrt{\sigma^2_{nhw} + \epsilon}}\,\gamma_c
                   + \beta_c

    One statistic per ``(n, h, w)``, reduced over ``C``: exactly ``LayerNorm(C)`` applied to
    ``x.permute(0, 2, 3, 1)`` and permuted back, and computed that way
    (:func:`normlab.functional.layer_norm` on the channels-last view), so it is fastest for
    ``channels_last`` inputs. A :class:`LayerNorm` with ``normalized_shape=(C,)``: same
    parameters and ``state_dict`` keys as timm's ``LayerNorm2d``.

    Args:
        num_channels: C.
        eps: added to the variance. Default: 1e-6 (ConvNeXt's).
        elementwise_affine: learn per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: True.
        bias: with ``elementwise_affine``, learn :math:`\beta` too. Default: True.

    Shape: input ``(N, C, H, W)``, or any ``(N, C, *)`` (statistics per ``(n, *)`` position);
    output the same shape, dtype and memory format (``channels_last`` stays ``channels_last``).

    >>> x = torch.tensor([[[[1.]], [[2.]], [[3.]]]])   # N=1, C=3, H=W=1
    >>> LayerNorm2d(3)(x).flatten().detach()
    tensor([-1.2247,  0.0000,  1.2247])
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _channels_first("LayerNorm2d", input, self.normalized_shape[0], _ANY, "(N, C, *)")
        y = F.layer_norm(input.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return _same_layout(y.movedim(-1, 1), input)


# --- 2. Batch Renormalization


class _BatchRenorm:
    _LAYOUT = ""
    _RANKS: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype,
                         bias=bias)
        self.r_max = r_max
        self.d_max = d_max

    @property
    def r_max(self) -> float:
        return self._r_max

    @r_max.setter
    def r_max(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ArgumentError(
                f"{type(self).__name__}: r_max must be a number >= 1 (r is clipped to "
                f"[1/r_max, r_max]; r_max=1 is BatchNorm), got {value!r}"
            )
        self._r_max = float(value)

    @property
    def d_max(self) -> float:
        return self._d_max

    @d_max.setter
    def d_max(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ArgumentError(
                f"{type(self).__name__}: d_max must be a number >= 0 (d is clipped to "
                f"[-d_max, d_max]; d_max=0 is BatchNorm), got {value!r}"
            )
        self._d_max = float(value)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = type(self).__name__
        _channels_first(fn, input, self.num_features, self._RANKS, self._LAYOUT)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        _checks.more_than_one_value(fn, input, input.numel() // input.shape[1],
                                    "value per channel")
        _checks.positive_eps_in_training(fn, self.eps)
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        with torch.no_grad():  # r and d are constants: no gradient flows through them
            shift, delta, var = _engine.moments(input, _engine.batch_reduction(tuple(input.shape)))
            acc = var.dtype
            mean_b, var_b = (shift + delta).reshape(-1), var.reshape(-1)
            sigma = (self.running_var.to(acc) + self.eps).sqrt()
            r = ((var_b + self.eps).sqrt() / sigma).clamp(1 / self.r_max, self.r_max)
            d = ((mean_b - self.running_mean.to(acc)) / sigma).clamp(-self.d_max, self.d_max)
        # gamma (x_hat r + d) + beta is BatchNorm with weight gamma r and bias gamma d + beta.
        if self.weight is None:
            weight, bias = r, d
        else:
            weight = self.weight * r.to(self.weight.dtype)
            bias = self.weight * d.to(self.weight.dtype)
            if self.bias is not None:
                bias = bias + self.bias
        # Normalizes with the batch statistics and then updates the running ones (r and d above
        # used the running statistics from before this batch, as in the paper).
        return F.batch_norm(input, self.running_mean, self.running_var, weight, bias, True,
                            factor, self.eps)


def _renorm_doc(dim: int) -> str:
    layout, axes = {1: ("(N, C) or (N, C, L)", "N, L"), 2: ("(N, C, H, W)", "N, H, W")}[dim]
    return rf"""Batch Renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing
    Minibatch Dependence in Batch-Normalized Models") over a {layout} input.

    In training, with the batch statistics :math:`\mu_B, \sigma_B^2` per channel (reduced over
    {axes}, biased variance) and the running ones :math:`\mu, \sigma^2`:

    .. math::

        \sigma_B = \sqrt{{\sigma_B^2 + \epsilon}}, \quad \sigma = \sqrt{{\sigma^2 + \epsilon}},
        \quad r = \mathrm{{clip}}_{{[1/r_{{max}},\, r_{{max}}]}}
                   \!\left(\frac{{\sigma_B}}{{\sigma}}\right),
        \quad d = \mathrm{{clip}}_{{[-d_{{max}},\, d_{{max}}]}}
                   \!\left(\frac{{\mu_B - \mu}}{{\sigma}}\right)

    .. math::

        y = \gamma\left(\frac{{x - \mu_B}}{{\sigma_B}}\,r + d\right) + \beta

    with :math:`r` and :math:`d` treated as constants (no gradient), computed from the running
    statistics *before* this batch updates them. In eval it is BatchNorm's eval,
    :math:`y = \gamma (x - \mu)/\sigma + \beta`; so training sees the output eval will give
    whenever the clipping is inactive. ``r_max=1, d_max=0`` is exactly BatchNorm.

    Computed as :func:`normlab.functional.batch_norm` with weight :math:`\gamma r` and bias
    :math:`\gamma d + \beta` (one fused pass), after the batch moments from
    :func:`normlab._engine.moments`.

    The running statistics are torch's: ``running = (1 - momentum) * running + momentum *
    batch``, the variance *unbiased* (the paper averages :math:`\sigma` itself; a running
    variance keeps the buffers of BatchNorm). A :class:`BatchNorm{dim}d` (and so a
    :class:`torch.nn.BatchNorm{dim}d`) with the same buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``) and ``state_dict`` keys: BatchNorm checkpoints
    load with ``strict=True``. Running statistics are always tracked.

    **Warm-up.** The paper trains with :math:`r_{{max}} = 1, d_{{max}} = 0` (plain BatchNorm)
    for the first 5k steps, then relaxes them gradually to :math:`r_{{max}} = 3` (at 40k steps)
    and :math:`d_{{max}} = 5` (at 25k steps). The defaults are those final values; a schedule
    is the user's, by setting the attributes between steps, e.g.
    ``m.r_max = min(3.0, 1 + 2 * max(0, step - 5000) / 35000)``. Without warm-up, the first
    batches are normalized towards the initial running statistics (mean 0, variance 1).

    Args:
        num_features: C.
        eps: added to the variances. Default: 1e-5.
        momentum: weight of the new batch statistic in the running update, or None for the
            cumulative average. Default: 0.01, the slow average the paper's method relies on
            (TensorFlow's ``renorm_momentum=0.99`` in its old-value convention) and
            torch implementations commonly use; torch's BatchNorm uses 0.1.
        affine: learn a per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: True.
        r_max: bound on the scale correction :math:`r`, >= 1. Default: 3.0.
        d_max: bound on the shift correction :math:`d`, >= 0. Default: 5.0.
        bias: with ``affine``, learn :math:`\beta` too (keyword, as in torch). Default: True.

    Shape: input {layout}, output the same shape, dtype and memory format.
    """


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    _LAYOUT, _RANKS = "(N, C) or (N, C, L)", (2, 3)
    __doc__ = _renorm_doc(1) + """
    >>> m = BatchRenorm1d(2, r_max=1.0, d_max=0.0)     # no correction: BatchNorm1d
    >>> m(torch.tensor([[1., 10.], [3., 20.]])).detach()
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    >>> m.running_mean
    tensor([0.0200, 0.1500])
    """


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    _LAYOUT, _RANKS = "(N, C, H, W)", (4,)
    __doc__ = _renorm_doc(2) + """
    >>> m = BatchRenorm2d(4)
    >>> m.r_max = 1.0                                # warm-up: start as BatchNorm
    >>> m(torch.randn(8, 4, 5, 5)).shape
    torch.Size([8, 4, 5, 5])
    """


# --- 3. Ghost Batch Normalization


class _GhostBatchNorm:
    _LAYOUT = ""
    _RANKS: tuple[int, ...] = ()

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.virtual_batch_size = _positive_int(
            type(self).__name__, "virtual_batch_size", virtual_batch_size, 2,
            "a virtual batch of one sample has no batch statistics (for per-sample statistics "
            "use InstanceNorm or GroupNorm)",
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = type(self).__name__
        _channels_first(fn, input, self.num_features, self._RANKS, self._LAYOUT)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:  # eval: BatchNorm's eval with the running statistics
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        vbs, n = self.virtual_batch_size, input.shape[0]
        per_sample = input.numel() // max(1, n * input.shape[1]) if n else 0
        last = n % vbs
        if last * per_sample == 1:
            raise ShapeError(
                f"{fn}: the last virtual batch of the input of shape {tuple(input.shape)} holds "
                f"a single value per channel ({n} samples split into virtual batches of {vbs}), "
                "and the variance of one value is 0. Use a batch size that leaves a remainder "
                f"other than 1 (n % {vbs} != 1), drop the last incomplete batch "
                "(DataLoader(drop_last=True)), or another virtual_batch_size"
            )
        update = self.training and self.track_running_stats
        outs = []
        for chunk in input.split(vbs) if n else (input,):
            factor = 0.0 if self.momentum is None else self.momentum
            if update:  # one BatchNorm step per virtual batch
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
            outs.append(F.batch_norm(
                chunk, self.running_mean if update else None,
                self.running_var if update else None, self.weight, self.bias, True, factor,
                self.eps,
            ))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _ghost_doc(dim: int) -> str:
    layout, axes = {1: ("(N, C) or (N, C, L)", "B, L"), 2: ("(N, C, H, W)", "B, H, W")}[dim]
    return rf"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, "Train longer,
    generalize better: closing the generalization gap in large batch training of neural
    networks") over a {layout} input: BatchNorm whose training statistics come from small
    *virtual* batches, so large-batch training keeps small-batch regularization.

    In training the batch is split along N into consecutive virtual batches
    :math:`B_1, B_2, \ldots` of ``virtual_batch_size`` samples (``input.split(virtual_batch_size)``;
    **the last one holds the remaining** ``N % virtual_batch_size`` samples when N is not a
    multiple), and each is normalized with its own statistics, per channel over ({axes}):

    .. math::

        y = \frac{{x - \mu_{{B_l}}}}{{\sqrt{{\sigma^2_{{B_l}} + \epsilon}}}}\,\gamma + \beta
        \qquad (x \in B_l)

    The running statistics are updated **once per virtual batch, in order**, exactly as if
    each virtual batch were a separate :class:`BatchNorm{dim}d` call (the sequential
    exponential average of the paper's Algorithm 1): after :math:`k` virtual batches,
    :math:`\hat\mu \leftarrow (1-m)^k\hat\mu + \sum_l m(1-m)^{{k-l}}\mu_{{B_l}}`, each variance
    unbiased with its own count, and ``num_batches_tracked`` counts virtual batches (so
    ``momentum=None`` averages over all virtual batches seen). In eval it is BatchNorm's eval
    with the running statistics; with ``track_running_stats=False`` eval uses the virtual-batch
    statistics like training. ``virtual_batch_size >= N`` is exactly BatchNorm.

    Each virtual batch is one :func:`normlab.functional.batch_norm` call (fused kernels,
    backward included); the outputs are concatenated.

    A :class:`BatchNorm{dim}d` (and so a :class:`torch.nn.BatchNorm{dim}d`): same buffers and
    ``state_dict`` keys; BatchNorm checkpoints load with ``strict=True``.

    Args:
        num_features: C.
        virtual_batch_size: samples per virtual batch, an integer >= 2.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of each virtual batch's statistic in the running update, or None.
            Default: 0.1 (torch's). Note that one forward makes ``ceil(N / virtual_batch_size)``
            updates.
        affine: learn a per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        bias: with ``affine``, learn :math:`\beta` too (keyword, as in torch). Default: True.

    Shape: input {layout}, output the same shape, dtype and memory format.
    """


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    _LAYOUT, _RANKS = "(N, C) or (N, C, L)", (2, 3)
    __doc__ = _ghost_doc(1) + """
    >>> m = GhostBatchNorm1d(1, virtual_batch_size=2)
    >>> m(torch.tensor([[1.], [3.], [10.], [20.]])).flatten().detach()  # (1, 3) and (10, 20)
    tensor([-1.0000,  1.0000, -1.0000,  1.0000])
    >>> m.num_batches_tracked
    tensor(2)
    """


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    _LAYOUT, _RANKS = "(N, C, H, W)", (4,)
    __doc__ = _ghost_doc(2) + """
    >>> m = GhostBatchNorm2d(4, virtual_batch_size=32)
    >>> m(torch.randn(100, 4, 3, 3)).shape             # virtual batches of 32, 32, 32 and 4
    torch.Size([100, 4, 3, 3])
    """


# --- 4. Weight Standardization


class WSConv2d(Scriptable, torch.nn.Conv2d):
    r"""A :class:`torch.nn.Conv2d` with Weight Standardization (Qiao, Wang, Liu, Shen & Yuille,
    2019, "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization").

    Each output channel's filter :math:`W_o` (its ``in_channels / groups * kh * kw`` weights)
    is standardized before the convolution:

    .. math::

        \mu_o = \frac{1}{I}\sum_i W_{oi}, \qquad
        \sigma^2_o = \frac{1}{I}\sum_i (W_{oi} - \mu_o)^2, \qquad
        \hat W_{oi} = \frac{W_{oi} - \mu_o}{\sqrt{\sigma^2_o + \epsilon}}, \qquad
        y = \hat W * x + b

    the paper's equation (biased variance, :math:`\epsilon` inside the root; the authors' code
    divides by the unbiased standard deviation plus 1e-5 instead). Mind the scale: under
    torch's default initialization a filter's variance is about :math:`1/(3I)` (6e-4 for
    :math:`I = 576`), so the standardized variance :math:`\sigma^2_o/(\sigma^2_o + \epsilon)`
    is 1 only up to :math:`\epsilon/\sigma^2_o`. The standardization is
    :func:`normlab.functional.layer_norm` over the rows of the ``(out_channels, I)`` weight
    matrix, so the gradient reaches ``weight`` through it. Parameters and ``state_dict`` are
    Conv2d's; :meth:`standardized_weight` gives :math:`\hat W`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode: as :class:`torch.nn.Conv2d`.
        eps: added to each filter's variance. Default: 1e-6 (timm's ``StdConv2d``).

    Shape: as :class:`torch.nn.Conv2d`: input ``(N, C_in, H, W)`` or ``(C_in, H, W)``.

    Raises ``ValueError`` when a filter has a single weight (``in_channels / groups * kh * kw
    == 1``): it would standardize to 0.

    >>> conv = WSConv2d(3, 8, 3, padding=1)
    >>> w = conv.standardized_weight().flatten(1)
    >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.var(1, unbiased=False) - 1).abs().max() < 1e-3)
    (True, True)
    >>> conv(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        fan_in = math.prod(self.weight.shape[1:])
        if fan_in < 2:
            raise ArgumentError(
                f"WSConv2d: each filter has {fan_in} weight (in_channels / groups * kh * kw = "
                f"{in_channels} / {groups} * {self.kernel_size[0]} * {self.kernel_size[1]}), and "
                "standardizing a single value gives 0; use a plain Conv2d for this layer"
            )
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"

    def standardized_weight(self) -> torch.Tensor:
        """:math:`\\hat W`: each output channel's filter with mean 0 and variance 1."""
        w = self.weight
        rows = w.reshape(w.shape[0], -1)
        return F.layer_norm(rows, (rows.shape[1],), None, None, self.eps).reshape(w.shape)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)


# --- 5. Filter Response Normalization and TLU


class FilterResponseNorm2d(Scriptable, torch.nn.Module):
    r"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan,
    2020, "Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of
    Deep Neural Networks") over an ``(N, C, H, W)`` input.

    .. math::

        \nu^2_{nc} = \frac{1}{HW}\sum_{h,w} x_{nchw}^2, \qquad
        \hat x = \frac{x}{\sqrt{\nu^2 + |\epsilon|}}, \qquad
        y = \gamma_c\,\hat x + \beta_c, \qquad
        z = \max(y, \tau_c)

    A mean square (not a variance: no centering) per ``(n, c)``, reduced over ``(H, W)``; no
    batch dependence, train and eval compute the same thing. The paper always follows FRN by
    TLU (the learned threshold :math:`\tau` replaces the ReLU and keeps the uncentered output
    from collapsing), so ``tlu=True`` (default) applies it here; ``tlu=False`` returns
    :math:`y`, for a :class:`TLU` or another activation of your own.

    :math:`\nu^2` comes from :func:`normlab.functional.rms_norm` over the ``(N, C, H*W)`` view;
    with ``learnable_eps`` (where :math:`\epsilon` needs a gradient) from
    :func:`normlab._engine.moments` with autograd. For ``1 x 1`` feature maps (or fully
    connected layers viewed as ``(N, C, 1, 1)``), :math:`\hat x \approx \mathrm{sign}(x)`
    unless :math:`\epsilon` is large: the paper learns it there (``learnable_eps=True``).

    Args:
        num_features: C.
        eps: :math:`\epsilon` (its absolute value is used). Default: 1e-6.
        learnable_eps: make :math:`\epsilon` a learned parameter ``eps`` of shape ``(1,)``,
            initialized to ``eps``. Default: False.
        tlu: apply the TLU :math:`\max(y, \tau)` with a learned per-channel ``tau`` (zeros).
            Default: True.

    Parameters ``weight`` (:math:`\gamma`, ones), ``bias`` (:math:`\beta`, zeros), ``tau``
    (zeros, with ``tlu``) and ``eps`` (with ``learnable_eps``), each of shape ``(C,)`` but eps.

    Shape: input ``(N, C, H, W)``, output the same shape, dtype and memory format.

    >>> frn = FilterResponseNorm2d(1, tlu=False)
    >>> frn(torch.tensor([[[[3., 4.], [0., 0.]]]])).detach()    # RMS = sqrt(25 / 4) = 2.5
    tensor([[[[1.2000, 1.6000],
              [0.0000, 0.0000]]]])
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False,
                 tlu: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.learnable_eps = bool(learnable_eps)
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))
        self.tau = torch.nn.Parameter(torch.zeros(num_features, **kw)) if tlu else None
        if self.learnable_eps:
            self.eps = torch.nn.Parameter(torch.full((1,), float(eps), **kw))
        else:
            self.eps = float(eps)

    def extra_repr(self) -> str:
        eps = float(self.eps) if self.learnable_eps else self.eps
        return (f"{self.num_features}, eps={eps}, learnable_eps={self.learnable_eps}, "
                f"tlu={self.tau is not None}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _channels_first("FilterResponseNorm2d", input, self.num_features, (4,), "(N, C, H, W)")
        n, c, h, w = input.shape
        if self.learnable_eps:
            red = _engine.Reduction((n, c, h * w), (2,), (1, c, 1), centered=False)
            _, _, nu2 = _engine.moments(input, red)  # differentiable: autograd
            acc = nu2.dtype
            xhat = input.reshape(red.view).to(acc) * torch.rsqrt(nu2 + self.eps.abs().to(acc))
            xhat = xhat.reshape(input.shape)
        else:
            acc = _engine.compute_dtype(input.dtype)
            xhat = F.rms_norm(input.flatten(2), (h * w,), None, abs(self.eps)).reshape(input.shape)
        y = xhat.to(acc) * _per_channel(self.weight, 4).to(acc) + _per_channel(self.bias, 4).to(acc)
        if self.tau is not None:
            y = torch.maximum(y, _per_channel(self.tau, 4).to(acc))
        return _same_layout(y.to(input.dtype), input)


class TLU(Scriptable, torch.nn.Module):
    r"""Thresholded Linear Unit (Singh & Krishnan, 2020): :math:`z = \max(x, \tau_c)` with a
    learned per-channel threshold :math:`\tau` (zeros, so it starts as a ReLU).

    The activation that goes with Filter Response Normalization (which applies it itself with
    ``tlu=True``); use it after ``FilterResponseNorm2d(..., tlu=False)`` or any other norm.

    Args:
        num_features: C.

    Shape: input ``(N, C, *)``, output the same.

    >>> TLU(2)(torch.tensor([[-1., 2.]])).detach()
    tensor([[0., 2.]])
    """

    def __init__(self, num_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.tau = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _channels_first("TLU", input, self.num_features, _ANY, "(N, C, *)")
        return torch.maximum(input, _per_channel(self.tau, input.dim()).to(input.dtype))


# --- 6. Dynamic Tanh


class DyT(Scriptable, torch.nn.Module):
    r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization"):
    a statistics-free replacement for LayerNorm in transformers.

    .. math::

        y = \gamma \odot \tanh(\alpha x) + \beta

    with a learned scalar :math:`\alpha` (``alpha``, initialized to ``alpha_init``) and a learned
    per-feature :math:`\gamma` (``weight``, ones) and :math:`\beta` (``bias``, zeros): the names
    of the authors' ``DynamicTanh``, so its checkpoints load. Computed in float32 (float64 for
    float64 inputs), returned in the input's dtype.

    Args:
        num_features: the number of features (C, or the last dimension).
        alpha_init: initial :math:`\alpha`. Default: 0.5 (the paper's for non-LLM models; it
            lowers it for large language models).
        channels_last: features on the last axis, ``(*, C)`` (transformers); False for
            ``(N, C, *)`` (convolutional feature maps). Default: True.

    Shape: input ``(*, C)`` (``channels_last``) or ``(N, C, *)``; output the same.

    >>> DyT(2)(torch.tensor([[0., 2.]])).detach()     # tanh(0.5 * x)
    tensor([[0.0000, 0.7616]])
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, channels_last: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.channels_last = bool(channels_last)
        self.alpha = torch.nn.Parameter(torch.full((1,), float(alpha_init), **kw))
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))

    def extra_repr(self) -> str:
        return f"{self.num_features}, channels_last={self.channels_last}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            _checks.floating_input("DyT", input, 1, "(*, C)")
            if input.shape[-1] != self.num_features:
                raise ShapeError(
                    f"DyT: expected {self.num_features} features in the last dimension (layout "
                    f"(*, C), channels_last=True), got input of shape {tuple(input.shape)}; "
                    "for channels-first (N, C, *) inputs use DyT(C, channels_last=False)"
                )
            w, b = self.weight, self.bias
        else:
            _channels_first("DyT", input, self.num_features, _ANY, "(N, C, *)")
            w, b = _per_channel(self.weight, input.dim()), _per_channel(self.bias, input.dim())
        acc = _engine.compute_dtype(input.dtype)
        y = torch.tanh(self.alpha.to(acc) * input.to(acc)) * w.to(acc) + b.to(acc)
        return y.to(input.dtype)


# --- 7. Adaptive Instance Normalization


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5, *,
                           unbiased: bool = False) -> torch.Tensor:
    r"""Adaptive Instance Normalization (Huang & Belongie, 2017, "Arbitrary Style Transfer in
    Real-time with Adaptive Instance Normalization"): the content's per-channel statistics
    replaced by the style's.

    .. math::

        \mathrm{AdaIN}(x, s) = \sigma(s)\,\frac{x - \mu(x)}{\sigma(x)} + \mu(s), \qquad
        \mu(x)_{nc} = \frac{1}{m}\sum_{i} x_{nci}, \qquad
        \sigma(x)_{nc} = \sqrt{\frac{1}{m}\sum_{i} (x_{nci} - \mu(x)_{nc})^2 + \epsilon}

    over the :math:`m` spatial positions :math:`i`, per ``(n, c)``: the paper's equations, the
    same (biased) estimator for content and style, so ``AdaIN(x, x) = x``. The content part is
    :func:`normlab.functional.instance_norm`; the style statistics come from
    :func:`normlab._engine.moments` and are differentiable (gradients reach ``style``).

    ``unbiased=True`` divides both variances by :math:`m - 1` instead (``var(unbiased) + eps``,
    then the square root), as the widely used PyTorch port (naoto0804/pytorch-AdaIN) does:
    use it to run decoders trained with that code. The authors' Torch code uses the biased
    standard deviation.

    Args:
        content: ``(N, C, *)`` floating tensor with more than one spatial element.
        style: ``(N, C, *')`` or ``(1, C, *')`` (one style for the whole batch), with more than
            one spatial element; its spatial size may differ from the content's.
        eps: added to both variances. Default: 1e-5.
        unbiased: use unbiased variances (see above). Default: False.

    Returns: a tensor of the content's shape, dtype and memory format.

    >>> content = torch.tensor([[[1., 2., 3.]]])       # mean 2
    >>> style = torch.tensor([[[10., 20., 30.]]])      # mean 20, 10 times the spread
    >>> adaptive_instance_norm(content, style, eps=0.).round(decimals=4)
    tensor([[[10., 20., 30.]]])
    """
    fn = "adaptive_instance_norm"
    _channels_first(fn, content, None, _ANY[1:], "(N, C, *)", "content")
    _channels_first(fn, style, content.shape[1], _ANY[1:], "(N, C, *)", "style")
    if style.shape[0] not in (content.shape[0], 1):
        raise ShapeError(
            f"{fn}: style must have the content's batch size {content.shape[0]} or 1 (one style "
            f"for every content), got style of shape {tuple(style.shape)} for content of shape "
            f"{tuple(content.shape)}"
        )
    m_c, m_s = _checks.spatial_count(content), _checks.spatial_count(style)
    for name, x, m in (("content", content, m_c), ("style", style, m_s)):
        if m < 2:
            raise ShapeError(
                f"{fn}: {name} of shape {tuple(x.shape)} has {m} spatial element per channel; "
                "its standard deviation needs more than 1 (apply AdaIN to feature maps, not to "
                "pooled vectors)"
            )
    eps = float(eps)
    if unbiased:  # (x - mu) / sqrt(m/(m-1) var + eps) = sqrt(k) (x - mu) / sqrt(var + k eps)
        k = (m_c - 1) / m_c
        xhat = F.instance_norm(content, eps=eps * k) * math.sqrt(k)
    else:
        xhat = F.instance_norm(content, eps=eps)
    shift, delta, var = _engine.moments(style, _engine.instance_reduction(tuple(style.shape)))
    if unbiased:
        var = var * (m_s / (m_s - 1))
    stats = (style.shape[0], style.shape[1]) + (1,) * (content.dim() - 2)
    mean, std = (shift + delta).reshape(stats), (var + eps).sqrt().reshape(stats)
    y = xhat.to(mean.dtype) * std + mean
    return _same_layout(y.to(content.dtype), content)


class AdaIN(Scriptable, torch.nn.Module):
    r"""Adaptive Instance Normalization (Huang & Belongie, 2017) as a module:
    ``forward(content, style)`` is :func:`adaptive_instance_norm` (see there for the math).

    .. math::

        \mathrm{AdaIN}(x, s) = \sigma(s)\,\frac{x - \mu(x)}{\sigma(x)} + \mu(s)

    with per-``(n, c)`` means and standard deviations over the spatial axes, biased variances
    plus :math:`\epsilon` (``unbiased=True``: unbiased, as naoto0804/pytorch-AdaIN). No
    parameters.

    Args:
        eps: added to both variances. Default: 1e-5.
        unbiased: use unbiased variances. Default: False.

    Shape: content ``(N, C, *)``, style ``(N, C, *')`` or ``(1, C, *')``; output the content's.

    >>> AdaIN(eps=0.)(torch.tensor([[[1., 3.]]]), torch.tensor([[[0., 10.]]]))
    tensor([[[ 0., 10.]]])
    """

    def __init__(self, eps: float = 1e-5, unbiased: bool = False) -> None:
        super().__init__()
        self.eps = float(eps)
        self.unbiased = bool(unbiased)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, unbiased={self.unbiased}"

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return adaptive_instance_norm(content, style, self.eps, unbiased=self.unbiased)


# --- 8. Partial RMSNorm


class PartialRMSNorm(RMSNorm):
    r"""Partial RMSNorm, pRMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer
    Normalization"): RMSNorm whose root mean square is estimated from the first
    :math:`k = \lceil p\,d\rceil` of the :math:`d` normalized elements only, and applied to all.

    .. math::

        \overline{\mathrm{RMS}}(x) = \sqrt{\frac{1}{k}\sum_{i=1}^{k} x_i^2 + \epsilon}, \qquad
        y = \frac{x}{\overline{\mathrm{RMS}}(x)}\,\gamma

    per leading index, over the last ``len(normalized_shape)`` axes (flattened in row-major
    order: "first" means the first ``k`` of ``x.flatten(-len(normalized_shape))``). The gradient
    flows through the partial mean square (autograd on :func:`normlab._engine.moments`); when
    :math:`k = d` it is :class:`RMSNorm`, computed by :func:`normlab.functional.rms_norm`.
    An :class:`RMSNorm` (and a :class:`torch.nn.RMSNorm`): same ``weight`` and ``state_dict``.

    Args:
        normalized_shape: trailing shape to normalize over (an int for the last axis).
        p: fraction of the elements in the estimate, in (0, 1]. Default: 0.0625, the 6.25% the
            paper reports.
        eps: added to the mean square. Default None: the machine epsilon of the compute dtype,
            as :class:`RMSNorm`.
        elementwise_affine: learn :math:`\gamma` (ones) of shape ``normalized_shape``.
            Default: True.

    Shape: input ``(*, *normalized_shape)``, output the same.

    >>> m = PartialRMSNorm(4, p=0.5, eps=0.)         # RMS of (3, 4) only: sqrt(12.5)
    >>> m(torch.tensor([[3., 4., 100., -100.]])).detach()
    tensor([[  0.8485,   1.1314,  28.2843, -28.2843]])
    """

    def __init__(self, normalized_shape, p: float = 0.0625, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ArgumentError(
                f"PartialRMSNorm: p must be a fraction in (0, 1] (the share of the normalized "
                f"elements the RMS is estimated from; 1 is RMSNorm), got {p!r}"
            )
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.p = float(p)

    @property
    def partial_size(self) -> int:
        """k = ceil(p d), the number of leading elements the RMS is estimated from."""
        d = math.prod(self.normalized_shape)
        return max(1, min(d, math.ceil(round(self.p * d, 9))))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = "PartialRMSNorm"
        _checks.floating_input(fn, input, 1, "(*, *normalized_shape)")
        shape = _checks.normalized_shape(fn, input, self.normalized_shape)
        d, k = math.prod(shape), self.partial_size
        if k == d:
            return F.rms_norm(input, shape, self.weight, self.eps)
        flat = input.reshape(input.shape[: input.dim() - len(shape)] + (d,))
        part = flat[..., :k]
        _, _, ms = _engine.moments(part, _engine.row_reduction(tuple(part.shape), 1, False))
        acc = ms.dtype
        eps = torch.finfo(acc).eps if self.eps is None else float(self.eps)
        y = flat.to(acc) * torch.rsqrt(ms + eps)
        if self.weight is not None:
            y = y * self.weight.reshape(d).to(acc)
        return y.to(input.dtype).reshape(input.shape)
