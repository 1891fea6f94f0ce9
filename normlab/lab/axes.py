"""Which elements share one statistic, read off the engine's own reduction specs and drawn.

Nothing here is written per norm: each norm is its :mod:`normlab.registry` entry, whose
:mod:`normlab._engine` function builds its :class:`~normlab._engine.Reduction`, and
:func:`stat_labels` numbers the statistics the way the engine broadcasts them (one per index
of ``stats_shape``, expanded over ``view``), so the figure shows what the code computes. The drawing is the GroupNorm paper's Figure 2 (Wu &
He, 2018): an (N, C, H*W) activation cube with one statistics set highlighted.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

import torch

from .. import _engine as E
from .. import registry

SHAPE = (4, 6, 2, 3)  #: (N, C, H, W) of the drawn activation
GROUPS = 2  #: GroupNorm's G in the drawing (and in :func:`normlab.lab.explain.explain`)
AXES = ("N", "C", "H", "W")


@dataclass(frozen=True)
class Norm:
    """A registered norm (:mod:`normlab.registry`) as the figures see it: ``key`` is its name
    without separators (``"batchnorm"``)."""

    spec: registry.NormSpec

    @property
    def key(self) -> str:
        return self.spec.name.replace("_", "")

    @property
    def title(self) -> str:
        return self.spec.title

    def reduction(self, shape: tuple[int, ...], groups: int = GROUPS) -> E.Reduction:
        return self.spec.reduction(tuple(shape), self.spec.example_arg(tuple(shape), groups))

    def call(self, shape: tuple[int, ...], groups: int = GROUPS) -> str:
        """The engine call, as code: ``"group_reduction((4, 6, 2, 3), groups=2)"``."""
        return self.spec.engine_call(tuple(shape), self.spec.example_arg(tuple(shape), groups))

    @property
    def doc(self) -> str:
        """The engine function's own description (its docstring's first paragraph)."""
        return " ".join((self.spec.engine.__doc__ or "").split("\n\n")[0].split())


class _Norms(Mapping):
    """``key -> Norm`` for every registered norm, in registration order (the five in the
    order of the GroupNorm paper's figure, then RMSNorm), read when asked: norms registered
    later are drawn too."""

    def __getitem__(self, key: str) -> Norm:
        return norm(key)

    def __iter__(self):
        return (Norm(spec).key for spec in registry.norms())

    def __len__(self) -> int:
        return len(registry.names())


NORMS = _Norms()


def norm(name: str) -> Norm:
    """The :class:`Norm` called ``name`` in any spelling (``"BatchNorm"``, ``"batchnorm"``,
    ``"batch_norm"``)."""
    return Norm(registry.get(name))


def stat_labels(red: E.Reduction, shape: tuple[int, ...]) -> torch.Tensor:
    """For each element of an input of ``shape``, the number of the statistic it shares:
    statistics numbered over ``red.stats_shape`` and broadcast over ``red.view``, exactly as
    the engine's mean and variance broadcast."""
    ids = torch.arange(math.prod(red.stats_shape)).reshape(red.stats_shape)
    return ids.expand(red.view).reshape(shape)


def axis_roles(labels: torch.Tensor) -> list[int]:
    """Per axis, how many of its indices one statistics set spans: 1 means the axis indexes the
    statistics, its full size that it is reduced over, a size between that it is reduced in
    groups of that many (GroupNorm's channels)."""
    roles = []
    for a, size in enumerate(labels.shape):
        index = torch.arange(size).reshape([-1 if d == a else 1 for d in range(labels.ndim)])
        pairs = set(zip(labels.flatten().tolist(), index.expand_as(labels).flatten().tolist()))
        roles.append(max(Counter(label for label, _ in pairs).values()))
    return roles


@dataclass(frozen=True)
class Description:
    """A norm's reduction on one input shape: per element, the statistic it shares
    (``labels``), and per axis its role (:func:`axis_roles`)."""

    norm: Norm
    shape: tuple[int, ...]
    reduction: E.Reduction
    labels: torch.Tensor
    roles: list[int]

    @property
    def statistics(self) -> int:
        return int(self.labels.max()) + 1

    def words(self, names=AXES) -> str:
        """``"one statistic per (N), over C, H, W"``, from the axis roles."""
        per = [n for n, r in zip(names, self.roles) if r == 1]
        over = [n if r == s else f"{n} in groups of {r}"
                for n, r, s in zip(names, self.roles, self.shape) if r > 1]
        text = f"one statistic per ({', '.join(per)})" if per else "one statistic in all"
        return f"{text}, over {', '.join(over)}"


def describe(name: str, shape: tuple[int, ...] = SHAPE, groups: int = GROUPS) -> Description:
    """The reduction of norm ``name`` on ``shape``, with which elements share a statistic."""
    nm = norm(name)
    red = nm.reduction(tuple(shape), groups)
    labels = stat_labels(red, tuple(shape))
    return Description(nm, tuple(shape), red, labels, axis_roles(labels))


_COLORS = {"batchnorm": "#4878d0", "layernorm": "#ee854a", "instancenorm": "#3a9e4a",
           "groupnorm": "#d65f5f", "rmsnorm": "#956cb4"}
_DEPTH = (0.45, 0.35)  # the oblique projection: one step along C moves (right, up) by this


def _cube(ax, chosen, color: str) -> None:
    """Draw the visible faces of an (N, C, H*W) cube of cells, ``chosen`` cells in ``color``:
    N to the right, C into the page, H*W up (front face c = 0, top face, right face n = N-1)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    n, c, z = chosen.shape
    dx, dy = _DEPTH

    def at(x, y, h):
        return (x + y * dx, h + y * dy)

    def quad(x, y, h, u, v):
        """The cell with corner (x, y, h) spanned by the unit steps u and v (in x, y, h)."""
        return [at(x + a * u[0] + b * v[0], y + a * u[1] + b * v[1], h + a * u[2] + b * v[2])
                for a, b in ((0, 0), (1, 0), (1, 1), (0, 1))]

    X, Y, H = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    faces = (  # (cells, whether each is chosen, shade): the front, top and right faces
        ([quad(i, 0, h, X, H) for i in range(n) for h in range(z)], chosen[:, 0, :].ravel(), 1.0),
        ([quad(i, j, z, X, Y) for i in range(n) for j in range(c)], chosen[:, :, -1].ravel(), 0.85),
        ([quad(n, j, h, Y, H) for j in range(c) for h in range(z)], chosen[-1].ravel(), 0.7),
    )
    base, blank = to_rgb(color), to_rgb("#f7f7f7")
    for cells, flags, shade in faces:
        colors = [tuple(shade * v for v in (base if f else blank)) for f in flags]
        ax.add_collection(PolyCollection(cells, facecolors=colors, edgecolors="#444444",
                                         linewidths=0.6))
    ax.text(n / 2, -0.5, "N", ha="center", va="top", fontsize=11)
    ax.text(*at(n + 0.35, c / 2, -0.1), "C", ha="left", va="top", fontsize=11)
    ax.text(-0.35, z / 2, "H, W", ha="right", va="center", fontsize=11)
    ax.set_xlim(-1.8, n + c * dx + 0.8)
    ax.set_ylim(-1.2, z + c * dy + 0.3)
    ax.set_aspect("equal")
    ax.set_axis_off()


def draw(path: str | Path, names: tuple[str, ...] | None = None,
         shape: tuple[int, ...] = SHAPE) -> Path:
    """Draw, for each norm, an (N, C, H*W) activation cube with the elements that share the
    statistic of element (N-1, 0, 0, 0) highlighted, and save it as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(tuple(names or NORMS), tuple(shape)))
    return path


@functools.lru_cache(maxsize=16)
def _png(names: tuple[str, ...], shape: tuple[int, ...]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, len(names), figsize=(2.7 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axs[0], names):
        d = describe(name, shape)
        cube = d.labels.reshape(shape[0], shape[1], -1)  # H and W in one axis, as in the paper
        chosen = (cube == cube[-1, 0, 0]).numpy()
        _cube(ax, chosen, _COLORS.get(d.norm.key, "#4878d0"))
        ax.set_title(d.norm.title, fontsize=13)
        caption = d.words().replace(", over", ",\nover")
        if not d.reduction.centered:
            moment = "mean square" if d.reduction.averaged else "L2 norm"
            caption += f"\n({moment}: no centering)"
        ax.text(0.5, -0.02, caption, transform=ax.transAxes, ha="center", va="top", fontsize=8.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
