"""What one fused-kernel call computes, read once from its input: the :class:`Plan` both fused
backends (``cpu``, ``triton``) work from, and the helpers they share.

A fused operator receives a norm as three numbers, not a name:

* ``normalized_ndim > 0``: a row norm, one statistic per leading index over the trailing
  ``normalized_ndim`` axes, parameters per element of those axes (LayerNorm, RMSNorm);
* ``normalized_ndim == 0`` and ``groups > 0``: one statistic per (sample, group of
  ``C / groups`` channels) over the group and the spatial axes, parameters per channel
  (GroupNorm; InstanceNorm in training is ``groups = C``);
* ``normalized_ndim == 0`` and ``groups == 0``: one statistic per channel over the batch and
  the spatial axes (BatchNorm), or given per-channel statistics (BatchNorm and InstanceNorm
  in evaluation);

and ``centered`` (False: RMSNorm's mean square). :func:`plan` turns them and the input into the
sizes and the kernels' view of it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _engine as E

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: the statistics dtype of each input dtype (:func:`normlab._engine.compute_dtype`, as a dict:
#: a lookup costs less than the call on every kernel call)
ACC = {dt: E.compute_dtype(dt) for dt in FLOATS}


class Plan(NamedTuple):
    """A fused call on a dense input (contiguous, or channels-last for the channel norms).

    ``layout`` and ``shape`` are the kernels' view of x: ``"rows"`` (M, D) for the row norms and
    GroupNorm/InstanceNorm on NCHW (a row per (sample, group) of C/G channel segments of
    ``seg`` elements each; ``seg = 0`` for per-element parameters), ``"nchw"`` (N, C, L) for
    BatchNorm, ``"nhwc"`` (P, R, C) for channels innermost (any channel norm on channels-last
    x, BatchNorm on (N, C) x), with ``cpg`` channels per statistic (1: per channel)."""

    normalized_ndim: int
    groups: int
    centered: bool
    sets: int  # number of statistics
    params: int  # elements of the weight (and bias)
    layout: str
    shape: tuple[int, ...]
    seg: int
    cpg: int

    @property
    def rows(self) -> bool:
        """A row norm (statistics over trailing axes, parameters per element)."""
        return self.normalized_ndim > 0

    @property
    def keeps_channels_last(self) -> bool:
        """Whether the output keeps a channels-last input's format (torch's BatchNorm,
        GroupNorm and RMSNorm do; LayerNorm does not; InstanceNorm reads a contiguous copy)."""
        return not self.rows or not self.centered


def counts(x: torch.Tensor, normalized_ndim: int, groups: int) -> tuple[int, int]:
    """``(statistics, parameter elements)`` of a call on x (no layout: fake tensors too)."""
    if normalized_ndim:
        d = math.prod(x.shape[x.dim() - normalized_ndim:])
        return (x.numel() // d if d else 0), d
    return (x.shape[0] * groups if groups else x.shape[1]), x.shape[1]


def plan(x: torch.Tensor, normalized_ndim: int, groups: int, centered: bool) -> Plan:
    """The :class:`Plan` of a call on x, which :func:`dense` gave."""
    if normalized_ndim:
        d = x.shape[-1] if normalized_ndim == 1 else math.prod(x.shape[x.dim() - normalized_ndim:])
        m = x.numel() // d if d else 0
        return Plan(normalized_ndim, 0, centered, m, d, "rows", (m, d), 0, 1)
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // (n * c) if n * c else 0
    sets = n * groups if groups else c
    if not x.is_contiguous() or (not groups and hw == 1):
        shape = (n, hw, c) if groups else (1, n * hw, c)
        return Plan(0, groups, centered, sets, c, "nhwc", shape, 0, c // groups if groups else 1)
    if groups:
        return Plan(0, groups, centered, sets, c, "rows", (n * groups, (c // groups) * hw), hw, 1)
    return Plan(0, 0, centered, sets, c, "nchw", (n, c, hw), 0, 1)


def channels_last(x: torch.Tensor) -> bool:
    """Channels innermost and dense: ``x.movedim(1, -1)`` is contiguous (and x is not). (For
    4-D x the same as torch's channels_last contiguity, a cheaper call.)"""
    if x.dim() == 4:
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def dense(x: torch.Tensor, rows: bool) -> torch.Tensor:
    """x itself when the kernels read its strides (contiguous, or channels-last for the channel
    norms), else a contiguous copy."""
    if x.is_contiguous() or (not rows and channels_last(x)):
        return x
    return x.contiguous()


def output_for(x: torch.Tensor, normalized_ndim: int, centered: bool) -> torch.Tensor:
    """An empty output (or dx) of a call on x, in torch's layout
    (:func:`~normlab._engine.output_like`)."""
    return E.output_like(x, not normalized_ndim or not centered)


def reduction(shape: tuple[int, ...], normalized_ndim: int, groups: int,
              centered: bool) -> E.Reduction:
    """The engine's :class:`~normlab._engine.Reduction` of the same call."""
    if normalized_ndim:
        return E.row_reduction(shape, normalized_ndim, centered=centered)
    if groups:
        return E.group_reduction(shape, groups)
    return E.batch_reduction(shape)
