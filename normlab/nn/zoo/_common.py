"""What the zoo's modules share: the check of a channels-first input, the output in the
input's memory format, a per-channel parameter viewed to broadcast, an integer argument check."""
from __future__ import annotations

import torch

from ... import _checks
from ..._errors import ArgumentError, ShapeError


def channels_first(fn: str, x, num_features: int, ranks: tuple[int, ...], layout: str,
                   name: str = "input") -> None:
    """``x`` is a floating ``(N, C, *)`` tensor of an accepted rank with ``num_features``
    channels in dim 1."""
    _checks.floating_tensor(fn, x, name)
    if x.dim() not in ranks:
        ranks_text = (" or ".join(f"{r}-D" for r in ranks) if len(ranks) < 4
                      else f"{ranks[0]}-D or more")
        raise ShapeError(
            f"{fn}: expected a {ranks_text} {name} of shape {layout}, got a {x.dim()}-D {name} "
            f"of shape {tuple(x.shape)}"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ShapeError(
            f"{fn}: expected {num_features} channels in dim 1 of the {name} (layout {layout}), "
            f"got {name} of shape {tuple(x.shape)} with {x.shape[1]}; check num_features, or "
            "that the tensor is channels-first (permute an (N, H, W, C) tensor with "
            "x.permute(0, 3, 1, 2))"
        )


ANY = tuple(range(2, 17))  # (N, C, *): any rank from 2


def same_layout(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` in ``like``'s memory format (contiguous, channels_last or channels_last_3d)."""
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        try:
            if like.is_contiguous(memory_format=fmt):
                return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)
        except RuntimeError:  # channels_last for a tensor that is not 4-D (or 5-D)
            continue
    return y


def positive_int(fn: str, name: str, value, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return value


def per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(C,)`` parameter viewed to broadcast against an ``(N, C, *)`` tensor of ``ndim`` dims."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))
