"""The minimal-bytes model, and the benchmark's CSV and markdown reports.

Minimal bytes (``shared/design/architecture.md``), with ``s`` the element size: a forward pass
reads x and writes y, 2s per element (BatchNorm in training 3s: a statistics pass, then a
normalize pass); a backward pass reads x and dy and writes dx, 3s more (BatchNorm 5s). The
per-channel and per-row parameters and statistics are ignored. GB/s = bytes / time, compared
with the copy bandwidth ``2 * bytes / time`` of ``dst.copy_(src)`` measured in the same run.
"""
from __future__ import annotations

import csv
import io
import math
import os
import platform
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from .harness import Result

_FWD = {"batch_norm": 3}  # bytes per element per element size; others 2
_BWD = {"batch_norm": 5}  # others 3


def minimal_bytes(norm: str, pass_: str, numel: int, element_size: int) -> int:
    """Bytes a ``pass_`` ("fwd" or "fwd+bwd") of ``norm`` must move over ``numel`` elements.

    >>> minimal_bytes("layer_norm", "fwd+bwd", 4096 * 1024, 4)  # 5 * 4 bytes per element
    83886080
    >>> minimal_bytes("batch_norm", "fwd+bwd", 10, 2)  # 8 * 2 bytes per element
    160
    """
    per = _FWD.get(norm, 2)
    if pass_ == "fwd+bwd":
        per += _BWD.get(norm, 3)
    elif pass_ != "fwd":
        raise ValueError(f"unknown pass {pass_!r}; known passes: fwd, fwd+bwd")
    return per * numel * element_size


