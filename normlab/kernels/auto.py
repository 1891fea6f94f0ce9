r"""``auto`` on CPU: per call, normlab's fused kernels (the ``cpu`` backend) or ATen's
(``torch.nn.functional``'s), whichever ran faster in the benchmark figures committed with the
code for that cell of

    (norm, layout, dtype, size class, pass)

* norm: ``batch_norm`` (batch statistics) and ``batch_norm_eval`` (running ones),
  ``instance_norm`` and ``instance_norm_eval`` (``use_input_stats=False``), ``group_norm``,
  ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``;
* layout: ``rows`` (the row norms), ``nchw`` (contiguous, or any other strides: both copy
  them), ``channels_last`` (``x.movedim(1, -1)`` dense) and ``nc`` (2-D ``(N, C)`` inputs);
* dtype: float32, float64, bfloat16, float16;
* size class: ``x.numel()`` in bands of a factor 4, :data:`CLASS_EDGES`;
* pass: ``fwd`` (no gradient recorded: under ``torch.no_grad()`` or with no input requiring
  one) or ``train`` (autograd records the call; judged by forward + backward).

The figures are ``normlab bench --dispatch`` (:mod:`normlab.bench.dispatch`), which times both
backends through normlab's own functional layer, interleaved, and writes
:data:`TABLE_FILE`; a cell missing from it runs the kernels. Only calls that ATen computes as
normlab does are eligible: every given parameter, running statistic and residual has the
input's dtype (ATen rejects or casts mixed ones differently). ``normlab.backend("cpu")`` and
``normlab.backend("torch")`` still force one side everywhere.

**Warm-up in the background.** A kernel compiles on its first call (seconds; with Numba's disk
cache, it loads in a fraction of that). So that no first call stalls, a cell whose kernels are
not ready in this process is computed by ATen while a background thread gets them ready, by
running the same call on a small input of the same dtype, layout, channels and kernel version
(:class:`Warmup`); the kernels take over as each finishes. The first steps of a model are
torch's own, bit for bit. Synchronous instead (the calling thread compiles, as before) when
``torch.are_deterministic_algorithms_enabled()``, or with ``normlab.background_warmup(False)``
or ``NORMLAB_BACKGROUND_WARMUP=0``: then which steps ran on ATen cannot depend on timing.
:func:`normlab.wait_for_kernels` waits for the pending warm-ups (benchmarks call it before
timing).
"""
from __future__ import annotations

import json
import os
import queue
import threading
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch

