"""How fast each norm is, forward and backward, with normlab's default kernels and with torch's:
RMSNorm against LayerNorm (Zhang & Sennrich 2019) and normlab against torch eager, timed with
the interleaved round-robin loop of ``normlab bench`` (:mod:`normlab.bench.runner`)."""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as TF

import normlab.functional as NF
from ...bench import peers, runner, spec
from ..api import Context, claim, figure

NAME = "speed"
TITLE = "RMSNorm against LayerNorm, and normlab's kernels against torch's (forward + backward)"
DESCRIPTION = (
    "<p>Is RMSNorm faster than LayerNorm, and are normlab's fused CPU kernels faster than "
    "torch's? Zhang &amp; Sennrich (<i>Root Mean Square Layer Normalization</i>, NeurIPS 2019) "
    "drop LayerNorm's re-centering and report that RMSNorm cuts the running time of their "
    "models by 7%&ndash;64%. We time one forward and backward pass (float32, gradients of the "
    "input and the affine parameters) of each norm alone: LayerNorm and RMSNorm on transformer "
    "rows <i>(tokens, features)</i>, and BatchNorm (training mode), GroupNorm (32 groups) and "
    "InstanceNorm on CNN activations <i>(N, C, H, W)</i>, contiguous (NCHW) and channels_last. "
    "Each runs through <code>normlab.functional</code> on normlab's default backend (the fused "
    "Numba kernels on CPU) and through <code>torch.nn.functional</code> (torch eager). The two "
    "are timed in the same loop, as <code>normlab bench</code> does: a warm-up call each, then "
    "rounds that time each once in an order rotated every round; we report the median over "
    "rounds, and the speedups are ratios of medians of the same run. Numba compiles a kernel on "
    "its first use in a process (or loads it from its disk cache), so the first call is "
    "excluded from the timing and reported on its own. The machine's other work shows up as "
    "noise; the 1-minute load average is recorded with each measurement.</p>"
)

NORMS = {  # our name -> the bench's
    "LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "BatchNorm": "batch_norm",
    "GroupNorm": "group_norm", "InstanceNorm": "instance_norm",
}
IMPLS = ("normlab", "torch")
FASTER = 1.05  # "faster" means at least 5% faster: smaller gaps are within this machine's noise


def _settings(ctx: Context) -> dict:
    return {
        "rows": ctx.pick(tiny=((64, 128),), quick=((2048, 768),),
                         full=((4096, 1024), (2048, 4096))),
        "images": ctx.pick(tiny=((4, 32, 8, 8),), quick=((16, 64, 28, 28),),
                           full=((16, 64, 28, 28), (32, 64, 56, 56))),
        "rounds": ctx.pick(tiny=3, quick=25, full=50),
    }


def _shape_key(cell: spec.Cell) -> str:
    return cell.shape_str if cell.layout == "rows" else f"{cell.shape_str} {cell.layout}"


def _first_call(cell: spec.Cell) -> dict[str, float]:
    """Seconds of each implementation's first call on this cell in this process (normlab's
    includes Numba compiling or loading the kernel, the first time a kernel is used)."""
    t = runner._inputs(cell, seed=1)
    out = {}
    for impl, F in (("normlab", NF), ("torch", TF)):
        step = runner._step(peers._norm_fns(F)[cell.norm], cell, t)
        t0 = time.perf_counter()
        step()
        out[impl] = time.perf_counter() - t0
    return out


