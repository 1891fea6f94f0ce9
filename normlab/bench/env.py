"""Probes of the machine and the installed packages that the benchmarks record: the CPU
(:func:`machine`), the versions (:func:`versions`), the device's name, the backend normlab's
default dispatch picks, and whether Liger-Kernel imports (:func:`liger_kernel`). The first of
the chain: it imports nothing else of :mod:`normlab.bench`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import platform

import torch

import normlab


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


@functools.lru_cache(maxsize=None)
def versions() -> str:
    """``torch X (CUDA Y), triton Z, normlab W`` of this process."""
    out = f"torch {torch.__version__}"
    if torch.version.cuda:
        out += f" (CUDA {torch.version.cuda})"
    try:
        import triton
        out += f", triton {triton.__version__}"
    except Exception:  # noqa: BLE001 - not installed, or broken: not a peer of ours
        pass
    return out + f", normlab {normlab.__version__}"


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """The GPU's name for ``"cuda"``, else the CPU's (:func:`machine`)."""
    return torch.cuda.get_device_name() if device == "cuda" else machine()


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


def liger_kernel() -> tuple[tuple | None, str]:
    """``((LigerLayerNormFunction, LigerRMSNormFunction, rms_extra), "liger-kernel VERSION")``
    where Liger-Kernel's LayerNorm and RMSNorm autograd functions import, else
    ``(None, reason)``. ``rms_extra``: the arguments after ``(X, W, eps)`` that RMSNorm's forward
    takes, as Liger's module passes them (``offset=0``, ``casting_mode="llama"``,
    ``in_place=True``). Not cached: :func:`peers.liger_status` caches."""
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
    return (ln, rms, rms_extra), f"liger-kernel {ver}"
