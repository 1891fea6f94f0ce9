"""What ``normlab bench`` times: the cells (norm x layout x dtype x shape x pass), the peers, the
round-robin timing loop and the machine's copy bandwidth.

Each cell is timed for every peer in the same loop: a warm-up call per peer (for ``compile``
that call compiles, and its duration is reported as the compile time), then ``rounds`` rounds
that each time every peer once, in an order rotated every round. The reported time is the
median over rounds. A round's sample repeats the call until it lasts ``min_time_s`` (only tiny
shapes need more than one call) and divides by the count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as TF

import normlab
import normlab.functional as NF

from .progress import progress_bar
from .report import minimal_bytes

CHANNEL_NORMS = ("batch_norm", "instance_norm", "group_norm")  # (N, C, H, W) inputs
ROW_NORMS = ("layer_norm", "rms_norm")  # (M, D) rows, normalized over D
NORMS = CHANNEL_NORMS + ROW_NORMS
LAYOUTS = ("nchw", "channels_last")  # of the channel norms; the row norms' layout is "rows"
PASSES = ("fwd", "fwd+bwd")
PEERS = ("normlab", "torch", "compile")
DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16, "float64": torch.float64,
}
_ALIASES = {
    "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64",
    "forward": "fwd", "forward+backward": "fwd+bwd", "fwd_bwd": "fwd+bwd",
    "contiguous": "nchw", "nhwc": "channels_last",
}
# CNN activations (ResNet stage 1 at batch 32, stage 3 at batch 8) and transformer rows
# (BERT-large / GPT-2 small / a 4096-wide model).
DEFAULT_SHAPES = ((32, 64, 56, 56), (8, 256, 28, 28), (4096, 1024), (8192, 768), (2048, 4096))
QUICK_SHAPES = ((4, 32, 8, 8), (64, 128))
EPS = 1e-5
MOMENTUM = 0.1


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
    pass_: str  # "fwd" or "fwd+bwd"
    groups: int = 0  # group_norm's G, else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def bytes(self) -> int:
        """Bytes the cell must move at least (the minimal-bytes model of :func:`minimal_bytes`)."""
        return minimal_bytes(self.norm, self.pass_, self.numel, self.element_size)

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
        norms: subset of ``NORMS``.
        layouts: the channel norms' layouts, ``"nchw"`` (contiguous) and/or ``"channels_last"``.
        dtypes: e.g. ``("float32", "bfloat16")``; params and running stats get the same dtype.
        shapes: 4-D (N, C, H, W) shapes for the channel norms, 2-D (M, D) for the row norms.
            Default: ``DEFAULT_SHAPES``, or ``QUICK_SHAPES`` with ``quick``.
        passes: ``"fwd"`` (under ``torch.no_grad``) and/or ``"fwd+bwd"``.
        rounds: timed rounds per cell (median reported). Default 10, or 3 with ``quick``.
        backend: force normlab's backend (``normlab.backend(name)``); None: default dispatch.
        compile: add the ``torch.compile`` peer.
        groups: GroupNorm's G; ``gcd(groups, C)`` where C is not divisible by it.
        quick: tiny shapes and 3 rounds (tests and smoke runs).
        copy_mib: buffer size of the copy-bandwidth measurement. Default 256, or 32 with quick.
        min_time_s: a round's sample repeats the call until it lasts this long.
        progress: show a progress bar on stderr.
    """

    norms: Sequence[str] = NORMS
    layouts: Sequence[str] = LAYOUTS
    dtypes: Sequence[str] = ("float32",)
    shapes: Sequence[tuple[int, ...]] | None = None
    passes: Sequence[str] = PASSES
    rounds: int | None = None
    backend: str | None = None
    compile: bool = True
    groups: int = 32
    quick: bool = False
    copy_mib: int | None = None
    min_time_s: float = 2e-3
    progress: bool = True

    def __post_init__(self):
        self.norms = _names("norm", self.norms, NORMS)
        self.layouts = _names("layout", self.layouts, LAYOUTS)
        self.dtypes = _names("dtype", self.dtypes, tuple(DTYPES))
        self.passes = _names("pass", self.passes, PASSES)
        if self.shapes is None:
            self.shapes = QUICK_SHAPES if self.quick else DEFAULT_SHAPES
        self.shapes = parse_shapes(self.shapes)
        if self.rounds is None:
            self.rounds = 3 if self.quick else 10
        if self.copy_mib is None:
            self.copy_mib = 32 if self.quick else 256
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

    @property
    def peers(self) -> tuple[str, ...]:
        return PEERS if self.compile else PEERS[:2]

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


