"""What ``normlab bench`` times: the cells (norm x layout x dtype x shape x pass), the peers, the
round-robin timing loop and the device's copy bandwidth.

Each cell is timed for every peer in the same loop: a warm-up call per peer (for ``compile``
that call compiles, and its duration is reported as the compile time), then ``rounds`` rounds
that each time every peer once, in an order rotated every round. The reported time is the
median over rounds. A round's sample repeats the call until it lasts ``min_time_s`` (only small
shapes need more than one call) and divides by the count.

Clocks: on CPU, ``time.perf_counter`` around the calls (:class:`CpuTimer`). On CUDA
(:class:`CudaTimer`), CUDA events around each call, the L2 cache flushed before each call
outside the timed region (as ``triton.testing.do_bench`` does), and ``torch.cuda.synchronize()``
before any host clock is read. The copy bandwidth is ``dst.copy_(src)`` on the same device,
counted as bytes read + bytes written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib
import inspect
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as TF

import normlab
from normlab._dispatch import synchronous_warmup
import normlab.functional as NF

from .progress import progress_bar
from .report import machine, minimal_bytes, versions

CHANNEL_NORMS = ("batch_norm", "instance_norm", "group_norm")  # (N, C, H, W) inputs
ROW_NORMS = ("layer_norm", "rms_norm")  # (M, D) rows, normalized over D
NORMS = CHANNEL_NORMS + ROW_NORMS
LAYOUTS = ("nchw", "channels_last")  # of the channel norms; the row norms' layout is "rows"
# fwd: forward under no_grad; bwd: backward alone (one forward's graph retained);
# fwd+bwd: forward then backward
PASSES = ("fwd", "bwd", "fwd+bwd")
CPU_PASSES = ("fwd", "fwd+bwd")  # the defaults per device
CUDA_PASSES = ("fwd", "bwd")
DEVICES = ("cpu", "cuda")
# Result.peer names; "torch" is torch eager ("eager" in --peers)
PEERS = ("normlab", "torch", "compile", "liger")
PEER_OPTIONS = ("eager", "compile", "liger")  # what --peers takes
ROW_ONLY_PEERS = ("liger",)  # peers that only have LayerNorm and RMSNorm
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16, "float64": torch.float64,
}
_ALIASES = {
    "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64",
    "forward": "fwd", "forward+backward": "fwd+bwd", "fwd_bwd": "fwd+bwd", "backward": "bwd",
    "contiguous": "nchw", "nhwc": "channels_last",
    "torch": "eager", "inductor": "compile", "torch.compile": "compile",
    "liger_kernel": "liger", "liger-kernel": "liger",
}
# CNN activations (ResNet stage 1 at batch 32, stage 3 at batch 8) and transformer rows
# (BERT-large / GPT-2 small / a 4096-wide model).
DEFAULT_SHAPES = ((32, 64, 56, 56), (8, 256, 28, 28), (4096, 1024), (8192, 768), (2048, 4096))
QUICK_SHAPES = ((4, 32, 8, 8), (64, 128))
# --preset: GPU-sized cells. llm: rows of 1K to 64K elements; cnn: ResNet stages 1, 3, 4.
PRESETS = {
    "llm": ((4096, 1024), (4096, 4096), (16384, 8192), (2048, 65536)),
    "cnn": ((32, 64, 56, 56), (8, 256, 28, 28), (16, 512, 14, 14)),
}
PRESETS["all"] = PRESETS["llm"] + PRESETS["cnn"]
EPS = 1e-5
MOMENTUM = 0.1
FLUSH_MIB = 256  # bytes written to flush the L2 cache before each timed CUDA call
MAX_REPS = 500  # calls per sample at most
WARM_S = 0.5  # CUDA: seconds of copies before the copy bandwidth is measured (clocks up)


def _names(kind: str, values, known: Sequence[str]) -> tuple[str, ...]:
    """Canonical names of ``values`` (a comma-separated string or a sequence), or a ValueError
    naming the unknown one and listing the known ones."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for v in values:
        name = _ALIASES.get(str(v).strip().lower(), str(v).strip().lower())
        if name not in known:
            raise ValueError(
                f"unknown {kind} {str(v).strip()!r}; known {kind}s: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no {kind} given; known {kind}s: {', '.join(known)}")
    return tuple(out)


