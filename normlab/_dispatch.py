"""Backends behind one small interface, and the ``backend`` context manager that forces one.

A backend is an object with the five methods ``batch_norm``, ``instance_norm``, ``group_norm``,
``layer_norm`` and ``rms_norm``. They receive arguments that :mod:`normlab.functional` has
already validated and canonicalized (``normalized_shape`` a tuple, ``eps`` a float), and they
implement exactly the semantics of the torch function of the same name, including in-place
running-statistics updates.

The choice is read on every call (a :class:`contextvars.ContextVar`, so it is per thread and per
asyncio task), never captured at import time. Unforced, the choice is ``"auto"``: the fused
``cpu`` kernels for CPU tensors (when Numba is installed), the ``triton`` kernels for CUDA
tensors (when Triton is installed), the ``reference`` engine elsewhere.

Backends may also offer ``add_layer_norm`` and ``add_rms_norm`` (residual add fused with the
norm); :mod:`normlab.functional` composes ``x + residual`` and the norm for those that don't.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
from typing import Iterator

import torch

from ._errors import BackendUnavailableError

# name -> "module:attribute" of the backend object, imported on first use.
_KNOWN = {
    "reference": "normlab.kernels.reference:BACKEND",
    "torch": "normlab.kernels.torch_ops:BACKEND",
    "cpu": "normlab.kernels.cpu:BACKEND",  # fused Numba kernels, needs numba
    "triton": "normlab.kernels.triton_backend:BACKEND",  # GPU kernels, needs triton
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
    """The forced backend's name, or ``"auto"`` when none is forced (the default)."""
    return _forced.get() or "auto"


_installed: dict[str, bool] = {}  # whether a backend's requirement imports, looked up once
_AUTO = {"cpu": "cpu", "cuda": "triton"}  # device type -> the fused backend "auto" prefers


def auto_backend(x: torch.Tensor | None) -> str:
    """The backend ``"auto"`` picks for input ``x``: ``"cpu"`` for CPU tensors when Numba is
    installed, ``"triton"`` for CUDA tensors when Triton is, else ``"reference"``."""
    return _auto_for(None if x is None else x.device.type)


def _auto_for(device_type: str | None) -> str:
    name = _AUTO.get(device_type)
    if name is None:
        return "reference"
    if name not in _installed:
        _installed[name] = importlib.util.find_spec(_REQUIRES[name]) is not None
    return name if _installed[name] else "reference"


def get_backend(x: torch.Tensor | None = None):
    """The backend object for a call on input ``x``: the forced one, else ``"auto"``'s choice.

    ``"auto"`` on a CPU tensor (with Numba installed) is :class:`normlab.kernels.auto.Auto`:
    per call the ``cpu`` kernels or ATen's, as the committed benchmark table says; on a CUDA
    tensor the ``triton`` backend (with Triton installed); else the ``reference`` engine.

    Under ``torch.compile``, dynamo cannot read the ContextVar; it reads ``_forced_name``, a
    module-level mirror of the innermost forced backend, and guards on it, so a compiled function
    recompiles when the choice changes. Compiled ``auto`` follows the same table as eager (on
    static shapes; the kernels where the size is symbolic), with no background warm-up: the
    compiled graph calls ATen's operators or the ``cpu`` backend's registered ones. (The mirror
    is process-wide: threads compiling under different forced backends at the same time may see
    each other's choice.)"""
    if torch.compiler.is_compiling():
        name = _forced_name or _auto_name(None if x is None else x.device.type)
        if _forced_name is None and name == "cpu":
            return _cpu_auto.compiled  # made, with its kernels loaded, by _auto_name
        return _loaded[name]
    name = _forced.get()
    if name is not None:
        return _loaded.get(name) or _load(name)
    if x is not None and x.is_cpu:
        return _cpu_auto or _make_cpu_auto()
    return _load(auto_backend(x))


_cpu_auto = None  # the Auto object for CPU tensors, made on first use

