r"""``normlab bench --dispatch``: the figures behind ``auto``'s choice on CPU.

For every cell of :mod:`normlab.kernels.auto`'s table, (norm, layout, dtype, size class, pass),
two inputs of the class's size that differ in shape (:func:`shape_of`: 64 and 256 channels,
rows of 1024 and 4096) are each run through normlab's functional layer twice,
with ``normlab.backend("cpu")`` (the fused kernels) and with ``normlab.backend("torch")``
(ATen), interleaved: a warm-up call each, then ``rounds`` rounds that each time both (the order
alternating), a sample repeating the call until it lasts ``min_time_s``. The cell's ratio is
ATen's median time over the kernels'; the kernels are chosen for the cell where the geometric
mean of its shapes' ratios is above 1 and neither is below 0.9 (a shape in a class can favour
the other side: the rule leans towards ATen, never much slower than it). A shape whose
ratio is within ``recheck`` of 1 is timed again with twice the rounds and decided on all its
samples (this VM's noise is 10-30% per cell). ``--dispatch-recheck`` times a run's close
classes again and ``--from-csv`` merges runs (:func:`from_csv`: the geometric mean of two, the
median run of three or more; the committed table merges four, see its ``command`` field).

``fwd`` runs under ``torch.no_grad()``; ``train`` is the forward with x and the parameters
requiring gradients, then ``backward`` with an upstream gradient in x's memory layout (fresh
gradients each call). Parameters and running statistics have the input's dtype (mixed dtypes
never go to ATen).
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import normlab
import normlab.functional as NF
from normlab.kernels import auto

from .env import machine, versions
from .progress import progress_bar
from .report import csv_rows, out_paths

ROW_NORMS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
LAYOUTS = {n: ("rows",) for n in ROW_NORMS}
LAYOUTS.update({"batch_norm": ("nchw", "channels_last", "nc"),
                "batch_norm_eval": ("nchw", "channels_last", "nc"),
                "instance_norm": ("nchw", "channels_last"),
                "instance_norm_eval": ("nchw", "channels_last"),
                "group_norm": ("nchw", "channels_last")})
ROW_D = (1024, 4096)  # the row norms' normalized size, one per shape of a class
GROUPS = 32
# (N, C, H, W) per size class, two shapes each (64 and 256 channels, a multiple of 32 for
# GroupNorm): CNN activations of 2K to 16M elements
IMAGES = (((1, 32, 8, 8), (2, 256, 2, 2)), ((2, 64, 8, 8), (1, 512, 4, 4)),
          ((2, 64, 16, 16), (2, 256, 8, 8)), ((2, 64, 32, 32), (2, 256, 16, 16)),
          ((8, 64, 32, 32), (8, 256, 16, 16)), ((8, 64, 64, 64), (8, 256, 32, 32)),
          ((32, 64, 64, 64), (32, 256, 32, 32)), ((32, 128, 64, 64), (64, 256, 32, 32)))
# (N, C) per size class: BatchNorm1d in an MLP
VECTORS = (((16, 128), (4, 512)), ((32, 256), (8, 1024)), ((64, 512), (16, 2048)),
           ((128, 1024), (32, 4096)), ((256, 2048), (64, 8192)), ((512, 4096), (128, 16384)),
           ((1024, 8192), (256, 32768)), ((2048, 8192), (512, 32768)))
VARIANTS = (0, 1)
QUICK_CLASSES = (0, 2)


def shape_of(norm: str, layout: str, size_class: int, variant: int = 0) -> tuple[int, ...]:
    """Input shape ``variant`` (0 or 1) of a size class, near its geometric middle (16M for the
    last class).

    >>> shape_of("layer_norm", "rows", 2), shape_of("layer_norm", "rows", 2, 1)
    ((32, 1024), (8, 4096))
    >>> shape_of("batch_norm", "nc", 0), shape_of("group_norm", "nchw", 3, 1)
    ((16, 128), (2, 256, 16, 16))
    """
    if layout == "rows":
        numel = 1 << (2 * size_class + 11) if size_class < 7 else 1 << 24
        d = min(ROW_D[variant], numel)
        return (max(1, numel // d), d)
    return (VECTORS if layout == "nc" else IMAGES)[size_class][variant]


@dataclass(frozen=True)
class Cell:
    norm: str
    layout: str
    dtype: str
    size_class: int
    pass_: str
    variant: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return shape_of(self.norm, self.layout, self.size_class, self.variant)

    @property
    def key(self) -> str:
        return f"{self.norm}/{self.layout}/{self.dtype}/{self.pass_}"

    @property
    def label(self) -> str:
        return f"{self.key} class {self.size_class} {'x'.join(map(str, self.shape))}"


@dataclass
class Timing:
    cell: Cell
    kernels_ms: float
    aten_ms: float
    rounds: int

    @property
    def ratio(self) -> float:
        """ATen's time over the kernels' (> 1: the kernels are faster)."""
        return self.aten_ms / self.kernels_ms


def choose(ratios: Sequence[float]) -> str:
    """A cell's choice from its shapes' ratios (ATen time / kernels time): the kernels where
    the geometric mean is above 1 and no ratio below 0.9."""
    gm = math.exp(statistics.fmean(math.log(r) for r in ratios))
    return auto.KERNELS if gm > 1 and min(ratios) >= 0.9 else auto.ATEN


def cells(norms: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
          classes: Sequence[int] | None = None, passes: Sequence[str] | None = None) -> list[Cell]:
    """The grid, in run order; defaults: every norm, dtype, class and pass of the table."""
    out = []
    for dtype in dtypes or tuple(auto.DTYPES):
        for norm in norms or auto.NORMS:
            for layout in LAYOUTS[norm]:
                for pass_ in passes or auto.PASSES:
                    for k in classes if classes is not None else range(len(auto.CLASS_EDGES) + 1):
                        for v in VARIANTS:
                            out.append(Cell(norm, layout, dtype, k, pass_, v))
    return out


def _call(cell: Cell, seed: int = 0) -> Callable[[], None]:
    """One call of the cell's pass on fresh inputs (the backend is chosen by the caller)."""
    g = torch.Generator().manual_seed(seed)
    dt = auto.DTYPES[cell.dtype]
    shape = cell.shape
    x = (torch.randn(shape, generator=g) + 0.5).to(dt)
    if cell.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[-1] if cell.layout == "rows" else shape[1]
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(dt)
    b = (0.1 * torch.randn(c, generator=g)).to(dt)
    rm, rv = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)
    r = torch.randn(shape, generator=g).to(dt) if cell.norm.startswith("add_") else None
    train = cell.pass_ == "train"
    leaves = [x, w, b] + ([r] if r is not None else [])
    if train:
        for t in leaves:
            t.requires_grad_()
    fns = {
        "layer_norm": lambda: NF.layer_norm(x, (c,), w, b),
        "rms_norm": lambda: NF.rms_norm(x, (c,), w),
        "add_layer_norm": lambda: NF.add_layer_norm(x, r, (c,), w, b),
        "add_rms_norm": lambda: NF.add_rms_norm(x, r, (c,), w),
        "batch_norm": lambda: NF.batch_norm(x, rm, rv, w, b, True),
        "batch_norm_eval": lambda: NF.batch_norm(x, rm, rv, w, b, False),
        "instance_norm": lambda: NF.instance_norm(x, None, None, w, b, True),
        "instance_norm_eval": lambda: NF.instance_norm(x, rm, rv, w, b, False),
        "group_norm": lambda: NF.group_norm(x, GROUPS, w, b),
    }
    fn = fns[cell.norm]
    if not train:
        def step():
            with torch.no_grad():
                fn()
        return step
    dy = torch.randn(shape, generator=g).to(dt)
    if cell.layout == "channels_last":  # the upstream gradient of a channels_last model
        dy = dy.contiguous(memory_format=torch.channels_last)

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, (dy,) * len(outs))
    return step


