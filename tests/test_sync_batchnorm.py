"""SyncBatchNorm against BatchNorm on the concatenated global batch, in gloo process groups.

Each worker compares, in float64, against torch's BatchNorm on the global batch that every rank
rebuilds from the same seed: forward slices, input-gradient slices, parameter gradients summed
over ranks, running statistics after the steps.

One start of 3 processes runs every distributed case; the 2-rank cases run in a subgroup of
it, and the torchrun example runs 2 more processes. The workers are forked from a
``forkserver`` that imported torch and normlab once (a fresh process, so as safe as
``spawn``): three spawned interpreters each importing torch take ~4x longer on 2 cores.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nl
from normlab.nn.sync import SyncBatchNorm

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# (outputs and input gradients, statistics and parameter gradients): atol = rtol
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 1e-4),
    torch.float16: (4e-3, 1e-4),
}

# Cases as data: the per-rank batch sizes (3 ranks) and the options of one comparison.
CASES = {
    "even": dict(sizes=(4, 4, 4)),
    "uneven": dict(sizes=(3, 1, 5)),
    "empty_rank": dict(sizes=(3, 0, 5)),
    "one_value_on_a_rank_2d": dict(sizes=(1, 2, 0), spatial=()),  # fine: 3 values globally
    "3d_input": dict(sizes=(2, 3, 1), spatial=(5,)),
    "5d_channels_last_3d": dict(sizes=(1, 2, 1), spatial=(2, 3, 2), channels_last=True),
    "momentum_none": dict(sizes=(2, 3, 4), momentum=None, steps=3),
    "affine_false": dict(sizes=(3, 1, 5), affine=False),
    "no_bias": dict(sizes=(3, 1, 5), bias=False),
    "track_running_stats_false": dict(sizes=(3, 0, 5), track=False),
    "channels_last": dict(sizes=(3, 2, 5), channels_last=True),
    "float64": dict(sizes=(3, 1, 5), dtype=torch.float64),
    "bfloat16": dict(sizes=(3, 1, 5), dtype=torch.bfloat16),
    "float16_channels_last": dict(sizes=(2, 0, 2), dtype=torch.float16, channels_last=True),
    # 1e4 + N(0, 4) in float32: E[x^2] - E[x]^2 would be off by ~10, a one-pass mean by 1e-3.
    "large_mean": dict(sizes=(3, 1, 5), offset=1e4, spatial=(8, 8)),
}


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def _check_case(rank, ranks, sizes, *, group=None, spatial=(3, 4), channels=3,
                dtype=torch.float32, channels_last=False, offset=0.0, momentum=0.1, affine=True,
                bias=True, track=True, steps=2):
    """Train ``steps`` steps; compare with BatchNorm on the global batch; return both modules."""
    i = ranks.index(rank)
    start, stop = sum(sizes[:i]), sum(sizes[: i + 1])
    out_tol, stat_tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(1234)
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, bias=bias)
    ref = REFERENCE[2 + len(spatial)](channels, dtype=torch.float64, **kw)
    m = SyncBatchNorm(channels, process_group=group, **kw,
                      dtype=torch.float64 if dtype == torch.float64 else None)
    params = [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        for name in params:
            value = torch.rand(channels, generator=gen) + 0.5
            getattr(ref, name).copy_(value)
            getattr(m, name).copy_(value)
    for step in range(steps):
        shape = (sum(sizes), channels, *spatial)
        X = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
        X = X.double().requires_grad_(True)
        dY = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
        Y = ref(X)
        Y.backward(dY)
        x = X.detach()[start:stop].to(dtype).clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        x.requires_grad_(True)
        y = m(x)
        y.backward(dY[start:stop].to(dtype))
        assert y.dtype == dtype and y.shape == x.shape
        if channels_last:
            assert y.stride() == x.stride(), (y.stride(), x.stride())
        _close(y, Y[start:stop], out_tol, f"step {step} output")
        _close(x.grad, X.grad[start:stop], out_tol, f"step {step} input gradient")
        if params:
            grads = torch.stack([getattr(m, n).grad for n in params]).double()
            if start == stop:  # an empty batch contributes zero (not None) gradients
                assert torch.equal(grads, torch.zeros_like(grads))
            dist.all_reduce(grads, group=group)  # what DDP does to them
            _close(grads, torch.stack([getattr(ref, n).grad for n in params]), stat_tol,
                   f"step {step} parameter gradients summed over ranks")
            m.zero_grad(), ref.zero_grad()
    if track:
        _close(m.running_mean, ref.running_mean, stat_tol, "running_mean")
        _close(m.running_var, ref.running_var, stat_tol, "running_var")
        assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == steps
    else:
        assert m.running_mean is None and m.num_batches_tracked is None
    return m, ref, X.detach()[start:stop].float()


def _eval_without_collective(rank, trained, ref, x):
    """Only rank 0 runs eval: a collective would fail (patched) or hang."""
    if rank != 0:
        return
    fail = mock.Mock(side_effect=AssertionError("a collective ran in eval mode"))
    with mock.patch.object(dist, "all_gather", fail), mock.patch.object(dist, "all_reduce", fail):
        trained.eval(), ref.eval()
        _close(trained(x), ref(x.double()), 2e-5, "eval output (running statistics)")
        local = SyncBatchNorm(3, track_running_stats=False).eval()  # local batch statistics
        expected = nn.BatchNorm2d(3, track_running_stats=False).eval()(x)
        _close(local(x), expected, 2e-5, "eval output without running statistics")


def _too_few_values(rank):
    """A global count of 0 or 1 value per channel raises on every rank, with no hang."""
    for sizes in [(1, 0, 0), (0, 0, 0)]:
        m = SyncBatchNorm(2)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m(torch.ones(sizes[rank], 2))


def _ddp_case(rank, group):
    """DDP over 2 ranks, 3 SGD steps = one process on the global batch (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nl.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3),
    ).double()
    reference = copy.deepcopy(model)
    model = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert [type(model[i]) for i in (1, 4, 9)] == [SyncBatchNorm] * 3
    assert model[1].process_group is group
    ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(7)
    part = slice(4 * rank, 4 * rank + 4)
    for _ in range(3):
        X = torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64) + 1.0
        T = torch.randint(0, 3, (8,), generator=gen)
        ref_opt.zero_grad()
        F.cross_entropy(reference(X), T).backward()
        ref_opt.step()
        opt.zero_grad()
        F.cross_entropy(ddp(X[part]), T[part]).backward()  # DDP averages the rank means
        opt.step()
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        _close(value, expected[name], 1e-9, f"DDP {name}")
    # Why this is not a subclass of torch.nn.SyncBatchNorm: DDP refuses those in CPU models.
    with pytest.raises(ValueError, match="only work with GPU"):
        nn.parallel.DistributedDataParallel(nn.SyncBatchNorm(2).double(), process_group=group)


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    step = "start"
    try:
        # The eval fallback and the reference model run normlab's readable engine: the fused
        # CPU kernels are tested elsewhere, and loading them costs seconds in every process.
        with normlab.backend("reference"):
            ranks = list(range(world))
            for step, case in CASES.items():
                result = _check_case(rank, ranks, **case)
                if step == "even":
                    trained = result
            step = "eval"
            _eval_without_collective(rank, *trained)
            step = "too_few_values"
            _too_few_values(rank)
            pair = dist.new_group([0, 1])  # every rank creates it; ranks 0 and 1 use it
            if rank < 2:
                step = "subgroup"
                _check_case(rank, [0, 1], (2, 5), group=pair)
                step = "ddp"
                _ddp_case(rank, pair)
            step = "barrier"
            dist.barrier()
    except BaseException as e:
        raise AssertionError(f"rank {rank}, case {step!r}: {type(e).__name__}: {e}") from e
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(worker, world):
    """Run ``worker(rank, world, port)`` in ``world`` processes; a worker's exception (with its
    rank and case) is raised here, and the other workers are then terminated."""
    method = "spawn"
    if "forkserver" in multiprocessing.get_all_start_methods():
        method = "forkserver"
        multiprocessing.set_forkserver_preload(["normlab.nn.sync", "torch.nn.parallel"])
    mp.start_processes(worker, args=(world, _free_port()), nprocs=world, join=True,
                       start_method=method)


