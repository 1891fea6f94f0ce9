"""fold_batchnorm: BatchNorm folded into the Conv/ConvTranspose/Linear before it."""
from __future__ import annotations

import collections
import copy
import functools
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from .._errors import ShapeError
from ._common import _arity, _rank, _show, _where, spec_of



def _leaf(m: nn.Module) -> bool:
    """A norm, conv or linear: traced as one call, never looked into."""
    return isinstance(m, (_ConvNd, nn.Linear)) or spec_of(type(m)) is not None


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps every norm, conv and linear (normlab's included) as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _leaf(m) or super().is_leaf_module(m, module_qualified_name)


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
        if not _leaf(child):
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
    if not _leaf(folded):
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