def parse_shapes(values) -> tuple[tuple[int, ...], ...]:
    """``"32x64x56x56,4096x1024"`` (or a sequence of tuples) as shape tuples: 4-D shapes are
    (N, C, H, W) inputs of the channel norms, 2-D shapes (M, D) rows of the row norms."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    shapes = []
    for v in values:
        try:
            shape = tuple(int(d) for d in v.lower().split("x")) if isinstance(v, str) else tuple(
                int(d) for d in v)
        except ValueError:
            raise ValueError(f"bad shape {v!r}: write it as 32x64x56x56 or 4096x1024") from None
        if len(shape) not in (2, 4) or min(shape) < 1:
            raise ValueError(
                f"bad shape {v!r}: a shape is 4-D (N, C, H, W) for the channel norms or 2-D"
                f" (M, D) for the row norms, every size positive")
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shape given")
    return tuple(shapes)


@dataclass(frozen=True)
class Cell:
    """One benchmarked case: a norm on one input shape, layout and dtype, one pass."""

    norm: str
    layout: str  # "nchw", "channels_last" or "rows"
    dtype: str
    shape: tuple[int, ...]
    pass_: str  # "fwd", "bwd" or "fwd+bwd"
    groups: int = 0  # group_norm's G, else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def params(self) -> int:
        """Elements of each per-channel (C) or per-feature (D) parameter."""
        return self.shape[1] if self.norm in CHANNEL_NORMS else self.shape[-1]

    @property
    def bytes(self) -> int:
        """Bytes the cell must move at least (the minimal-bytes model of :func:`minimal_bytes`)."""
        return minimal_bytes(self.norm, self.pass_, self.numel, self.element_size, self.params)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def label(self) -> str:
        norm = f"{self.norm}(G={self.groups})" if self.groups else self.norm
        return f"{norm} {self.layout} {self.dtype} {self.shape_str} {self.pass_}"


@dataclass
class Config:
    """What to benchmark.

    Args:
        norms: subset of ``NORMS``. Default: every norm the shapes can run.
        layouts: the channel norms' layouts, ``"nchw"`` (contiguous) and/or ``"channels_last"``.
        dtypes: e.g. ``("float32", "bfloat16")``; params and running stats get the same dtype.
        shapes: 4-D (N, C, H, W) shapes for the channel norms, 2-D (M, D) for the row norms.
            Default: ``DEFAULT_SHAPES``, or ``QUICK_SHAPES`` with ``quick``.
        preset: ``"llm"``, ``"cnn"`` or ``"all"``: the shapes of ``PRESETS`` (not with shapes).
        passes: ``"fwd"`` (under ``torch.no_grad``), ``"bwd"`` (backward alone, on a retained
            graph) and/or ``"fwd+bwd"``. Default: ``CPU_PASSES`` or ``CUDA_PASSES``.
        rounds: timed rounds per cell (median reported). Default 10, or 3 with ``quick``.
        backend: force normlab's backend (``normlab.backend(name)``); None: default dispatch.
        compile: allow the ``torch.compile`` peer (False drops it, whatever ``peers`` says).
        peers: from ``PEER_OPTIONS`` (``"eager"``, ``"compile"``, ``"liger"``); normlab is
            always timed. Default: eager and compile, and Liger-Kernel on CUDA when it imports.
        device: ``"cpu"`` or ``"cuda"`` (the current CUDA device; an error without one).
        groups: GroupNorm's G; ``gcd(groups, C)`` where C is not divisible by it.
        quick: tiny shapes and 3 rounds (tests and smoke runs).
        copy_mib: buffer size of the copy-bandwidth measurement. Default 256 (CPU), 1024 (CUDA),
            32 with quick.
        min_time_s: a round's sample repeats the call until it lasts this long. Default 2 ms
            (CPU), 1 ms of GPU time (CUDA).
        flush_l2: CUDA: flush the L2 cache before each timed call (outside the timed region).
        time_budget_s: start no new cell once the next one would end after this many seconds;
            the cells left are reported as not run.
        progress: show a progress bar on stderr.
    """

    norms: Sequence[str] | None = None
    layouts: Sequence[str] = LAYOUTS
    dtypes: Sequence[str] = ("float32",)
    shapes: Sequence[tuple[int, ...]] | None = None
    passes: Sequence[str] | None = None
    rounds: int | None = None
    backend: str | None = None
    compile: bool = True
    groups: int = 32
    quick: bool = False
    copy_mib: int | None = None
    min_time_s: float | None = None
    progress: bool = True
    device: str = "cpu"
    peers: Sequence[str] | None = None
    preset: str | None = None
    flush_l2: bool = True
    time_budget_s: float | None = None

    def __post_init__(self):
        self.device = _names("device", [self.device], DEVICES)[0]
        if self.device == "cuda" and not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise ValueError(f"--device cuda: torch {torch.__version__} cannot use CUDA here: "
                             f"{why}; run on a machine with a GPU, or use --device cpu")
        cuda = self.device == "cuda"
        if self.preset is not None:
            if self.shapes is not None:
                raise ValueError("give --preset or --shapes, not both")
            self.preset = _names("preset", [self.preset], tuple(PRESETS))[0]
            self.shapes = PRESETS[self.preset]
        self.layouts = _names("layout", self.layouts, LAYOUTS)
        self.dtypes = _names("dtype", self.dtypes, tuple(DTYPES))
        if self.passes is None:
            self.passes = CUDA_PASSES if cuda else CPU_PASSES
        self.passes = _names("pass", self.passes, PASSES)
        if self.shapes is None:
            self.shapes = QUICK_SHAPES if self.quick else DEFAULT_SHAPES
        self.shapes = parse_shapes(self.shapes)
        if self.norms is None:  # every norm that has a shape of its rank
            ranks = {len(s) for s in self.shapes}
            self.norms = [n for n in NORMS if (4 if n in CHANNEL_NORMS else 2) in ranks]
        self.norms = _names("norm", self.norms, NORMS)
        if self.rounds is None:
            self.rounds = 3 if self.quick else 10
        if self.copy_mib is None:
            self.copy_mib = (256 if cuda else 32) if self.quick else (1024 if cuda else 256)
        if self.min_time_s is None:
            self.min_time_s = 1e-3 if cuda else 2e-3
        if int(self.rounds) < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if int(self.groups) < 1:
            raise ValueError(f"groups must be at least 1, got {self.groups}")
        self.rounds, self.groups = int(self.rounds), int(self.groups)
        if self.backend is not None:
            with normlab.backend(self.backend):  # ValueError / BackendUnavailableError now
                pass
        for norm in self.norms:
            rank = 4 if norm in CHANNEL_NORMS else 2
            if not any(len(s) == rank for s in self.shapes):
                what = "(N, C, H, W)" if rank == 4 else "(M, D)"
                raise ValueError(f"no {rank}-D {what} shape to run {norm} on; shapes given: "
                                 f"{', '.join('x'.join(map(str, s)) for s in self.shapes)}")
        self.peers = _resolve_peers(self.peers, self.compile, self.device)

    def cells(self) -> list[Cell]:
        """Every cell, in the order they are run and reported."""
        out = []
        for dtype in self.dtypes:
            for norm in self.norms:
                if norm in CHANNEL_NORMS:
                    cases = [(lay, s) for s in self.shapes if len(s) == 4 for lay in self.layouts]
                else:
                    cases = [("rows", s) for s in self.shapes if len(s) == 2]
                for layout, shape in cases:
                    g = math.gcd(self.groups, shape[1]) if norm == "group_norm" else 0
                    for pass_ in self.passes:
                        out.append(Cell(norm, layout, dtype, shape, pass_, g))
        return out


def _resolve_peers(peers, compile: bool, device: str) -> tuple[str, ...]:
    """``("normlab", ...)`` in ``PEERS`` order: the ``--peers`` choice, or the default."""
    if peers is None:
        chosen = {"eager", "compile"}
        if device == "cuda" and liger_status()[0] is not None:
            chosen.add("liger")
    else:
        names = [p for p in (peers.split(",") if isinstance(peers, str) else peers)
                 if str(p).strip().lower() != "normlab"]
        chosen = set(_names("peer", names, PEER_OPTIONS)) if names else set()
    if not compile:
        chosen.discard("compile")
    ids = {"torch" if p == "eager" else p for p in chosen}
    return ("normlab",) + tuple(p for p in PEERS[1:] if p in ids)


@dataclass
class Result:
    """One peer's timing of one cell. ``ms`` is the median over rounds."""

    cell: Cell
    peer: str  # "normlab", "torch" (eager), "compile" or "liger"
    impl: str  # normlab's backend, "eager", "inductor" or "liger-kernel VERSION"
    ms: float
    ms_min: float
    rounds: int
    reps: int  # calls per timed sample
    copy_gbps: float
    threads: int
    compile_s: float | None = None  # the compile peer's first call (compilation included)
    max_abs_diff: float | None = None  # normlab and liger: forward output vs torch eager's
    error: str | None = None  # the peer could not run this cell (reported n/a); ms is nan
    load: float | None = None  # 1-minute load average after the cell (other work competing)
    device: str = "cpu"  # "cpu" or "cuda"
    device_name: str = ""  # the GPU (torch.cuda.get_device_name()) or the CPU
    timing: str = ""  # the clock: Timer.label
    copy_mib: int = 0  # buffer size of the copy-bandwidth measurement
    versions: str = ""  # report.versions() of the run

    @property
    def gbps(self) -> float:
        """Achieved bandwidth under the minimal-bytes model."""
        return self.cell.bytes / (self.ms * 1e-3) / 1e9

    @property
    def roofline(self) -> float:
        """Fraction of the device's copy bandwidth."""
        return self.gbps / self.copy_gbps


