"""The benchmark's reports: its Results as CSV (:func:`to_csv`, and back with
:func:`from_csv`), the summary line, the markdown report and issue 4's targets; and where
``--out`` writes them (:func:`out_paths`). GB/s and roofline follow the minimal-bytes model of
:mod:`.spec`.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Iterable, Sequence

import torch

from .env import machine, versions
from .spec import BYTES_MODEL, CHANNEL_NORMS, PEERS, ROW_NORMS, Cell, Result

FWD_TARGET, BWD_TARGET = 0.85, 0.70  # issue 4: fractions of the copy bandwidth, rows 1K-64K
TARGET_ROWS = (1024, 65536)


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
    "max_abs_diff", "threads", "load", "torch", "error", "device", "device_name", "timing",
    "copy_mib", "versions",
)
PEER_NAMES = {"torch": "torch eager", "compile": "torch.compile", "liger": "Liger-Kernel"}


def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _torch_version(r: Result) -> str:
    words = r.versions.split()
    return words[1].rstrip(",") if words[:1] == ["torch"] and len(words) > 1 else torch.__version__


def to_csv(results: Sequence[Result], path: str | os.PathLike | None = None) -> str:
    """One row per cell and peer (``CSV_FIELDS``); written to ``path`` when given, returned.
    ``normlab_speedup`` is this peer's time / normlab's time on the same cell."""
    cells = _by_cell(results)
    rows = []
    for r in results:
        c = r.cell
        ours = cells[c].get("normlab")
        rows.append({
            "norm": c.norm, "layout": c.layout, "dtype": c.dtype, "shape": c.shape_str,
            "groups": c.groups or "", "pass": c.pass_, "peer": r.peer, "impl": r.impl,
            "ms": f"{r.ms:.6g}", "ms_min": f"{r.ms_min:.6g}", "rounds": r.rounds,
            "reps": r.reps, "bytes": c.bytes, "gbps": f"{r.gbps:.4g}",
            "roofline": f"{r.roofline:.4g}", "copy_gbps": f"{r.copy_gbps:.4g}",
            "normlab_speedup": f"{r.ms / ours.ms:.4g}" if ours else "",
            "compile_s": _f(r.compile_s, ".3f"), "max_abs_diff": _f(r.max_abs_diff, ".3g"),
            "threads": r.threads, "load": _f(r.load, ".2f"),
            "torch": _torch_version(r), "error": r.error or "",
            "device": r.device, "device_name": r.device_name, "timing": r.timing,
            "copy_mib": r.copy_mib or "", "versions": r.versions,
        })
    return write_csv(CSV_FIELDS, rows, path)


def write_csv(fields: Sequence[str], rows: Iterable[dict],
              path: str | os.PathLike | None = None) -> str:
    """``rows`` (dicts keyed by ``fields``) as CSV text under a header line, ``\\n`` line ends;
    written to ``path`` when given, returned. The ``to_csv`` of the kernel and the model
    benchmarks."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    if path is not None:
        with open(path, "w", newline="") as f:
            f.write(text)
    return text


