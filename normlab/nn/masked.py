r"""BatchNorm over padded variable-length sequences: statistics from the real positions only."""
from __future__ import annotations

import torch

from .._errors import ArgumentError, DTypeError, ShapeError
from .batchnorm import BatchNorm1d


class MaskedBatchNorm1d(BatchNorm1d):
    r"""Batch Normalization over the real (unpadded) positions of a padded ``(N, C, L)`` batch.

    A :class:`BatchNorm1d` (and so a :class:`torch.nn.BatchNorm1d`: same arguments, buffers and
    ``state_dict`` keys) whose ``forward(input, mask)`` takes a bool ``mask`` of shape
    ``(N, L)``, True at a real token and False at padding. With :math:`m_{il}` the mask and
    :math:`n = \sum_{il} m_{il}` the number of real positions, per channel :math:`c`:

    .. math::

        \mu_c = \frac{1}{n}\sum_{i,l:\, m_{il}} x_{icl}, \qquad
        \sigma_c^2 = \frac{1}{n}\sum_{i,l:\, m_{il}} (x_{icl} - \mu_c)^2, \qquad
        y_{icl} = m_{il}\left(\frac{x_{icl} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}}\,\gamma_c
                  + \beta_c\right)

    which is exactly :class:`torch.nn.BatchNorm1d` applied to the ``(n, C)`` concatenation of
    the real positions, and is computed that way: the real positions are gathered, normalized by
    :func:`normlab.functional.batch_norm`, and scattered back. So in training the running
    statistics are updated with the real positions' mean and *unbiased* variance
    (:math:`\frac{n}{n-1}\sigma_c^2`, count :math:`n`):
    ``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``: the
    cumulative average), and in eval the running statistics normalize (the real positions'
    batch statistics if ``track_running_stats=False``). Padding never enters a statistic.

    **Padded positions of the output are set to zero** (not :math:`\beta`), like the zero
    padding of the input, so a following convolution or masked pooling sees the same padding
    whatever the norm; their input gradient is zero. Backward is autograd through the gather,
    normlab's batch-norm backward on the real rows, and the scatter.

    ``mask=None`` is exactly :class:`BatchNorm1d` (every position is real). A 2-D input
    ``(N, C)`` takes a mask of shape ``(N,)`` (which samples are real).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch statistic, or None. Default: 0.1.
        affine: learn a per-channel scale :math:`\gamma` and shift :math:`\beta`. Default: True.
        track_running_stats: keep running statistics for eval. Default: True.

    Shape: input ``(N, C, L)`` (or ``(N, C)``), mask ``(N, L)`` (or ``(N,)``) bool, output the
    input's shape.

    Raises ``TypeError`` for a mask that is not bool, ``ValueError`` for a mask of the wrong
    shape, for a batch with no real position, and for one real position per channel when the
    batch statistics are used (the variance of one value is 0), like torch's "Expected more
    than 1 value per channel when training".

    >>> x = torch.tensor([[[1., 2., 0.]], [[3., 0., 0.]]])   # N=2, C=1, L=3; lengths 2 and 1
    >>> mask = torch.tensor([[True, True, False], [True, False, False]])
    >>> m = MaskedBatchNorm1d(1)
    >>> m(x, mask).detach()            # statistics of the real values 1, 2, 3 only
    tensor([[[-1.2247,  0.0000,  0.0000]],
    <BLANKLINE>
            [[ 1.2247,  0.0000,  0.0000]]])
    >>> m.running_mean, m.running_var  # unbiased variance of 1, 2, 3 is 1
    (tensor([0.2000]), tensor([1.]))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return super().forward(input)
        self._check_input_dim(input)
        _check_mask(input, mask)
        # (N, C, L) -> (N, L, C): the real positions are then rows mask selects.
        channels_last = input.transpose(1, 2) if input.dim() == 3 else input
        real = channels_last[mask]  # (n, C), in the order of the mask
        n = real.shape[0]
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if batch_stats and n < 2:
            when = "when training" if self.training else "with track_running_stats=False"
            if n == 0:
                raise ArgumentError(
                    f"MaskedBatchNorm1d: the mask marks no real position in this batch (input "
                    f"of shape {tuple(input.shape)}), so there is no statistic to normalize "
                    f"with {when}; drop all-padding batches or check that True marks real tokens"
                )
            raise ShapeError(
                f"MaskedBatchNorm1d: expected more than 1 value per channel {when}, but the "
                f"mask marks a single real position (input of shape {tuple(input.shape)}): its "
                "variance is 0, so the output would be all zeros. Use more real tokens per "
                "batch, eval mode (running statistics), or a per-token LayerNorm/RMSNorm"
            )
        out = torch.zeros_like(input)
        if n:
            y = super().forward(real)  # torch's BatchNorm1d on the concatenated real positions
            (out.transpose(1, 2) if input.dim() == 3 else out)[mask] = y
        return out


def _check_mask(input: torch.Tensor, mask) -> None:
    name = "MaskedBatchNorm1d"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise DTypeError(
            f"{name}: mask must be a bool tensor (True = real token, False = padding), got "
            f"{mask.dtype}; convert it first, e.g. mask.bool() or "
            "torch.arange(L) < lengths[:, None]"
        )
    expected = (input.shape[0], input.shape[2]) if input.dim() == 3 else (input.shape[0],)
    if tuple(mask.shape) != expected:
        layout = "(N, L)" if input.dim() == 3 else "(N,)"
        raise ShapeError(
            f"{name}: mask must have shape {layout} = {expected} for an input of shape "
            f"{tuple(input.shape)}, got mask of shape {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise ArgumentError(
            f"{name}: mask and input must be on the same device, got mask on {mask.device} "
            f"and input on {input.device}"
        )
