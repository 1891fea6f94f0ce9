"""How the kernels compile: the Numba flags, the on-disk cache and its guard, and
:class:`Kernel` (a parallel and a serial version of one function).

Flags: no general ``fastmath`` (see the package docstring; the slice sums of :mod:`.arith`
carry the one scoped ``reassoc``) and NumPy's error model, IEEE division as torch's:
``1 / sqrt(var + eps)`` with ``var + eps == 0`` (eps=0 on a constant row) is inf and the output
NaN. Numba's default ("python") raises ZeroDivisionError inside the kernel instead, which
surfaced as "SystemError: CPUDispatcher(...) returned a result with an exception set".

Cache: ``cache=True`` where Numba has a location for it. Numba keys a cached function by its
signature and bytecode and checks only its own file's time stamp, so a kernel cached from
``rows.py`` would survive an edit of a helper in ``arith.py``: :func:`guard_caches` gives every
cached function of the package the stamp of all the package's files (as when they were one
file), and makes a damaged cache file a miss.
"""
from __future__ import annotations

import os
import warnings
from types import FunctionType

from numba import njit

FM = False  # no fastmath
EM = "numpy"  # IEEE division (see above)


def _cache_probe():  # pragma: no cover - compiled only to find a cache location
    return 0


def _cache_available() -> bool:
    """Whether Numba has a cache location for this package (its ``__pycache__``, the
    user-wide cache or ``NUMBA_CACHE_DIR``): without one, ``cache=True`` raises at decoration
    (every kernel import would), so the kernels compile uncached in each process, warned once."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        _cache_warning(e)
        return False
    return True


_warned = []


def _cache_warning(e: BaseException) -> None:
    if not _warned:
        _warned.append(e)
        warnings.warn(f"normlab: Numba's cache cannot be used here ({type(e).__name__}: {e}); "
                      "the cpu kernels compile in this process without it (set NUMBA_CACHE_DIR"
                      " to a writable folder to keep them across processes)", RuntimeWarning,
                      stacklevel=3)


CACHE = _cache_available()


def jit(fn=None, **flags):
    """``njit`` with the package's cache, fastmath and error-model settings (``flags``
    override them)."""
    opts = {"cache": CACHE, "fastmath": FM, "error_model": EM, **flags}
    return njit(**opts) if fn is None else njit(**opts)(fn)


class _SafeCache:
    """A function's Numba cache where a damaged file (a truncated or foreign ``.nbi``/``.nbc``,
    which Numba unpickles and raises on at every call) or a failed write is a cache miss: the
    function compiles, with one warning per process."""

    def __init__(self, cache):
        self._inner = cache

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load_overload(self, sig, target_context):
        try:
            return self._inner.load_overload(sig, target_context)
        except Exception as e:  # noqa: BLE001 - any damage: compile instead
            _cache_warning(e)
            return None

    def save_overload(self, sig, data):
        try:
            self._inner.save_overload(sig, data)
        except Exception as e:  # noqa: BLE001
            _cache_warning(e)


def _package_stamp():
    """(name, mtime, size) of every source file of this package: the cache stamp of each of
    its functions, so that editing one file invalidates the cache of all."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(here, name))
            out.append((name, st.st_mtime, st.st_size))
    return tuple(out)


_STAMP = _package_stamp()


def guard_caches(namespace: dict) -> None:
    """Give every dispatcher in ``namespace`` (and each Kernel's two) the package stamp and a
    :class:`_SafeCache`."""
    for v in list(namespace.values()):
        for d in ((v.parallel, v.serial) if isinstance(v, Kernel) else (v,)):
            cache = getattr(d, "_cache", None)
            if cache is None or not hasattr(cache, "load_overload") \
                    or isinstance(cache, _SafeCache):
                continue
            index = getattr(cache, "_cache_file", None)
            if index is not None and hasattr(index, "_source_stamp"):
                index._source_stamp = _STAMP
            d._cache = _SafeCache(cache)


class Kernel:
    """One kernel, compiled on first use in two versions from the same Python function:

    ``parallel``  ``prange`` loops run on Numba's thread pool (``parallel=True``);
    ``serial``    ``prange`` is ``range``: no parallel region, no thread pool at all.

    The caller picks (:mod:`..cpu`): serial for small inputs (no thread wake-up, nothing to
    wait for when a neighbour process holds the other core), with one torch thread, and in a
    process forked after Numba's OpenMP pool started (GNU OpenMP is not fork-safe: Numba
    terminates such a child at its first parallel region). The loop bodies are the same code
    and every reduction runs over fixed blocks, so both versions give bitwise the same results
    (tested).

    The serial version is compiled from a copy of the function under another qualified name:
    Numba's on-disk cache files are named after the function and keyed by its signature and
    bytecode, not by ``parallel``, so the two would otherwise overwrite each other's cache."""

    def __init__(self, fn):
        self.__name__, self.__doc__, self.__wrapped__ = fn.__name__, fn.__doc__, fn
        self.parallel = jit(fn, parallel=True)
        twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                            fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        twin.__doc__ = fn.__doc__
        self.serial = jit(twin)

    def pick(self, threads: int):
        """The version to run on ``threads`` threads: serial for 1."""
        return self.parallel if threads > 1 else self.serial

    def __call__(self, *args):
        """The parallel version (what a direct call of a ``parallel=True`` kernel runs)."""
        return self.parallel(*args)

    def __repr__(self) -> str:
        return f"<normlab kernel {self.__name__} (parallel and serial)>"