TABLE_FILE = Path(__file__).with_name("cpu_dispatch.json")
#: Upper bounds (exclusive) of the size classes 0..6 in elements of x; class 7 is the rest.
CLASS_EDGES = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
NORMS = ("batch_norm", "batch_norm_eval", "instance_norm", "instance_norm_eval", "group_norm",
         "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
LAYOUTS = ("rows", "nchw", "channels_last", "nc")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
PASSES = ("fwd", "train")
KERNELS, ATEN = "k", "a"  # a cell's choice, one character per size class in the table


def size_class(numel: int) -> int:
    """The size class of an input of ``numel`` elements (0: under 4096; 7: 16M and more).

    >>> [size_class(n) for n in (1, 4095, 4096, 16383, 16384, 1 << 24, 1 << 30)]
    [0, 0, 1, 1, 2, 7, 7]
    """
    k = (numel.bit_length() - 11) >> 1
    return 0 if k < 0 else (k if k < 7 else 7)


def load_table(path: str | os.PathLike = TABLE_FILE) -> dict:
    """``{(norm, layout, dtype, train): (uses ATen per size class, ...)}`` from a table file
    (``{"choices": {"norm/layout/dtype/pass": "kkaa..."}, ...}``); empty when there is none."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    table = {}
    for key, row in data.get("choices", {}).items():
        norm, layout, dtype, pass_ = key.split("/")
        if norm not in NORMS or layout not in LAYOUTS or dtype not in DTYPES \
                or pass_ not in PASSES or len(row) != len(CLASS_EDGES) + 1 \
                or set(row) - {KERNELS, ATEN}:
            raise ValueError(f"{path}: bad dispatch table entry {key!r}: {row!r}")
        table[(norm, layout, DTYPES[dtype], pass_ == "train")] = tuple(c == ATEN for c in row)
    return table


def _channel_layout(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "nc" if x.dim() == 2 else "nchw"
    d = x.dim()
    if d == 4:
        return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "nchw"
    return "channels_last" if d >= 3 and x.movedim(1, -1).is_contiguous() else "nchw"


def _small_like(x: torch.Tensor, layout: str, keep: int) -> torch.Tensor:
    """A small random tensor that the kernels see as they see x: x's dtype, layout and last
    ``keep`` dims (the row norms) or channel count (dim 1), the other dims cut to 2 at most (1
    stays 1)."""
    if layout == "rows":
        shape = (2,) + tuple(x.shape[x.dim() - keep:])
    else:
        shape = (2, x.shape[1]) + tuple(min(d, 2) for d in x.shape[2:])
    t = torch.randn(shape).to(x.dtype)
    if layout == "channels_last":
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


def _env_background() -> bool:
    return os.environ.get("NORMLAB_BACKGROUND_WARMUP", "1").strip().lower() not in (
        "0", "false", "no", "off")


class Warmup:
    """Which cells' kernels are ready in this process, and the background thread that makes
    them ready.

    A cell is ``(norm, layout, dtype, train, parallel, channels)``: ``parallel`` the kernel
    version the call runs (see :mod:`.cpu`), ``channels`` C of the channel norms (which kernel
    variant runs can depend on it). ``job()`` runs the call on small inputs (compiling or loading
    what it needs); a failing job is reported once as a warning and the cell stays on ATen."""

    def __init__(self):
        self.background = _env_background()
        self._ready: set = set()
        self._failed: set = set()
        self.errors: dict = {}  # cell -> the exception its warm-up raised
        self._pending: set = set()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._job_lock = threading.RLock()  # held while a job runs (and across a fork)
        _WARMUPS.add(self)

    def synchronous(self) -> bool:
        return not self.background or torch.are_deterministic_algorithms_enabled()

    def ready(self, key, make_job: Callable[[], Callable[[], None]]) -> bool:
        """Whether the cell's kernels can run now; if not, its warm-up (``make_job()``) is
        started: in the background, or here and now in synchronous mode (then True once it is
        done)."""
        if key in self._ready:
            return True
        if key in self._failed:
            return False
        if self.synchronous():
            self._run(key, make_job())
            return key in self._ready
        with self._lock:
            if key in self._pending:
                return False
            self._pending.add(key)
            self._queue.put((key, make_job()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="normlab-warmup",
                                                daemon=True)
                self._thread.start()
        return False

    def _run(self, key, job) -> None:
        try:
            with self._job_lock:
                job()
        except Exception as e:  # noqa: BLE001 - the cell stays on ATen, once said
            self._failed.add(key)
            self.errors[key] = e
            warnings.warn(f"normlab: the cpu kernels for {key[:4]} could not be prepared "
                          f"({type(e).__name__}: {e}); ATen computes these calls",
                          RuntimeWarning, stacklevel=4)
        else:
            self._ready.add(key)

    def _work(self) -> None:
        while True:
            try:
                key, job = self._queue.get(timeout=1.0)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        self._idle.notify_all()
                        return
                continue
            self._run(key, job)
            with self._lock:
                self._pending.discard(key)
                if not self._pending:
                    self._idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no warm-up is pending; False if ``timeout`` seconds passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def after_fork_in_child(self) -> None:
        """No thread survives fork: forget the pending warm-ups (calls start them again)."""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending.clear()
        self._queue = queue.Queue()
        self._thread = None


# Fork while the warm-up thread works: the child would inherit the locks that thread holds (an
# import's module lock, Numba's compiler lock) held by a thread that does not exist there, and
# deadlock on them (seen: a child stuck importing a NumPy submodule). So a fork waits for the
# job in progress to finish (each job runs holding its Warmup's job lock; the fork holds every
# job lock across the fork), and the child forgets the warm-ups that were pending.
_WARMUPS: weakref.WeakSet = weakref.WeakSet()
_held: list = []


def _before_fork() -> None:
    for w in list(_WARMUPS):
        w._job_lock.acquire()
        _held.append(w)


def _after_fork(child: bool) -> None:
    while _held:
        w = _held.pop()
        w._job_lock.release()
        if child:
            w.after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=lambda: _after_fork(False),
                    after_in_child=lambda: _after_fork(True))


class Auto:
    """The backend interface on two backends, the ``cpu`` kernels (loaded by ``load_kernels``
    on first need) and ``aten`` (the ``torch`` backend: ATen's operators, which the norms with
    a single ATen operator call directly, a Python call less), chosen per call by ``table``
    (:func:`load_table`) and by whether the cell's kernels are ready (:class:`Warmup`)."""

    name = "auto"

    def __init__(self, load_kernels: Callable[[], object], table: dict,
                 warmup: Warmup | None = None, aten=None):
        from .torch_ops import BACKEND as _ATEN

        self._load, self.table, self.aten = load_kernels, table, aten or _ATEN
        self._kernels = self._cpu = None
        self.warmup = warmup if warmup is not None else Warmup()
        self.compiling = False  # True on the twin that torch.compile traces (see compiled)
        self._compiled = None

    @property
    def compiled(self) -> "Auto":
        """The same choice for ``torch.compile`` to trace: the table alone, no warm-up (the
        compiled graph calls ATen's operators or the kernels' registered ones)."""
        if self._compiled is None:
            twin = Auto(self._load, self.table, self.warmup, self.aten)
            twin._kernels, twin._cpu, twin.compiling = self.kernels, self._cpu, True
            self._compiled = twin
        return self._compiled

    @property
    def kernels(self):
        """The ``cpu`` backend (imported on first use: Numba and the custom operators)."""
        if self._kernels is None:
            from . import cpu

            self._kernels, self._cpu = self._load(), cpu
        return self._kernels

    def _aten(self, norm: str, layout: str, x: torch.Tensor, tensors: tuple,
              call: Callable, keep: int = 1, like_x: int = 0) -> bool:
        """Whether ATen computes this call: its cell's table entry says so, or its kernels are
        not ready (then their warm-up starts, see :class:`Warmup`). Calls that ATen would
        compute otherwise (a tensor of another dtype than x) always run the kernels. ``call``
        makes the call on the kernels (``call(kernels, x, *tensors)``), ``keep`` is the number of
        normalized dims of a row norm, the first ``like_x`` tensors have x's shape (the residual).
        """
        dt = x.dtype
        grad = x.requires_grad
        for t in tensors:
            if t is not None:
                if t.dtype is not dt:
                    return False
                grad = grad or t.requires_grad
        train = grad and torch.is_grad_enabled()
        numel = x.numel()
        if numel == 0:  # (the kernels' backend answers empty inputs with the reference engine)
            return False
        row = self.table.get((norm, layout, dt, train))
        if self.compiling:  # the table alone (static sizes), no warm-up
            return row is not None and isinstance(numel, int) and row[size_class(numel)]
        if row is not None:
            k = (numel.bit_length() - 11) >> 1  # size_class, inlined
            if row[0 if k < 0 else (k if k < 7 else 7)]:
                return True
        if self._kernels is None:  # the cpu backend itself is the first thing to get ready
            if not self.warmup.ready("load", lambda: lambda: self.kernels):
                return True
        cpu = self._cpu
        parallel = cpu.uses_threads(numel)
        key = (norm, layout, dt, train, parallel, None if layout == "rows" else x.shape[1])
        if key in self.warmup._ready:
            return False
        if parallel:
            cpu.start_pool()  # here, not in the warm-up thread (it sets torch's thread count)
        return not self.warmup.ready(
            key, lambda: _job(self, layout, x, tensors, call, keep, like_x, train, parallel))

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        if self._aten("layer_norm", "rows", x, (weight, bias),
                      lambda k, x, w, b: k.layer_norm(x, normalized_shape, w, b, eps),
                      len(normalized_shape)):
            return torch.layer_norm(x, normalized_shape, weight, bias, eps, True)
        return self.kernels.layer_norm(x, normalized_shape, weight, bias, eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        if self._aten("rms_norm", "rows", x, (weight,),
                      lambda k, x, w: k.rms_norm(x, normalized_shape, w, eps),
                      len(normalized_shape)):
            return torch.rms_norm(x, normalized_shape, weight, eps)
        return self.kernels.rms_norm(x, normalized_shape, weight, eps)

    def group_norm(self, x, num_groups, weight, bias, eps):
        if self._aten("group_norm", _channel_layout(x), x, (weight, bias),
                      lambda k, x, w, b: k.group_norm(x, num_groups, w, b, eps)):
            return self.aten.group_norm(x, num_groups, weight, bias, eps)
        return self.kernels.group_norm(x, num_groups, weight, bias, eps)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        norm = "batch_norm" if training else "batch_norm_eval"
        if self._aten(norm, _channel_layout(x), x, (weight, bias, running_mean, running_var),
                      lambda k, x, w, b, rm, rv: k.batch_norm(x, rm, rv, w, b, training,
                                                              momentum, eps)):
            return torch.batch_norm(x, weight, bias, running_mean, running_var, training,
                                    momentum, eps, True)
        return self.kernels.batch_norm(x, running_mean, running_var, weight, bias, training,
                                       momentum, eps)

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats,
                      momentum, eps):
        norm = "instance_norm" if use_input_stats else "instance_norm_eval"
        if self._aten(norm, _channel_layout(x), x, (weight, bias, running_mean, running_var),
                      lambda k, x, w, b, rm, rv: k.instance_norm(x, rm, rv, w, b,
                                                                 use_input_stats, momentum, eps)):
            return torch.instance_norm(x, weight, bias, running_mean, running_var,
                                       use_input_stats, momentum, eps, True)
        return self.kernels.instance_norm(x, running_mean, running_var, weight, bias,
                                          use_input_stats, momentum, eps)

    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        if self._aten("add_layer_norm", "rows", x, (residual, weight, bias),
                      lambda k, x, r, w, b: k.add_layer_norm(x, r, normalized_shape, w, b, eps),
                      len(normalized_shape), like_x=1):
            return self.aten.add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
        return self.kernels.add_layer_norm(x, residual, normalized_shape, weight, bias, eps)

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        if self._aten("add_rms_norm", "rows", x, (residual, weight),
                      lambda k, x, r, w: k.add_rms_norm(x, r, normalized_shape, w, eps),
                      len(normalized_shape), like_x=1):
            return self.aten.add_rms_norm(x, residual, normalized_shape, weight, eps)
        return self.kernels.add_rms_norm(x, residual, normalized_shape, weight, eps)

    def normalize(self, x, red, weight, bias, eps):
        """A norm beyond torch's five (:mod:`normlab.registry`): the kernels' backend."""
        return self.kernels.normalize(x, red, weight, bias, eps)


def _job(auto: Auto, layout: str, x: torch.Tensor, tensors: tuple, call: Callable, keep: int,
         like_x: int, train: bool, parallel: bool) -> Callable[[], None]:
    """The warm-up of a cell: ``call(kernels, x, *tensors)`` on small tensors like the real
    ones (fresh ones: the real buffers are never touched; each requires a gradient where the
    real one does), forward and, for ``train``, backward, on the kernel version the real call
    runs."""
    def like(t, as_x):
        if t is None:
            return None
        s = _small_like(t, layout, keep) if as_x else (torch.rand(t.shape) + 0.5).to(t.dtype)
        return s.requires_grad_() if train and t.requires_grad else s
    xs, small = like(x, True), [like(t, i < like_x) for i, t in enumerate(tensors)]
    threads = torch.get_num_threads() if parallel else 1

    def job():
        kernels, cpu = auto.kernels, auto._cpu
        with cpu.forced_threads(threads), torch.enable_grad() if train else torch.no_grad():
            out = call(kernels, xs, *small)
            if train:
                outs = [o for o in (out if isinstance(out, tuple) else (out,))
                        if o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return job