def test_three_ranks_match_batchnorm_on_the_global_batch(torchrun_example):
    """Every case in CASES, eval, too few values, a 2-rank subgroup and DDP: one start."""
    _start(_worker, 3)


# --- one process: no collective, exactly normlab's (and torch's) BatchNorm


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 2, 5), (2, 3, 2, 2, 3)])
def test_single_process_is_batchnorm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = (torch.randn(shape) + 3).requires_grad_(True)
    ours, theirs = SyncBatchNorm(3), nn.SyncBatchNorm(3)  # torch's falls back to F.batch_norm
    for m in (ours, theirs):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        y, y_ref = ours(x), theirs(x)
        torch.testing.assert_close(y, y_ref)
        gx, gw = torch.autograd.grad(y, (x, ours.weight), y * y)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, theirs.weight), y_ref * y_ref)
        torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_world_size_one_runs_no_collective():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        fail = mock.Mock(side_effect=AssertionError("collective"))
        with mock.patch.object(dist, "all_gather", fail):
            torch.testing.assert_close(SyncBatchNorm(3)(x), nl.BatchNorm2d(3)(x))
        # torch's own refuses any CPU input once a process group exists, even of one process.
        with pytest.raises(ValueError, match="GPU"):
            nn.SyncBatchNorm(3)(x)
    finally:
        dist.destroy_process_group()