# wrapped(): inside a torch.func transform (vmap, grad, jacrev, jacfwd, hessian, jvp, functional
# per-sample gradients), a forward-mode AD level (torch.autograd.forward_ad.dual_level) or a
# torch.jit.trace recording, the tensors a norm receives are wrappers (batched, gradient-
# tracking, dual) or their calls are being recorded. Kernels that read memory cannot see through
# them, and an autograd.Function has no batching or forward-derivative rule, so normlab.functional
# then calls torch.nn.functional's norms, whatever backend is forced: they carry those rules, and
# a trace records ATen's operators. The answers (and errors) are torch's own.
_fwad = torch.autograd.forward_ad
_transforms_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state


def wrapped() -> bool:
    """Whether a norm called now sees wrapped tensors (torch.func, forward AD) or is being
    traced by ``torch.jit.trace``: then normlab.functional calls torch's functions."""
    return _fwad._current_level >= 0 or _transforms_active() or _tracing_state() is not None


def _make_cpu_auto():
    """``auto`` for CPU tensors: the kernels/ATen table over the ``cpu`` backend, or the
    reference engine when Numba is missing."""
    global _cpu_auto
    if _auto_for("cpu") != "cpu":
        return _load("reference")
    from .kernels import auto

    _cpu_auto = auto.Auto(lambda: _load("cpu"), auto.load_table())
    return _cpu_auto


def background_warmup(enabled: bool | None = None) -> bool:
    """Whether ``auto`` gets the cpu kernels ready in a background thread while ATen computes
    their calls (the default; ``NORMLAB_BACKGROUND_WARMUP=0`` turns it off), and, with
    ``enabled``, set it. Off, the first call of each kernel compiles it (or loads it from Numba's
    cache) in the calling thread, as does every call under
    ``torch.use_deterministic_algorithms(True)``: which calls ran on ATen then never depends
    on timing. Returns the setting in force before the call.

    >>> import normlab
    >>> previous = normlab.background_warmup(False)
    >>> _ = normlab.background_warmup(previous)
    """
    auto = _cpu_auto or _make_cpu_auto()
    warm = getattr(auto, "warmup", None)
    if warm is None:  # no Numba: nothing to warm up
        return False
    before = warm.background
    if enabled is not None:
        warm.background = bool(enabled)
    return before


@contextlib.contextmanager
def synchronous_warmup() -> Iterator[None]:
    """``background_warmup(False)`` inside the block (benchmarks, the lab: every call of the
    block runs where the table says, never on ATen because a kernel was still compiling)."""
    before = background_warmup(False)
    try:
        yield
    finally:
        background_warmup(before)


def wait_for_kernels(timeout: float | None = None) -> bool:
    """Wait until the background warm-ups started so far are done (see
    :func:`background_warmup`); False if ``timeout`` seconds passed first. Benchmarks call it
    after a warm-up call, so that they time the kernels and not ATen standing in."""
    auto = _cpu_auto
    warm = getattr(auto, "warmup", None)
    return True if warm is None else warm.wait(timeout)


def _auto_name(device_type: str | None) -> str:
    """``auto_backend``'s choice for a device type, loaded (a constant for dynamo); for
    ``"cpu"`` the Auto object too, its kernels loaded."""
    name = _auto_for(device_type)
    _load(name)
    if name == "cpu":
        (_cpu_auto or _make_cpu_auto()).compiled
    return name


# What ``torch.compiler.assume_constant_result`` does (torch 2.0-2.13), without its import of
# torch._dynamo: that import took 1.7 s of ``import normlab`` (tested: test_compile.py).
_auto_name._dynamo_marked_constant = True


_forced_name: str | None = None


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Force every normlab normalization inside the ``with`` block to run on backend ``name``.

    ``"cpu"`` runs the fused Numba kernels (the default for CPU tensors), ``"triton"`` the
    Triton kernels (the default for CUDA tensors), ``"reference"``
    normlab's own readable engine (the oracle of the tests), ``"torch"`` ATen's kernels
    (``torch.nn.functional``) as a peer. An unknown name raises ``ValueError``; a
    known backend that cannot run here raises :class:`BackendUnavailableError`.

    >>> import torch, normlab
    >>> with normlab.backend("torch"):
    ...     y = normlab.functional.layer_norm(torch.ones(2, 3), (3,))
    """
    global _forced_name
    _load(name)  # fail on entering, not at the first call inside
    token, outer = _forced.set(name), _forced_name
    _forced_name = name
    try:
        yield name
    finally:
        _forced.reset(token)
        _forced_name = outer
