r"""Normalization functions with the signatures and semantics of ``torch.nn.functional``.

Every function validates its arguments (one message per mistake, see :mod:`normlab._checks`),
then runs on the current backend (:func:`normlab.backend`). All five share one statistics
engine (:mod:`normlab._engine`): they differ only in which elements share a mean and variance.

=============  ======================================  =====================================
function       statistics per                          reduced over
=============  ======================================  =====================================
batch_norm     channel                                 batch and spatial axes (N, *S)
instance_norm  (sample, channel)                       spatial axes (*S)
group_norm     (sample, group of C/G channels)         the group's channels and (*S)
layer_norm     leading index                           the trailing ``normalized_shape`` axes
rms_norm       leading index (no centering)            the trailing ``normalized_shape`` axes
=============  ======================================  =====================================

``add_layer_norm`` and ``add_rms_norm`` are the transformer hot path: a residual add fused with
the norm that follows it, returning both the normalized output and the new residual stream.

Statistics are computed in float32 (float64 for float64 inputs) with a two-pass variance;
the output has the input's dtype. Parameters and running statistics may have another floating
dtype than the input (torch refuses some of these combinations on CPU).

Inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
``jvp``), forward-mode AD (``torch.autograd.forward_ad``) and ``torch.jit.trace``, each function
calls ``torch.nn.functional``'s (whatever backend is forced): the tensors are wrappers that only
ATen's operators, with their batching and derivative rules, see through, and a trace records
those operators (:func:`normlab._dispatch.wrapped`). So do empty inputs, where torch's answers
(and its few errors) are conventions, not arithmetic. Results and errors there are torch's.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

import torch.nn.functional as _torch_F

from . import _checks
from ._dispatch import _fwad, _tracing_state, _transforms_active, get_backend, wrapped
from ._engine import compute_dtype
from ._errors import DTypeError

__all__ = [
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm",
    "add_layer_norm", "add_rms_norm",
]


def _torch_answers(input) -> bool:
    """Whether torch.nn.functional computes this call: wrapped tensors or a trace
    (:func:`normlab._dispatch.wrapped`), or an empty input, where torch's answers (and its few
    errors) are conventions, not arithmetic."""
    # (wrapped()'s test written out: a Python call less on every norm call)
    return _fwad._current_level >= 0 or _transforms_active() or _tracing_state() is not None \
        or (isinstance(input, torch.Tensor) and not input.numel())


def _seq(normalized_shape):
    """normlab takes an int ``normalized_shape`` (one trailing axis); torch's functions a sequence."""
    return (normalized_shape,) if type(normalized_shape) is int else normalized_shape


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch Normalization (Ioffe & Szegedy, 2015) over an ``(N, C, *)`` input.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with one mean and biased variance per channel, reduced over the batch and all spatial axes
    (``N, *``). In training the batch statistics normalize, and ``running_mean`` /
    ``running_var`` (when given) are updated in place:
    ``running = (1 - momentum) * running + momentum * batch``, the variance unbiased
    (``n / (n - 1)``). In eval (``training=False``) the running statistics normalize.

    Args:
        input: ``(N, C)`` or ``(N, C, *)`` floating tensor.
        running_mean, running_var: ``(C,)`` buffers, or None (required when not training).
        weight, bias: ``(C,)`` affine parameters :math:`\gamma, \beta`, or None.
        training: use batch statistics (and update the running ones). Default: False.
        momentum: weight of the new batch statistic in the running update. Default: 0.1.
        eps: added to the variance. Default: 1e-5. Must be positive in training.

    >>> x = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])
    >>> batch_norm(x, None, None, training=True)
    tensor([[-1.2247, -1.2247, -1.2247],
            [ 0.0000,  0.0000,  0.0000],
            [ 1.2247,  1.2247,  1.2247]])
    """
    if _torch_answers(input):
        return _torch_F.batch_norm(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps)
    fn = "batch_norm"
    _checks.channel_norm(fn, input, weight, bias, running_mean, running_var)
    _checks.running_stats(fn, running_mean, running_var)
    eps = float(eps)
    if training:
        _checks.more_than_one_value(
            fn, input, input.shape[0] * _checks.spatial_count(input), "value per channel"
        )
        _checks.positive_eps_in_training(fn, eps)
    else:
        if running_mean is None or running_var is None:
            _checks.given(
                fn, "in evaluation mode (training=False)",
                running_mean=running_mean, running_var=running_var,
            )
        if eps < 0:
            _checks.non_negative_eps(fn, eps)
    return get_backend(input).batch_norm(
        input, running_mean, running_var, weight, bias, bool(training),
        _checks.momentum(fn, momentum), eps,
    )


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Instance Normalization (Ulyanov et al., 2016) over an ``(N, C, *)`` input.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with one mean and biased variance per ``(sample, channel)``, reduced over the spatial axes
    ``*``. With ``use_input_stats`` (default) the instance statistics normalize, and given
    running statistics move towards their batch average (variance unbiased per instance), as in
    torch. Otherwise ``running_mean`` / ``running_var`` normalize.

    Args:
        input: ``(N, C, *)`` floating tensor with more than one spatial element when
            ``use_input_stats``.
        running_mean, running_var: ``(C,)`` buffers or None (required if not ``use_input_stats``).
        weight, bias: ``(C,)`` affine parameters or None.
        use_input_stats: normalize with the instance statistics. Default: True.
        momentum: weight of the new statistic in the running update. Default: 0.1.
        eps: added to the variance. Default: 1e-5.
    """
    # (Not empty inputs: torch's InstanceNorm fails on an empty batch, an IndexError from
    # inside; normlab returns the empty output. eps == 0 with input statistics: torch's
    # convention, 1/sqrt(0) = 0 for a constant instance, comes from ATen.)
    if wrapped() or (eps == 0 and use_input_stats):
        return _torch_F.instance_norm(input, running_mean, running_var, weight, bias,
                                      use_input_stats, momentum, eps)
    fn = "instance_norm"
    _checks.channel_norm(fn, input, weight, bias, running_mean, running_var)
    _checks.running_stats(fn, running_mean, running_var)
    if use_input_stats:
        _checks.more_than_one_value(fn, input, _checks.spatial_count(input), "spatial element")
    else:
        _checks.given(
            fn, "when use_input_stats=False", running_mean=running_mean, running_var=running_var
        )
    return get_backend(input).instance_norm(
        input, running_mean, running_var, weight, bias, bool(use_input_stats),
        _checks.momentum(fn, momentum), float(eps),
    )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Group Normalization (Wu & He, 2018) over an ``(N, C, *)`` input.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The ``C`` channels are split into ``num_groups`` groups of ``C / num_groups`` consecutive
    channels; one mean and biased variance per ``(sample, group)``, reduced over the group's
    channels and all spatial axes. ``num_groups=1`` is LayerNorm over ``(C, *)``;
    ``num_groups=C`` is InstanceNorm. The affine parameters are per channel.

    Args:
        input: ``(N, C, *)`` floating tensor, ``C`` divisible by ``num_groups``.
        num_groups: number of groups.
        weight, bias: ``(C,)`` affine parameters or None.
        eps: added to the variance. Default: 1e-5.
    """
    if _torch_answers(input):
        return _torch_F.group_norm(input, num_groups, weight, bias, eps)
    fn = "group_norm"
    _checks.channel_norm(fn, input, weight, bias, vector_params=True)
    num_groups = _checks.groups(fn, num_groups, input.shape[1])
    if input.shape[0] * (input.shape[1] // num_groups) == 1:  # torch's check, word for word
        _checks.more_than_one_value(fn, input, _checks.spatial_count(input), "value per channel")
    return get_backend(input).group_norm(input, num_groups, weight, bias, float(eps))


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Layer Normalization (Ba et al., 2016) over the trailing ``normalized_shape`` axes.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    One mean and biased variance per leading index, reduced over the last
    ``len(normalized_shape)`` axes; ``weight`` and ``bias`` have shape ``normalized_shape``
    (one value per normalized element).

    Args:
        input: ``(*, *normalized_shape)`` floating tensor.
        normalized_shape: the trailing shape to normalize over (an int for one axis).
        weight, bias: parameters of shape ``normalized_shape``, or None.
        eps: added to the variance. Default: 1e-5.

    >>> layer_norm(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]), (3,))
    tensor([[-1.2247,  0.0000,  1.2247],
            [-1.2247,  0.0000,  1.2247],
            [-1.2247,  0.0000,  1.2247]])
    """
    if _torch_answers(input):
        return _torch_F.layer_norm(input, _seq(normalized_shape), weight, bias, eps)
    shape = _checks.row_norm("layer_norm", input, normalized_shape, weight, bias)
    return get_backend(input).layer_norm(input, shape, weight, bias, float(eps))


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019).

    .. math::

        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    One mean square per leading index, reduced over the last ``len(normalized_shape)`` axes;
    no centering and no bias.

    Args:
        input: ``(*, *normalized_shape)`` floating tensor.
        normalized_shape: the trailing shape to normalize over (an int for one axis).
        weight: parameter of shape ``normalized_shape``, or None.
        eps: added to the mean square. Default None: the machine epsilon of the compute dtype,
            ``torch.finfo(torch.float32).eps`` for float32/float16/bfloat16 inputs and
            ``torch.finfo(torch.float64).eps`` for float64, as torch does.

    >>> rms_norm(torch.tensor([[1., 2., 3.]]), (3,), eps=1e-8)
    tensor([[0.4629, 0.9258, 1.3887]])
    """
    if _torch_answers(input):
        return _torch_F.rms_norm(input, _seq(normalized_shape), weight, eps)
    try:
        shape = _checks.row_norm("rms_norm", input, normalized_shape, weight)
    except DTypeError:
        if not (isinstance(weight, torch.Tensor) and isinstance(input, torch.Tensor)
                and input.is_floating_point() and not weight.is_floating_point()
                and not weight.is_complex()):
            raise
        # torch takes an integer weight with this warning (its composite path promotes it)
        warnings.warn(f"Mismatch dtype between input and weight: input dtype = {input.dtype}, "
                      f"weight dtype = {weight.dtype}, Cannot dispatch to fused implementation.",
                      UserWarning, stacklevel=2)
        weight = weight.to(input.dtype)
        shape = _checks.row_norm("rms_norm", input, normalized_shape, weight)
    eps = _default_eps(input.dtype) if eps is None else float(eps)
    return get_backend(input).rms_norm(input, shape, weight, eps)


_EPS = {dt: torch.finfo(compute_dtype(dt)).eps
        for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def _default_eps(dtype: torch.dtype) -> float:
    """RMSNorm's default eps: the machine epsilon of the compute dtype."""
    eps = _EPS.get(dtype)
    return torch.finfo(compute_dtype(dtype)).eps if eps is None else eps


