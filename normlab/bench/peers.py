"""The peers a cell is timed with, and how each calls the norm: ``normlab``
(``normlab.functional``, default dispatch or ``Config.backend``), ``torch``
(``torch.nn.functional`` eager), ``compile`` (``torch.compile`` of the same call) and ``liger``
(Liger-Kernel's LayerNorm and RMSNorm autograd functions, where they import).

A factory in :data:`PEER_FACTORIES` makes a cell's :class:`PeerFn`; one that raises makes the
peer n/a on that cell (:class:`PeerUnavailable`: the message alone is the reason reported).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as TF

import normlab.functional as NF
from normlab import registry

from .env import _default_backend, liger_kernel
from .spec import NORMS, ROW_NORMS, ROW_ONLY_PEERS, Cell, Config

EPS = 1e-5
MOMENTUM = 0.1


def _norm_fns(F) -> dict[str, Callable]:
    """The benchmarked norms' training-mode calls on the functional module ``F`` (normlab's or
    torch's), one signature ``(x, w, b, rm, rv, g)``: running statistics where the norm keeps
    them and the cell has them (BatchNorm), ``g`` groups, rows normalized over the last axis
    (each norm's ``call`` in :mod:`normlab.registry`)."""
    def fn(spec):
        f = getattr(F, spec.name)
        if spec.input == "rows":
            return lambda x, w, b, rm, rv, g: spec.call(f, x, x.shape[-1:], w, b, EPS)
        return lambda x, w, b, rm, rv, g: spec.call(f, x, g, w, b, EPS, rm, rv)

    return {name: fn(registry.get(name)) for name in NORMS}


@functools.lru_cache(maxsize=None)
def liger_status() -> tuple[dict | None, str]:
    """``(fns, "liger-kernel VERSION")`` where Liger-Kernel's LayerNorm and RMSNorm autograd
    functions import (:func:`env.liger_kernel`), else ``(None, reason)``. ``fns`` has
    ``_norm_fns``' signature.

    RMSNorm runs as Liger's module does (``offset=0``, ``casting_mode="llama"``,
    ``in_place=True``: dX is written into dY, so the runner gives Liger its own dy)."""
    found, label = liger_kernel()
    if found is None:
        return None, label
    ln, rms, rms_extra = found
    fns = {
        "layer_norm": lambda x, w, b, rm, rv, g: ln.apply(x, w, b, EPS),
        "rms_norm": lambda x, w, b, rm, rv, g: rms.apply(x, w, EPS, *rms_extra),
    }
    return fns, label


class PeerUnavailable(RuntimeError):
    """A peer cannot run here at all; the message is the reason reported for its cells."""


@dataclass
class PeerFn:
    """How a peer runs a cell: ``fn(x, w, b, rm, rv, g)``, its label, normlab's forced backend,
    and whether it needs its own ``dy`` (it writes into it)."""

    impl: str
    fn: Callable
    backend: str | None = None
    own_dy: bool = False


def _normlab_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    return PeerFn(config.backend or _default_backend(x), _norm_fns(NF)[cell.norm],
                  config.backend)


def _eager_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    return PeerFn("eager", _norm_fns(TF)[cell.norm])


def _compile_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    """One static-shape compilation per (norm, layout, dtype, shape), shared by its passes:
    dynamo is reset when that key changes (so no recompile limit is reached)."""
    key = (cell.norm, cell.layout, cell.dtype, cell.shape, cell.groups)
    if cache.get("compile_key") != key:
        torch._dynamo.reset()
        cache["compile_key"] = key
        cache["compile_fn"] = torch.compile(_norm_fns(TF)[cell.norm], dynamic=False)
    return PeerFn("inductor", cache["compile_fn"])


def _liger_peer(cell: Cell, config: Config, x: torch.Tensor, cache: dict) -> PeerFn:
    fns, label = liger_status()
    if fns is None:
        raise PeerUnavailable(label)
    return PeerFn(label, fns[cell.norm], own_dy=True)


# peer -> factory(cell, config, x, cache) -> PeerFn; a factory that raises makes the peer n/a
PEER_FACTORIES: dict[str, Callable[..., PeerFn]] = {
    "normlab": _normlab_peer, "torch": _eager_peer, "compile": _compile_peer,
    "liger": _liger_peer,
}


def applies(peer: str, cell: Cell) -> bool:
    """Whether ``peer`` has ``cell``'s norm at all (Liger-Kernel: LayerNorm and RMSNorm)."""
    return peer not in ROW_ONLY_PEERS or cell.norm in ROW_NORMS


def _reason(e: BaseException) -> str:
    """The reason reported for a peer that raised ``e``: ``"Type: message"`` (a
    :class:`PeerUnavailable`: its message alone), first line, at most 200 characters."""
    text = str(e) if isinstance(e, PeerUnavailable) else f"{type(e).__name__}: {e}"
    return (text.splitlines() or [""])[0][:200]
