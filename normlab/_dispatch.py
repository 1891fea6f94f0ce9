"""Backends behind one interface (:class:`Backend`), and the ``backend`` context manager that
forces one.

A backend implements the norms of :mod:`normlab.functional` with exactly the semantics of the
torch functions of the same names, in-place running-statistics updates included, and
``normalize(x, red, weight, bias, eps)`` for any other registered norm's
:class:`~normlab._engine.Reduction` (:mod:`normlab.registry`). It receives arguments that
:mod:`normlab.functional` has validated and canonicalized (``normalized_shape`` a tuple,
``eps`` a float). Every backend is checked against :class:`Backend` when it is loaded.

The choice is read on every call (a :class:`contextvars.ContextVar`, so it is per thread and per
asyncio task), never captured at import time. Unforced, the choice is ``"auto"``: the fused
``cpu`` kernels for CPU tensors (when Numba is installed), the ``triton`` kernels for CUDA
tensors (when Triton is installed), the ``reference`` engine elsewhere.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import inspect
from typing import Iterator, Protocol

import torch

from ._errors import BackendUnavailableError


class Backend(Protocol):
    """What every backend implements (the names and parameters are checked at loading)."""

    name: str

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum,
                   eps): ...

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats,
                      momentum, eps): ...

    def group_norm(self, x, num_groups, weight, bias, eps): ...

    def layer_norm(self, x, normalized_shape, weight, bias, eps): ...

    def rms_norm(self, x, normalized_shape, weight, eps): ...

    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps): ...

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps): ...

    def normalize(self, x, red, weight, bias, eps): ...


_METHODS = {name: list(inspect.signature(fn).parameters)[1:]
            for name, fn in vars(Backend).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def check_backend(obj, name: str | None = None):
    """``obj`` if it implements :class:`Backend` (every method, with its parameters), else a
    ``TypeError`` naming what is missing. Returns ``obj``."""
    problems = [] if isinstance(getattr(obj, "name", None), str) else ["a str attribute name"]
    for method, params in _METHODS.items():
        fn = getattr(obj, method, None)
        if not callable(fn):
            problems.append(f"{method}()")
        elif list(inspect.signature(fn).parameters) != params:
            problems.append(f"{method}({', '.join(params)})")
    if problems:
        raise TypeError(f"normlab backend {name or type(obj).__name__!r} lacks "
                        f"{', '.join(problems)} of the Backend interface (normlab._dispatch)")
    return obj


# name -> ("module:attribute" of the backend object, the module it cannot run without),
# imported on first use.
_KNOWN: dict[str, tuple[str, str]] = {}
_loaded: dict[str, object] = {}


def register_backend(name: str, target: str, requires: str = "torch") -> None:
    """Make backend ``name`` available: ``target`` is ``"module:attribute"`` of its object,
    imported (and checked against :class:`Backend`) on first use; ``requires`` the module
    without which it cannot run."""
    _KNOWN[name] = (target, requires)
    _loaded.pop(name, None)


register_backend("reference", "normlab.kernels.reference:BACKEND")
register_backend("torch", "normlab.kernels.torch_ops:BACKEND")  # ATen's kernels
register_backend("cpu", "normlab.kernels.cpu:BACKEND", "numba")  # fused Numba kernels
register_backend("triton", "normlab.kernels.triton_backend:BACKEND", "triton")  # GPU kernels


def _load(name: str):
    if name not in _KNOWN:
        raise ValueError(f"unknown normlab backend {name!r}; known backends: {', '.join(_KNOWN)}")
    if name not in _loaded:
        module, attr = _KNOWN[name][0].split(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise BackendUnavailableError(
                f"normlab backend {name!r} cannot run here: {e}; "
                f"available: {', '.join(available_backends())}"
            ) from e
        _loaded[name] = check_backend(obj, name)
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (their dependencies import)."""
    return [name for name, (_, requires) in _KNOWN.items()
            if name in _loaded or importlib.util.find_spec(requires) is not None]


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("normlab_backend", default=None)


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
        _installed[name] = importlib.util.find_spec(_KNOWN[name][1]) is not None
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

    _cpu_auto = check_backend(auto.Auto(lambda: _load("cpu"), auto.load_table()), "auto")
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