@dataclass
class Result:
    """One peer's timing of one cell. ``ms`` is the median over rounds."""

    cell: Cell
    peer: str  # "normlab", "torch" or "compile"
    impl: str  # normlab's backend, "eager" or "inductor"
    ms: float
    ms_min: float
    rounds: int
    reps: int  # calls per timed sample
    copy_gbps: float
    threads: int
    compile_s: float | None = None  # the compile peer's first call (compilation included)
    max_abs_diff: float | None = None  # normlab rows: forward output vs torch eager's
    error: str | None = None  # the peer failed on this cell; ms is nan
    load: float | None = None  # 1-minute load average after the cell (other work competing)

    @property
    def gbps(self) -> float:
        """Achieved bandwidth under the minimal-bytes model."""
        return self.cell.bytes / (self.ms * 1e-3) / 1e9

    @property
    def roofline(self) -> float:
        """Fraction of the machine's copy bandwidth."""
        return self.gbps / self.copy_gbps


def copy_samples(mib: int = 256, reps: int = 10) -> list[float]:
    """Seconds of ``dst.copy_(src)`` on two ``mib`` MiB buffers (larger than the caches), after
    one untimed copy that faults the pages in."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(time.perf_counter() - t0)
    return out


def _copy_gbps(mib: int, samples: list[float]) -> float:
    return 2 * mib * 2**20 / statistics.median(samples) / 1e9  # read + write


def copy_bandwidth(mib: int = 256, reps: int = 10) -> float:
    """The machine's copy bandwidth in GB/s: ``2 * bytes / median time`` (read + write)."""
    return _copy_gbps(mib, copy_samples(mib, reps))


# --- one cell ---------------------------------------------------------------------------

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


@dataclass
class _Inputs:
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    dy: torch.Tensor
    leaves: list = field(default_factory=list)


def _inputs(cell: Cell, seed: int = 0) -> _Inputs:
    """Inputs with a nonzero mean in the cell's layout and dtype; params (and BatchNorm's
    running stats) in the same dtype, as after ``model.to(dtype)``; ``dy`` in x's layout."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[cell.dtype]
    x = (torch.randn(cell.shape, generator=g) + 1).to(dtype)
    dy = torch.randn(cell.shape, generator=g).to(dtype)
    if cell.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = cell.shape[1] if cell.norm in CHANNEL_NORMS else cell.shape[-1]
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(dtype)
    b = None if cell.norm == "rms_norm" else (0.1 * torch.randn(c, generator=g)).to(dtype)
    rm = rv = None
    if cell.norm == "batch_norm":
        rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    leaves = []
    if cell.pass_ == "fwd+bwd":
        leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    return _Inputs(x, w, b, rm, rv, dy, leaves)


def _step(fn: Callable, cell: Cell, t: _Inputs, backend: str | None = None) -> Callable[[], None]:
    """One call of the pass: forward under ``no_grad``, or forward then ``backward(dy)`` with
    the leaves' grads set to None first (fresh grads each call, no retained graph)."""
    args = (t.x, t.w, t.b, t.rm, t.rv, cell.groups)
    if cell.pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(*args)
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