def machine() -> str:
    """The CPU's name (``platform.processor()``, else /proc/cpuinfo's model name), the
    architecture and the logical CPU count."""
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f
                             if ln.startswith("model name")), "")
        except OSError:
            name = ""
    return f"{name or 'unknown CPU'} ({platform.machine()}), {os.cpu_count()} logical CPUs"


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values (nan when there are none)."""
    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def _by_cell(results: Sequence[Result]) -> dict:
    cells: dict = {}
    for r in results:
        cells.setdefault(r.cell, {})[r.peer] = r
    return cells


def speedups(results: Sequence[Result], peer: str) -> list[float]:
    """Per cell, ``peer``'s time / normlab's time (> 1: normlab is faster), where both ran."""
    out = []
    for peers in _by_cell(results).values():
        if "normlab" in peers and peer in peers:
            s = peers[peer].ms / peers["normlab"].ms
            if math.isfinite(s):
                out.append(s)
    return out


CSV_FIELDS = (
    "norm", "layout", "dtype", "shape", "groups", "pass", "peer", "impl", "ms", "ms_min",
    "rounds", "reps", "bytes", "gbps", "roofline", "copy_gbps", "normlab_speedup", "compile_s",
    "max_abs_diff", "threads", "load", "torch", "error",
)


def to_csv(results: Sequence[Result], path: str | os.PathLike | None = None) -> str:
    """One row per cell and peer (``CSV_FIELDS``); written to ``path`` when given, returned.
    ``normlab_speedup`` is this peer's time / normlab's time on the same cell."""
    cells = _by_cell(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results:
        c = r.cell
        ours = cells[c].get("normlab")
        w.writerow({
            "norm": c.norm, "layout": c.layout, "dtype": c.dtype, "shape": c.shape_str,
            "groups": c.groups or "", "pass": c.pass_, "peer": r.peer, "impl": r.impl,
            "ms": f"{r.ms:.6g}", "ms_min": f"{r.ms_min:.6g}", "rounds": r.rounds,
            "reps": r.reps, "bytes": c.bytes, "gbps": f"{r.gbps:.4g}",
            "roofline": f"{r.roofline:.4g}", "copy_gbps": f"{r.copy_gbps:.4g}",
            "normlab_speedup": f"{r.ms / ours.ms:.4g}" if ours else "",
            "compile_s": "" if r.compile_s is None else f"{r.compile_s:.3f}",
            "max_abs_diff": "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}",
            "threads": r.threads, "load": "" if r.load is None else f"{r.load:.2f}",
            "torch": torch.__version__, "error": r.error or "",
        })
    text = buf.getvalue()
    if path is not None:
        with open(path, "w", newline="") as f:
            f.write(text)
    return text


def _ms(r: Result | None) -> str:
    if r is None:
        return "-"
    return "error" if r.error else f"{r.ms:.3f}" if r.ms < 10 else f"{r.ms:.1f}"


def _x(num: Result | None, den: Result | None) -> str:
    if num is None or den is None or not math.isfinite(num.ms / den.ms):
        return "-"
    return f"{num.ms / den.ms:.2f}x"


def summary(results: Sequence[Result], copy_gbps: float) -> str:
    """The one-line summary: geometric-mean speedups of normlab and the copy bandwidth."""
    parts = []
    for peer, what in (("torch", "torch eager"), ("compile", "torch.compile")):
        s = speedups(results, peer)
        if s:
            parts.append(f"{geomean(s):.2f}x over {what} ({len(s)} cells)")
        elif peer == "compile":
            parts.append("torch.compile not run")
    return (f"**Summary:** geometric-mean speedup of normlab {', '.join(parts)}; "
            f"copy bandwidth {copy_gbps:.1f} GB/s.")


def to_markdown(results: Sequence[Result], copy_gbps: float | None = None) -> str:
    """A markdown report: a header (machine, threads, versions, backend, copy bandwidth), one
    table row per cell and the summary line. ``copy_gbps`` defaults to the results' own."""
    import normlab

    if copy_gbps is None:
        copy_gbps = results[0].copy_gbps if results else math.nan
    cells = _by_cell(results)
    has_compile = any(r.peer == "compile" for r in results)
    impls = sorted({r.impl for r in results if r.peer == "normlab"})
    rounds = sorted({r.rounds for r in results})
    threads = results[0].threads if results else torch.get_num_threads()
    groups = sorted({c.groups for c in cells if c.groups})
    lines = [
        "# normlab bench",
        "",
        f"- machine: {machine()}; torch threads: {threads}",
        f"- torch {torch.__version__}, normlab {normlab.__version__}, normlab backend: "
        f"{', '.join(impls) or '-'}",
        f"- copy bandwidth: {copy_gbps:.1f} GB/s (`dst.copy_(src)`, 2 x bytes / time)",
        f"- time: median of {', '.join(map(str, rounds))} rounds, peers interleaved round-robin"
        " after a warm-up call; fwd runs under `no_grad`, fwd+bwd is `y.backward(dy)` with"
        " fresh grads for x, weight, bias",
        "- GB/s and roofline (fraction of the copy bandwidth) are normlab's, from the"
        " minimal-bytes model: fwd 2 x element size per element (BatchNorm training 3), bwd 3"
        " more (BatchNorm 5); speedup = peer ms / normlab ms (> 1: normlab is faster)",
    ]
    loads = [r.load for r in results if r.load is not None]
    if loads:
        lines.append(f"- 1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}"
                     f" (the benchmark itself accounts for up to {threads}; more means other"
                     " processes were competing for the CPUs)")
    if groups:
        lines.append(f"- group_norm: G = {', '.join(map(str, groups))}")
    lines.append("")
    head = ["norm", "layout", "dtype", "shape", "pass", "normlab ms", "torch ms"]
    if has_compile:
        head.append("compile ms")
    head += ["GB/s", "roofline", "vs torch"]
    if has_compile:
        head += ["vs compile", "compile s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, peers in cells.items():
        ours, theirs, comp = peers.get("normlab"), peers.get("torch"), peers.get("compile")
        ok = ours is not None and not ours.error
        row = [c.norm if not c.groups else f"group_norm G={c.groups}", c.layout, c.dtype,
               c.shape_str, c.pass_, _ms(ours), _ms(theirs)]
        if has_compile:
            row.append(_ms(comp))
        row += [f"{ours.gbps:.1f}" if ok else "-", f"{ours.roofline:.2f}" if ok else "-",
                _x(theirs, ours)]
        if has_compile:
            row += [_x(comp, ours),
                    f"{comp.compile_s:.1f}" if comp and comp.compile_s is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    errors = [f"- {r.peer} on {r.cell.label}: {r.error}" for r in results if r.error]
    if errors:
        lines += ["", "Errors:", *errors]
    if has_compile:
        total = sum(r.compile_s or 0 for r in results if r.peer == "compile")
        lines += ["", f"torch.compile: {total:.0f} s compiling in all (the first call per cell,"
                      " inductor's caches as found)."]
    diffs = [(r.max_abs_diff, r.cell) for r in results
             if r.max_abs_diff is not None and math.isfinite(r.max_abs_diff)]
    if diffs:
        worst, cell = max(diffs, key=lambda d: d[0])
        lines += ["", f"Largest forward difference |normlab - torch|: {worst:.2g} ({cell.label})."]
    lines += ["", summary(results, copy_gbps), ""]
    return "\n".join(lines)
