"""Input validation shared by every backend: each mistake gets a message that names it.

The exception classes derive from both the Python exception a reader expects (``ValueError``,
``TypeError``) and ``RuntimeError``, which is what torch raises for the same mistakes.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

from ._errors import ArgumentError, DTypeError, ShapeError


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# --- fast paths: one test per argument for the calls models make (a valid call costs under a
# microsecond); anything they do not recognize goes through the full checks below, which raise
# the message naming the mistake or accept the call.

_FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def row_norm(fn: str, x, given_shape, weight, bias=None) -> tuple[int, ...]:
    """The checks of layer_norm/rms_norm (and their add variants): ``x`` a floating tensor whose
    trailing dims are the normalized shape ``given_shape``, ``weight``/``bias`` of that shape.
    Returns the normalized shape as a tuple."""
    shape = (given_shape,) if type(given_shape) is int else given_shape
    try:  # the fast path: one normalized dim (an AttributeError: not a tensor, full checks)
        if type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int \
                and isinstance(x, torch.Tensor) and x.dtype in _FLOATING and x.ndim \
                and x.shape[-1] == shape[0] \
                and (weight is None or (weight.dtype in _FLOATING and weight.shape == shape)) \
                and (bias is None or (bias.dtype in _FLOATING and bias.shape == shape)) \
                and x.is_cpu and (weight is None or weight.is_cpu) \
                and (bias is None or bias.is_cpu):  # (other devices: the full checks)
            return shape
    except AttributeError:
        pass
    floating_input(fn, x, 1, "(*, *normalized_shape)")
    shape = normalized_shape(fn, x, given_shape)
    same_shape(fn, shape, weight=weight, bias=bias)
    devices(fn, x, weight=weight, bias=bias)
    return shape


def devices(fn: str, x: torch.Tensor, **tensors) -> None:
    """Every given tensor is on the input's device, as torch requires."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ArgumentError(f"{fn}: {name} is on {t.device}, the input on {x.device}; "
                                "move them to one device")


def running_stats(fn: str, running_mean, running_var) -> None:
    """Both running statistics or neither, and neither requiring grad while autograd records
    (torch's rules: they are buffers, updated in place, never differentiated)."""
    if running_mean is None and running_var is None:
        return
    if running_mean is None or running_var is None:
        raise ArgumentError(f"{fn}: running_mean and running_var must either both be None or "
                            f"neither be None; got only {'running_mean' if running_var is None else 'running_var'}")
    if (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        raise ArgumentError(f"{fn}: running_mean and running_var must not require grad (they "
                            "are statistics buffers, not parameters); pass .detach()ed tensors")


def channel_norm(fn: str, x, weight=None, bias=None, running_mean=None,
                 running_var=None, vector_params: bool = False) -> None:
    """The checks of batch_norm/instance_norm/group_norm: ``x`` a floating ``(N, C, *)`` tensor,
    each given tensor one floating value per channel: running statistics (and, with
    ``vector_params``, GroupNorm's weight and bias) 1-D, as torch requires; BatchNorm's weight
    and bias of any shape holding C values, as torch takes them."""
    try:  # the fast path (an AttributeError: not a tensor, full checks)
        if isinstance(x, torch.Tensor) and x.dtype in _FLOATING and x.ndim >= 2:
            c = x.shape[1]
            if (weight is None or (weight.dtype in _FLOATING and weight.numel() == c
                                   and (weight.ndim == 1 or not vector_params))) \
                    and (bias is None or (bias.dtype in _FLOATING and bias.numel() == c
                                          and (bias.ndim == 1 or not vector_params))) \
                    and (running_mean is None or (running_mean.dtype in _FLOATING
                                                  and running_mean.shape == (c,))) \
                    and (running_var is None or (running_var.dtype in _FLOATING
                                                 and running_var.shape == (c,))) \
                    and x.is_cpu and (weight is None or weight.is_cpu) \
                    and (bias is None or bias.is_cpu) \
                    and (running_mean is None or running_mean.is_cpu) \
                    and (running_var is None or running_var.is_cpu):
                return
    except AttributeError:
        pass
    floating_input(fn, x, 2, "(N, C, *)")
    per_channel(fn, x, weight=weight, bias=bias, running_mean=running_mean,
                running_var=running_var)
    devices(fn, x, weight=weight, bias=bias, running_mean=running_mean,
            running_var=running_var)
    vectors = dict(running_mean=running_mean, running_var=running_var)
    if vector_params:
        vectors.update(weight=weight, bias=bias)
    for name, t in vectors.items():
        if t is not None and t.dim() != 1:
            raise ShapeError(f"{fn}: {name} must be a vector of {x.shape[1]} values (one per "
                             f"channel), got {name} of shape {_shape(t)}")


def floating_tensor(fn: str, x, name: str = "input") -> None:
    """``x`` (called ``name`` in messages) is a real floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor {name}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DTypeError(
            f"{fn}: expected a floating-point {name} (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}; convert it first, e.g. {'x' if name == 'input' else name}.float()"
        )


def floating_input(fn: str, x, min_dim: int, layout: str) -> None:
    """``x`` is a real floating-point tensor with at least ``min_dim`` dimensions."""
    floating_tensor(fn, x)
    if x.dim() < min_dim:
        raise ShapeError(
            f"{fn}: expected an input of shape {layout} with at least {min_dim} dimensions, "
            f"got a {x.dim()}-D input of shape {_shape(x)}"
        )


def residual(fn: str, x: torch.Tensor, residual) -> None:
    """``residual`` is a real floating-point tensor of exactly ``x``'s shape (no broadcasting:
    a residual stream is never smaller than the branch added to it) on ``x``'s device."""
    floating_tensor(fn, residual, "residual")
    if _shape(residual) != _shape(x):
        raise ShapeError(
            f"{fn}: residual must have exactly the input's shape {_shape(x)} (no broadcasting), "
            f"got residual of shape {_shape(residual)}"
        )
    devices(fn, x, residual=residual)