def from_csv(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Result]:
    """The Results of one or more CSVs written by :func:`to_csv` (older CSVs without the device
    columns read as CPU runs), in file order: to merge runs and render them again. A cell and
    peer seen twice keeps the later row, unless that one is n/a and the earlier one is not (a
    rerun of the cells a time budget cut keeps the cells timed before)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    out: dict = {}
    for path in paths:
        with open(path, newline="") as f:
            for n, row in enumerate(csv_rows(f, path, _REQUIRED), 2):
                try:
                    r = _result(row)
                except ValueError as e:
                    raise ValueError(f"{path}: row {n}: {e}") from None
                seen = out.get((r.cell, r.peer))
                if seen is None or not r.error or seen.error:
                    out[(r.cell, r.peer)] = r
    return list(out.values())


def _num(text, cast=float):
    return None if text in (None, "") else cast(text)


def _result(row: dict) -> Result:
    """One CSV row as a Result."""
    cell = Cell(row["norm"], row["layout"], row["dtype"],
                tuple(int(d) for d in row["shape"].split("x")), row["pass"],
                int(row["groups"] or 0))
    return Result(
        cell=cell, peer=row["peer"], impl=row["impl"], ms=float(row["ms"]),
        ms_min=float(row["ms_min"]), rounds=int(row["rounds"]),
        reps=int(row["reps"]), copy_gbps=float(row["copy_gbps"]),
        threads=int(row["threads"]), compile_s=_num(row.get("compile_s")),
        max_abs_diff=_num(row.get("max_abs_diff")), error=row.get("error") or None,
        load=_num(row.get("load")), device=row.get("device") or "cpu",
        device_name=row.get("device_name") or "", timing=row.get("timing") or "",
        copy_mib=_num(row.get("copy_mib"), int) or 0,
        versions=row.get("versions") or (f"torch {row['torch']}" if row.get("torch") else ""))


_REQUIRED = ("norm", "layout", "dtype", "shape", "pass", "groups", "peer", "impl", "ms",
             "ms_min", "rounds", "reps", "copy_gbps", "threads")


def csv_rows(f, path, required: Sequence[str]):
    """The rows of a CSV that ``normlab bench`` wrote, as dicts; a ValueError naming ``path``
    when it is empty, lacks one of the ``required`` columns or has a malformed row."""
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path}: not a CSV that normlab bench wrote (no "
                         f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                         "column)" if reader.fieldnames else f"{path}: the file is empty")
    n = 0
    for n, row in enumerate(reader, 1):
        if None in row or any(row.get(c) is None for c in required):
            raise ValueError(f"{path}: row {n + 1} does not have the header's columns")
        yield row
    if n == 0:
        raise ValueError(f"{path}: the CSV holds no rows")


def out_paths(out: str, stem: str = "bench") -> tuple[str, str]:
    """(csv, md) for ``--out``: FILE.csv and FILE.md, or DIR/STEM.csv and DIR/STEM.md."""
    if out.lower().endswith(".csv"):
        return out, out[:-4] + ".md"
    return os.path.join(out, f"{stem}.csv"), os.path.join(out, f"{stem}.md")


def _ms(r: Result | None) -> str:
    if r is None:
        return "-"
    return "n/a" if r.error else f"{r.ms:.3f}" if r.ms < 10 else f"{r.ms:.1f}"


def _x(num: Result | None, den: Result | None) -> str:
    if num is None or den is None or not math.isfinite(num.ms / den.ms):
        return "-"
    return f"{num.ms / den.ms:.2f}x"


def _peers(results: Sequence[Result]) -> list[str]:
    """The peers other than normlab present in ``results``, in ``spec.PEERS``' order."""
    present = {r.peer for r in results}
    return [p for p in PEERS[1:] if p in present]


def _gbps_text(results: Sequence[Result], copy_gbps) -> str:
    if copy_gbps is not None:
        return f"{copy_gbps:.1f} GB/s"
    values = sorted({round(r.copy_gbps, 1) for r in results if math.isfinite(r.copy_gbps)})
    if not values:
        return "nan GB/s"
    return f"{values[0]:.1f} GB/s" if len(values) == 1 else (
        f"{values[0]:.1f} to {values[-1]:.1f} GB/s (runs merged; each cell against its own run's)")


def summary(results: Sequence[Result], copy_gbps: float | None = None) -> str:
    """The one-line summary: geometric-mean speedups of normlab over each peer and the copy
    bandwidth (default: the results' own)."""
    parts = []
    peers = _peers(results)
    for peer in ("torch", "compile", "liger"):
        s = speedups(results, peer)
        if s:
            parts.append(f"{geomean(s):.2f}x over {PEER_NAMES[peer]} ({len(s)} cells)")
        elif peer == "compile":
            parts.append("torch.compile not run")
        elif peer in peers:
            parts.append(f"{PEER_NAMES[peer]} n/a")
    return (f"**Summary:** geometric-mean speedup of normlab {', '.join(parts)}; "
            f"copy bandwidth {_gbps_text(results, copy_gbps)}.")


