"""swap_norms: replace a model's norms by another norm."""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

from .. import _checks, registry
from .._errors import ArgumentError, ShapeError
from ._common import _INPUTS, _accepts, _arity, _first_tensor, _rank, _show, _where, spec_of

def _check_rank(module: nn.Module, args, *, name: str, source: str):
    """Forward pre-hook of a norm swapped in for a BatchNorm1d: a 2-D (N, C) input has no axis
    for instance or layer statistics of the kind the swap meant."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() != module._normlab_rank:
        raise ShapeError(
            f"{type(module).__name__} at {_show(name)} (swapped in for a {source}) got a "
            f"{args[0].dim()}-D input of shape {tuple(args[0].shape)}; it expects "
            f"{module._normlab_rank}-D input here. "
            + ("InstanceNorm1d would read (N, C) as one unbatched (C, L) sample: swap this "
               "layer to GroupNorm or LayerNorm instead." if module._normlab_rank == 3 else
               "LayerNorm(C) normalizes the last axis, which is C only for (N, C) input: "
               "swap this layer to GroupNorm instead.")
        )


def _guard_rank(new: nn.Module, rank: int, name: str, source: str) -> None:
    new._normlab_rank = rank
    new.register_forward_pre_hook(functools.partial(_check_rank, name=name, source=source))


def _build(old: nn.Module, name: str, to: type, kwargs: dict) -> tuple[nn.Module, bool]:
    """A new ``to`` standing in for ``old``, and whether ``old``'s bias had nowhere to go. The
    constructor's arguments follow ``to``'s registered norm (:mod:`normlab.registry`): channel
    norms take the channel count (GroupNorm ``num_groups`` first), row norms the
    ``normalized_shape``."""
    src = type(old).__name__
    where = f"{_show(name)} ({src})"
    if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
        raise ArgumentError(f"{where} is not initialized yet; run one forward first")
    if _arity(type(old), required=False) != 1:
        raise ArgumentError(
            f"{where}'s forward takes more than the input (a mask, a residual); a {to.__name__} "
            "cannot stand in for it. Pass a callable `to=lambda old: ...` or leave it out of "
            "`source`")
    spec, old_spec = spec_of(to), spec_of(type(old))
    channels = (old.num_features if isinstance(old, _NormBase)
                else old.num_channels if isinstance(old, nn.GroupNorm) else None)
    affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))
    has_bias = getattr(old, "bias", None) is not None
    kw = dict(kwargs)

    def default(arg, value, none_is_a_value=False):
        if arg not in kw and (value is not None or none_is_a_value) and _accepts(to, arg):
            kw[arg] = value

    default("eps", getattr(old, "eps", None))
    default("elementwise_affine" if spec.input == "rows" else "affine", affine)
    if affine:
        default("bias", has_bias)
    old_rank, new_rank = _rank(type(old)), _rank(to)
    guard = None
    if spec.input == "channels":  # (N, C, *) input
        if channels is None:
            raise ArgumentError(
                f"{where} has no channel count (num_features or num_channels) to build a "
                f"{to.__name__} from. Pass a callable `to=lambda old: ...` to build it yourself"
            )
        if old_rank is not None and new_rank is not None and old_rank != new_rank:
            raise ArgumentError(
                f"{where} takes {_INPUTS[old_rank]} input but {to.__name__} takes "
                f"{_INPUTS[new_rank]} input; use its {old_rank}d variant"
            )
        if issubclass(to, _BatchNorm):
            if isinstance(old, _BatchNorm):  # momentum=None: the cumulative average
                default("momentum", old.momentum, none_is_a_value=True)
            default("track_running_stats", getattr(old, "track_running_stats", None))
        if new_rank == 1 and spec.name == "instance_norm" and old_spec is not spec:
            guard = 3
        args = (channels,)
        if spec.arg == "num_groups":
            groups = kw.pop("num_groups", None)
            if groups is None:
                raise ArgumentError(
                    f"a {to.__name__} needs num_groups=..., e.g. "
                    f"swap_norms(model, {to.__name__}, num_groups=32)"
                )
            args = (_checks.groups(where, groups, channels), channels)
    else:  # trailing-axes norms
        if old_spec is not None and old_spec.input == "rows":
            args = (tuple(old.normalized_shape),)
        elif old_rank == 1 and isinstance(old, _BatchNorm):  # (N, C) input: C is last
            args, guard = ((channels,),), 2
        else:
            raise ArgumentError(
                f"{where} normalizes the channel axis 1 of (N, C, *) input, but "
                f"{to.__name__} normalizes the trailing axes; only a BatchNorm1d on (N, C) input "
                f"maps to it. For statistics over (C, *spatial) per sample use GroupNorm with "
                f"num_groups=1"
            )
    new = to(*args, **kw)
    # The parameters and statistics that map (same name and shape), with their requires_grad.
    for key in ("weight", "bias"):
        src_p, dst_p = getattr(old, key, None), getattr(new, key, None)
        if isinstance(src_p, torch.Tensor) and isinstance(dst_p, torch.Tensor) \
                and src_p.shape == dst_p.shape:
            with torch.no_grad():
                dst_p.copy_(src_p)
            dst_p.requires_grad_(src_p.requires_grad)
    if isinstance(old, _BatchNorm) and isinstance(new, _BatchNorm):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            src_b, dst_b = getattr(old, key, None), getattr(new, key, None)
            if src_b is not None and dst_b is not None:
                dst_b.copy_(src_b)
    if guard is not None:
        _guard_rank(new, guard, name, src)
    dropped = has_bias and getattr(new, "bias", None) is None and bool(old.bias.detach().any())
    return new, dropped


def swap_norms(
    model: nn.Module,
    to: type | Callable[[nn.Module], nn.Module],
    *,
    source: type | tuple[type, ...] = _BatchNorm,
    **kwargs,
) -> nn.Module:
    r"""Replace every ``source`` module inside ``model`` (default: every BatchNorm - torch's,
    normlab's, ``SyncBatchNorm`` and subclasses) by a new normalization, in place, and return
    ``model`` (or the replacement, when ``model`` itself is a ``source`` module).

    ``to`` is either a class or a callable ``to(old_module) -> new_module``.

    * A class is built from the old module: the channel count C (``num_features`` /
      ``num_channels``) or ``normalized_shape``, and ``eps``, ``affine``, ``bias`` (and for a
      BatchNorm target ``momentum``, ``track_running_stats``) unless given in ``kwargs``.
      ``GroupNorm`` needs ``num_groups=`` in ``kwargs``. The affine ``weight``/``bias`` are
      copied (with their ``requires_grad``) wherever the shapes agree; BatchNorm -> BatchNorm
      (e.g. ``torch.nn.SyncBatchNorm``) also keeps ``running_mean``, ``running_var``,
      ``num_batches_tracked``. LayerNorm/RMSNorm targets take a LayerNorm/RMSNorm source
      (``source=torch.nn.LayerNorm``) or a BatchNorm1d, whose replacement then refuses any
      input but ``(N, C)`` at forward; an InstanceNorm1d swapped in for a BatchNorm1d refuses
      ``(N, C)`` input (it would read it as one unbatched sample).
    * A callable builds the replacement itself.

    Either way the new module gets the old one's device, floating dtype and train/eval mode.
    Every replacement is built before any is installed: on an error (a C that ``num_groups``
    does not divide, a norm that cannot stand in for another) the model is left unchanged and
    the error names each layer by its qualified name. Shared modules stay shared.

    >>> import normlab
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6))
    >>> swap_norms(model, normlab.nn.GroupNorm, num_groups=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normlab._errors.ShapeError: swap_norms: '1' (BatchNorm2d) has C=6 channels, not divisible ...
    >>> swap_norms(model, normlab.nn.GroupNorm, num_groups=3)[1]
    GroupNorm(3, 6, eps=1e-05, affine=True, bias=True)
    """
    if not isinstance(to, type) and not callable(to):
        raise TypeError(f"swap_norms: `to` must be a module class or a callable, got {to!r}")
    if isinstance(to, type) and not issubclass(to, nn.Module):
        raise TypeError(f"swap_norms: `to` must be an nn.Module subclass, got {to!r}")
    if isinstance(to, type) and spec_of(to) is None:
        raise ArgumentError(
            f"swap_norms has no rule to build a {to.__name__} from a norm (it knows the classes "
            f"of the registered norms, {', '.join(registry.names())}, SyncBatchNorm and their "
            "subclasses); pass a callable `to=lambda old: ...` that builds it"
        )
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, source)]
    built: dict[int, nn.Module] = {}
    errors: list[ArgumentError] = []
    dropped: list[str] = []
    for name, old in found:
        try:
            if isinstance(to, type):
                new, lost = _build(old, name, to, kwargs)
            else:
                new, lost = to(old), False
                if not isinstance(new, nn.Module):
                    raise TypeError(f"swap_norms: `to` returned {type(new).__name__} for "
                                    f"{_show(name)}, not an nn.Module")
        except ArgumentError as exc:
            errors.append(exc)
            continue
        ref = _first_tensor(old)
        if ref is not None:
            new.to(device=ref.device)
            if ref.is_floating_point():
                new.to(dtype=ref.dtype)
        new.train(old.training)
        built[id(old)] = new
        if lost:
            dropped.append(name)
    if errors:
        detail = "; ".join(dict.fromkeys(str(e) for e in errors))
        kind = ShapeError if all(isinstance(e, ShapeError) for e in errors) else ArgumentError
        raise kind(f"swap_norms: {detail}")
    if dropped:
        warnings.warn(f"swap_norms: {to.__name__} has no bias; the non-zero bias of "
                      f"{', '.join(map(repr, dropped))} was dropped", stacklevel=2)
    for name, old in found:
        _where(model, old, built[id(old)])
    return built[id(model)] if id(model) in built else model