# --- clocks ---------------------------------------------------------------------------

class CpuTimer:
    """Host wall clock around ``reps`` back-to-back calls."""

    label = "perf_counter"

    def sync(self) -> None:
        pass

    def sample(self, step: Callable[[], None], reps: int, flush: bool = True) -> float:
        """Seconds per call of ``reps`` calls of ``step``."""
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t0) / reps


class CudaTimer:
    """CUDA events around each call, after an L2 flush that is not timed.

    ``api`` is ``torch.cuda`` (tests pass a stand-in); ``flush_mib`` MiB of int32 zeros are
    written before each timed call (0: no flush, one event pair around all calls)."""

    def __init__(self, flush_mib: int = FLUSH_MIB, device="cuda", api=None):
        self.api = api if api is not None else torch.cuda
        n = flush_mib * 2**20 // 4
        self.cache = torch.empty(n, dtype=torch.int32, device=device) if n else None
        self.label = f"cuda-events, L2 flush {flush_mib} MiB" if n else "cuda-events"

    def sync(self) -> None:
        self.api.synchronize()

    def _event(self):
        return self.api.Event(enable_timing=True)

    def sample(self, step: Callable[[], None], reps: int, flush: bool = True) -> float:
        """Seconds per call: GPU time between events recorded right before and after each call
        (after flushing L2 when ``flush``), summed, over ``reps``."""
        self.api.synchronize()
        if self.cache is None or not flush:
            start, end = self._event(), self._event()
            start.record()
            for _ in range(reps):
                step()
            end.record()
            self.api.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        pairs = [(self._event(), self._event()) for _ in range(reps)]
        for start, end in pairs:
            self.cache.zero_()
            start.record()
            step()
            end.record()
        self.api.synchronize()
        return sum(s.elapsed_time(e) for s, e in pairs) / 1e3 / reps