def _sample(step: Callable[[], None], backend: str, reps: int) -> float:
    with normlab.backend(backend):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t0) / reps


def time_cell(cell: Cell, rounds: int, min_time_s: float = 1e-3,
              recheck: float = 0.1) -> Timing:
    """Median seconds per call of the kernels and of ATen on the cell, interleaved."""
    step = _call(cell)
    reps = {}
    for b in ("cpu", "torch"):
        _sample(step, b, 1)  # warm-up (the kernels compile or load here)
        once = _sample(step, b, 1)
        reps[b] = max(1, min(200, math.ceil(min_time_s / max(once, 1e-7))))
    got = {"cpu": [], "torch": []}

    def run(n):
        for i in range(n):
            order = ("cpu", "torch") if i % 2 == 0 else ("torch", "cpu")
            for b in order:
                got[b].append(_sample(step, b, reps[b]))
    run(rounds)
    ratio = statistics.median(got["torch"]) / statistics.median(got["cpu"])
    if abs(ratio - 1) < recheck:
        run(2 * rounds)
    return Timing(cell, statistics.median(got["cpu"]) * 1e3,
                  statistics.median(got["torch"]) * 1e3, len(got["cpu"]))


def run(grid: Sequence[Cell], rounds: int = 7, progress: bool = True,
        time_budget_s: float | None = None, on_cell=None) -> list[Timing]:
    out: list[Timing] = []
    t_start = time.perf_counter()
    with progress_bar(len(grid), enabled=progress) as bar:
        for cell in grid:
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                break
            bar.describe(cell.label)
            out.append(time_cell(cell, rounds))
            bar.advance()
            if on_cell is not None:
                on_cell(out)
    return out


