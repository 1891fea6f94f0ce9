"""Model tools for BatchNorm: swap it for another norm, fold it into the preceding Conv/Linear
for inference, or freeze it for fine-tuning.

* :func:`swap_norms` - replace every BatchNorm (or any ``source`` class) by another norm, in
  place, keeping the parameters that map.
* :func:`fold_batchnorm` - an eval-mode copy with each BatchNorm that directly follows a
  Conv/ConvTranspose/Linear folded into its weights.
* :func:`freeze_batchnorm` / :func:`unfreeze_batchnorm` - BatchNorms that normalize with their
  running statistics and learn nothing, even after ``model.train()``.
"""
from __future__ import annotations

import collections
import copy
import functools
import inspect
import warnings
from typing import Callable

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import _classes
from ._errors import ArgumentError, ShapeError

__all__ = ["swap_norms", "fold_batchnorm", "freeze_batchnorm", "unfreeze_batchnorm"]

_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
# Spatial rank implied by a class: 1 for (N, C) or (N, C, L), 2 for (N, C, H, W), 3 for 5-D.
_RANKS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3),
          (nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3))


_INPUTS = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _rank(cls: type) -> int | None:
    return next((r for base, r in _RANKS if issubclass(cls, base)), None)


def _show(name: str) -> str:
    return repr(name) if name else "the model itself"