def make_timer(config: Config):
    """The clock for ``config.device``."""
    if config.device == "cuda":
        return CudaTimer(FLUSH_MIB if config.flush_l2 else 0)
    return CpuTimer()


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """The GPU's name for ``"cuda"``, else the CPU's (:func:`report.machine`)."""
    return torch.cuda.get_device_name() if device == "cuda" else machine()


# --- copy bandwidth -------------------------------------------------------------------

def copy_samples(mib: int = 256, reps: int = 10, device: str = "cpu", timer=None) -> list[float]:
    """Seconds of ``dst.copy_(src)`` on two ``mib`` MiB buffers on ``device`` (larger than the
    caches), after one untimed copy that faults the pages in (CUDA: ``WARM_S`` seconds of
    them, so that the GPU has left its idle clocks). CUDA: timed with events."""
    if timer is None:
        timer = CudaTimer(0) if device == "cuda" else CpuTimer()
    n = mib * 2**20 // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)

    def copy():
        dst.copy_(src)
    copy()
    timer.sync()
    t0 = time.perf_counter()  # a GPU idle until now clocks up: copy for warm_s first
    while time.perf_counter() - t0 < (WARM_S if device == "cuda" else 0):
        copy()
        timer.sync()
    return [timer.sample(copy, 1, flush=False) for _ in range(reps)]


