r"""Input standardization: per-channel statistics of a dataset in one streaming pass, and the
transforms built from them.

:func:`channel_stats` reads every batch once. For each batch :math:`b` it computes, per channel
and in float64, the count :math:`n_b`, the mean :math:`\bar x_b` and the sum of squared
deviations :math:`M_b = \sum_i (x_i - \bar x_b)^2` (two passes over the batch, which is in
memory), and merges them into the running totals with the parallel formula of Chan, Golub &
LeVeque (1979):

.. math::

    n = n_a + n_b, \qquad \delta = \bar x_b - \bar x_a, \qquad
    \bar x = \bar x_a + \delta\,\frac{n_b}{n}, \qquad
    M = M_a + M_b + \delta^2\,\frac{n_a\,n_b}{n}.

The standard deviation is the *population* one, :math:`\sqrt{M / n}` (what normalization layers
use), or :math:`\sqrt{M / (n - 1)}` with ``unbiased=True``. Nothing is ever computed as
:math:`E[x^2] - E[x]^2`, so data such as :math:`10^6 + N(0, 1)` keeps its digits.

>>> import torch
>>> stats = channel_stats([torch.zeros(2, 3, 4), torch.ones(1, 3, 4)])
>>> stats.mean.tolist(), stats.count
([0.3333333333333333, 0.3333333333333333, 0.3333333333333333], 12)
>>> stats.std[0].item() ** 2  # population variance: 2/9
0.2222222222222222
>>> Standardize(stats, dim=1)(torch.ones(1, 3, 4))[0, :, 0]  # (1 - 1/3) / sqrt(2/9)
tensor([1.4142, 1.4142, 1.4142])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of a dataset (float64 tensors of shape ``(C,)``).

    Attributes:
        mean, std, min, max: per channel; ``std`` is the population standard deviation unless
            ``unbiased``.
        count: number of values per channel.
        unbiased: whether ``std`` divides by ``count - 1``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    count: int
    unbiased: bool = False

    @property
    def channels(self) -> int:
        return self.mean.numel()


def channel_stats(data: Any, dim: int = 1, batch_size: int = 256,
                  unbiased: bool = False) -> ChannelStats:
    """Per-channel mean, std, min and max of ``data`` in one streaming pass (see the module).

    Args:
        data: one tensor or array (read in chunks of ``batch_size`` along axis 0), or an
            iterable of them: a list, a generator, a ``DataLoader`` yielding tensors or
            ``(x, y, ...)`` tuples (the first item is used). Integer and bool data are
            converted to float64; NaNs propagate.
        dim: the channel axis of each batch (default 1: ``(N, C, ...)``; 0 for ``(C, H, W)``
            samples of a ``Dataset``).
        batch_size: chunk size when ``data`` is one tensor or array.
        unbiased: divide by ``count - 1`` instead of ``count`` for ``std``.

    Raises:
        ValueError: no data; a batch without axis ``dim``; the channel count changing between
            batches. TypeError: a batch that is not numeric.
    """
    n = 0
    mean = m2 = lo = hi = None
    for i, batch in enumerate(_batches(data, dim, batch_size)):
        x = _as_channel_rows(batch, dim, i)
        if x.shape[1] == 0:
            continue
        if mean is not None and x.shape[0] != mean.numel():
            raise ValueError(f"batch {i} has {x.shape[0]} channels along dim={dim}; the batches "
                             f"before it had {mean.numel()}")
        nb = x.shape[1]
        mb = x.mean(1)
        m2b = (x - mb[:, None]).square().sum(1)
        lob, hib = x.amin(1), x.amax(1)
        if mean is None:
            n, mean, m2, lo, hi = nb, mb, m2b, lob, hib
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta.square() * (n * nb / total)
        lo, hi, n = torch.minimum(lo, lob), torch.maximum(hi, hib), total
    if mean is None:
        raise ValueError("channel_stats got no data: no batches, or only empty ones")
    std = (m2 / (n - 1 if unbiased and n > 1 else n)).sqrt()
    cpu = lambda t: t.cpu()
    return ChannelStats(cpu(mean), cpu(std), cpu(lo), cpu(hi), int(n), unbiased)


def _batches(data: Any, dim: int, batch_size: int) -> Iterable[Any]:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if data.ndim == 0 or dim % data.ndim == 0:  # chunking axis 0 would split the channels
            yield data
            return
        for start in range(0, max(len(data), 1), batch_size):
            yield data[start:start + batch_size]
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"channel_stats needs a tensor, an array or an iterable of them, "
                        f"got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch and \
                isinstance(batch[0], (torch.Tensor, np.ndarray)):
            batch = batch[0]  # (x, y) from a DataLoader
        yield batch


def _as_channel_rows(batch: Any, dim: int, i: int) -> torch.Tensor:
    """A batch as float64 ``(C, values)``."""
    try:
        x = torch.as_tensor(batch)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"batch {i} is not a tensor or an array of numbers "
                        f"({type(batch).__name__}): {e}") from None
    if x.is_complex():
        raise TypeError(f"batch {i} is complex ({x.dtype}); channel_stats needs real data")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"batch {i} of shape {tuple(x.shape)} has no channel axis dim={dim}")
    x = x.detach().to(torch.float64).movedim(dim, 0)
    return x.reshape(x.shape[0], -1)


class _ChannelTransform:
    """Shared plumbing: ``(x - offset) * scale + base`` per channel along axis ``dim`` (the
    offset first, so inputs far from zero keep their digits)."""

    def __init__(self, stats: ChannelStats, offset: torch.Tensor, scale: torch.Tensor,
                 base: float, dim: int):
        self.stats, self.offset, self.scale, self.base, self.dim = stats, offset, scale, base, dim

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x)
        if not -x.ndim <= self.dim < x.ndim:
            raise ValueError(f"{type(self).__name__}: an input of shape {tuple(x.shape)} has no "
                             f"channel axis dim={self.dim}")
        d = self.dim % x.ndim
        if x.shape[d] != self.stats.channels:
            raise ValueError(f"{type(self).__name__} was built for {self.stats.channels} "
                             f"channels; the input of shape {tuple(x.shape)} has {x.shape[d]} "
                             f"along dim={self.dim}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        shape = (-1,) + (1,) * (x.ndim - d - 1)
        offset = self.offset.to(x.device, dtype).reshape(shape)
        scale = self.scale.to(x.device, dtype).reshape(shape)
        y = (x.to(dtype) - offset) * scale
        return y + self.base if self.base else y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.stats.channels}, dim={self.dim})"


class Standardize(_ChannelTransform):
    """``(x - mean) / std`` per channel: zero mean and unit variance on the data the statistics
    came from. A channel with ``std == 0`` is only centered (divided by 1).

    ``dim`` is the channel axis of the tensors it is applied to; the default -3 is
    ``(..., C, H, W)``, like torchvision's ``Normalize``: a ``(C, H, W)`` image or an
    ``(N, C, H, W)`` batch. Floating inputs keep their dtype, others become float32.
    """

    def __init__(self, stats: ChannelStats, dim: int = -3):
        std = torch.where(stats.std > 0, stats.std, torch.ones_like(stats.std))
        super().__init__(stats, stats.mean, 1 / std, 0.0, dim)


class MinMaxScale(_ChannelTransform):
    """``low + (x - min) * (high - low) / (max - min)`` per channel: the data's range onto
    ``[low, high]``. A constant channel (``max == min``) is shifted to ``low``. ``dim`` as in
    :class:`Standardize`."""

    def __init__(self, stats: ChannelStats, low: float = 0.0, high: float = 1.0, dim: int = -3):
        span = stats.max - stats.min
        scale = (high - low) / torch.where(span > 0, span, torch.ones_like(span))
        super().__init__(stats, stats.min, scale, float(low), dim)