def _listing(items: list[str], limit: int = 12) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def not_available(results: Sequence, what: str) -> list[str]:
    """A report's "Not available (n/a)" lines (none when nothing failed): each error once, in
    order of appearance, with the peers it hit and how many ``what``s (``"cell"`` or ``"case"``,
    the results' attribute of that name), naming up to four."""
    reasons: dict = {}  # error -> (peers, labels), in order of appearance
    for r in results:
        if r.error:
            peers, labels = reasons.setdefault(r.error, ({}, {}))
            peers[r.peer] = labels[getattr(r, what).label] = None
    if not reasons:
        return []
    lines = ["", "Not available (n/a):"]
    for error, (peers, labels) in reasons.items():
        n = len(labels)
        lines.append(f"- {', '.join(peers)} on {n} {what}{'s' * (n > 1)}: {error}"
                     f" ({_listing(list(labels), 4)})")
    return lines


def targets(results: Sequence[Result]) -> list[str]:
    """Issue 4's targets, judged on the normlab rows of ``results``: LayerNorm/RMSNorm on rows
    of 1K-64K elements at >= ``FWD_TARGET`` (fwd) and >= ``BWD_TARGET`` (bwd) of the copy
    bandwidth and ahead of torch.compile and Liger-Kernel; GroupNorm/InstanceNorm/BatchNorm
    ahead of torch eager in each layout. A cell where normlab or the peer is n/a is a miss."""
    cells = _by_cell(results)
    lo, hi = TARGET_ROWS
    rows = {c: p for c, p in cells.items()
            if c.norm in ROW_NORMS and lo <= c.shape[-1] <= hi and "normlab" in p}
    lines = []
    for pass_, goal in (("fwd", FWD_TARGET), ("bwd", BWD_TARGET)):
        judged = [(c, p["normlab"]) for c, p in rows.items() if c.pass_ == pass_]
        if not judged:
            continue
        miss = [f"{c.label} " + ("n/a" if r.error else f"{r.roofline:.2f}")
                for c, r in judged if r.error or not r.roofline >= goal]
        lines.append(f"- LayerNorm/RMSNorm {pass_} at >= {goal:.2f} of the copy bandwidth: "
                     f"{len(judged) - len(miss)} of {len(judged)} cells"
                     + (f"; missed: {_listing(miss)}" if miss else ""))

    def ahead(group: dict, peer: str, what: str) -> None:
        judged = [(c, p) for c, p in group.items() if peer in p]
        if not judged:
            return
        miss = []
        for c, p in judged:
            s = p[peer].ms / p["normlab"].ms
            if not (math.isfinite(s) and s > 1):
                miss.append(f"{c.label} " + (f"{s:.2f}x" if math.isfinite(s) else "n/a"))
        lines.append(f"- ahead of {PEER_NAMES[peer]} on {what}: {len(judged) - len(miss)} of "
                     f"{len(judged)} cells" + (f"; not: {_listing(miss)}" if miss else ""))

    ahead(rows, "compile", "LayerNorm/RMSNorm")
    ahead(rows, "liger", "LayerNorm/RMSNorm")
    for layout in ("nchw", "channels_last"):
        group = {c: p for c, p in cells.items()
                 if c.norm in CHANNEL_NORMS and c.layout == layout and "normlab" in p}
        ahead(group, "torch", f"GroupNorm/InstanceNorm/BatchNorm {layout}")
    return lines


def _timing_text(results: Sequence[Result]) -> str:
    rounds = ", ".join(map(str, sorted({r.rounds for r in results})))
    timing = next((r.timing for r in results if r.timing), "perf_counter")
    if timing.startswith("cuda-events"):
        flush = timing.partition("L2 flush ")[2]
        clock = ("CUDA events around each call" + (
            f", the L2 cache flushed ({flush} written) before each call outside the timed"
            " region" if flush else ", around back-to-back calls (no L2 flush)")
            + "; torch.cuda.synchronize() before any host clock is read")
    else:
        clock = "time.perf_counter around back-to-back calls"
    return (f"- time: median of {rounds} rounds, peers interleaved round-robin after a warm-up"
            f" call; {clock}; fwd runs under `no_grad`, bwd is `y.backward(dy,"
            " retain_graph=True)` on one forward's graph, fwd+bwd is the forward then"
            " `y.backward(dy)`; fresh grads for x, weight, bias")


