"""Dynamic Tanh: DyT (Zhu, Chen, He, LeCun & Liu, 2025)."""
from __future__ import annotations

import torch

from ... import _checks, _engine
from ..._errors import ShapeError
from .._script import Scriptable
from ._common import ANY, channels_first, per_channel


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
            channels_first("DyT", input, self.num_features, ANY, "(N, C, *)")
            w, b = per_channel(self.weight, input.dim()), per_channel(self.bias, input.dim())
        acc = _engine.compute_dtype(input.dtype)
        y = torch.tanh(self.alpha.to(acc) * input.to(acc)) * w.to(acc) + b.to(acc)
        return y.to(input.dtype)