# --- residual add fused with the norm (pre-norm transformer blocks)


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residual add fused with RMSNorm: returns ``(output, new_residual)``.

    .. math::

        h = x + r, \qquad y = \frac{h}{\sqrt{\mathrm{E}[h^2] + \epsilon}} \cdot \gamma

    Exactly the unfused ``h = input + residual; y = rms_norm(h, ...)``: ``h`` has the promoted
    dtype ``torch.result_type(input, residual)`` and is rounded to it, and ``y`` normalizes that
    rounded ``h`` (so the output and the new residual stream are consistent); ``y`` has ``h``'s
    dtype. Gradients reach ``input``, ``residual`` and ``weight`` through both outputs. In a
    pre-norm block, ``y, h = add_rms_norm(attn_out, h, ...)`` replaces two passes over memory
    by one on backends with a fused kernel.

    Args:
        input: ``(*, *normalized_shape)`` floating tensor (the branch output).
        residual: floating tensor of exactly ``input``'s shape (the residual stream; not
            broadcast), on the same device.
        normalized_shape: the trailing shape to normalize over (an int for one axis).
        weight: parameter of shape ``normalized_shape``, or None.
        eps: added to the mean square. Default None: the machine epsilon of ``h``'s compute
            dtype, as in :func:`rms_norm`.

    >>> y, h = add_rms_norm(torch.tensor([[0.5, 1., 2.]]), torch.tensor([[0.5, 1., 1.]]), (3,),
    ...                     eps=1e-8)
    >>> y, h
    (tensor([[0.4629, 0.9258, 1.3887]]), tensor([[1., 2., 3.]]))
    """
    if _torch_answers(input):
        h = input + residual
        return _torch_F.rms_norm(h, _seq(normalized_shape), weight, eps), h
    fn = "add_rms_norm"
    shape = _checks.row_norm(fn, input, normalized_shape, weight)
    _checks.residual(fn, input, residual)
    if eps is None:
        eps = _default_eps(torch.result_type(input, residual))
    eps = float(eps)
    return get_backend(input).add_rms_norm(input, residual, shape, weight, eps)


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Residual add fused with LayerNorm: returns ``(output, new_residual)``.

    .. math::

        h = x + r, \qquad
        y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}} \cdot \gamma + \beta

    Exactly the unfused ``h = input + residual; y = layer_norm(h, ...)``: ``h`` has the promoted
    dtype ``torch.result_type(input, residual)`` and is rounded to it, and ``y`` normalizes that
    rounded ``h``; ``y`` has ``h``'s dtype. Gradients reach ``input``, ``residual``, ``weight``
    and ``bias`` through both outputs.

    Args:
        input: ``(*, *normalized_shape)`` floating tensor (the branch output).
        residual: floating tensor of exactly ``input``'s shape (the residual stream; not
            broadcast), on the same device.
        normalized_shape: the trailing shape to normalize over (an int for one axis).
        weight, bias: parameters of shape ``normalized_shape``, or None.
        eps: added to the variance. Default: 1e-5.

    >>> y, h = add_layer_norm(torch.tensor([[1., 1., 1.]]), torch.tensor([[0., 1., 2.]]), (3,))
    >>> y, h
    (tensor([[-1.2247,  0.0000,  1.2247]]), tensor([[1., 2., 3.]]))
    """
    if _torch_answers(input):
        h = input + residual
        return _torch_F.layer_norm(h, _seq(normalized_shape), weight, bias, eps), h
    fn = "add_layer_norm"
    shape = _checks.row_norm(fn, input, normalized_shape, weight, bias)
    _checks.residual(fn, input, residual)
    eps = float(eps)
    return get_backend(input).add_layer_norm(input, residual, shape, weight, bias, eps)