#: A class is "close" (timed again by ``--dispatch-recheck``) when one of its ratios lies in
#: this band: the runs' noise (a few percent, more on a busy core) could flip its choice.
CLOSE = (0.8, 1.25)


def close_cells(timings: Sequence[Timing], band: tuple[float, float] = CLOSE) -> list[Cell]:
    """The cells of the classes (cell key, size class) with a ratio inside ``band``, in run
    order: both shapes of such a class."""
    near = {(t.cell.key, t.cell.size_class) for t in timings
            if band[0] <= t.ratio <= band[1]}
    return [t.cell for t in timings if (t.cell.key, t.cell.size_class) in near]


def choices(timings: Sequence[Timing]) -> dict[tuple[str, int], str]:
    """``{(cell key, size class): choice}`` over the shapes timed for each class."""
    ratios: dict = {}
    for t in timings:
        ratios.setdefault((t.cell.key, t.cell.size_class), []).append(t.ratio)
    return {k: choose(v) for k, v in ratios.items()}


def table(timings: Sequence[Timing], previous: dict | None = None) -> dict:
    """The table file's contents: ``choices`` per ``norm/layout/dtype/pass``, one character per
    size class; classes not measured keep ``previous``'s choice (else the kernels)."""
    n = len(auto.CLASS_EDGES) + 1
    rows = {k: list(v) for k, v in (previous or {}).get("choices", {}).items()}
    for (key, k), choice in choices(timings).items():
        rows.setdefault(key, [auto.KERNELS] * n)[k] = choice
    return {
        "generated": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{machine()}, {torch.get_num_threads()} torch threads",
        "versions": versions(),
        "command": "normlab bench --dispatch",
        "classes": "size class k < 7 holds inputs of fewer than "
                   + ", ".join(str(e) for e in auto.CLASS_EDGES) + " elements; 7 the rest",
        "rule": "kernels where the geometric mean of a class's shapes' ATen/kernels time ratios"
                " is above 1 and none is below 0.9",
        "choices": {k: "".join(v) for k, v in sorted(rows.items())},
    }


