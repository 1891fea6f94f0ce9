"""LayerNorm2d: channels-first Layer Normalization (ConvNeXt)."""
from __future__ import annotations

import torch

from ... import functional as F
from ..normalization import LayerNorm
from ._common import ANY, channels_first, same_layout


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
        channels_first("LayerNorm2d", input, self.normalized_shape[0], ANY, "(N, C, *)")
        y = F.layer_norm(input.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return same_layout(y.movedim(-1, 1), input)
