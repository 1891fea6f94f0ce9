"""What the model tools share: which modules are norms, their spatial rank, names in messages,
and what a class's ``forward`` and ``__init__`` take."""
from __future__ import annotations

import functools
import inspect

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _norms  # noqa: F401  (torch's five registered)
from .. import registry


@functools.cache
def spec_of(cls: type) -> registry.NormSpec | None:
    """The registered norm (:mod:`normlab.registry`) a module class computes: the first whose
    torch or normlab class is ``cls`` or a base of it (any ``_BatchNorm``, SyncBatchNorm
    included, is BatchNorm); None for other classes."""
    for spec in registry.norms():
        if any(issubclass(cls, c) for pair in spec.modules for c in pair if c is not None):
            return spec
    return registry.get("batch_norm") if issubclass(cls, _BatchNorm) else None

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
