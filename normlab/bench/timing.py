"""The clocks, the round-robin loop that times peers with them, the device's copy
bandwidth, and the time budget of a run (:class:`TimeBudget`).

Clocks: on CPU, ``time.perf_counter`` around the calls (:class:`CpuTimer`). On CUDA
(:class:`CudaTimer`), CUDA events around each call, the L2 cache flushed before each call
outside the timed region (as ``triton.testing.do_bench`` does), and ``torch.cuda.synchronize()``
before any host clock is read. :func:`interleaved` runs ``rounds`` rounds that each time every
peer once, in an order rotated every round. The copy bandwidth is ``dst.copy_(src)`` on the same
device, counted as bytes read + bytes written.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .peers import _reason
from .spec import Config

FLUSH_MIB = 256  # bytes written to flush the L2 cache before each timed CUDA call
WARM_S = 0.5  # CUDA: seconds of copies before the copy bandwidth is measured (clocks up)


# --- the time budget -----------------------------------------------------------------

class TimeBudget:
    """``--time-budget``: the next item (a cell, a case) is not started when the seconds since
    this was made plus ``last``, the previous item's duration (the guess for the next one),
    exceed ``seconds``; ``None``: no budget."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.last = 0.0

    def spent(self, done: int, total: int, items: str) -> str | None:
        """Before the item after the first ``done`` of ``total`` ``items``: the error of it and
        those after it ("not run: time budget ..."), or None to start it."""
        if self.seconds is None or time.perf_counter() - self.start + self.last <= self.seconds:
            return None
        return (f"not run: time budget of {self.seconds:.0f} s reached after {done} of {total}"
                f" {items}")


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


# --- the round-robin loop -------------------------------------------------------------

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
