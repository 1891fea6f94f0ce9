"""Adaptive Instance Normalization: adaptive_instance_norm and AdaIN (Huang & Belongie, 2017)."""
from __future__ import annotations

import math

import torch

from ... import _checks, _engine
from ... import functional as F
from ..._errors import ShapeError
from .._script import Scriptable
from ._common import ANY, channels_first, same_layout


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
    channels_first(fn, content, None, ANY[1:], "(N, C, *)", "content")
    channels_first(fn, style, content.shape[1], ANY[1:], "(N, C, *)", "style")
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
    return same_layout(y.to(content.dtype), content)


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
