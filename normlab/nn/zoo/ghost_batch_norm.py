"""Ghost Batch Normalization: GhostBatchNorm1d and GhostBatchNorm2d (Hoffer, Hubara & Soudry,
2017)."""
from __future__ import annotations

import torch

from ... import functional as F
from ..._errors import ShapeError
from ..batchnorm import BatchNorm1d, BatchNorm2d
from ._common import channels_first, positive_int


class _GhostBatchNorm:
    _LAYOUT = ""
    _RANKS: tuple[int, ...] = ()

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.virtual_batch_size = positive_int(
            type(self).__name__, "virtual_batch_size", virtual_batch_size, 2,
            "a virtual batch of one sample has no batch statistics (for per-sample statistics "
            "use InstanceNorm or GroupNorm)",
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = type(self).__name__
        channels_first(fn, input, self.num_features, self._RANKS, self._LAYOUT)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:  # eval: BatchNorm's eval with the running statistics
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        vbs, n = self.virtual_batch_size, input.shape[0]
        per_sample = input.numel() // max(1, n * input.shape[1]) if n else 0
        last = n % vbs
        if last * per_sample == 1:
            raise ShapeError(
                f"{fn}: the last virtual batch of the input of shape {tuple(input.shape)} holds "
                f"a single value per channel ({n} samples split into virtual batches of {vbs}), "
                "and the variance of one value is 0. Use a batch size that leaves a remainder "
                f"other than 1 (n % {vbs} != 1), drop the last incomplete batch "
                "(DataLoader(drop_last=True)), or another virtual_batch_size"
            )
        update = self.training and self.track_running_stats
        outs = []
        for chunk in input.split(vbs) if n else (input,):
            factor = 0.0 if self.momentum is None else self.momentum
            if update:  # one BatchNorm step per virtual batch
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
            outs.append(F.batch_norm(
                chunk, self.running_mean if update else None,
                self.running_var if update else None, self.weight, self.bias, True, factor,
                self.eps,
            ))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _ghost_doc(dim: int) -> str:
    layout, axes = {1: ("(N, C) or (N, C, L)", "B, L"), 2: ("(N, C, H, W)", "B, H, W")}[dim]
    return rf"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, "Train longer,
    generalize better: closing the generalization gap in large batch training of neural
    networks") over a {layout} input: BatchNorm whose training statistics come from small
    *virtual* batches, so large-batch training keeps small-batch regularization.

    In training the batch is split along N into consecutive virtual batches
    :math:`B_1, B_2, \ldots` of ``virtual_batch_size`` samples (``input.split(virtual_batch_size)``;
    **the last one holds the remaining** ``N % virtual_batch_size`` samples when N is not a
    multiple), and each is normalized with its own statistics, per channel over ({axes}):

    .. math::

        y = \frac{{x - \mu_{{B_l}}}}{{\sqrt{{\sigma^2_{{B_l}} + \epsilon}}}}\,\gamma + \beta
        \qquad (x \in B_l)

    The running statistics are updated **once per virtual batch, in order**, exactly as if
    each virtual batch were a separate :class:`BatchNorm{dim}d` call (the sequential
    exponential average of the paper's Algorithm 1): after :math:`k` virtual batches,
    :math:`\hat\mu \leftarrow (1-m)^k\hat\mu + \sum_l m(1-m)^{{k-l}}\mu_{{B_l}}`, each variance
    unbiased with its own count, and ``num_batches_tracked`` counts virtual batches (so
    ``momentum=None`` averages over all virtual batches seen). In eval it is BatchNorm's eval
    with the running statistics; with ``track_running_stats=False`` eval uses the virtual-batch
    statistics like training. ``virtual_batch_size >= N`` is exactly BatchNorm.

    Each virtual batch is one :func:`normlab.functional.batch_norm` call (fused kernels,
    backward included); the outputs are concatenated.

    A :class:`BatchNorm{dim}d` (and so a :class:`torch.nn.BatchNorm{dim}d`): same buffers and
    ``state_dict`` keys; BatchNorm checkpoints load with ``strict=True``.

    Args:
        num_features: C.
        virtual_batch_size: samples per virtual batch, an integer >= 2.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of each virtual batch's statistic in the running update, or None.
            Default: 0.1 (torch's). Note that one forward makes ``ceil(N / virtual_batch_size)``
            updates.
        affine: learn a per-channel :math:`\gamma` (ones) and :math:`\beta` (zeros).
            Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        bias: with ``affine``, learn :math:`\beta` too (keyword, as in torch). Default: True.

    Shape: input {layout}, output the same shape, dtype and memory format.
    """


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    _LAYOUT, _RANKS = "(N, C) or (N, C, L)", (2, 3)
    __doc__ = _ghost_doc(1) + """
    >>> m = GhostBatchNorm1d(1, virtual_batch_size=2)
    >>> m(torch.tensor([[1.], [3.], [10.], [20.]])).flatten().detach()  # (1, 3) and (10, 20)
    tensor([-1.0000,  1.0000, -1.0000,  1.0000])
    >>> m.num_batches_tracked
    tensor(2)
    """


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    _LAYOUT, _RANKS = "(N, C, H, W)", (4,)
    __doc__ = _ghost_doc(2) + """
    >>> m = GhostBatchNorm2d(4, virtual_batch_size=32)
    >>> m(torch.randn(100, 4, 3, 3)).shape             # virtual batches of 32, 32, 32 and 4
    torch.Size([100, 4, 3, 3])
    """
