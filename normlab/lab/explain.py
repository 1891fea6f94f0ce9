"""``normlab explain NORM``: a norm's reduction spec, in code and in words, a worked example on
the classic 3x3 matrix checked against torch, and its axes figure.

Everything shown is read from :mod:`normlab._engine` (the :class:`~normlab._engine.Reduction`
the norm is built from, the statistics :func:`~normlab._engine.normalize` returns); torch's
module is only the check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import _engine as E
from . import axes

SEED_MATRIX = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]


@dataclass(frozen=True)
class _Case:
    reads_as: str  # how the matrix is read
    names: tuple[str, ...]  # its axes
    batched: bool  # the matrix is one sample (x[None])
    module: Callable[[], torch.nn.Module]
    module_text: str
    groups: int = axes.GROUPS


_CASES = {  # the examples of `normlab demo`
    "batchnorm": _Case("a batch of 3 samples (rows) of 3 channels (columns), training mode",
                       ("N", "C"), False, lambda: torch.nn.BatchNorm1d(3), "BatchNorm1d(3)"),
    "layernorm": _Case("3 rows of 3 features", ("N", "D"), False,
                       lambda: torch.nn.LayerNorm(3), "LayerNorm(3)"),
    "instancenorm": _Case("1 sample of 3 channels (rows) x 3 steps (columns)", ("N", "C", "L"),
                          True, lambda: torch.nn.InstanceNorm1d(3), "InstanceNorm1d(3)"),
    "groupnorm": _Case("1 sample of 3 channels (rows) x 3 steps, in G=1 group (3 channels "
                       "allow G = 1 or 3)", ("N", "C", "L"), True,
                       lambda: torch.nn.GroupNorm(1, 3), "GroupNorm(1, 3)", groups=1),
    "rmsnorm": _Case("3 rows of 3 features", ("N", "D"), False,
                     lambda: torch.nn.RMSNorm(3), "RMSNorm(3)"),
}


@dataclass(frozen=True)
class Example:
    """The worked example of one norm: the engine's statistics and output, and torch's."""

    norm: axes.Norm
    x: torch.Tensor  # as the norm sees it (3x3, or 1x3x3)
    reduction: E.Reduction
    labels: torch.Tensor  # the statistic each element shares (axes.stat_labels)
    mean: torch.Tensor | None  # one per statistic (None: not centered)
    var: torch.Tensor  # one per statistic: biased variance, or the mean square (or sum)
    eps: float
    y: torch.Tensor  # the engine's output
    torch_y: torch.Tensor  # torch.nn's module on the same input
    weight: torch.Tensor | None = None  # the module's, where it does not start at ones

    @property
    def max_diff(self) -> float:
        return (self.y - self.torch_y).abs().max().item()


def _case(norm: axes.Norm) -> _Case:
    """The example of a norm: its own above, else the matrix as 3 rows of 3 features (row
    norms) or a batch of 3 samples of 3 channels, checked against normlab's module."""
    case = _CASES.get(norm.key)
    if case is not None:
        return case
    cls = norm.spec.classes[0]
    if norm.spec.input == "rows":
        return _Case("3 rows of 3 features", ("N", "D"), False, lambda: cls(3),
                     f"{cls.__name__}(3)")
    return _Case("a batch of 3 samples (rows) of 3 channels (columns)", ("N", "C"), False,
                 lambda: cls(3), f"{cls.__name__}(3)")


def worked_example(name: str) -> Example:
    """Normalize the 3x3 seed matrix with the engine and with the norm's module (torch.nn's,
    for the norms torch has)."""
    norm = axes.norm(name)
    case = _case(norm)
    x = torch.tensor(SEED_MATRIX)
    x = x[None] if case.batched else x
    module = case.module()
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    red = norm.reduction(tuple(x.shape), case.groups)
    w = getattr(module, "weight", None)
    w = None if w is None or bool((w == 1).all()) else w.detach()
    with torch.no_grad():
        y, mean, var = E.normalize(x, red, w, eps=eps)
        torch_y = module(x)
    flat = lambda t: None if t is None else t.reshape(-1)
    return Example(norm, x, red, axes.stat_labels(red, tuple(x.shape)), flat(mean), flat(var),
                   float(eps), y, torch_y, w)


