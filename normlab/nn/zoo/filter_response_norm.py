"""Filter Response Normalization and its Thresholded Linear Unit: FilterResponseNorm2d and TLU
(Singh & Krishnan, 2020)."""
from __future__ import annotations

import torch

from ... import _engine
from ... import functional as F
from .._script import Scriptable
from ._common import ANY, channels_first, per_channel, same_layout


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
        channels_first("FilterResponseNorm2d", input, self.num_features, (4,), "(N, C, H, W)")
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
        y = xhat.to(acc) * per_channel(self.weight, 4).to(acc) + per_channel(self.bias, 4).to(acc)
        if self.tau is not None:
            y = torch.maximum(y, per_channel(self.tau, 4).to(acc))
        return same_layout(y.to(input.dtype), input)


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
        channels_first("TLU", input, self.num_features, ANY, "(N, C, *)")
        return torch.maximum(input, per_channel(self.tau, input.dim()).to(input.dtype))