def _copy_gbps(mib: int, samples: list[float]) -> float:
    return 2 * mib * 2**20 / statistics.median(samples) / 1e9  # read + write


def copy_bandwidth(mib: int = 256, reps: int = 10, device: str = "cpu") -> float:
    """The device's copy bandwidth in GB/s: ``2 * bytes / median time`` (read + write)."""
    return _copy_gbps(mib, copy_samples(mib, reps, device))


# --- peers ----------------------------------------------------------------------------

def _norm_fns(F) -> dict[str, Callable]:
    """The five calls on the functional module ``F``, one signature ``(x, w, b, rm, rv, g)``."""
    return {
        "batch_norm": lambda x, w, b, rm, rv, g: F.batch_norm(
            x, rm, rv, w, b, True, MOMENTUM, EPS),
        "instance_norm": lambda x, w, b, rm, rv, g: F.instance_norm(
            x, None, None, w, b, True, MOMENTUM, EPS),
        "group_norm": lambda x, w, b, rm, rv, g: F.group_norm(x, g, w, b, EPS),
        "layer_norm": lambda x, w, b, rm, rv, g: F.layer_norm(x, x.shape[-1:], w, b, EPS),
        "rms_norm": lambda x, w, b, rm, rv, g: F.rms_norm(x, x.shape[-1:], w, EPS),
    }


def _positional(fn_forward, values: dict) -> list:
    """The leading ``values`` (name -> value, in order) that ``fn_forward(ctx, ...)`` takes, as
    a positional list: a newer argument an older release lacks is left out."""
    params = list(inspect.signature(fn_forward).parameters)[1:]
    args = []
    for name, value in values.items():
        if len(args) >= len(params) or params[len(args)] != name:
            break
        args.append(value)
    return args


@functools.lru_cache(maxsize=None)
def liger_status() -> tuple[dict | None, str]:
    """``(fns, "liger-kernel VERSION")`` where Liger-Kernel's LayerNorm and RMSNorm autograd
    functions import, else ``(None, reason)``. ``fns`` has ``_norm_fns``' signature.

    RMSNorm runs as Liger's module does (``offset=0``, ``casting_mode="llama"``,
    ``in_place=True``: dX is written into dY, so the harness gives Liger its own dy)."""
    try:
        rms = importlib.import_module("liger_kernel.ops.rms_norm").LigerRMSNormFunction
        ln = importlib.import_module("liger_kernel.ops.layer_norm").LigerLayerNormFunction
        rms_extra = _positional(rms.forward, {"X": 0, "W": 0, "eps": 0, "offset": 0.0,
                                              "casting_mode": "llama", "in_place": True})[3:]
    except Exception as e:  # noqa: BLE001 - any failure means: not available
        return None, f"liger_kernel is not importable: {type(e).__name__}: {e}".splitlines()[0]
    try:
        from importlib.metadata import version
        ver = version("liger-kernel")
    except Exception:  # noqa: BLE001 - only a label
        ver = "?"
    fns = {
        "layer_norm": lambda x, w, b, rm, rv, g: ln.apply(x, w, b, EPS),
        "rms_norm": lambda x, w, b, rm, rv, g: rms.apply(x, w, EPS, *rms_extra),
    }
    return fns, f"liger-kernel {ver}"


