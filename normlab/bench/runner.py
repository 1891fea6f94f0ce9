"""What ``normlab bench`` times: a cell's inputs and passes, every peer of a cell timed in one
loop (:func:`time_cell`), and a whole run (:func:`run`).

Each cell is timed for every peer in the same loop: a warm-up call per peer (for ``compile``
that call compiles, and its duration is reported as the compile time), then ``rounds`` rounds
that each time every peer once, in an order rotated every round (:func:`timing.interleaved`).
The reported time is the median over rounds. A round's sample repeats the call until it lasts
``min_time_s`` (only small shapes need more than one call) and divides by the count. The copy
bandwidth (:func:`timing.copy_samples`) is measured before and after the cells.
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
from typing import Callable

import torch
import torch.nn.functional as TF

import normlab
from normlab._dispatch import synchronous_warmup
import normlab.functional as NF
from normlab import registry

from .env import device_name, versions
from .peers import PEER_FACTORIES, _norm_fns, _reason, applies
from .progress import progress_bar
from .spec import DTYPES, Cell, Config, Result
from .timing import TimeBudget, _copy_gbps, copy_samples, interleaved, make_timer

MAX_REPS = 500  # calls per sample at most


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
    b = (None if not registry.get(cell.norm).bias
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


def _info(config: Config, timer) -> dict:
    """The Result fields that describe the run rather than the cell."""
    return dict(device=config.device, device_name=device_name(config.device),
                timing=timer.label, copy_mib=config.copy_mib, versions=versions())


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
    budget = TimeBudget(config.time_budget_s)
    before = copy_samples(config.copy_mib, device=config.device)
    results: list[Result] = []
    gbps_now = _copy_gbps(config.copy_mib, before)
    with progress_bar(len(cells), enabled=config.progress) as bar:
        for i, cell in enumerate(cells):
            why = budget.spent(i, len(cells), "cells")
            if why:
                for rest in cells[i:]:
                    results += _not_run(rest, config, timer, gbps_now, why)
                break
            bar.describe(cell.label)
            t0 = time.perf_counter()
            try:
                results += time_cell(cell, config, gbps_now, timer=timer, cache=cache)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
                results += _not_run(cell, config, timer, gbps_now, _reason(e))
            budget.last = time.perf_counter() - t0
            gc.collect()
            if config.device == "cuda":
                torch.cuda.empty_cache()
            bar.advance()
            if on_cell is not None:
                on_cell(results)
    after = copy_samples(config.copy_mib, device=config.device)
    copy_gbps = _copy_gbps(config.copy_mib, before + after)
    return [dataclasses.replace(r, copy_gbps=copy_gbps) for r in results]
