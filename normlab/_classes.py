"""The classes normlab makes at run time, and how their instances pickle.

``normlab.patch`` switches a module of a user's norm subclass (timm's ``LayerNorm2d``, a
``MyBatchNorm``) to a subclass made for it, and ``freeze_batchnorm`` switches a BatchNorm to a
``Frozen<Name>`` subclass. pickle saves a class by its module and name, and these names lead
to the class they were made from (or to nothing), so an instance of a made class is pickled
with its *recipe* instead: how to make the class again from importable ones, e.g.
``("patch", ("frozen", MyBatchNorm))``. The makers are cached, so a recipe rebuilds the very
class object of this process (``type(copy) is type(module)``).
"""
from __future__ import annotations

from typing import Callable

_MAKERS: dict[str, Callable[[type], type]] = {}


def register(kind: str, maker: Callable[[type], type]) -> None:
    """``maker(base)`` makes (cached) the class of ``kind`` for ``base``; a made class holds
    ``_normlab_made = (kind, base)`` in its own namespace."""
    _MAKERS[kind] = maker


def recipe(cls: type):
    """``cls`` itself when pickle can find it by name, else ``(kind, recipe(base))``."""
    made = vars(cls).get("_normlab_made")
    if made is None:
        return cls
    kind, base = made
    return kind, recipe(base)


def build(rec) -> type:
    """The class a :func:`recipe` describes."""
    if isinstance(rec, type):
        return rec
    kind, base = rec
    if kind not in _MAKERS:  # the module that registers it (import order of unpickling)
        from . import _patch, tools  # noqa: F401
    return _MAKERS[kind](build(base))


def instance(rec):
    """A new, uninitialized instance of the class ``rec`` describes (pickle then sets its
    state)."""
    return object.__new__(build(rec))


def reduce_ex(self, protocol):
    """``__reduce_ex__`` of the made classes: rebuilt from the recipe, then the state set."""
    return instance, (recipe(type(self)),), self.__getstate__()