def measure(cell: spec.Cell, config: spec.Config) -> dict:
    """One cell: first calls, then both implementations timed round-robin (JSON-able)."""
    first = _first_call(cell)
    results = runner.time_cell(cell, config, copy_gbps=math.nan)
    out = {"first_call_s": first, "threads": torch.get_num_threads(),
           "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for r in results:
        impl = "normlab" if r.peer == "normlab" else "torch"
        out[impl] = {"ms": r.ms, "ms_min": r.ms_min, "reps": r.reps, "backend": r.impl,
                     "error": r.error}
        if r.peer == "normlab":
            out["max_abs_diff"] = r.max_abs_diff
    return out


def run(ctx: Context) -> dict:
    s = _settings(ctx)
    config = spec.Config(norms=tuple(NORMS.values()), layouts=spec.LAYOUTS,
                            dtypes=("float32",), shapes=tuple(s["rows"]) + tuple(s["images"]),
                            passes=("fwd+bwd",), rounds=s["rounds"], compile=False,
                            progress=False)
    cells = config.cells()
    ours = {v: k for k, v in NORMS.items()}
    found = []
    with ctx.bar(len(cells), "timing") as bar:
        for cell in cells:
            bar.describe(f"{ours[cell.norm]} {_shape_key(cell)}")
            found.append((cell, ctx.cached(f"{ours[cell.norm]}-{_shape_key(cell)}",
                                           lambda cell=cell: measure(cell, config))))
            bar.advance()

    time_ms = {n: {i: {} for i in IMPLS} for n in NORMS}
    time_ms_min = {n: {i: {} for i in IMPLS} for n in NORMS}
    first = {n: {i: {} for i in IMPLS} for n in NORMS}
    speedup, diff, load = {n: {} for n in NORMS}, {n: {} for n in NORMS}, []
    backend = None
    for cell, m in found:
        norm, key = ours[cell.norm], _shape_key(cell)
        for impl in IMPLS:
            time_ms[norm][impl][key] = m[impl]["ms"]
            time_ms_min[norm][impl][key] = m[impl]["ms_min"]
            first[norm][impl][key] = m["first_call_s"][impl]
        speedup[norm][key] = m["torch"]["ms"] / m["normlab"]["ms"]
        diff[norm][key] = m["max_abs_diff"]
        backend = backend or m["normlab"]["backend"]
        if m["load"] is not None:
            load.append(m["load"])
    row_keys = ["x".join(map(str, r)) for r in s["rows"]]
    rms_vs_layer_by_shape = {i: {k: time_ms["LayerNorm"][i][k] / time_ms["RMSNorm"][i][k]
                                 for k in row_keys} for i in IMPLS}
    rms_vs_layer = {i: _geomean(rms_vs_layer_by_shape[i].values()) for i in IMPLS}
    metrics = {
        "time_ms": time_ms, "speedup": speedup, "rms_vs_layer": rms_vs_layer,
        "rms_vs_layer_by_shape": rms_vs_layer_by_shape, "time_ms_min": time_ms_min,
        "first_call_s": first, "max_abs_diff": diff, "normlab_backend": backend,
        "rounds": s["rounds"], "dtype": "float32", "pass": "fwd+bwd", "group_norm_groups":
        config.groups, "threads": found[0][1]["threads"] if found else None,
        "load_average": {"min": min(load), "max": max(load)} if load else None,
    }
    return {"title": TITLE, "claims": _claims(metrics, row_keys), "metrics": metrics,
            "figures": [ctx.save_figure(_figure(metrics), "times")]}


def _geomean(v) -> float:
    v = list(v)
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


WHY_RMS = {
    "normlab": "On a CPU both norms are limited by memory traffic, not arithmetic: each reads "
               "x and writes y (and the backward reads x and dy, writes dx), and normlab's "
               "kernels move the same bytes for both, so they take about the same time. "
               "RMSNorm saves the mean, a few operations per element that a memory-bound kernel "
               "hides; the paper's 7-64% were measured in whole models on GPUs of 2019, where "
               "LayerNorm's two reductions cost more.",
    "torch": "torch eager composes RMSNorm from several elementwise operations (pow, mean, "
             "rsqrt, mul) with a full pass over memory each on the CPU, while LayerNorm is one "
             "fused C++ kernel: the implementation, not the math, decides here.",
}
WHY_KERNELS = (
    "The quick shapes fit in this machine's caches (a few MB), where a call costs little more "
    "than its fixed part: normlab's Python-side work and several Numba kernel launches against "
    "one C++ call in torch. The fused kernels win where the data exceeds the caches (the full "
    "mode's larger shapes, and benchmarks/RESULTS.md); on shared machines the fixed part also "
    "grows with the load.")


def _claims(metrics: dict, row_keys: list[str]) -> list[dict]:
    """Decided on the medians; each evidence also gives the ratio of the fastest rounds, which
    other work on a shared machine disturbs less."""
    t, tmin, claims = metrics["time_ms"], metrics["time_ms_min"], []
    busy = _busy(metrics)
    for impl, who in (("normlab", "normlab's kernels"), ("torch", "torch eager")):
        by = metrics["rms_vs_layer_by_shape"][impl]
        ok = all(r >= FASTER for r in by.values())
        ev = "; ".join(
            f"{k}: LayerNorm {t['LayerNorm'][impl][k]:.3g} ms, RMSNorm {t['RMSNorm'][impl][k]:.3g}"
            f" ms (medians), LayerNorm / RMSNorm = {r:.2f}: {_pct(r)} (fastest rounds: "
            f"{tmin['LayerNorm'][impl][k] / tmin['RMSNorm'][impl][k]:.2f})"
            for k, r in by.items())
        claims.append(claim(
            f"RMSNorm is faster than LayerNorm, forward + backward, with {who} (Zhang & "
            f"Sennrich 2019: 7%-64% faster in their models; here 'faster' means by at least "
            f"{FASTER - 1:.0%})", ok, ev + busy,
            why=WHY_RMS[impl]))
    for norm in NORMS:
        sp = metrics["speedup"][norm]
        ok = all(r >= FASTER for r in sp.values())
        ev = "; ".join(f"{k}: normlab {t[norm]['normlab'][k]:.3g} ms, torch "
                       f"{t[norm]['torch'][k]:.3g} ms (medians), {r:.2f}x: {_verdict(r)} "
                       f"(fastest rounds: {tmin[norm]['torch'][k] / tmin[norm]['normlab'][k]:.2f}x)"
                       for k, r in sp.items())
        claims.append(claim(
            f"{norm}: normlab's default CPU kernels are faster than torch eager, forward + "
            f"backward (by at least {FASTER - 1:.0%} on every shape)", ok, ev + busy,
            why=WHY_KERNELS))
    return claims


def _busy(metrics: dict) -> str:
    """A warning for the evidence when other work held the cores while we timed."""
    load, cpus = metrics["load_average"], os.cpu_count() or 1
    others = load["max"] - (metrics["threads"] or 1) if load else 0.0  # our threads count too
    if others < 0.5 * cpus:
        return ""
    return (f". Caution: the machine was busy while timing (1-minute load average up to "
            f"{load['max']:.1f} on {cpus} cores), so these times include waiting for a core")


def _pct(r: float) -> str:
    return f"RMSNorm {1 - 1 / r:.0%} less time" if r >= 1 else f"RMSNorm {1 / r - 1:.0%} more time"


def _verdict(r: float) -> str:
    if r >= FASTER:
        return "normlab faster"
    if r > 1 / FASTER:
        return "parity, within 5%"
    return "torch faster"


def _figure(metrics: dict):
    t, sp = metrics["time_ms"], metrics["speedup"]
    groups = [(n, k) for n in NORMS for k in t[n]["normlab"]]
    rows = [g for g in groups if g[0] in ("LayerNorm", "RMSNorm")]
    images = [g for g in groups if g not in rows]
    fig, axes = figure(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2.4]})
    for ax, part, title in ((axes[0], rows, "transformer rows (tokens x features)"),
                            (axes[1], images, "CNN activations (N x C x H x W)")):
        width = 0.38
        for j, (impl, color) in enumerate((("normlab", "tab:blue"), ("torch", "tab:gray"))):
            xs = [i + (j - 0.5) * width for i in range(len(part))]
            ax.bar(xs, [t[n][impl][k] for n, k in part], width, color=color, label=impl)
        for i, (n, k) in enumerate(part):
            top = max(t[n]["normlab"][k], t[n]["torch"][k])
            ax.text(i, top * 1.02, f"{sp[n][k]:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(part)),
                      [f"{n}\n{k.replace(' ', chr(10))}" for n, k in part], fontsize=7)
        ax.set_ylim(0, 1.15 * max(max(t[n][i][k] for i in IMPLS) for n, k in part))
        ax.set_ylabel("ms per forward + backward (median)")
        ax.set_title(title + "; label: torch time / normlab time", fontsize=9)
        ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.15)
    return fig
