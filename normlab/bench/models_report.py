"""The CSV and markdown reports of ``normlab bench --models``.

Speedups are against torch eager: ``torch ms / peer ms`` on the same case (> 1: the peer is
faster than torch eager). ``norm %`` is the torch eager model's share of time in its norms
(:func:`models_harness.norm_share`).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .env import machine
from .models import MODELS
from .models_harness import LR, PEERS, ModelResult
from .report import geomean, not_available, write_csv

CSV_FIELDS = (
    "model", "layout", "mode", "batch", "input", "peer", "impl", "ms", "ms_min", "rounds",
    "reps", "speedup", "compile_s", "max_abs_diff", "check", "norm_pct", "norm_ms", "norms",
    "unpatched", "quick", "threads", "load", "error", "device_name", "timing", "versions",
)
PEER_NAMES = {"torch": "torch eager", "normlab": "normlab", "normlab+fold": "normlab+fold",
              "compile": "torch.compile"}
NORM_SHARE_TEXT = (
    "norm % = the torch eager model's share of time in its norms, from `torch.profiler` (CPU) on"
    " {steps} step(s) after the timed rounds: the CPU time of the forward operators"
    " `aten::batch_norm`, `aten::layer_norm`, `aten::group_norm`, `aten::instance_norm`,"
    " `aten::rms_norm` (with everything they call) and of profiler ranges put around each"
    " hand-written norm module's forward by hooks (a leaf module named like a norm that is not a"
    " torch norm class, e.g. LlamaRMSNorm), plus in the backward every autograd node created"
    " inside those forwards (matched by sequence number: NativeLayerNormBackward0 and the like,"
    " and the elementary nodes of norms written with plain ops), each counted once; over the"
    " wall time of the profiled steps. Not counted: AccumulateGrad of the norm weights and the"
    " optimizer step. The profiler's own overhead is in both numbers.")


def _by_case(results: Sequence[ModelResult]) -> dict:
    cases: dict = {}
    for r in results:
        cases.setdefault(r.case, {})[r.peer] = r
    return cases


def _ok(r: ModelResult | None) -> bool:
    return r is not None and not r.error and math.isfinite(r.ms) and r.ms > 0


def speedups(results: Sequence[ModelResult], peer: str, mode: str | None = None) -> list[float]:
    """Per case (of ``mode``, default any), torch eager ms / ``peer`` ms, where both ran."""
    out = []
    for case, peers in _by_case(results).items():
        if (mode is None or case.mode == mode) and _ok(peers.get("torch")) \
                and _ok(peers.get(peer)):
            out.append(peers["torch"].ms / peers[peer].ms)
    return out


def _f(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, fmt)


def to_csv(results: Sequence[ModelResult], path: str | os.PathLike | None = None) -> str:
    """One row per case and peer (``CSV_FIELDS``); written to ``path`` when given, returned.
    ``speedup`` is torch eager's ms / this peer's ms on the same case."""
    cases = _by_case(results)
    rows = []
    for r in results:
        c = r.case
        eager = cases[c].get("torch")
        rows.append({
            "model": c.model, "layout": c.layout, "mode": c.mode, "batch": c.batch,
            "input": c.input_str, "peer": r.peer, "impl": r.impl, "ms": f"{r.ms:.6g}",
            "ms_min": f"{r.ms_min:.6g}", "rounds": r.rounds, "reps": r.reps,
            "speedup": f"{eager.ms / r.ms:.4g}" if _ok(eager) and _ok(r) else "",
            "compile_s": _f(r.compile_s, ".3f"), "max_abs_diff": _f(r.max_abs_diff, ".3g"),
            "check": r.check, "norm_pct": _f(None if r.norm_share is None else
                                             100 * r.norm_share, ".2f"),
            "norm_ms": _f(r.norm_ms, ".4g"), "norms": r.norms, "unpatched": r.unpatched,
            "quick": int(r.quick), "threads": r.threads, "load": _f(r.load, ".2f"),
            "error": r.error or "", "device_name": r.device_name, "timing": r.timing,
            "versions": r.versions,
        })
    return write_csv(CSV_FIELDS, rows, path)


def _ms(r: ModelResult | None) -> str:
    if r is None:
        return "-"
    return "n/a" if r.error else f"{r.ms:.2f}" if r.ms < 100 else f"{r.ms:.0f}"


def _x(eager: ModelResult | None, peer: ModelResult | None) -> str:
    return f"{eager.ms / peer.ms:.2f}x" if _ok(eager) and _ok(peer) else "-"


def _peers(results: Sequence[ModelResult]) -> list[str]:
    present = {r.peer for r in results}
    return [p for p in PEERS if p in present]


def summary(results: Sequence[ModelResult]) -> str:
    """The one-line summary: each peer's geometric-mean speedup over torch eager, overall and
    for inference and training apart."""
    parts = []
    for peer in _peers(results)[1:]:
        s = speedups(results, peer)
        if not s:
            parts.append(f"{PEER_NAMES[peer]} n/a")
            continue
        by_mode = [f"{m} {geomean(v):.2f}x ({len(v)})" for m in ("infer", "train")
                   if (v := speedups(results, peer, m))]
        parts.append(f"{PEER_NAMES[peer]} {geomean(s):.2f}x over {len(s)} cases"
                     + (f" ({', '.join(by_mode)})" if len(by_mode) > 1 else ""))
    if "compile" not in _peers(results):
        parts.append("torch.compile not run")
    return ("**Summary:** geometric-mean speedup over torch eager (torch ms / peer ms): "
            + "; ".join(parts) + ".")


def _model_lines(results: Sequence[ModelResult]) -> list[str]:
    quick = any(r.quick for r in results)
    seen = list(dict.fromkeys(r.case.model for r in results))
    return [f"  - {name}: " + (MODELS[name].quick_summary + " (quick)" if quick
                               else MODELS[name].summary) for name in seen if name in MODELS]


def to_markdown(results: Sequence[ModelResult]) -> str:
    """A markdown report: a header (machine, versions, threads, peers, timing method, load),
    one table row per case, the models, the n/a reasons, the norms patch left alone, compile
    time, the largest differences from torch eager, what norm % counts, and the summary."""
    cases = _by_case(results)
    peers = _peers(results)
    others = peers[1:]
    threads = results[0].threads if results else torch.get_num_threads()
    name = next((r.device_name for r in results if r.device_name), "") or machine()
    vers = next((r.versions for r in results if r.versions), "")
    backends = sorted({r.impl for r in results if r.peer == "normlab" and not r.error})
    rounds = ", ".join(map(str, sorted({r.rounds for r in results}))) or "-"
    lines = ["# normlab bench --models", "",
             f"- machine: {name}; torch threads: {threads}",
             f"- {vers}; normlab backend: {', '.join(backends) or '-'}",
             "- peers, each on its own deep copy of one randomly initialized float32 model"
             " (same weights, inputs, optimizer): torch eager; normlab = `normlab.patch(model)`;"
             " normlab+fold = `normlab.fold_batchnorm(normlab.patch(model))` (inference of the"
             " BatchNorm CNNs); torch.compile = `torch.compile(model)` (inductor, default"
             " options; its first call, compilation included, is `compile s`)",
             f"- time: median of {rounds} rounds per case (the min is in the CSV), peers"
             " interleaved round-robin (the order rotated every round) after one warm-up call"
             " each; time.perf_counter around back-to-back calls (a sample repeats the call"
             " until it lasts 2 ms); inference is the forward under `torch.no_grad()` in eval"
             " mode; a training step is zero_grad, forward, loss, backward and an"
             f" `SGD(lr={LR:g})` step in train mode",
             "- speedup = torch eager ms / peer ms (> 1: faster than torch eager)"]
    loads = [r.load for r in results if r.load is not None]
    if loads:
        lines.append(f"- 1-minute load average after each case: {min(loads):.2f} to"
                     f" {max(loads):.2f} (the benchmark itself accounts for up to {threads};"
                     " more means other processes were competing for the CPUs)")
    lines += ["- models:", *_model_lines(results), ""]
    head = ["model", "layout", "mode", "batch", "input"] + [f"{p} ms" for p in peers]
    head += [p for p in others]
    if "compile" in peers:
        head.append("compile s")
    head += ["norm %", "norms on normlab", "max diff normlab"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, got in cases.items():
        eager, ours = got.get("torch"), got.get("normlab")
        share = next((r.norm_share for r in got.values() if r.norm_share is not None), None)
        row = [c.model, c.layout, c.mode, str(c.batch), c.input_str]
        row += [_ms(got.get(p)) for p in peers]
        row += [_x(eager, got.get(p)) for p in others]
        if "compile" in peers:
            comp = got.get("compile")
            row.append(f"{comp.compile_s:.1f}" if comp and comp.compile_s is not None else "-")
        row.append(f"{100 * share:.1f}" if share is not None else "-")
        row.append(ours.norms or "-" if ours else "-")
        row.append(f"{ours.max_abs_diff:.2g}" if ours and ours.max_abs_diff is not None
                   else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += not_available(results, "case")
    left = {}
    for r in results:
        if r.peer == "normlab" and r.unpatched:
            left.setdefault(r.case.model, (r.unpatched, r.norms))
    if left:
        lines += ["", "Norms `normlab.patch` leaves as they are (not torch norm classes: they"
                      " compute with plain tensor ops, so their normlab time is torch eager's):"]
        lines += [f"- {m}: {names} ({norms} norm modules on normlab)"
                  for m, (names, norms) in left.items()]
    if "compile" in peers:
        total = sum(r.compile_s or 0 for r in results if r.peer == "compile")
        lines += ["", f"torch.compile: {total:.0f} s compiling in all (the first call per case,"
                      " a fresh dynamo cache per case, inductor's caches as found)."]
    diffs = []
    for peer in others:
        for check in ("output", "first-step loss"):
            found = [(r.max_abs_diff, r.case) for r in results if r.peer == peer
                     and r.check == check and r.max_abs_diff is not None
                     and math.isfinite(r.max_abs_diff)]
            if found:
                worst, case = max(found, key=lambda d: d[0])
                diffs.append(f"{PEER_NAMES[peer]} {check} {worst:.2g} ({case.label})")
    if diffs:
        lines += ["", "Largest difference from torch eager (max |peer - torch|; inference: the"
                      " output; training: the first step's loss, same weights and seed; compiled"
                      " dropout draws other random numbers): " + "; ".join(diffs) + "."]
    lines += ["", NORM_SHARE_TEXT.format(steps=_profile_steps(results)), "",
              summary(results), ""]
    return "\n".join(lines)


def _profile_steps(results: Sequence[ModelResult]) -> str:
    values = sorted({r.profile_steps for r in results if r.profile_steps})
    return ", ".join(map(str, values)) or "no"
