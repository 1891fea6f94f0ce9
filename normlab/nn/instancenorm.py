"""InstanceNorm1d/2d/3d: torch's classes with the normalization computed by normlab."""
from __future__ import annotations

import torch

from .. import functional as F
from ._script import Scriptable

_SHAPES = {1: ("(N, C, L) or (C, L)", "L"), 2: ("(N, C, H, W) or (C, H, W)", "H, W"),
           3: ("(N, C, D, H, W) or (C, D, H, W)", "D, H, W")}


class _InstanceNormApply:
    """Overrides only torch's ``_apply_instance_norm``: torch's forward keeps its input checks
    and its handling of unbatched inputs."""

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # torch.jit.script compiles torch's function (_script.py)
            return torch.nn.functional.instance_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0, self.eps)
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


def _doc(dim: int) -> str:
    shape, axes = _SHAPES[dim]
    return rf"""Instance Normalization over a {shape} input (Ulyanov et al., 2016), a drop-in
    for :class:`torch.nn.InstanceNorm{dim}d` (a subclass: same arguments and defaults).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \cdot \gamma + \beta

    Statistics per (sample, channel), reduced over the spatial axes ({axes}). The same as
    ``GroupNorm(C, C)``. With ``track_running_stats=True`` the running statistics (the batch
    average of the instance statistics, variance unbiased) are kept in training and used in
    eval.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new statistic in the running update. Default: 0.1.
        affine: learn a per-channel scale and shift. Default: False.
        track_running_stats: keep running statistics for eval. Default: False.
        bias: with ``affine``, learn the shift too. Default: True.

    Shape: input {shape}, output the same.
    """


class InstanceNorm1d(Scriptable, _InstanceNormApply, torch.nn.InstanceNorm1d):
    __doc__ = _doc(1)


class InstanceNorm2d(Scriptable, _InstanceNormApply, torch.nn.InstanceNorm2d):
    __doc__ = _doc(2) + """
    >>> x = torch.arange(32.).reshape(2, 4, 2, 2)
    >>> InstanceNorm2d(4)(x)[0, 0]
    tensor([[-1.3416, -0.4472],
            [ 0.4472,  1.3416]])
    """


class InstanceNorm3d(Scriptable, _InstanceNormApply, torch.nn.InstanceNorm3d):
    __doc__ = _doc(3)
