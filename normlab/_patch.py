"""``normlab.patch``: make the normalization modules of an existing model run on normlab."""
from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as _torch_F

from . import _classes, _norms, registry  # noqa: F401  (_norms: torch's five registered)
from . import functional as _F
from . import nn as _nn

# Each torch class and its normlab twin (the registry's module pairs), and the methods the
# twin overrides.
TWINS: dict[type, type] = {theirs: ours for spec in registry.norms()
                           for theirs, ours in spec.modules if theirs is not None}
_OVERRIDDEN = ("forward", "_apply_instance_norm")


class _FunctionalShim(types.ModuleType):
    """``torch.nn.functional`` with its five normalizations answered by normlab."""

    def __getattr__(self, name):
        return getattr(_torch_F, name)


_SHIM = _FunctionalShim("normlab._patch.functional")
for _name in _F.__all__:
    setattr(_SHIM, _name, getattr(_F, _name))


def _torch_base(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in TWINS), None)


def _rebind(fn: types.FunctionType) -> types.FunctionType | None:
    """``fn`` with every global naming ``torch.nn.functional`` pointing at the shim instead, or
    None when it has none. The globals are a snapshot of its module's taken now."""
    names = [k for k in fn.__code__.co_names if fn.__globals__.get(k) is _torch_F]
    if not names:
        return None
    scope = dict(fn.__globals__)
    scope.update({k: _SHIM for k in names})
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__doc__, new.__qualname__ = fn.__kwdefaults__, fn.__doc__, fn.__qualname__
    return new


@functools.cache
def _twin_of(cls: type) -> type | None:
    """The class a module of ``cls`` is switched to, or None when it cannot be patched."""
    if cls in TWINS:
        return TWINS[cls]
    base = _torch_base(cls)
    if base is None or _is_normlab(cls):
        return None
    twin = TWINS[base]
    methods = {}
    for name in _OVERRIDDEN:
        own, torchs = getattr(cls, name, None), getattr(base, name, None)
        if own is not torchs:  # the subclass wrote its own: route its torch calls to normlab
            rebound = _rebind(own)
            if rebound is not None:
                methods[name] = rebound
        elif getattr(twin, name, None) is not torchs:  # it kept torch's: use normlab's
            methods[name] = getattr(twin, name)
    if not methods:
        return None
    namespace = {**methods, "_normlab_patched": True, "__module__": cls.__module__,
                 "_normlab_made": ("patch", cls), "__reduce_ex__": _classes.reduce_ex,
                 "__prepare_scriptable__": _nn._script.Scriptable.__prepare_scriptable__}
    return type(cls.__name__, (cls,), namespace)


_classes.register("patch", _twin_of)  # pickling a patched module: see normlab._classes


def _is_normlab(cls: type) -> bool:
    """Already runs on normlab: a normlab module (or a subclass of one) or a patched class."""
    return issubclass(cls, tuple(TWINS.values())) or "_normlab_patched" in vars(cls)


def _unpatchable(cls: type) -> bool:
    return _twin_of(cls) is None and _torch_base(cls) is not None and not _is_normlab(cls)


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch normalization module inside ``model`` (``model`` itself included) run
    on normlab, in place, and return ``model``.

    Each module's class is switched, so the module keeps its identity, parameters (an optimizer
    built before still works), buffers, hooks, train/eval mode and device:

    * an exact torch class (``torch.nn.BatchNorm2d``, ...) becomes its normlab twin
      (``normlab.nn.BatchNorm2d``, ...);
    * a subclass (timm's ``LayerNorm2d``, a user's ``MyBatchNorm``) becomes a subclass of itself
      that computes with normlab: with normlab's ``forward`` if it kept torch's, or with its own
      ``forward`` whose calls to ``torch.nn.functional``'s five norms go to
      :mod:`normlab.functional` if it wrote one (a snapshot of its module's globals is taken).
      A subclass whose own ``forward`` does not call them through ``torch.nn.functional`` is
      left as it is, with a warning.

    Patching twice changes nothing more.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(patch(model)[1]).__module__
    'normlab.nn.batchnorm'
    """
    skipped = set()
    for module in model.modules():
        twin = _twin_of(type(module))
        if twin is not None:
            module.__class__ = twin
        elif _unpatchable(type(module)):
            skipped.add(type(module).__qualname__)
    if skipped:
        warnings.warn(
            f"normlab.patch left {', '.join(sorted(skipped))} unpatched: its forward does not "
            "call torch.nn.functional's normalizations, so it keeps its own computation",
            stacklevel=2,
        )
    return model