def _where(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every reference to ``old`` among the children of ``model``'s modules by ``new``."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)


def _first_tensor(module: nn.Module):
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    floating = [t for t in tensors if t.is_floating_point()]
    return (floating or tensors or [None])[0]


# --------------------------------------------------------------------------------------------
# swap_norms
# --------------------------------------------------------------------------------------------

@functools.cache
def _arity(cls: type, required: bool = True) -> int:
    """How many positional arguments ``cls.forward`` takes (``required``: without a default)
    besides ``self``."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return 1
    return sum((p.default is p.empty or not required)
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _accepts(cls: type, arg: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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
    """A new ``to`` standing in for ``old``, and whether ``old``'s bias had nowhere to go."""
    src = type(old).__name__
    where = f"{_show(name)} ({src})"
    if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
        raise ArgumentError(f"{where} is not initialized yet; run one forward first")
    if _arity(type(old), required=False) != 1:
        raise ArgumentError(
            f"{where}'s forward takes more than the input (a mask, a residual); a {to.__name__} "
            "cannot stand in for it. Pass a callable `to=lambda old: ...` or leave it out of "
            "`source`")
    channels = (old.num_features if isinstance(old, _NormBase)
                else old.num_channels if isinstance(old, nn.GroupNorm) else None)
    affine = (old.affine if isinstance(old, (_NormBase, nn.GroupNorm))
              else old.elementwise_affine if isinstance(old, (nn.LayerNorm, nn.RMSNorm)) else None)
    has_bias = getattr(old, "bias", None) is not None
    kw = dict(kwargs)

    def default(arg, value, none_is_a_value=False):
        if arg not in kw and (value is not None or none_is_a_value) and _accepts(to, arg):
            kw[arg] = value

    default("eps", getattr(old, "eps", None))
    old_rank, new_rank = _rank(type(old)), _rank(to)
    guard = None
    if issubclass(to, (_NormBase, nn.GroupNorm)):  # channel norms: (N, C, *) input
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
        default("affine", affine)
        if affine:
            default("bias", has_bias)
        if issubclass(to, _BatchNorm):
            if isinstance(old, _BatchNorm):  # momentum=None: the cumulative average
                default("momentum", old.momentum, none_is_a_value=True)
            default("track_running_stats", getattr(old, "track_running_stats", None))
            new = to(channels, **kw)
        elif issubclass(to, _InstanceNorm):
            new = to(channels, **kw)
            if new_rank == 1 and not isinstance(old, _InstanceNorm):
                guard = 3
        else:  # GroupNorm
            groups = kw.pop("num_groups", None)
            if groups is None:
                raise ArgumentError(
                    f"a {to.__name__} needs num_groups=..., e.g. "
                    f"swap_norms(model, {to.__name__}, num_groups=32)"
                )
            if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
                raise ArgumentError(f"num_groups must be a positive int, got {groups!r}")
            if channels % groups:
                divisors = [g for g in range(1, channels + 1) if channels % g == 0]
                raise ShapeError(
                    f"{where} has C={channels} channels, not divisible by num_groups={groups} "
                    f"(valid: {divisors})"
                )
            new = to(groups, channels, **kw)
    elif issubclass(to, (nn.LayerNorm, nn.RMSNorm)):  # trailing-axes norms
        if isinstance(old, (nn.LayerNorm, nn.RMSNorm)):
            shape = tuple(old.normalized_shape)
        elif old_rank == 1 and isinstance(old, _BatchNorm):  # (N, C) input: C is last
            shape, guard = (channels,), 2
        else:
            raise ArgumentError(
                f"{where} normalizes the channel axis 1 of (N, C, *) input, but "
                f"{to.__name__} normalizes the trailing axes; only a BatchNorm1d on (N, C) input "
                f"maps to it. For statistics over (C, *spatial) per sample use GroupNorm with "
                f"num_groups=1"
            )
        default("elementwise_affine", affine)
        if affine and issubclass(to, nn.LayerNorm):
            default("bias", has_bias)
        new = to(shape, **kw)
    else:  # swap_norms checked the target class first
        raise AssertionError(to)
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
    if isinstance(to, type) and not issubclass(to, _NORMS):
        raise ArgumentError(
            f"swap_norms has no rule to build a {to.__name__} from a norm (it knows BatchNorm, "
            "SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm and their subclasses); "
            "pass a callable `to=lambda old: ...` that builds it"
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


# --------------------------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------------------------

_LEAVES = (*_NORMS, _ConvNd, nn.Linear)


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps every norm, conv and linear (normlab's included) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


@functools.cache
def _plain_forward(cls: type) -> bool:
    """``cls.forward`` is torch's or normlab's and takes the input alone."""
    origin = getattr(cls.forward, "__module__", None) or ""
    return origin.startswith(("torch.", "normlab.")) and _arity(cls) == 1


def _is_predecessor(m: nn.Module) -> bool:
    return isinstance(m, (_ConvNd, nn.Linear))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_NOT_AFTER = "its input is not the output of a Conv/ConvTranspose/Linear used only by it"


def _pairs_from_graph(root, prefix, graph, verdicts, pairs):
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [n.target for n in graph.nodes if n.op == "get_attr"]

    def read_directly(target):
        return any(a == target or a.startswith(target + ".") for a in attrs)

    for name, m in root.named_modules():
        if isinstance(m, _BatchNorm) and name not in calls:
            verdicts[_join(prefix, name)] = "forward (as traced by torch.fx) does not call it"
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(root.get_submodule(node.target), _BatchNorm):
            continue
        name = _join(prefix, node.target)
        arg = node.args[0] if node.args else None
        if calls[node.target] > 1:
            verdicts[name] = "it is called more than once in forward"
        elif len(node.args) != 1 or node.kwargs or not isinstance(arg, torch.fx.Node) \
                or arg.op != "call_module" or not _is_predecessor(root.get_submodule(arg.target)):
            verdicts[name] = _NOT_AFTER
        elif len(arg.users) != 1:
            verdicts[name] = f"the output of {_join(prefix, arg.target)!r} is also used elsewhere"
        elif calls[arg.target] > 1:
            verdicts[name] = f"{_join(prefix, arg.target)!r} is called more than once in forward"
        elif read_directly(arg.target) or read_directly(node.target):
            verdicts[name] = "forward reads its (or its Conv's) parameters directly"
        else:
            pairs[name] = _join(prefix, arg.target)


def _find_pairs(module, prefix, verdicts, pairs):
    """fx on ``module``; where it does not trace, adjacency in plain ``nn.Sequential`` and
    the same search in each child."""
    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any failure to trace means: look closer
        graph = None
    if graph is not None:
        _pairs_from_graph(module, prefix, graph, verdicts, pairs)
        return
    children = [(k, c) for k, c in module._modules.items() if c is not None]
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        for (ka, a), (kb, b) in zip(children, children[1:]):
            if isinstance(b, _BatchNorm) and _is_predecessor(a):
                pairs[_join(prefix, kb)] = _join(prefix, ka)
    for key, child in children:
        if not isinstance(child, _LEAVES):
            _find_pairs(child, _join(prefix, key), verdicts, pairs)


def _refuse(bn: nn.Module, pred: nn.Module, counts, param_counts) -> str | None:
    """Why ``bn`` cannot be folded into ``pred``, or None."""
    if isinstance(pred, LazyModuleMixin) and pred.has_uninitialized_params():
        return "its Conv/Linear is not initialized"
    if counts[id(bn)] > 1 or counts[id(pred)] > 1:
        return "it or its Conv/Linear is registered in more than one place"
    if any(param_counts[id(p)] > 1 for p in pred.parameters(recurse=False)):
        return "its Conv/Linear shares parameters with another module"
    if torch.nn.utils.parametrize.is_parametrized(pred):
        return "its Conv/Linear's weight is parametrized"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (bn, pred)):
        return "it or its Conv/Linear has forward hooks"
    if not _plain_forward(type(bn)):
        return f"{type(bn).__name__} has its own forward"
    out = pred.out_features if isinstance(pred, nn.Linear) else pred.out_channels
    if bn.num_features != out:
        return f"num_features={bn.num_features} differs from the {out} outputs before it"
    rank, pred_rank = _rank(type(bn)), (1 if isinstance(pred, nn.Linear) else len(pred.kernel_size))
    if rank is not None and rank != pred_rank:
        return f"a {type(bn).__name__} after a {type(pred).__name__}"
    return None


def _fold(bn: _BatchNorm, pred: nn.Module) -> None:
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in float64."""
    w = pred.weight
    f64 = dict(dtype=torch.float64, device=w.device)
    mean, var = bn.running_mean.to(**f64), bn.running_var.to(**f64)
    gamma = bn.weight.to(**f64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(**f64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = pred.bias.to(**f64) if pred.bias is not None else torch.zeros_like(mean)
    w64 = w.detach().to(**f64)
    if isinstance(pred, _ConvNd) and pred.transposed:  # weight (in, out / groups, *k)
        g = pred.groups
        grouped = w64.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))
        new_w = (grouped * s).reshape(w.shape)
    else:  # weight (out, ...)
        new_w = w64 * scale.reshape(-1, *[1] * (w.dim() - 1))
    new_b = (bias - mean) * scale + beta
    with torch.no_grad():
        w.copy_(new_w)
        if pred.bias is None:
            pred.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
        else:
            pred.bias.copy_(new_b)


def _linear_ranks(model: nn.Module, linears: list, example_inputs) -> dict:
    """``{id(linear): output.dim()}`` of the given Linears in one eval call of ``model`` on
    ``example_inputs`` (a tensor or a tuple of positional arguments)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ranks: dict = {}
    hooks = [m.register_forward_hook(
        lambda mod, _, out: ranks.__setitem__(id(mod), getattr(out, "ndim", None)))
        for m in linears]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return ranks


def _folded_linear_check(module: nn.Module, args) -> None:
    """Forward pre-hook of a Linear that a BatchNorm1d was folded into without example inputs:
    the fold holds for (N, features) activations only."""
    x = args[0] if args else None
    if getattr(x, "ndim", 2) != 2:
        raise ShapeError(
            f"fold_batchnorm folded a BatchNorm1d into this Linear assuming (N, features) "
            f"activations, but it got a {x.ndim}-D input {tuple(x.shape)}: the BatchNorm1d "
            "normalizes dim 1 while the Linear acts on the last dim, so the fold does not hold. "
            "Fold with fold_batchnorm(model, example_inputs=...), which leaves such pairs "
            "unfolded.")


def fold_batchnorm(model: nn.Module, *, report: bool = False, example_inputs=None):
    r"""An eval-mode deep copy of ``model`` in which every BatchNorm that directly follows a
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` is folded into it and replaced
    by ``nn.Identity``. ``model`` is not changed.

    With :math:`s = \gamma / \sqrt{\mathrm{running\_var} + \epsilon}` per output channel:

    .. math::

        W' = W \cdot s, \qquad b' = (b - \mathrm{running\_mean}) \cdot s + \beta

    (over the output-channel axis: 0 of a Conv/Linear weight, 1 of a ConvTranspose weight),
    computed in float64 and cast back; a missing conv bias is created, a missing :math:`\gamma`
    or :math:`\beta` counts as 1 or 0. In eval the copy computes what ``model`` does.

    "Directly follows" is read off the dataflow: with :mod:`torch.fx` the conv's output must
    feed only the BatchNorm, each is called once, and neither's parameters are read elsewhere.
    Where a module does not trace (data-dependent control flow), its plain ``nn.Sequential``
    containers are searched for a Conv/Linear followed by a BatchNorm as consecutive children
    (assuming, as fx cannot check there, that they are called only through the container),
    and its children are traced one by one.

    ``Linear`` + ``BatchNorm1d`` folds only for ``(N, features)`` activations (on ``(N, C, L)``
    the BatchNorm normalizes dim 1, the Linear acts on the last). With ``example_inputs`` the
    model runs once on them and a pair whose Linear output is not 2-D stays unfolded; without,
    the folded Linear raises a ShapeError on an input that is not 2-D (never a wrong answer).

    A BatchNorm that cannot be folded stays: one after a ReLU, one whose conv output is used
    elsewhere, one without running statistics (``track_running_stats=False`` normalizes with
    batch statistics even in eval), one with its own forward or hooks.

    Args:
        model: the model; not modified.
        report: return ``(copy, unfolded)`` where ``unfolded`` maps the qualified name of each
            BatchNorm left in the copy to the reason. Default False: return the copy, and warn
            (``UserWarning``) listing those BatchNorms if there are any.
        example_inputs: a tensor, or a tuple of positional arguments, that ``model`` runs on
            in eval (once, without gradients) to check the shapes of ``Linear`` outputs.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                             torch.nn.ReLU(), torch.nn.BatchNorm2d(8)).eval()
    >>> folded, unfolded = fold_batchnorm(model, report=True)
    >>> folded[1], list(unfolded)
    (Identity(), ['3'])
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(folded(x), model(x), atol=1e-6)
    True
    """
    folded = copy.deepcopy(model).eval()
    counts = collections.Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    param_counts = collections.Counter(
        id(p) for _, p in folded.named_parameters(remove_duplicate=False))
    verdicts: dict[str, str] = {}
    pairs: dict[str, str] = {}
    if not isinstance(folded, _LEAVES):
        _find_pairs(folded, "", verdicts, pairs)
    linears = [folded.get_submodule(p) for p in pairs.values()]
    linears = [m for m in linears if isinstance(m, nn.Linear)]
    ranks = _linear_ranks(folded, linears, example_inputs) \
        if linears and example_inputs is not None else None
    done = set()
    for bn_name, pred_name in pairs.items():
        bn, pred = folded.get_submodule(bn_name), folded.get_submodule(pred_name)
        if id(bn) in done:
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue  # reported below
        why = _refuse(bn, pred, counts, param_counts)
        linear = isinstance(pred, nn.Linear)
        if why is None and linear and ranks is not None and ranks.get(id(pred), 2) != 2:
            why = (f"its Linear's output is {ranks[id(pred)]}-D on example_inputs: the "
                   "BatchNorm1d normalizes dim 1, the Linear acts on the last dim")
        if why is not None:
            verdicts[bn_name] = why
            continue
        _fold(bn, pred)
        if linear and ranks is None:
            pred.register_forward_pre_hook(_folded_linear_check)
        done.add(id(bn))
        _where(folded, bn, nn.Identity())
    unfolded = {}
    for name, m in folded.named_modules():
        if isinstance(m, _BatchNorm):
            if m.running_mean is None or m.running_var is None:
                unfolded[name] = ("it has no running statistics (track_running_stats=False): it "
                                  "normalizes with batch statistics even in eval")
            else:
                unfolded[name] = verdicts.get(name, (
                    "forward does not trace with torch.fx and it does not directly follow a "
                    "Conv/Linear in an nn.Sequential"))
    if report:
        return folded, unfolded
    if unfolded:
        warnings.warn(
            f"fold_batchnorm left {len(unfolded)} BatchNorm(s) unfolded: "
            + "; ".join(f"{_show(k)}: {v}" for k, v in unfolded.items()),
            stacklevel=2,
        )
    return folded


# --------------------------------------------------------------------------------------------
# freeze_batchnorm
# --------------------------------------------------------------------------------------------

class _FrozenBatchNorm:
    """Mixin of the frozen BatchNorm classes: ``train(mode)`` always means eval."""

    def train(self, mode: bool = True):
        return super().train(False)

    # picklable, deep-copyable: rebuilt from the class it was made from (normlab._classes)
    __reduce_ex__ = _classes.reduce_ex


@functools.cache
def _frozen_class(base: type) -> type:
    return type(f"Frozen{base.__name__}", (_FrozenBatchNorm, base), {
        "__module__": __name__, "_normlab_unfrozen": base, "_normlab_made": ("frozen", base),
        "__doc__": f"A frozen {base.__name__}: see :func:`normlab.tools.freeze_batchnorm`.",
    })


_classes.register("frozen", _frozen_class)


def _frozen_instance(base: type) -> nn.Module:  # (what pickles of normlab <= 0.x hold)
    return object.__new__(_frozen_class(base))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    r"""Freeze every BatchNorm inside ``model`` (``model`` itself included), in place, and
    return ``model``.

    A frozen BatchNorm stays in eval mode whatever ``model.train()`` says, so it normalizes
    with its running statistics and never updates them,

    .. math::

        y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
            \cdot \gamma + \beta,

    and its :math:`\gamma, \beta` get ``requires_grad=False`` (and their ``.grad`` is cleared).
    Gradients still flow through it to earlier layers. This is torchvision's
    ``FrozenBatchNorm2d`` (fine-tuning detection backbones with small batches) without its
    drawbacks: the module keeps its identity, is still an instance of its class (its class is
    switched to a ``Frozen<Name>`` subclass), keeps ``num_batches_tracked`` and its
    parameters, so the ``state_dict`` has the same keys and a checkpoint loads into the frozen
    and the unfrozen model alike; any BatchNorm (1d/2d/3d, ``SyncBatchNorm``, normlab's) can be
    frozen. A BatchNorm with ``track_running_stats=False`` has no statistics to freeze: its
    parameters are frozen and it keeps normalizing with batch statistics (with a warning).
    :func:`unfreeze_batchnorm` undoes it.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> model = freeze_batchnorm(model)
    >>> model.train()[1].training, model[1].weight.requires_grad, type(model[1]).__name__
    (False, False, 'FrozenBatchNorm1d')
    """
    batch_stats = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or isinstance(m, _FrozenBatchNorm):
            continue
        m._normlab_requires_grad = {k: p.requires_grad
                                    for k, p in m.named_parameters(recurse=False)}
        m.__class__ = _frozen_class(type(m))
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
            p.grad = None
        m.train(False)
        if m.running_mean is None:
            batch_stats.append(name)
    if batch_stats:
        warnings.warn(
            "freeze_batchnorm: " + ", ".join(map(_show, batch_stats)) + " track no running "
            "statistics (track_running_stats=False): only their parameters are frozen, they "
            "keep normalizing with batch statistics", stacklevel=2)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm` in place and return ``model``: each frozen BatchNorm gets
    its class and its parameters' ``requires_grad`` back, and the train/eval mode of ``model``.

    >>> model = unfreeze_batchnorm(freeze_batchnorm(torch.nn.BatchNorm2d(3)))
    >>> type(model).__name__, model.training, model.weight.requires_grad
    ('BatchNorm2d', False, True)
    """
    for m in list(model.modules()):
        base = vars(type(m)).get("_normlab_unfrozen")
        if base is None:
            continue
        m.__class__ = base
        flags = m.__dict__.pop("_normlab_requires_grad", {})
        for k, p in m.named_parameters(recurse=False):
            p.requires_grad_(flags.get(k, True))
        m.training = model.training
    return model
