r"""SyncBatchNorm: BatchNorm with the statistics of the global batch, over gloo (CPU) or nccl."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _checks, _engine
from .._errors import ShapeError
from .batchnorm import _BatchNormForward
from ._script import Scriptable

_NAME = "SyncBatchNorm"


class SyncBatchNorm(Scriptable, _BatchNormForward, _BatchNorm):
    r"""Batch Normalization (Ioffe & Szegedy, 2015) over the *global* batch of all processes of
    a group, a drop-in for :class:`torch.nn.SyncBatchNorm` that also runs on CPU over gloo.

    In training each process normalizes its ``(N_r, C, *)`` slice with the statistics of the
    concatenation of every rank's batch, so the forward output, the running statistics and the
    input gradient are exactly those of a BatchNorm on the concatenated batch. Per channel, each
    rank computes its count :math:`n_r`, mean :math:`\mu_r` and sum of squared deviations
    :math:`M_r = \sum (x - \mu_r)^2` (two-pass, :func:`normlab._engine.moments`); one
    ``all_gather`` exchanges them, and every rank merges them with Chan, Golub & LeVeque's
    (1979) parallel formula, never :math:`E[x^2] - E[x]^2`:

    .. math::

        n = \sum_r n_r, \qquad \mu = \frac{1}{n}\sum_r n_r \mu_r, \qquad
        \sigma^2 = \frac{1}{n}\Bigl(\sum_r M_r + \sum_r n_r (\mu_r - \mu)^2\Bigr), \qquad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    (the pairwise :math:`M = M_a + M_b + \delta^2 n_a n_b / n` applied to all ranks at once).
    The running statistics are updated with :math:`\mu` and the global *unbiased* variance
    :math:`\frac{n}{n-1}\sigma^2`: ``running = (1 - momentum) * running + momentum * batch``;
    ``momentum=None`` gives the cumulative average over ``num_batches_tracked``. Backward, with
    :math:`g = \partial L/\partial y`, :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` and
    :math:`\langle\cdot\rangle` the mean over the global batch (one ``all_reduce`` of the packed
    per-channel sums :math:`\sum g` and :math:`\sum g\hat x`):

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
            \bigl(g - \langle g\rangle - \hat x\,\langle g\hat x\rangle\bigr), \qquad
        \frac{\partial L}{\partial \gamma} = \sum_{\text{local}} g\hat x, \qquad
        \frac{\partial L}{\partial \beta} = \sum_{\text{local}} g

    The parameter gradients are each rank's *local* contributions, as in torch: their sum over
    ranks is the global BatchNorm's (:class:`~torch.nn.parallel.DistributedDataParallel`
    all-reduces them). Statistics are float32 (float64 for float64 inputs); the output has the
    input's dtype and memory layout (channels_last too).

    Batches may differ in size across ranks, and a rank may hold an empty batch (``N = 0``): it
    still takes part in both collectives with count 0, returns an empty output and gets zero
    parameter gradients. Every rank must call forward and backward (the backward collective
    runs when the input needs a gradient: that must agree across ranks too). A global count of
    at most one value per channel raises ``ValueError`` on every rank (the same decision
    everywhere, no hang).

    No collective runs in eval mode, when :mod:`torch.distributed` is unavailable or not
    initialized, or when the group has one process: the layer is then exactly
    :class:`normlab.nn.BatchNorm2d` (for any ``(N, C, *)`` input), like torch's fallback.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch statistic, or None. Default: 0.1.
        affine: learn a per-channel scale :math:`\gamma` and shift :math:`\beta`. Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        process_group: the group whose batches are merged. Default: None, the whole world.
        bias: with ``affine``, learn :math:`\beta` too. Default: True.

    Shape: input ``(N, C, *)`` (at least 2-D, ``N`` may differ across ranks and be 0), output
    the same.

    Unlike torch's, it is a subclass of ``torch.nn.modules.batchnorm._BatchNorm`` but not of
    :class:`torch.nn.SyncBatchNorm` (arguments, ``process_group``, buffers, ``state_dict`` keys
    and ``extra_repr`` are the same): DistributedDataParallel refuses every
    ``torch.nn.SyncBatchNorm`` in a CPU model ("SyncBatchNorm layers only work with GPU
    modules"). Raises ``TypeError`` for a non-floating input, ``ValueError`` for a 1-D input or
    one whose dim 1 is not ``num_features`` (checked even without parameters or buffers: a
    mismatch across ranks would break the collectives).

    >>> m = SyncBatchNorm(3)          # no process group here: a plain BatchNorm
    >>> m(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])).detach()
    tensor([[-1.2247, -1.2247, -1.2247],
            [ 0.0000,  0.0000,  0.0000],
            [ 1.2247,  1.2247,  1.2247]])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _checks.floating_input(_NAME, input, 2, "(N, C, *)")
        if input.shape[1] == 0:
            raise ShapeError(f"{_NAME}: the number of input channels (dim 1) must be non-zero, "
                             f"got input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ShapeError(
                f"{_NAME}: expected {self.num_features} channels (dim 1) for num_features="
                f"{self.num_features}, got input of shape {tuple(input.shape)}"
            )

    def _sync_group(self):
        """The group to merge statistics over, or None when no collective is needed."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)  # normlab's BatchNorm, no collective
        self._check_input_dim(input)
        eps = float(self.eps)
        _checks.positive_eps_in_training(_NAME, eps)
        factor = 0.0 if self.momentum is None else _checks.momentum(_NAME, self.momentum)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return _sync_batch_norm(
            input, self.weight, self.bias,
            self.running_mean if tracked else None, self.running_var if tracked else None,
            eps, factor, group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every BatchNorm (torch's or normlab's ``_BatchNorm`` subclasses, SyncBatchNorm
        included) in ``module``'s tree by this class, as :meth:`torch.nn.SyncBatchNorm.
        convert_sync_batchnorm` does: the new layer *shares* the old one's parameters and
        buffers (same tensors, so ``requires_grad`` and an optimizer built before are kept) and
        its train/eval mode. A BatchNorm passed directly is returned as a new layer.
        A BatchNorm subclass that computes something else (its own ``forward``:
        :class:`normlab.nn.MaskedBatchNorm1d`, ``BatchRenorm``, ``GhostBatchNorm``) is left as
        it is, with a warning: it has no synchronized version and keeps per-rank statistics."""
        out = module
        if isinstance(module, _BatchNorm) and not _plain_batchnorm(module):
            warnings.warn(
                f"{_NAME}.convert_sync_batchnorm: {type(module).__name__} has no synchronized "
                "version; it is left as it is and keeps per-rank statistics", UserWarning,
                stacklevel=2,
            )
        elif isinstance(module, _BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


def _plain_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes BatchNorm itself: its ``forward`` is torch's, normlab's or a
    SyncBatchNorm's (subclasses that only change defaults or add methods count)."""
    return type(module).forward in (_BatchNorm.forward, _BatchNormForward.forward,
                                    torch.nn.SyncBatchNorm.forward, SyncBatchNorm.forward)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """``(world, *t.shape)``: every rank's ``t`` (list form: gloo has no all_gather_into_tensor)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def _sync_batch_norm(x, weight, bias, running_mean, running_var, eps, momentum, group):
    """Training-mode BatchNorm over the global batch: one all_gather of the per-rank moments in
    forward, merged by Chan's formula (class docstring); the engine normalizes, and its backward
    takes the global means of its sums through one all_reduce (when the input needs a gradient,
    as torch's: the same on every rank)."""
    red = _engine.batch_reduction(tuple(x.shape))
    acc = _engine.compute_dtype(x.dtype)
    channels = x.shape[1]
    local_count = x.numel() // channels
    # Rows: count, shift, delta, M2 (mean = shift + delta, the engine's split; see moments).
    local = torch.zeros(4, channels, dtype=acc, device=x.device)
    if local_count:
        with torch.no_grad():
            shift_r, delta_r, var_r = _engine.moments(x, red)
        local[0] = local_count
        local[1], local[2] = shift_r.reshape(channels), delta_r.reshape(channels)
        local[3] = var_r.reshape(channels) * local_count
    n_r, shift_r, delta_r, m2_r = _all_gather(local, group).unbind(1)  # each (world, C)
    count = int(n_r[:, 0].to(torch.int64).sum())  # exact: each rank's count is < 2**24
    _checks.more_than_one_value(_NAME, x, count, "value per channel",
                                across="all ranks of the process group")
    # Chan's merge. The mean is kept as shift + delta like the engine's: ``shift`` is the
    # rounded global mean, ``d_r = mu_r - shift`` is exact-ish (Sterbenz) and small, so
    # ``delta`` recovers what rounding ``shift`` lost (1e4 + N(0, 1) stays accurate in fp32).
    weights = n_r / count
    shift = (weights * (shift_r + delta_r)).sum(0)
    d_r = (shift_r - shift) + delta_r
    delta = (weights * d_r).sum(0)
    var = (m2_r.sum(0) + (n_r * (d_r - delta).square()).sum(0)) / count
    _engine.update_running_stats(running_mean, running_var, shift + delta, var, count, momentum)

    def global_means(sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums / count

    stats = red.stats_shape
    return _engine.normalize_sets(
        x, red, weight, bias, eps=eps, offsets=(shift.reshape(stats), delta.reshape(stats)),
        var=var.reshape(stats), set_means=global_means)
