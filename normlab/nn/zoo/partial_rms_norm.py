"""Partial RMSNorm: PartialRMSNorm, pRMSNorm (Zhang & Sennrich, 2019)."""
from __future__ import annotations

import math

import torch

from ... import _checks, _engine
from ... import functional as F
from ..._errors import ArgumentError
from ..normalization import RMSNorm


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
