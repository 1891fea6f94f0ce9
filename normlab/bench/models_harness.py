"""What ``normlab bench --models`` times: whole models (:mod:`.models`) with torch's norms
against the same models after ``normlab.patch``, folded, and compiled.

Cases: per model and layout, inference at batch 1, inference at the realistic batch and a
training step at the realistic batch (:meth:`ModelConfig.cases`). Peers, each on its own deep
copy of one randomly initialized model (same weights, inputs and optimizer settings):

* ``torch``: the model as built (torch eager);
* ``normlab``: ``normlab.patch(copy)`` (with ``--backend``: inside ``normlab.backend(NAME)``);
* ``normlab+fold``: ``normlab.fold_batchnorm(normlab.patch(copy))``, an eval copy with every
  BatchNorm folded into the conv before it: inference of the BatchNorm CNNs only;
* ``compile``: ``torch.compile(copy)`` of the eager copy (inductor, default options); its first
  call is reported as the compile time.

Inference is ``model(inputs)`` under ``torch.no_grad()`` in eval mode; a training step, in train
mode, is ``zero_grad``, the forward and its loss, ``backward`` and ``torch.optim.SGD(lr=LR)``'s
step. Timing as the kernel bench (:mod:`.runner`): a warm-up call per peer, then ``rounds``
rounds that each time every peer once, the order rotated every round; median and min per peer.
A sample repeats the call until it lasts ``min_time_s`` (only the tiny quick models need more
than one call). Correctness: each peer's warm-up result against torch's, as the largest
absolute difference: the output of an inference case; the loss of a training case's first
step, taken from the same weights with ``torch.manual_seed(seed)`` before each peer's (compiled
dropout draws other random numbers, so compile's loss differs on models with dropout).

The share of the eager model's time spent in norms (:func:`norm_share`) is measured with
``torch.profiler`` on ``profile_steps`` more steps of the torch peer, after the timed rounds.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

import normlab
from normlab._dispatch import synchronous_warmup
from normlab._patch import TWINS

from . import models as zoo
from .env import _default_backend, machine, versions
from .peers import _reason
from .progress import progress_bar
from .spec import _names
from .timing import CpuTimer, TimeBudget, interleaved

MODES = ("infer", "train")
PEERS = ("torch", "normlab", "normlab+fold", "compile")
LR = 1e-3  # the SGD step's learning rate (no momentum: no optimizer state)
MAX_REPS = 100  # calls per sample at most
_ALIASES = {"resnet-18": "resnet18", "resnet-50": "resnet50", "gpt-2": "gpt2",
            "bert-base": "bert", "u-net": "unet", "inference": "infer", "training": "train"}
# Forward operators counted as norms (each with everything it calls), and the name of the
# profiler range put around each hand-written norm module's forward.
NORM_OPS = ("aten::batch_norm", "aten::layer_norm", "aten::group_norm", "aten::instance_norm",
            "aten::rms_norm")
NORM_RANGE = "normlab.bench::norm "
_TORCH_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_NORM_NAME = re.compile(r"(RMS|Layer|Group|Batch|Instance)_?Norm", re.IGNORECASE)
_EVALUATE = "autograd::engine::evaluate_function: "


def _canonical(kind: str, values, known: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    return _names(kind, [_ALIASES.get(str(v).strip().lower(), v) for v in values], known)


def model_names(values) -> tuple[str, ...]:
    """Canonical model names of ``values`` (``"resnet18,gpt-2"`` or a sequence), or a
    ValueError naming the unknown one and listing the known ones."""
    return _canonical("model", values, zoo.MODEL_NAMES)


@dataclass(frozen=True)
class Case:
    """One benchmarked case: a model in one layout, inference or a training step, one batch."""

    model: str
    layout: str  # "nchw", "channels_last" or "tokens"
    mode: str  # "infer" or "train"
    batch: int
    input_shape: tuple[int, ...]  # (N, C, H, W) images or (N, L) token ids

    @property
    def input_str(self) -> str:
        return "x".join(map(str, self.input_shape))

    @property
    def label(self) -> str:
        return f"{self.model} {self.layout} {self.mode} b{self.batch}"


@dataclass
class ModelConfig:
    """What ``normlab bench --models`` runs.

    Args:
        models: subset of :data:`models.MODEL_NAMES` (default: all; the transformers are skipped
            with their reason where ``transformers`` does not import).
        quick: the tiny configurations, 2 rounds, 1 profiled step (tests, smoke runs).
        rounds: timed rounds per case, median reported. Default 5, or 2 with ``quick``.
        compile: time the ``torch.compile`` peer.
        backend: force normlab's backend for the normlab peers (``normlab.backend(name)``).
        modes: from ``"infer"`` and ``"train"`` (default both).
        profile_steps: steps of the eager model profiled for the norm share. Default 3, or 1
            with ``quick``; 0: no profile.
        min_time_s: a sample repeats the call until it lasts this long (default 2 ms).
        time_budget_s: start no case that would end after this many seconds (the previous
            case's duration is the guess); the rest are reported as not run.
        seed: of the weights, the inputs and the first training step.
        progress: a progress bar on stderr.
    """

    models: Sequence[str] | None = None
    quick: bool = False
    rounds: int | None = None
    compile: bool = True
    backend: str | None = None
    modes: Sequence[str] = MODES
    profile_steps: int | None = None
    min_time_s: float = 2e-3
    time_budget_s: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.models = model_names(zoo.MODEL_NAMES if self.models is None else self.models)
        self.modes = _canonical("mode", self.modes, MODES)
        if self.rounds is None:
            self.rounds = 2 if self.quick else 5
        if self.profile_steps is None:
            self.profile_steps = 1 if self.quick else 3
        if int(self.rounds) < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if int(self.profile_steps) < 0:
            raise ValueError(f"profile_steps must be 0 or more, got {self.profile_steps}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        self.rounds, self.profile_steps = int(self.rounds), int(self.profile_steps)
        if self.backend is not None:
            with normlab.backend(self.backend):  # ValueError / BackendUnavailableError now
                pass

    def cases(self) -> list[Case]:
        """Every case, in the order they are run and reported: per model and layout, inference
        at batch 1 and at the realistic batch, then the training step at the realistic batch."""
        out = []
        for name in self.models:
            spec = zoo.MODELS[name]
            big = spec.batch[1 if self.quick else 0]
            runs = [("infer", 1), ("infer", big), ("train", big)]
            for layout in spec.layouts:
                out += [Case(name, layout, mode, b, spec.input_shape(self.quick, b))
                        for mode, b in runs if mode in self.modes]
        return out

    def peers(self, case: Case) -> tuple[str, ...]:
        """The peers that run ``case``: fold only for inference of the BatchNorm CNNs."""
        fold = case.mode == "infer" and zoo.MODELS[case.model].family == "cnn"
        return tuple(p for p in PEERS if (p != "normlab+fold" or fold)
                     and (p != "compile" or self.compile))


@dataclass
class ModelResult:
    """One peer's timing of one case. ``ms`` is the median over rounds, per call (one
    inference, or one training step)."""

    case: Case
    peer: str  # one of PEERS
    impl: str  # "eager", normlab's backend, "inductor", the fold's count
    ms: float
    ms_min: float
    rounds: int
    reps: int  # calls per timed sample
    threads: int
    compile_s: float | None = None  # the compile peer's first call (compilation included)
    max_abs_diff: float | None = None  # warm-up output (or first loss) vs torch eager's
    check: str = ""  # what max_abs_diff compares: "output" or "first-step loss"
    norm_share: float | None = None  # the eager model's fraction of time in norms (the case's)
    norm_ms: float | None = None  # ... its norm time per step, in ms, under the profiler
    norms: str = ""  # "k/n": of the model's n norm modules, k run on normlab
    unpatched: str = ""  # norm classes of this peer's model that do not run on normlab
    error: str | None = None  # n/a: why (skipped, not run, failed); ms is nan
    quick: bool = False  # the tiny configurations
    profile_steps: int = 0  # steps profiled for norm_share
    load: float | None = None  # 1-minute load average after the case
    device_name: str = ""
    timing: str = ""
    versions: str = ""


# --- norms in a model --------------------------------------------------------------------

def hand_written_norms(model: nn.Module) -> list[nn.Module]:
    """Leaf modules named like a norm (``...RMSNorm``, ``...LayerNorm``, ...) that are not torch
    norm classes: norms computed with plain tensor ops, e.g. transformers' LlamaRMSNorm."""
    return [m for m in model.modules() if not isinstance(m, _TORCH_NORMS)
            and _NORM_NAME.search(type(m).__name__) and not next(m.children(), None)]