def _max_abs_diff(cell: Cell, t: _Inputs, backend: str | None) -> float:
    """Largest |normlab - torch| of the forward outputs (running stats on copies)."""
    outs = []
    for F, bk in ((NF, backend), (TF, None)):
        rm = None if t.rm is None else t.rm.clone()
        rv = None if t.rv is None else t.rv.clone()
        with torch.no_grad(), (normlab.backend(bk) if bk else contextlib.nullcontext()):
            outs.append(_norm_fns(F)[cell.norm](t.x, t.w, t.b, rm, rv, cell.groups).double())
    return (outs[0] - outs[1]).abs().max().item()


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


def _sample(step: Callable[[], None], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def time_cell(cell: Cell, config: Config, copy_gbps: float) -> list[Result]:
    """Time every peer of ``config`` on ``cell``, interleaved round-robin; one Result per peer."""
    t = _inputs(cell)
    steps, impls, errors, warm = {}, {}, {}, {}
    nb_backend = config.backend
    impls["normlab"] = nb_backend or _default_backend(t.x)
    steps["normlab"] = _step(_norm_fns(NF)[cell.norm], cell, t, nb_backend)
    impls["torch"] = "eager"
    steps["torch"] = _step(_norm_fns(TF)[cell.norm], cell, t)
    if config.compile:
        torch._dynamo.reset()  # a fresh, static-shape compilation per cell
        impls["compile"] = "inductor"
        steps["compile"] = _step(torch.compile(_norm_fns(TF)[cell.norm], dynamic=False), cell, t)

    reps = {}
    for peer, step in list(steps.items()):
        try:
            t0 = time.perf_counter()
            step()  # warm-up (the compile peer compiles here)
            warm[peer] = time.perf_counter() - t0
            once = _sample(step, 1)
            reps[peer] = max(1, math.ceil(config.min_time_s / max(once, 1e-9)))
        except Exception as e:  # a peer that cannot run this cell is reported, not fatal
            errors[peer] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            del steps[peer]

    samples = {peer: [] for peer in steps}
    order = list(steps)
    for r in range(config.rounds if order else 0):
        k = r % len(order)  # rotate who goes first
        for peer in order[k:] + order[:k]:
            samples[peer].append(_sample(steps[peer], reps[peer]))

    diff = None
    if "normlab" in steps:
        try:
            diff = _max_abs_diff(cell, t, nb_backend)
        except Exception:  # noqa: BLE001 - the timing stands; the check is informative
            diff = float("nan")

    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    for peer in config.peers:
        common = dict(cell=cell, peer=peer, impl=impls[peer], rounds=config.rounds,
                      copy_gbps=copy_gbps, threads=threads, load=load)
        if peer in errors:
            results.append(Result(ms=math.nan, ms_min=math.nan, reps=0, error=errors[peer],
                                  **common))
            continue
        s = samples[peer]
        results.append(Result(
            ms=statistics.median(s) * 1e3, ms_min=min(s) * 1e3, reps=reps[peer],
            compile_s=warm[peer] if peer == "compile" else None,
            max_abs_diff=diff if peer == "normlab" else None, **common))
    return results


def run(config: Config | None = None) -> list[Result]:
    """Benchmark every cell of ``config`` (default: :class:`Config`'s defaults); one
    :class:`Result` per cell and peer. The copy bandwidth is measured before and after the
    cells, and the median of both sets of samples is every Result's ``copy_gbps``."""
    config = config or Config()
    cells = config.cells()
    before = copy_samples(config.copy_mib)
    results: list[Result] = []
    gbps_now = _copy_gbps(config.copy_mib, before)
    with progress_bar(len(cells), enabled=config.progress) as bar:
        for cell in cells:
            bar.describe(cell.label)
            results += time_cell(cell, config, gbps_now)
            gc.collect()
            bar.advance()
    after = copy_samples(config.copy_mib)
    copy_gbps = _copy_gbps(config.copy_mib, before + after)
    return [dataclasses.replace(r, copy_gbps=copy_gbps) for r in results]