def to_markdown(results: Sequence[Result], copy_gbps: float | None = None,
                show_targets: bool | None = None) -> str:
    """A markdown report: a header (device, versions, backend, peers, copy bandwidth, clock,
    bytes model), one table row per cell, the n/a reasons and the summary line; on CUDA (or
    with ``show_targets``) the issue-4 targets. ``copy_gbps`` defaults to the results' own."""
    cells = _by_cell(results)
    peers = _peers(results)
    impls = sorted({r.impl for r in results if r.peer == "normlab" and not r.error})
    threads = results[0].threads if results else torch.get_num_threads()
    groups = sorted({c.groups for c in cells if c.groups})
    cuda = any(r.device == "cuda" for r in results)
    name = next((r.device_name for r in results if r.device_name), "")
    vers = next((r.versions for r in results if r.versions), "") or versions()
    copy_mib = next((r.copy_mib for r in results if r.copy_mib), 0)
    peer_impls = [f"{PEER_NAMES[p]} ({', '.join(sorted({r.impl for r in results if r.peer == p}))})"
                  for p in peers]
    lines = ["# normlab bench", ""]
    if cuda:
        lines.append(f"- device: {name or 'CUDA device'} (cuda)")
    else:
        lines.append(f"- machine: {name or machine()}; torch threads: {threads}")
    lines += [
        f"- {vers}; normlab backend: {', '.join(impls) or '-'}",
        f"- peers: {', '.join(peer_impls) or 'none'}",
        f"- copy bandwidth: {_gbps_text(results, copy_gbps)} ("
        + ("device-to-device " if cuda else "") + "`dst.copy_(src)`"
        + (f" of {copy_mib} MiB buffers" if copy_mib else "")
        + ", 2 x bytes / time, median of samples before and after the cells)",
        _timing_text(results),
        f"- {BYTES_MODEL}; GB/s and roofline (fraction of the copy bandwidth) are normlab's;"
        " speedup = peer ms / normlab ms (> 1: normlab is faster)",
    ]
    loads = [r.load for r in results if r.load is not None]
    if loads and not cuda:
        lines.append(f"- 1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}"
                     f" (the benchmark itself accounts for up to {threads}; more means other"
                     " processes were competing for the CPUs)")
    if groups:
        lines.append(f"- group_norm: G = {', '.join(map(str, groups))}")
    lines.append("")
    head = ["norm", "layout", "dtype", "shape", "pass", "normlab ms"]
    head += [f"{p} ms" for p in peers]
    head += ["GB/s", "roofline"] + [f"vs {p}" for p in peers]
    if "compile" in peers:
        head.append("compile s")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, got in cells.items():
        ours = got.get("normlab")
        ok = ours is not None and not ours.error
        row = [c.norm if not c.groups else f"group_norm G={c.groups}", c.layout, c.dtype,
               c.shape_str, c.pass_, _ms(ours)]
        row += [_ms(got.get(p)) for p in peers]
        row += [f"{ours.gbps:.1f}" if ok else "-", f"{ours.roofline:.2f}" if ok else "-"]
        row += [_x(got.get(p), ours) for p in peers]
        if "compile" in peers:
            comp = got.get("compile")
            row.append(f"{comp.compile_s:.1f}" if comp and comp.compile_s is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += not_available(results, "cell")
    if "compile" in peers:
        total = sum(r.compile_s or 0 for r in results if r.peer == "compile")
        lines += ["", f"torch.compile: {total:.0f} s compiling in all (the first call per cell,"
                      " inductor's caches as found; the passes of one shape share a compilation)."]
    for peer in ("normlab", "liger"):
        diffs = [(r.max_abs_diff, r.cell) for r in results if r.peer == peer
                 and r.max_abs_diff is not None and math.isfinite(r.max_abs_diff)]
        if diffs:
            worst, cell = max(diffs, key=lambda d: d[0])
            lines += ["", f"Largest forward difference |{peer} - torch|: {worst:.2g}"
                          f" ({cell.label})."]
    if show_targets or (show_targets is None and cuda):
        found = targets(results)
        if found:
            lines += ["", f"Targets (issue 4; rows of {TARGET_ROWS[0]} to {TARGET_ROWS[1]}"
                          " elements):", *found]
    lines += ["", summary(results, copy_gbps), ""]
    return "\n".join(lines)