def _on_normlab(module: nn.Module) -> bool:
    cls = type(module)
    return cls in TWINS.values() or "_normlab_patched" in vars(cls) or (
        cls.__module__ or "").startswith("normlab.")


def norm_count(model: nn.Module) -> tuple[int, int, list[str]]:
    """(norm modules on normlab, norm modules, class names of those not on normlab)."""
    norms = [m for m in model.modules() if isinstance(m, _TORCH_NORMS)] + hand_written_norms(model)
    off = sorted({type(m).__name__ for m in norms if not _on_normlab(m)})
    return sum(map(_on_normlab, norms)), len(norms), off


@contextlib.contextmanager
def _norm_ranges(model: nn.Module):
    """Each hand-written norm module's forward inside ``record_function(NORM_RANGE + class)``,
    by a forward pre-hook and a forward hook (removed on exit)."""
    handles = []
    for m in hand_written_norms(model):
        stack: list = []

        def enter(mod, args, stack=stack):
            rf = torch.profiler.record_function(NORM_RANGE + type(mod).__name__)
            rf.__enter__()
            stack.append(rf)

        def leave(mod, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _is_norm_forward(name: str) -> bool:
    return name in NORM_OPS or name.startswith(NORM_RANGE)


def norm_events(events) -> list:
    """The events of a profile's ``events()`` that :func:`norm_share` counts as norm time.

    Each counted once with everything it calls (an event inside a counted one is not counted
    again): the forward operators ``NORM_OPS`` and the ``NORM_RANGE`` ranges around hand-written
    norm modules; in the backward, every ``autograd::engine::evaluate_function`` event (the node
    and the reduction of its gradients to the inputs' shapes) of an autograd node created inside
    those forwards, matched by (thread, sequence number) to the forward event that created the
    node (the last to record that number): ``NativeLayerNormBackward0`` and the
    like, and the elementary nodes (``PowBackward0``, ``MulBackward0``, ...) of norms computed
    with plain ops (LlamaRMSNorm; torch's own ``rms_norm`` on CPU). Not counted: the
    accumulation of the weight gradients into ``.grad`` (AccumulateGrad) and the optimizer."""
    def inside(e, test) -> bool:
        p = e.cpu_parent
        while p is not None:
            if test(p):
                return True
            p = p.cpu_parent
        return False

    def evaluating(p) -> bool:
        return p.name.startswith(_EVALUATE)

    forward = [e for e in events if _is_norm_forward(e.name)
               and not inside(e, lambda p: _is_norm_forward(p.name))]
    within, stack = set(), list(forward)
    while stack:
        e = stack.pop()
        within.add(id(e))
        stack.extend(e.cpu_children)
    # An operator records the sequence number its autograd node would get, whether or not it
    # creates one; the node's creator is the last event (by start) to record that number.
    creator = {}
    for e in events:
        if e.sequence_nr >= 0 and not evaluating(e) and not inside(e, evaluating):
            key = (e.thread, e.sequence_nr)
            if key not in creator or e.time_range.start >= creator[key].time_range.start:
                creator[key] = e
    seqs = {key for key, e in creator.items() if id(e) in within}
    backward = [e for e in events if e.name.startswith(_EVALUATE) and e.sequence_nr >= 0
                and (e.fwd_thread, e.sequence_nr) in seqs
                and not inside(e, evaluating)]
    return forward + backward


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block: the profiler's C++ start and stop lines."""
    sys.stderr.flush()
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@dataclass
class NormShare:
    """The norm time of :func:`norm_share`: ``share`` = ``norm_s`` / ``total_s``, per step."""

    share: float
    norm_s: float
    total_s: float
    counted: list[str]  # the names of the events counted, over all profiled steps


def norm_share(step: Callable[[], object], model: nn.Module, steps: int = 3) -> NormShare:
    """The fraction of ``steps`` calls of ``step`` spent in ``model``'s norms: the CPU time of
    the norm events (:func:`norm_events`) over the wall time of the calls, both with
    ``torch.profiler`` (CPU activities) recording; hand-written norm modules get profiler ranges
    for the duration (:func:`_norm_ranges`). Intra-op threads record no events: an operator's
    time is its wall time on the calling thread, as the denominator's."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    with _norm_ranges(model):
        with _quiet_stderr():
            prof.start()
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            total = time.perf_counter() - t0
        finally:
            with _quiet_stderr():
                prof.stop()
    counted = norm_events(prof.events())
    us = sum(e.cpu_time_total for e in counted)
    return NormShare(us * 1e-6 / total, us * 1e-6 / steps, total / steps,
                     [e.name for e in counted])


# --- peers ----------------------------------------------------------------------------

@dataclass
class _Peer:
    impl: str
    model: nn.Module  # what is called
    params: nn.Module  # whose parameters the optimizer steps
    backend: str | None = None
    norms: str = ""
    unpatched: str = ""


def _counted(peer: _Peer, counts_of: nn.Module) -> _Peer:
    on, total, off = norm_count(counts_of)
    peer.norms, peer.unpatched = f"{on}/{total}", ", ".join(off)
    return peer


def _torch_peer(base: nn.Module, case: Case, config: ModelConfig) -> _Peer:
    m = copy.deepcopy(base)
    return _counted(_Peer("eager", m, m), m)


def _normlab_peer(base: nn.Module, case: Case, config: ModelConfig) -> _Peer:
    m = normlab.patch(copy.deepcopy(base))
    return _counted(_Peer(config.backend or _default_backend(torch.empty(2, 2)), m, m,
                          config.backend), m)


def _fold_peer(base: nn.Module, case: Case, config: ModelConfig) -> _Peer:
    bns = sum(isinstance(m, _BatchNorm) for m in base.modules())
    m, left = normlab.fold_batchnorm(normlab.patch(copy.deepcopy(base)), report=True)
    label = f"{bns - len(left)}/{bns} BatchNorms folded"
    return _counted(_Peer(label, m, m, config.backend), m)


def _compile_peer(base: nn.Module, case: Case, config: ModelConfig) -> _Peer:
    m = copy.deepcopy(base)
    return _counted(_Peer("inductor", torch.compile(m), m), m)


# peer -> factory(base model, case, config) -> _Peer; a factory that raises makes the peer n/a
PEER_FACTORIES: dict[str, Callable[..., _Peer]] = {
    "torch": _torch_peer, "normlab": _normlab_peer, "normlab+fold": _fold_peer,
    "compile": _compile_peer,
}


def _step(spec: zoo.ModelSpec, peer: _Peer, inputs: dict, train: bool) -> Callable[[], object]:
    """One inference (no_grad) or one training step; returns the output or the loss."""
    if train:
        opt = torch.optim.SGD(peer.params.parameters(), lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = spec.forward(peer.model, inputs, True)
            loss.backward()
            opt.step()
            return loss
    else:
        def step():
            with torch.no_grad():
                return spec.forward(peer.model, inputs, False)
    if peer.backend is None:
        return step

    def in_backend():
        with normlab.backend(peer.backend):
            return step()
    return in_backend


def _inputs(spec: zoo.ModelSpec, case: Case, config: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(config.seed)
    inputs = spec.inputs(config.quick, case.batch, case.mode == "train", g)
    if case.layout == "channels_last":
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                  for k, v in inputs.items()}
    return inputs


def _build(spec: zoo.ModelSpec, case: Case, config: ModelConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = spec.build(config.quick, case.mode == "train")
    model.train(case.mode == "train")
    if case.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def _as64(value) -> torch.Tensor:
    return value.detach().to(torch.float64)


def _info(config: ModelConfig) -> dict:
    """The ModelResult fields that describe the run rather than the case."""
    return dict(device_name=machine(), timing=CpuTimer.label, versions=run_versions(),
                quick=config.quick, profile_steps=config.profile_steps)


def run_versions() -> str:
    """:func:`env.versions` and, where it imports, transformers' version."""
    tf, label = zoo.transformers_status()
    return versions() + (f", {label}" if tf is not None else "")


def time_case(case: Case, config: ModelConfig, timer=None) -> list[ModelResult]:
    """Time every peer of ``case``, interleaved round-robin, then profile the eager model; one
    ModelResult per peer (a peer that cannot run the case gets one with ``error``)."""
    timer = timer if timer is not None else CpuTimer()
    spec = zoo.MODELS[case.model]
    train = case.mode == "train"
    peers = config.peers(case)
    why = spec.available()
    if why is not None:
        return _not_run(case, config, f"skipped: {why}")
    if "compile" in peers:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, memory freed
    base = _build(spec, case, config)
    inputs = _inputs(spec, case, config)
    built, steps, errors, warm, first, reps = {}, {}, {}, {}, {}, {}
    for peer in peers:
        try:
            built[peer] = PEER_FACTORIES[peer](base, case, config)
            steps[peer] = _step(spec, built[peer], inputs, train)
        except Exception as e:  # noqa: BLE001 - the peer is n/a here, the run goes on
            errors[peer] = _reason(e)
    del base
    for peer, step in list(steps.items()):
        try:
            torch.manual_seed(config.seed)
            t0 = time.perf_counter()
            out = step()  # warm-up (the compile peer compiles here)
            warm[peer] = time.perf_counter() - t0
            first[peer] = _as64(out)
            once = warm[peer] if warm[peer] >= config.min_time_s else timer.sample(step, 1)
            reps[peer] = min(MAX_REPS, max(1, math.ceil(config.min_time_s / max(once, 1e-9))))
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is reported
            errors[peer] = _reason(e)
            del steps[peer]

    samples = interleaved(steps, reps, config.rounds, timer, errors)

    share = None
    if "torch" in steps and config.profile_steps:
        try:
            share = norm_share(steps["torch"], built["torch"].model, config.profile_steps)
        except Exception:  # noqa: BLE001 - the timing stands; the share is informative
            share = None
    diffs = {}
    for peer in first:
        if peer != "torch" and "torch" in first and peer not in errors:
            diffs[peer] = (first[peer] - first["torch"]).abs().max().item()
    about = {p: dict(impl=b.impl, norms=b.norms, unpatched=b.unpatched) for p, b in built.items()}
    del steps, built, first, inputs
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    for peer in peers:
        common = dict(case=case, peer=peer, rounds=config.rounds, threads=threads, load=load,
                      norm_share=share.share if share else None,
                      norm_ms=share.norm_s * 1e3 if share else None, **_info(config))
        if peer in errors:
            results.append(ModelResult(
                ms=math.nan, ms_min=math.nan, reps=0, error=errors[peer],
                **{"impl": "n/a", **about.get(peer, {})}, **common))
            continue
        results.append(ModelResult(
            ms=statistics.median(samples[peer]) * 1e3, ms_min=min(samples[peer]) * 1e3,
            reps=reps[peer], compile_s=warm[peer] if peer == "compile" else None,
            max_abs_diff=diffs.get(peer), check="first-step loss" if train else "output",
            **about[peer], **common))
    return results


def _not_run(case: Case, config: ModelConfig, reason: str) -> list[ModelResult]:
    return [ModelResult(case=case, peer=p, impl="n/a", ms=math.nan, ms_min=math.nan,
                        rounds=config.rounds, reps=0, threads=torch.get_num_threads(),
                        error=reason, **_info(config))
            for p in config.peers(case)]


@synchronous_warmup()  # no call runs on ATen because its kernel is still compiling
def run(config: ModelConfig | None = None,
        on_case: Callable[[list[ModelResult]], None] | None = None) -> list[ModelResult]:
    """Benchmark every case of ``config`` (default: :class:`ModelConfig`'s defaults); one
    :class:`ModelResult` per case and peer. ``on_case(results so far)`` is called after each
    case. With ``config.time_budget_s``, a case is not started when the elapsed time plus the
    previous case's duration exceeds the budget; it and the rest are reported as not run."""
    config = config or ModelConfig()
    cases = config.cases()
    timer = CpuTimer()
    budget = TimeBudget(config.time_budget_s)
    results: list[ModelResult] = []
    with progress_bar(len(cases), enabled=config.progress) as bar:
        for i, case in enumerate(cases):
            why = budget.spent(i, len(cases), "cases")
            if why:
                for rest in cases[i:]:
                    results += _not_run(rest, config, why)
                break
            bar.describe(case.label)
            t0 = time.perf_counter()
            try:
                done = time_case(case, config, timer=timer)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory building the model
                done = _not_run(case, config, _reason(e))
            results += done
            if not any((r.error or "").startswith("skipped") for r in done):
                budget.last = time.perf_counter() - t0  # the guess for the next case
            gc.collect()
            bar.advance()
            if on_case is not None:
                on_case(results)
    return results