class PeerUnavailable(RuntimeError):
    """A peer cannot run here at all; the message is the reason reported for its cells."""


@dataclass
class PeerFn:
    """How a peer runs a cell: ``fn(x, w, b, rm, rv, g)``, its label, normlab's forced backend,
    and whether it needs its own ``dy`` (it writes into it)."""

    impl: str
    fn: Callable
    backend: str | None = None
    own_dy: bool = False


def _normlab_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    return PeerFn(config.backend or _default_backend(x), _norm_fns(NF)[cell.norm],
                  config.backend)


def _eager_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    return PeerFn("eager", _norm_fns(TF)[cell.norm])


def _compile_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    """One static-shape compilation per (norm, layout, dtype, shape), shared by its passes:
    dynamo is reset when that key changes (so no recompile limit is reached)."""
    key = (cell.norm, cell.layout, cell.dtype, cell.shape, cell.groups)
    if cache.get("compile_key") != key:
        torch._dynamo.reset()
        cache["compile_key"] = key
        cache["compile_fn"] = torch.compile(_norm_fns(TF)[cell.norm], dynamic=False)
    return PeerFn("inductor", cache["compile_fn"])


def _liger_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    fns, label = liger_status()
    if fns is None:
        raise PeerUnavailable(label)
    return PeerFn(label, fns[cell.norm], own_dy=True)


# peer -> factory(cell, config, x, cache) -> PeerFn; a factory that raises makes the peer n/a
PEER_FACTORIES: dict[str, Callable[..., PeerFn]] = {
    "normlab": _normlab_peer, "torch": _eager_peer, "compile": _compile_peer,
    "liger": _liger_peer,
}


def applies(peer: str, cell: Cell) -> bool:
    """Whether ``peer`` has ``cell``'s norm at all (Liger-Kernel: LayerNorm and RMSNorm)."""
    return peer not in ROW_ONLY_PEERS or cell.norm in ROW_NORMS


# --- one cell ---------------------------------------------------------------------------

@dataclass
class _Inputs:
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    dy: torch.Tensor
    leaves: list = field(default_factory=list)


def _inputs(cell: Cell, seed: int = 0, device: str = "cpu") -> _Inputs:
    """Inputs with a nonzero mean in the cell's layout and dtype on ``device``; params (and
    BatchNorm's running stats) in the same dtype, as after ``model.to(dtype)``; ``dy`` in x's
    layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[cell.dtype]
    x = (torch.randn(cell.shape, generator=g, device=device) + 1).to(dtype)
    dy = torch.randn(cell.shape, generator=g, device=device).to(dtype)
    if cell.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = cell.params
    w = (1 + 0.1 * torch.randn(c, generator=g, device=device)).to(dtype)
    b = (None if cell.norm == "rms_norm"
         else (0.1 * torch.randn(c, generator=g, device=device)).to(dtype))
    rm = rv = None
    if cell.norm == "batch_norm":
        rm = torch.zeros(c, dtype=dtype, device=device)
        rv = torch.ones(c, dtype=dtype, device=device)
    leaves = []
    if cell.pass_ != "fwd":
        leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    return _Inputs(x, w, b, rm, rv, dy, leaves)


def _step(fn: Callable, cell: Cell, t: _Inputs, backend: str | None = None) -> Callable[[], None]:
    """One call of the pass: forward under ``no_grad``; backward alone (``backward(dy,
    retain_graph=True)`` on the graph of one forward, made at the first call); or forward then
    ``backward(dy)``. Backward calls set the leaves' grads to None first (fresh grads)."""
    args = (t.x, t.w, t.b, t.rm, t.rv, cell.groups)
    if cell.pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(*args)
    elif cell.pass_ == "bwd":
        graph = []

        def step():
            if not graph:
                graph.append(fn(*args))
            for leaf in t.leaves:
                leaf.grad = None
            graph[0].backward(t.dy, retain_graph=True)
    else:
        def step():
            for leaf in t.leaves:
                leaf.grad = None
            fn(*args).backward(t.dy)
    if backend is None:
        return step

    def in_backend():
        with normlab.backend(backend):
            step()
    return in_backend


