"""What a benchmark run is: the norms, layouts, dtypes, passes and shapes (their names, aliases
and presets), :class:`Cell`, :class:`Config` and :class:`Result`, and the minimal-bytes model a
cell's GB/s is judged by.

Minimal bytes (each norm's ``bytes`` in :mod:`normlab.registry`), with ``s`` the element size,
per element of x: a forward pass reads x and writes y, 2s (BatchNorm in training 3s: a statistics pass, then a
normalize pass); a backward pass reads x and dy and writes dx, 3s (BatchNorm 5s). Per element of
the affine parameters (C or D of them): the forward reads weight and bias (RMSNorm: weight;
BatchNorm also reads and writes the running mean and variance), the backward reads weight and
writes the weight and bias gradients. Per-row or per-group statistics and partial sums are not
counted. GB/s = bytes / time, compared with the copy bandwidth ``2 * bytes / time`` of
``dst.copy_(src)`` measured in the same run on the same device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

import normlab
from normlab import registry

from .env import liger_kernel

# the norms torch has too (the peers time torch's), from the registry
CHANNEL_NORMS = tuple(s.name for s in registry.norms(torch_only=True)
                      if s.input == "channels")  # (N, C, H, W) inputs
ROW_NORMS = tuple(s.name for s in registry.norms(torch_only=True)
                  if s.input == "rows")  # (M, D) rows, normalized over D
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


def minimal_bytes(norm: str, pass_: str, numel: int, element_size: int, params: int = 0) -> int:
    """Bytes a ``pass_`` ("fwd", "bwd" or "fwd+bwd") of ``norm`` must move over ``numel``
    elements of x with ``params`` elements per affine parameter.

    >>> minimal_bytes("layer_norm", "fwd+bwd", 4096 * 1024, 4)  # 5 * 4 bytes per element
    83886080
    >>> minimal_bytes("batch_norm", "fwd+bwd", 10, 2)  # 8 * 2 bytes per element
    160
    >>> minimal_bytes("rms_norm", "bwd", 4 * 8, 2, params=8)  # 3 * 2 * 32 + (2 * 2) * 8
    224
    """
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"unknown pass {pass_!r}; known passes: fwd, bwd, fwd+bwd")
    spec = registry.get(norm)
    fwd, bwd, fwd_param = spec.bytes
    per, per_param = 0, 0
    if pass_ != "bwd":
        per, per_param = fwd, fwd_param
    if pass_ != "fwd":  # read weight, write its gradient (and the bias's)
        per, per_param = per + bwd, per_param + 2 + spec.bias
    return (per * numel + per_param * params) * element_size


BYTES_MODEL = (
    "bytes = minimal traffic: fwd reads x, writes y (2 x element size per element; BatchNorm"
    " training 3: a statistics pass, then a normalize pass) and reads weight and bias"
    " (BatchNorm also reads and writes the running stats); bwd reads x and dy, writes dx (3;"
    " BatchNorm 5) and reads weight, writes the parameter gradients; per-row/group statistics"
    " are not counted")


def _names(kind: str, values, known: Sequence[str]) -> tuple[str, ...]:
    """Canonical names of ``values`` (a comma-separated string or a sequence), or a ValueError
    naming the unknown one and listing the known ones."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    kinds = kind + ("es" if kind.endswith("s") else "s")
    out = []
    for v in values:
        name = _ALIASES.get(str(v).strip().lower(), str(v).strip().lower())
        if name not in known:
            raise ValueError(
                f"unknown {kind} {str(v).strip()!r}; known {kinds}: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no {kind} given; known {kinds}: {', '.join(known)}")
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
        if device == "cuda" and liger_kernel()[0] is not None:
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
    versions: str = ""  # env.versions() of the run

    @property
    def gbps(self) -> float:
        """Achieved bandwidth under the minimal-bytes model."""
        return self.cell.bytes / (self.ms * 1e-3) / 1e9

    @property
    def roofline(self) -> float:
        """Fraction of the device's copy bandwidth."""
        return self.gbps / self.copy_gbps
