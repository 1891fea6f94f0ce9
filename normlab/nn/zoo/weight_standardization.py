"""Weight Standardization: WSConv2d (Qiao et al., 2019)."""
from __future__ import annotations

import math

import torch

from ... import functional as F
from ..._errors import ArgumentError
from .._script import Scriptable


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