def _forward(fn: Callable, cell: Cell, t: _Inputs, backend: str | None) -> torch.Tensor:
    """``fn``'s forward output in float64 (running stats on copies)."""
    rm = None if t.rm is None else t.rm.clone()
    rv = None if t.rv is None else t.rv.clone()
    with torch.no_grad(), (normlab.backend(backend) if backend else contextlib.nullcontext()):
        return fn(t.x, t.w, t.b, rm, rv, cell.groups).double()


def _max_abs_diff(cell: Cell, t: _Inputs, backend: str | None, fn: Callable | None = None,
                  expected: torch.Tensor | None = None) -> float:
    """Largest |peer - torch eager| of the forward outputs; the peer is normlab (``fn`` None)."""
    if expected is None:
        expected = _forward(_norm_fns(TF)[cell.norm], cell, t, None)
    got = _forward(fn or _norm_fns(NF)[cell.norm], cell, t, backend)
    return (got - expected).abs().max().item()


def _default_backend(x: torch.Tensor) -> str:
    """The name of the backend default dispatch uses for ``x``, e.g. ``"auto:cpu"`` where the
    dispatcher exposes its per-input choice (``auto_backend``), else ``current_backend()``."""
    name = normlab.current_backend()
    pick = getattr(normlab._dispatch, "auto_backend", None)
    if name == "auto" and pick is not None:
        try:
            return f"auto:{pick(x)}"
        except Exception:  # noqa: BLE001 - only a label
            pass
    return name


def _reason(e: BaseException) -> str:
    text = str(e) if isinstance(e, PeerUnavailable) else f"{type(e).__name__}: {e}"
    return (text.splitlines() or [""])[0][:200]


def _info(config: Config, timer) -> dict:
    """The Result fields that describe the run rather than the cell."""
    return dict(device=config.device, device_name=device_name(config.device),
                timing=timer.label, copy_mib=config.copy_mib, versions=versions())


def interleaved(steps: dict, reps: dict, rounds: int, timer, errors: dict) -> dict:
    """``rounds`` rounds that each time every peer's step once (``reps`` calls per sample),
    the order rotated every round; ``{peer: [seconds per call, ...]}``. A peer whose step
    raises is dropped from ``steps`` and its reason put in ``errors``."""
    samples = {peer: [] for peer in steps}
    order = list(steps)
    for r in range(rounds):
        if not order:
            break
        k = r % len(order)  # rotate who goes first
        for peer in order[k:] + order[:k]:
            try:
                samples[peer].append(timer.sample(steps[peer], reps[peer]))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory on a later call
                errors[peer] = _reason(e)
                order.remove(peer)
                del steps[peer]
    return samples


