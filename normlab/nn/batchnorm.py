"""BatchNorm1d/2d/3d: torch's classes with the forward computed by normlab."""
from __future__ import annotations

import torch

from .. import functional as F
from ._script import Scriptable

_SHAPES = {1: ("(N, C) or (N, C, L)", "N, L"), 2: ("(N, C, H, W)", "N, H, W"),
           3: ("(N, C, D, H, W)", "N, D, H, W")}


class _BatchNormForward:
    """torch's ``_BatchNorm.forward``, line for line, calling :func:`normlab.functional.batch_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # The buffers are passed only when they are used or to be updated.
        pass_buffers = not self.training or self.track_running_stats
        if torch.jit.is_scripting():  # torch.jit.script compiles torch's function (_script.py)
            return torch.nn.functional.batch_norm(
                input, self.running_mean if pass_buffers else None,
                self.running_var if pass_buffers else None, self.weight, self.bias,
                use_batch_stats, factor, self.eps)
        return F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


def _doc(dim: int) -> str:
    shape, axes = _SHAPES[dim]
    return rf"""Batch Normalization over a {shape} input (Ioffe & Szegedy, 2015), a drop-in for
    :class:`torch.nn.BatchNorm{dim}d` (a subclass: same arguments, buffers, state_dict keys).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \cdot \gamma + \beta

    Statistics per channel, reduced over ({axes}). In training the batch statistics (biased
    variance) normalize and the running statistics are updated with the *unbiased* variance:
    ``running = (1 - momentum) * running + momentum * batch`` (torch's convention: momentum
    weights the new value); ``momentum=None`` gives the cumulative average over the
    ``num_batches_tracked`` batches seen. In eval the running statistics normalize (batch
    statistics if ``track_running_stats=False``).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch statistic, or None. Default: 0.1.
        affine: learn a per-channel scale :math:`\gamma` (and shift :math:`\beta`). Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        bias: with ``affine``, learn :math:`\beta` too. Default: True.

    Shape: input {shape}, output the same.
    """


class BatchNorm1d(Scriptable, _BatchNormForward, torch.nn.BatchNorm1d):
    __doc__ = _doc(1) + """
    >>> m = BatchNorm1d(3)
    >>> m(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])).detach()
    tensor([[-1.2247, -1.2247, -1.2247],
            [ 0.0000,  0.0000,  0.0000],
            [ 1.2247,  1.2247,  1.2247]])
    >>> m.running_mean, m.running_var
    (tensor([0.4000, 0.5000, 0.6000]), tensor([1.8000, 1.8000, 1.8000]))
    """


class BatchNorm2d(Scriptable, _BatchNormForward, torch.nn.BatchNorm2d):
    __doc__ = _doc(2)


class BatchNorm3d(Scriptable, _BatchNormForward, torch.nn.BatchNorm3d):
    __doc__ = _doc(3)