def _view_axes(names: tuple[str, ...], shape: tuple[int, ...], view: tuple[int, ...]):
    """Per axis of ``view``: its name (a split axis X becomes (G, X/G)) and the input axis it
    belongs to."""
    out, i = [], 0
    for owner, (name, size) in enumerate(zip(names, shape)):
        parts, prod = 0, 1
        while prod < size or not parts:
            prod *= view[i + parts]
            parts += 1
        split = {1: [name], 2: ["G", f"{name}/G"]}.get(parts, [f"{name}{k}" for k in range(parts)])
        out += [(n, owner) for n in split]
        i += parts
    return out


def _spec_lines(red: E.Reduction, names: tuple[str, ...], shape: tuple[int, ...]) -> list[str]:
    axes_ = _view_axes(names, shape, red.view)
    along = lambda dims: ", ".join(axes_[d][0] for d in dims) or "nothing"
    per_param = sorted({axes_[d][1] for d, s in enumerate(red.affine) if s > 1})
    n_stats = math.prod(red.stats_shape)
    rows = [
        ("view", red.view, f"the input viewed as ({', '.join(n for n, _ in axes_)})"),
        ("dims", red.dims, f"reduced for one statistic: {along(red.dims)}"),
        ("affine", red.affine, "the affine parameters' view: " + (
            f"one per ({', '.join(names[a] for a in per_param)})" if per_param
            else "one value in all")),
        ("centered", red.centered, "the mean is subtracted" if red.centered
         else f"no mean: the statistic is the {_second_moment(red)}"),
        ("count", red.count, f"elements share one statistic; {n_stats} statistic"
         + "s" * (n_stats != 1)),
    ]
    return [f"  {k:<9s} {str(v):<18s} {text}" for k, v, text in rows]


def _second_moment(red: E.Reduction) -> str:
    return "mean square" if red.averaged else "sum of squares"


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _matrix(t: torch.Tensor, indent: str = "    ") -> list[str]:
    return [indent + "  ".join(f"{v:8.4f}" for v in row) for row in t.reshape(3, 3).tolist()]


def explain(norm: str, out_dir: str | Path = ".") -> str:
    """The text of ``normlab explain NORM``; writes ``axes-<norm>.png`` into ``out_dir``.

    ``norm`` is a registered norm in any spelling (:mod:`normlab.registry`: batchnorm,
    layernorm, instancenorm, groupnorm, rmsnorm, ...).
    """
    nm = axes.norm(norm)
    d = axes.describe(nm.key)
    lines = [nm.title, "=" * len(nm.title), nm.doc, "",
             f"Reduction spec for an (N, C, H, W) = {axes.SHAPE} input:",
             f"  normlab._engine.{nm.call(axes.SHAPE)}",
             *_spec_lines(d.reduction, axes.AXES, axes.SHAPE),
             f"  In words: {d.words()}.", ""]

    ex = worked_example(nm.key)
    case = _case(nm)
    shape = tuple(ex.x.shape)
    lines += [f"Worked example: x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]] read as {case.reads_as}",
              f"  normlab._engine.{nm.call(shape, case.groups)}",
              *_spec_lines(ex.reduction, case.names, shape)]
    red = ex.reduction
    centered, moment = red.centered, _second_moment(red)
    for k in range(ex.var.numel()):
        members = ex.x.reshape(-1)[ex.labels.reshape(-1) == k].tolist()
        stat = (f"mean {_fmt(ex.mean[k].item())}, variance {_fmt(ex.var[k].item())}" if centered
                else f"{moment} {_fmt(ex.var[k].item())}")
        lines.append(f"  statistics set {k + 1}: {{{', '.join(_fmt(v) for v in members)}}}: "
                     f"{stat}")
    formula = ("(x - mean) / " if centered else "x / ") + (
        f"max(sqrt({'variance' if centered else moment}), eps)" if red.clamp_eps
        else f"sqrt({'variance' if centered else moment} + eps)")
    if ex.weight is not None:
        formula += f" * weight {_fmt(ex.weight.item())}" if ex.weight.numel() == 1 else \
            " * weight"
    peer = ("torch.nn.", "torch") if nm.spec.torch_fn else ("normlab.nn.", "module")
    lines += [f"  output {formula}, eps = {ex.eps:.3g}:", *_matrix(ex.y),
              f"  {peer[0]}{case.module_text} gives the same: max |engine - {peer[1]}| = "
              f"{ex.max_diff:.1e}" + ("" if ex.max_diff < 1e-6 else "  (MISMATCH)"), ""]

    path = axes.draw(Path(out_dir) / f"axes-{nm.key}.png", names=(nm.key,))
    lines.append(f"Axes figure: {path}")
    return "\n".join(lines)
