"""LayerNorm, GroupNorm and RMSNorm: torch's classes with the forward computed by normlab; and
AddLayerNorm and AddRMSNorm, the same modules with the residual add fused in."""
from __future__ import annotations

import torch

from .. import _checks
from .. import functional as F
from ._script import Scriptable


class LayerNorm(Scriptable, torch.nn.LayerNorm):
    r"""Layer Normalization (Ba et al., 2016), a drop-in for :class:`torch.nn.LayerNorm`.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Statistics per leading index, reduced over the last ``len(normalized_shape)`` axes.

    Args:
        normalized_shape: trailing shape to normalize over (an int for the last axis).
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros) of shape
            ``normalized_shape``. Default: True.
        bias: with ``elementwise_affine``, learn :math:`\beta` too. Default: True.

    Shape: input ``(*, *normalized_shape)``, output the same.

    >>> LayerNorm(3)(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])).detach()
    tensor([[-1.2247,  0.0000,  1.2247],
            [-1.2247,  0.0000,  1.2247],
            [-1.2247,  0.0000,  1.2247]])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # torch.jit.script compiles torch's function (_script.py)
            return torch.nn.functional.layer_norm(input, self.normalized_shape, self.weight,
                                                  self.bias, self.eps)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(Scriptable, torch.nn.GroupNorm):
    r"""Group Normalization (Wu & He, 2018), a drop-in for :class:`torch.nn.GroupNorm`.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Statistics per (sample, group), reduced over the group's ``C / num_groups`` consecutive
    channels and all spatial axes; the affine parameters are per channel. ``num_groups=1`` is
    LayerNorm over ``(C, *)``, ``num_groups=C`` is InstanceNorm. No running statistics: train
    and eval compute the same thing.

    Args:
        num_groups: number of groups G; must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance. Default: 1e-5.
        affine: learn a per-channel scale (ones) and shift (zeros). Default: True.
        bias: with ``affine``, learn the shift too. Default: True.

    Shape: input ``(N, C, *)``, output the same.

    >>> x = torch.arange(32.).reshape(2, 4, 2, 2)
    >>> GroupNorm(2, 4)(x)[0, :2].flatten().detach()
    tensor([-1.5275, -1.0911, -0.6547, -0.2182,  0.2182,  0.6547,  1.0911,  1.5275])
    """

    def __init__(self, num_groups: int, num_channels: int, *args, **kwargs) -> None:
        _checks.groups("GroupNorm", num_groups, num_channels)
        super().__init__(num_groups, num_channels, *args, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # torch.jit.script compiles torch's function (_script.py)
            return torch.nn.functional.group_norm(input, self.num_groups, self.weight,
                                                  self.bias, self.eps)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(Scriptable, torch.nn.RMSNorm):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019), a drop-in for
    :class:`torch.nn.RMSNorm`.

    .. math::

        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    The mean square per leading index, reduced over the last ``len(normalized_shape)`` axes; no
    centering, no bias.

    Args:
        normalized_shape: trailing shape to normalize over (an int for the last axis).
        eps: added to the mean square. Default None: the machine epsilon of the compute dtype
            (float32's for float32/float16/bfloat16 inputs, float64's for float64).
        elementwise_affine: learn :math:`\gamma` (ones) of shape ``normalized_shape``.
            Default: True.

    Shape: input ``(*, *normalized_shape)``, output the same.

    >>> RMSNorm(3, eps=1e-8)(torch.tensor([[1., 2., 3.]])).detach()
    tensor([[0.4629, 0.9258, 1.3887]])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # torch.jit.script compiles torch's function (_script.py)
            return torch.nn.functional.rms_norm(input, self.normalized_shape, self.weight,
                                                self.eps)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(LayerNorm):
    r"""A residual add fused with Layer Normalization: ``forward(input, residual)`` returns
    ``(output, new_residual)``.

    .. math::

        h = x + r, \qquad
        y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}} \cdot \gamma + \beta

    Exactly ``h = input + residual; y = layer_norm(h)`` (see
    :func:`normlab.functional.add_layer_norm`). A :class:`LayerNorm` (and so a
    :class:`torch.nn.LayerNorm`) with the same arguments, parameters and ``state_dict`` keys:
    a LayerNorm checkpoint loads into it with ``strict=True``, and back.

    Args:
        normalized_shape: trailing shape to normalize over (an int for the last axis).
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros) of shape
            ``normalized_shape``. Default: True.
        bias: with ``elementwise_affine``, learn :math:`\beta` too. Default: True.

    Shape: ``input`` ``(*, *normalized_shape)`` and ``residual`` the same shape; both outputs
    have that shape and the promoted dtype of the two.

    >>> y, h = AddLayerNorm(3)(torch.tensor([[1., 1., 1.]]), torch.tensor([[0., 1., 2.]]))
    >>> y.detach(), h
    (tensor([[-1.2247,  0.0000,  1.2247]]), tensor([[1., 2., 3.]]))
    """

    # Already computes with normlab: normlab.patch must neither re-wrap it nor warn about it.

    def forward(
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return F.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps
        )


class AddRMSNorm(RMSNorm):
    r"""A residual add fused with RMSNorm: ``forward(input, residual)`` returns
    ``(output, new_residual)``.

    .. math::

        h = x + r, \qquad y = \frac{h}{\sqrt{\mathrm{E}[h^2] + \epsilon}} \cdot \gamma

    Exactly ``h = input + residual; y = rms_norm(h)`` (see
    :func:`normlab.functional.add_rms_norm`). An :class:`RMSNorm` (and so a
    :class:`torch.nn.RMSNorm`) with the same arguments, parameters and ``state_dict`` keys:
    an RMSNorm checkpoint loads into it with ``strict=True``, and back.

    Args:
        normalized_shape: trailing shape to normalize over (an int for the last axis).
        eps: added to the mean square. Default None: the machine epsilon of the compute dtype
            of ``h`` (float32's for float32/float16/bfloat16, float64's for float64).
        elementwise_affine: learn :math:`\gamma` (ones) of shape ``normalized_shape``.
            Default: True.

    Shape: ``input`` ``(*, *normalized_shape)`` and ``residual`` the same shape; both outputs
    have that shape and the promoted dtype of the two.

    >>> y, h = AddRMSNorm(3, eps=1e-8)(torch.tensor([[0.5, 1., 2.]]), torch.tensor([[0.5, 1., 1.]]))
    >>> y.detach(), h
    (tensor([[0.4629, 0.9258, 1.3887]]), tensor([[1., 2., 3.]]))
    """

    # Already computes with normlab: normlab.patch must neither re-wrap it nor warn about it.

    def forward(
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)
