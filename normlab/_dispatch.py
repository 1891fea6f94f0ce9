"""Backends behind one small interface, and the ``backend`` context manager that forces one.

A backend is an object with the five methods ``batch_norm``, ``instance_norm``, ``group_norm``,
``layer_norm`` and ``rms_norm``. They receive arguments that :mod:`normlab.functional` has
already validated and canonicalized (``normalized_shape`` a tuple, ``eps`` a float), and they
implement exactly the semantics of the torch function of the same name, including in-place
running-statistics updates.

The choice is read on every call (a :class:`contextvars.ContextVar`, so it is per thread and per
asyncio task), never captured at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
from typing import Iterator

from ._errors import BackendUnavailableError

# name -> "module:attribute" of the backend object, imported on first use.
_KNOWN = {
    "reference": "normlab.kernels.reference:BACKEND",
    "torch": "normlab.kernels.torch_ops:BACKEND",
    "cpu": "normlab.kernels.cpu:BACKEND",  # fused Numba kernels (rows so far), needs numba
    "triton": None,  # GPU kernels: not built yet
}
_REQUIRES = {"cpu": "numba", "triton": "triton"}  # the import a backend cannot run without
_loaded: dict[str, object] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("normlab_backend", default=None)


def _load(name: str):
    if name not in _KNOWN:
        raise ValueError(f"unknown normlab backend {name!r}; known backends: {', '.join(_KNOWN)}")
    if name not in _loaded:
        target = _KNOWN[name]
        if target is None:
            raise BackendUnavailableError(
                f"normlab backend {name!r} is not available in this build; "
                f"available: {', '.join(available_backends())}"
            )
        module, attr = target.split(":")
        try:
            _loaded[name] = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise BackendUnavailableError(
                f"normlab backend {name!r} cannot run here: {e}; "
                f"available: {', '.join(available_backends())}"
            ) from e
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (their dependencies import)."""
    names = []
    for name, target in _KNOWN.items():
        if target is None:
            continue
        if name not in _loaded and importlib.util.find_spec(_REQUIRES.get(name, "torch")) is None:
            continue
        names.append(name)
    return names


def current_backend() -> str:
    """The backend the next call will use: the forced one, else the default (``"reference"``)."""
    return _forced.get() or "reference"


def get_backend():
    """The backend object for the next call."""
    return _load(current_backend())


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Force every normlab normalization inside the ``with`` block to run on backend ``name``.

    ``"reference"`` is normlab's own readable engine (the oracle of the tests), ``"torch"`` runs
    ATen's kernels (``torch.nn.functional``) as a peer. An unknown name raises ``ValueError``; a
    known backend that cannot run here raises :class:`BackendUnavailableError`.

    >>> import torch, normlab
    >>> with normlab.backend("torch"):
    ...     y = normlab.functional.layer_norm(torch.ones(2, 3), (3,))
    """
    _load(name)  # fail on entering, not at the first call inside
    token = _forced.set(name)
    try:
        yield name
    finally:
        _forced.reset(token)