def time_cell(cell: Cell, config: Config, copy_gbps: float, timer=None,
              cache: dict | None = None) -> list[Result]:
    """Time every peer of ``config`` that has ``cell``'s norm, interleaved round-robin; one
    Result per peer (a peer that cannot run the cell gets one with ``error``, its reason).

    ``timer``: the clock (default: :func:`make_timer`); ``cache``: state kept between the
    cells of one run (the compile peer's compiled function)."""
    timer = timer if timer is not None else make_timer(config)
    cache = cache if cache is not None else {}
    t = _inputs(cell, device=config.device)
    peers = [p for p in config.peers if applies(p, cell)]
    steps, impls, errors, warm, fns = {}, {}, {}, {}, {}
    for peer in peers:
        try:
            pf = PEER_FACTORIES[peer](cell, config, t.x, cache)
        except Exception as e:  # noqa: BLE001 - the peer is n/a here, the run goes on
            impls[peer], errors[peer] = "n/a", _reason(e)
            continue
        impls[peer], fns[peer] = pf.impl, pf
        mine = dataclasses.replace(t, dy=t.dy.clone()) if pf.own_dy else t
        steps[peer] = _step(pf.fn, cell, mine, pf.backend)

    reps = {}
    for peer, step in list(steps.items()):
        try:
            timer.sync()
            t0 = time.perf_counter()
            step()  # warm-up (the compile peer compiles here, Triton kernels JIT-compile)
            timer.sync()
            warm[peer] = time.perf_counter() - t0
            once = timer.sample(step, 1)
            reps[peer] = min(MAX_REPS, max(1, math.ceil(config.min_time_s / max(once, 1e-9))))
        except Exception as e:  # a peer that cannot run this cell is reported, not fatal
            errors[peer] = _reason(e)
            del steps[peer]

    samples = interleaved(steps, reps, config.rounds, timer, errors)

    diffs = {}
    checked = [p for p in ("normlab", "liger") if p in steps]
    if checked:
        try:
            expected = _forward(_norm_fns(TF)[cell.norm], cell, t, None)
        except Exception:  # noqa: BLE001 - the timing stands; the check is informative
            expected = None
        for peer in checked:
            try:
                diffs[peer] = _max_abs_diff(cell, t, fns[peer].backend, fns[peer].fn, expected)
            except Exception:  # noqa: BLE001
                diffs[peer] = float("nan")
    del steps, t
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    for peer in peers:
        common = dict(cell=cell, peer=peer, impl=impls[peer], rounds=config.rounds,
                      copy_gbps=copy_gbps, threads=threads, load=load, **_info(config, timer))
        if peer in errors:
            results.append(Result(ms=math.nan, ms_min=math.nan, reps=0, error=errors[peer],
                                  **common))
            continue
        s = samples[peer]
        results.append(Result(
            ms=statistics.median(s) * 1e3, ms_min=min(s) * 1e3, reps=reps[peer],
            compile_s=warm[peer] if peer == "compile" else None,
            max_abs_diff=diffs.get(peer), **common))
    return results


def _not_run(cell: Cell, config: Config, timer, copy_gbps: float, reason: str) -> list[Result]:
    return [Result(cell=cell, peer=p, impl="n/a", ms=math.nan, ms_min=math.nan,
                   rounds=config.rounds, reps=0, copy_gbps=copy_gbps,
                   threads=torch.get_num_threads(), error=reason, **_info(config, timer))
            for p in config.peers if applies(p, cell)]


@synchronous_warmup()  # no call runs on ATen because its kernel is still compiling
def run(config: Config | None = None,
        on_cell: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Benchmark every cell of ``config`` (default: :class:`Config`'s defaults); one
    :class:`Result` per cell and peer. The copy bandwidth is measured before and after the
    cells, and the median of both sets of samples is every Result's ``copy_gbps``.

    ``on_cell(results so far)`` is called after each cell (to save partial results). With
    ``config.time_budget_s``, a cell is not started when the elapsed time plus the previous
    cell's duration exceeds the budget; it and the rest get Results with ``error`` "not run"."""
    config = config or Config()
    cells = config.cells()
    timer = make_timer(config)
    cache: dict = {}
    t_start, last = time.perf_counter(), 0.0
    before = copy_samples(config.copy_mib, device=config.device)
    results: list[Result] = []
    gbps_now = _copy_gbps(config.copy_mib, before)
    with progress_bar(len(cells), enabled=config.progress) as bar:
        for i, cell in enumerate(cells):
            elapsed = time.perf_counter() - t_start
            if config.time_budget_s is not None and elapsed + last > config.time_budget_s:
                why = (f"not run: time budget of {config.time_budget_s:.0f} s reached after "
                       f"{i} of {len(cells)} cells")
                for rest in cells[i:]:
                    results += _not_run(rest, config, timer, gbps_now, why)
                break
            bar.describe(cell.label)
            t0 = time.perf_counter()
            try:
                results += time_cell(cell, config, gbps_now, timer=timer, cache=cache)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
                results += _not_run(cell, config, timer, gbps_now, _reason(e))
            last = time.perf_counter() - t0
            gc.collect()
            if config.device == "cuda":
                torch.cuda.empty_cache()
            bar.advance()
            if on_cell is not None:
                on_cell(results)
    after = copy_samples(config.copy_mib, device=config.device)
    copy_gbps = _copy_gbps(config.copy_mib, before + after)
    return [dataclasses.replace(r, copy_gbps=copy_gbps) for r in results]
