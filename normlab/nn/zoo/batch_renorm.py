"""Batch Renormalization: BatchRenorm1d and BatchRenorm2d (Ioffe, 2017)."""
from __future__ import annotations

import torch

from ... import _checks, _engine
from ... import functional as F
from ..._errors import ArgumentError
from ..batchnorm import BatchNorm1d, BatchNorm2d
from ._common import channels_first


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
        channels_first(fn, input, self.num_features, self._RANKS, self._LAYOUT)
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