def test_torch_compatible_module():
    ours, theirs = SyncBatchNorm(5, momentum=None, bias=False), nn.SyncBatchNorm(5, momentum=None,
                                                                                 bias=False)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert ours.extra_repr() == theirs.extra_repr() and ours.process_group is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.running_mean.fill_(2.0)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    group = object()
    assert SyncBatchNorm(5, 1e-3, 0.1, True, True, group).process_group is group


def test_bad_inputs():
    m = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        m(torch.randn(3))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected 3 channels"):
        SyncBatchNorm(3, affine=False, track_running_stats=False)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="more than 1"):
        m(torch.randn(1, 3))


def test_convert_sync_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nl.BatchNorm2d(3, momentum=None, affine=False),
        nn.Sequential(nn.SyncBatchNorm(3, eps=1e-3), nl.BatchNorm3d(3, track_running_stats=False)),
        nn.Flatten(), nn.BatchNorm1d(3, bias=False),
    )
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(0.5)
    model[1].eval()
    old = [model[1], model[2], model[3][0], model[3][1], model[5]]
    group = object()
    out = SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert out is model and isinstance(out[0], nn.Conv2d)
    new = [out[1], out[2], out[3][0], out[3][1], out[5]]
    for a, b in zip(old, new):
        assert type(b) is SyncBatchNorm and b.process_group is group
        assert b.extra_repr() == a.extra_repr() and b.training == a.training
        assert b.weight is a.weight and b.bias is a.bias  # shared, as torch does
        assert b.running_mean is a.running_mean and b.running_var is a.running_var
        assert b.num_batches_tracked is a.num_batches_tracked
    assert not out[1].training and not out[1].weight.requires_grad and out[1].running_mean[0] == 0.5
    assert out[2].momentum is None and out[3][0].eps == 1e-3 and out[5].bias is None
    single = SyncBatchNorm.convert_sync_batchnorm(nl.BatchNorm1d(4))
    assert type(single) is SyncBatchNorm and single.process_group is None
    masked = nl.MaskedBatchNorm1d(4)
    with pytest.warns(UserWarning, match="MaskedBatchNorm1d"):
        assert SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(masked))[0] is masked


# --- the torchrun example


@pytest.fixture(scope="module")
def torchrun_example(tmp_path_factory):
    """``examples/ddp_syncbn.py --epochs 1`` under torchrun with 2 processes, started in the
    background when a test first asks for it (the 3-rank test does, so that the two interpreter
    starts overlap); yields ``(process, log file)`` and kills the process group if left running."""
    log = tmp_path_factory.mktemp("torchrun") / "out.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "examples" / "ddp_syncbn.py"),
           "--epochs", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                start_new_session=True)
    yield proc, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ddp_example_with_torchrun(torchrun_example):
    proc, log = torchrun_example
    proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 0, output
    accuracy = [float(a) for a in re.findall(r"validation accuracy ([0-9.]+)", output)]
    assert len(accuracy) == 1, output  # printed by rank 0 only
    assert accuracy[0] > 0.5, output  # chance is 0.1