def from_csv(paths: Sequence[str]) -> list[Timing]:
    """The timings of earlier runs, one per cell: a cell timed in two runs gets the geometric
    means of its times (so its ratio is the geometric mean of the runs' ratios); one timed in
    three or more, those of its median run by ratio (the two middle ones' geometric means for
    an even count), so that one disturbed run (this VM moves a cell by 2x at times) cannot
    decide it."""
    by: dict[Cell, list] = {}
    need = ("norm", "layout", "dtype", "size_class", "pass", "kernels_ms", "aten_ms", "rounds")
    for path in paths:
        with open(path, newline="") as f:
            for n, row in enumerate(csv_rows(f, path, need), 2):
                try:
                    cell = Cell(row["norm"], row["layout"], row["dtype"],
                                int(row["size_class"]), row["pass"], int(row.get("variant") or 0))
                    by.setdefault(cell, []).append(
                        (float(row["kernels_ms"]), float(row["aten_ms"]), int(row["rounds"])))
                except ValueError as e:
                    raise ValueError(f"{path}: row {n}: {e}") from None
    out = []
    for cell, runs in by.items():
        if len(runs) >= 3:  # the middle run(s) by ratio: one disturbed run cannot decide
            runs = sorted(runs, key=lambda r: r[1] / r[0])
            mid = runs[(len(runs) - 1) // 2: len(runs) // 2 + 1]
        else:
            mid = runs
        k = math.exp(statistics.fmean(math.log(r[0]) for r in mid))
        a = math.exp(statistics.fmean(math.log(r[1]) for r in mid))
        out.append(Timing(cell, k, a, sum(r[2] for r in runs)))
    return out


def to_csv(timings: Sequence[Timing], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["norm", "layout", "dtype", "pass", "size_class", "variant", "shape",
                    "kernels_ms", "aten_ms", "aten_over_kernels", "rounds"])
        for t in timings:
            c = t.cell
            w.writerow([c.norm, c.layout, c.dtype, c.pass_, c.size_class, c.variant,
                        "x".join(map(str, c.shape)), f"{t.kernels_ms:.5g}", f"{t.aten_ms:.5g}",
                        f"{t.ratio:.4g}", t.rounds])


def to_markdown(timings: Sequence[Timing]) -> str:
    """A table per dtype and pass: per (norm, layout) and size class, the ATen/kernels time
    ratios of the class's shapes (bold: the kernels are chosen)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shapes = lambda pairs: ", ".join("/".join("x".join(map(str, s)) for s in p) for p in pairs)
    lines = [f"- machine: {machine()}; torch threads: {torch.get_num_threads()}",
             f"- {versions()}",
             f"- 1-minute load average at the end: {load:.2f}",
             "- cell: ATen's median time / the kernels' for each of the class's two shapes (> 1:"
             " the kernels are faster); **bold**: `auto` runs the kernels (geometric mean above"
             " 1, neither below 0.9)",
             f"- shapes per class: rows (M, 1024) / (M, 4096); images {shapes(IMAGES)}; (N, C)"
             f" {shapes(VECTORS)}", ""]
    by: dict = {}
    for t in timings:
        by.setdefault((t.cell.dtype, t.cell.pass_), {}).setdefault(
            (t.cell.norm, t.cell.layout), {}).setdefault(t.cell.size_class, []).append(t)
    n = len(auto.CLASS_EDGES) + 1
    for (dtype, pass_), rows in by.items():
        lines += [f"### {dtype}, {pass_}", "",
                  "| norm | layout | " + " | ".join(f"class {k}" for k in range(n)) + " |",
                  "|---|---|" + "---|" * n]
        for (norm, layout), row in rows.items():
            out = []
            for k in range(n):
                ts = sorted(row.get(k, []), key=lambda t: t.cell.variant)
                if not ts:
                    out.append("-")
                    continue
                v = " / ".join(f"{t.ratio:.2f}" for t in ts)
                out.append(f"**{v}**" if choose([t.ratio for t in ts]) == auto.KERNELS else v)
            lines.append(f"| {norm} | {layout} | " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines)


def main(args, parser=None) -> int:
    """``normlab bench --dispatch``: time the grid, print the markdown, write ``--out``
    (CSV and markdown) and, with ``--table FILE``, the dispatch table. An unreadable
    ``--from-csv`` or ``--dispatch-recheck`` file is a parser error (with ``parser``)."""
    classes = QUICK_CLASSES if args.quick else None
    grid = cells(norms=args.dispatch_norms, dtypes=args.dtypes, classes=classes)
    try:
        merged = from_csv([f for f in args.from_csv.split(",") if f]) if args.from_csv else None
        if getattr(args, "dispatch_recheck", None):  # only the close classes of a run
            grid = close_cells(from_csv([args.dispatch_recheck]))
    except (OSError, ValueError) as e:
        if parser is None:
            raise
        parser.error(str(e))
    rounds = args.rounds or (3 if args.quick else 7)
    paths = out_paths(args.out, "dispatch") if args.out else None

    def save(done):
        if paths:
            os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
            to_csv(done, paths[0])
            with open(paths[1], "w") as f:
                f.write(to_markdown(done))
    if merged is not None:  # time nothing: merge earlier runs
        timings = merged
        save(timings)
    else:
        timings = run(grid, rounds, progress=args.progress, time_budget_s=args.time_budget,
                      on_cell=save)
    save(timings)
    print(to_markdown(timings))
    if args.table:
        previous = {}
        if os.path.exists(args.table):
            with open(args.table) as f:
                previous = json.load(f)
        with open(args.table, "w") as f:
            json.dump(table(timings, previous), f, indent=1)
            f.write("\n")
        print(f"wrote {args.table}", flush=True)
    return 0