def _floating_param(fn: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(f"{fn}: {name} must be floating-point, got {t.dtype}")


def per_channel(fn: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Each given tensor holds one value per channel (dim 1 of ``x``), like torch checks it."""
    channels = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        _floating_param(fn, name, t)
        if t.numel() != channels:
            raise ShapeError(
                f"{fn}: {name} must hold one value per channel, {channels} (dim 1 of the input "
                f"of shape {_shape(x)}), got {name} of shape {_shape(t)}"
            )


def more_than_one_value(fn: str, x: torch.Tensor, count: int, what: str, *,
                        across: str = "") -> None:
    """Training statistics need more than one value per statistics set. ``across`` names sets
    that extend beyond ``x`` (``"all ranks of the process group"``): ``count`` is then theirs,
    and 0 is refused too."""
    if count == 1 or (across and count < 1):
        got = f"{count} over {across} (this rank's input has shape {_shape(x)})" if across \
            else f"input of shape {_shape(x)}"
        raise ShapeError(
            f"{fn}: expected more than 1 {what} when training, got {got}: "
            "the variance of a single value is 0, so the output would be all zeros. Use a larger "
            "batch, eval mode (running statistics), or a GroupNorm/LayerNorm instead"
        )


def positive_eps_in_training(fn: str, eps: float) -> None:
    if eps <= 0:  # (NaN passes, as in torch: the output is NaN)
        raise ArgumentError(f"{fn}: eps must be positive during training, but got {eps}")


def non_negative_eps(fn: str, eps: float) -> None:
    if eps < 0:
        raise ArgumentError(f"{fn}: eps must be non-negative, but got {eps}")


def momentum(fn: str, value) -> float:
    """A float momentum from what torch takes: a Python or NumPy real (bool included) or a
    one-element tensor."""
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, numbers.Real):  # int, bool, numpy.float32, numpy.int64, ...
        return float(value)
    raise TypeError(
        f"{fn}: momentum must be a float, got {value!r}; momentum=None (a cumulative "
        "average) is an option of the modules, which pass 1 / num_batches_tracked"
    )


def given(fn: str, why: str, **tensors: torch.Tensor | None) -> None:
    """Tensors that the chosen mode needs are there."""
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise ArgumentError(f"{fn}: {' and '.join(missing)} must be given {why}")


def normalized_shape(fn: str, x: torch.Tensor, shape: int | Sequence[int]) -> tuple[int, ...]:
    """Canonical tuple for ``normalized_shape``; the input's trailing dims must equal it."""
    if type(shape) is int:
        shape = (shape,)
    elif not isinstance(shape, (list, tuple)):  # torch.Size is a tuple
        raise TypeError(
            f"{fn}: normalized_shape must be an int or a tuple/list of ints, got "
            f"{type(shape).__name__} {shape!r}")
    try:
        shape = tuple(_index(s) for s in shape)
    except TypeError:
        raise TypeError(
            f"{fn}: normalized_shape must be an int or a tuple/list of ints, got {shape!r}"
        ) from None
    if len(shape) == 0:
        raise ShapeError(
            f"{fn}: normalized_shape must name at least one trailing dimension, got ()"
        )
    if x.dim() < len(shape) or _shape(x)[-len(shape):] != shape:
        raise ShapeError(
            f"{fn}: normalized_shape={list(shape)} must equal the input's trailing dimensions, "
            f"but the input has shape {_shape(x)}; expected shape [*, {', '.join(map(str, shape))}]"
        )
    return shape


def same_shape(fn: str, shape: tuple[int, ...], **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        _floating_param(fn, name, t)
        if _shape(t) != shape:
            raise ShapeError(
                f"{fn}: {name} must have shape normalized_shape={list(shape)}, "
                f"got {name} of shape {_shape(t)}"
            )


def _index(v) -> int:
    """An integer argument as torch reads one: an int or what ``operator.index`` takes (NumPy
    integers), not a bool, a float or a tensor."""
    if type(v) is int:
        return v
    if isinstance(v, (bool, torch.Tensor)):
        raise TypeError(f"expected an int, got {v!r}")
    return operator.index(v)


def groups(fn: str, num_groups, num_channels: int) -> int:
    """``num_groups`` as an int: positive, dividing ``num_channels``."""
    try:
        num_groups = _index(num_groups)
    except TypeError:
        raise ShapeError(f"{fn}: num_groups must be a positive integer, got {num_groups!r}") \
            from None
    if num_groups <= 0:
        raise ShapeError(f"{fn}: num_groups must be a positive integer, got {num_groups!r}")
    if num_channels % num_groups != 0:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ShapeError(f"{fn} has C={num_channels} channels, not divisible by num_groups="
                         f"{num_groups} (valid: {divisors})")
    return num_groups


def spatial_count(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])
