"""Module contracts of ``normlab.nn``: cases as data, contracts as code.

``CASES`` is a table of (torch class, constructor args, input shapes). Every generic check below
runs over the whole table and compares the normlab twin against the torch class it subclasses:
class identity, repr, state_dict layout, checkpoint round trips, and train/eval forward/backward
(outputs, running statistics, ``num_batches_tracked``, input and parameter gradients).
Closed-form checks (running-statistics algebra, unbatched inputs, old checkpoints, dtypes)
follow the table.
"""
from __future__ import annotations

import collections
import copy
import io
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as tnn
from torch.testing import assert_close

import normlab.nn as nlnn

F32_TOL = dict(atol=1e-5, rtol=1e-5)
F64_TOL = dict(atol=1e-10, rtol=1e-10)
LOW_TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    torch_cls: type
    args: tuple
    kwargs: dict = field(default_factory=dict)
    shapes: tuple = ()  # input shapes the module must accept (the "input-shape factory")

    @property
    def nl_cls(self) -> type:
        return getattr(nlnn, self.torch_cls.__name__)

    @property
    def id(self) -> str:
        a = ",".join(map(str, self.args))
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.torch_cls.__name__}({a}{',' if kw else ''}{kw})"

    def make(self, **extra):
        return self.torch_cls(*self.args, **self.kwargs, **extra), self.nl_cls(*self.args, **self.kwargs, **extra)


BN1 = ((6, 4), (5, 4, 7))
BN2 = ((4, 3, 5, 6),)
BN3 = ((3, 2, 3, 4, 3),)
IN1 = ((4, 3, 7), (3, 7))  # batched and unbatched
IN2 = ((2, 3, 4, 5), (3, 4, 5))
IN3 = ((2, 2, 3, 4, 3), (2, 3, 4, 3))

CASES = [
    # BatchNorm1d
    Case(tnn.BatchNorm1d, (4,), {}, BN1),
    Case(tnn.BatchNorm1d, (4,), dict(affine=False), BN1),
    Case(tnn.BatchNorm1d, (4,), dict(bias=False), BN1),
    Case(tnn.BatchNorm1d, (4,), dict(track_running_stats=False), BN1),
    Case(tnn.BatchNorm1d, (4,), dict(momentum=None), BN1),
    Case(tnn.BatchNorm1d, (4,), dict(momentum=0.5, eps=1e-3), BN1),
    # BatchNorm2d
    Case(tnn.BatchNorm2d, (3,), {}, BN2),
    Case(tnn.BatchNorm2d, (3,), dict(momentum=None), BN2),
    Case(tnn.BatchNorm2d, (3,), dict(affine=False, track_running_stats=False), BN2),
    Case(tnn.BatchNorm2d, (3,), dict(bias=False, eps=1e-3), BN2),
    Case(tnn.BatchNorm2d, (3,), dict(momentum=0.5, affine=False), BN2),
    Case(tnn.BatchNorm2d, (3,), dict(track_running_stats=False, momentum=None), BN2),
    # BatchNorm3d
    Case(tnn.BatchNorm3d, (2,), {}, BN3),
    Case(tnn.BatchNorm3d, (2,), dict(momentum=None, affine=False), BN3),
    Case(tnn.BatchNorm3d, (2,), dict(track_running_stats=False, bias=False), BN3),
    # LayerNorm
    Case(tnn.LayerNorm, (5,), {}, ((4, 5), (2, 3, 5), (5,))),
    Case(tnn.LayerNorm, ((3, 5),), {}, ((2, 3, 5), (3, 5))),
    Case(tnn.LayerNorm, ([3, 5],), dict(elementwise_affine=False), ((2, 3, 5),)),
    Case(tnn.LayerNorm, (5,), dict(bias=False), ((2, 3, 5),)),
    Case(tnn.LayerNorm, (torch.Size([5]),), dict(eps=1e-3), ((2, 3, 5),)),
    # GroupNorm
    Case(tnn.GroupNorm, (2, 6), {}, ((3, 6, 5), (2, 6, 3, 4))),
    Case(tnn.GroupNorm, (3, 6), dict(affine=False), ((3, 6, 5),)),
    Case(tnn.GroupNorm, (1, 4), {}, ((2, 4, 3, 3),)),
    Case(tnn.GroupNorm, (4, 4), dict(eps=1e-3), ((2, 4, 5),)),
    Case(tnn.GroupNorm, (2, 6), dict(bias=False), ((2, 6, 2, 2, 3),)),
    # InstanceNorm1d
    Case(tnn.InstanceNorm1d, (3,), {}, IN1),
    Case(tnn.InstanceNorm1d, (3,), dict(affine=True), IN1),
    Case(tnn.InstanceNorm1d, (3,), dict(affine=True, track_running_stats=True), IN1),
    Case(tnn.InstanceNorm1d, (3,), dict(track_running_stats=True, momentum=None), IN1),
    Case(tnn.InstanceNorm1d, (3,), dict(affine=True, bias=False, eps=1e-3), IN1),
    # InstanceNorm2d
    Case(tnn.InstanceNorm2d, (3,), {}, IN2),
    Case(tnn.InstanceNorm2d, (3,), dict(affine=True, track_running_stats=True, momentum=0.5), IN2),
    Case(tnn.InstanceNorm2d, (3,), dict(track_running_stats=True), IN2),
    # InstanceNorm3d
    Case(tnn.InstanceNorm3d, (2,), dict(affine=True, track_running_stats=True), IN3),
    Case(tnn.InstanceNorm3d, (2,), dict(affine=True), IN3),
    # RMSNorm
    Case(tnn.RMSNorm, (5,), {}, ((4, 5), (2, 3, 5), (5,))),
    Case(tnn.RMSNorm, (5,), dict(eps=1e-6), ((2, 3, 5),)),
    Case(tnn.RMSNorm, ((3, 5),), dict(elementwise_affine=False), ((2, 3, 5),)),
    Case(tnn.RMSNorm, ([5],), dict(eps=None), ((2, 5),)),
    Case(tnn.RMSNorm, ((2, 5),), dict(eps=1e-3), ((2, 2, 5),)),
]
IDS = [c.id for c in CASES]
table = pytest.mark.parametrize("case", CASES, ids=IDS)

ALL_TORCH_CLASSES = {
    tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d, tnn.LayerNorm, tnn.GroupNorm,
    tnn.InstanceNorm1d, tnn.InstanceNorm2d, tnn.InstanceNorm3d, tnn.RMSNorm,
}


def test_table_covers_every_class():
    assert {c.torch_cls for c in CASES} == ALL_TORCH_CLASSES


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def randomize_(module: tnn.Module, seed: int = 0) -> tnn.Module:
    """Give every parameter and buffer a random, non-default value (reproducibly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.rand(p.shape, generator=g, dtype=torch.float64)
            p.copy_(r + 0.5 if name == "weight" else 2 * r - 1)
        for name, b in module.named_buffers():
            if name == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64))
            elif name == "running_var":
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
            elif name == "num_batches_tracked":
                b.fill_(int(torch.randint(1, 9, (), generator=g)))
    return module


def make_input(shape, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random, non-zero-mean input with a different offset per channel (dim 1 when present)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 2.3
    if len(shape) >= 2:
        off = torch.randn(shape[1], generator=g, dtype=torch.float64)
        x = x + off.view(1, -1, *([1] * (len(shape) - 2)))
    return x.to(dtype)


def assert_state_equal(a: tnn.Module, b: tnn.Module, exact: bool = True, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert sa[k].shape == sb[k].shape, k
        if exact or sa[k].dtype == torch.long:
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert_close(sa[k], sb[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def compare_steps(t_mod, n_mod, shape, seed, dtype=torch.float32, tol=F32_TOL, train_steps=3, eval_steps=2,
                  backward=True):
    """Run the same inputs/upstream grads through both modules and compare everything."""
    g = torch.Generator().manual_seed(seed)
    t_mod.train()
    n_mod.train()
    for step in range(train_steps + eval_steps):
        if step == train_steps:
            t_mod.eval()
            n_mod.eval()
        x = make_input(shape, g, dtype)
        xt = x.clone().requires_grad_(backward)
        xn = x.clone().requires_grad_(backward)
        yt = t_mod(xt)
        yn = n_mod(xn)
        where = f"step {step} ({'train' if step < train_steps else 'eval'}), shape {tuple(shape)}"
        assert yn.dtype == yt.dtype and yn.shape == yt.shape, where
        assert_close(yn, yt, **tol, msg=lambda m: f"output, {where}: {m}")
        assert_state_equal(t_mod, n_mod, exact=False, **tol)
        if backward:
            up = torch.randn(yt.shape, generator=g, dtype=torch.float64).to(dtype)
            yt.backward(up)
            yn.backward(up)
            assert_close(xn.grad, xt.grad, **tol, msg=lambda m: f"input grad, {where}: {m}")
            for (name, pt), (name_n, pn) in zip(t_mod.named_parameters(), n_mod.named_parameters()):
                assert name == name_n
                assert (pt.grad is None) == (pn.grad is None), name
                if pt.grad is not None:
                    assert_close(pn.grad, pt.grad, **tol, msg=lambda m, name=name: f"{name}.grad, {where}: {m}")
            t_mod.zero_grad(set_to_none=True)
            n_mod.zero_grad(set_to_none=True)


def outcome(fn):
    """('ok', result) or ('raise', exception type name, message), for comparing with torch."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - compared against torch's behaviour
        return ("raise", type(e).__name__, str(e))


# --------------------------------------------------------------------------------------------
# Generic checks over the table
# --------------------------------------------------------------------------------------------
@table
def test_is_subclass_and_instance_of_torch_class(case):
    t, n = case.make()
    assert issubclass(case.nl_cls, case.torch_cls)
    assert case.nl_cls is not case.torch_cls
    assert isinstance(n, case.torch_cls)
    assert isinstance(n, tnn.Module)
    assert type(n).__name__ == type(t).__name__


@table
def test_repr_and_extra_repr_match_torch(case):
    t, n = case.make()
    assert n.extra_repr() == t.extra_repr()
    assert repr(n) == repr(t)


@table
def test_attributes_match_torch(case):
    t, n = case.make()
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "num_groups",
                 "num_channels", "normalized_shape", "elementwise_affine", "training"):
        assert hasattr(n, attr) == hasattr(t, attr), attr
        if hasattr(t, attr):
            assert getattr(n, attr) == getattr(t, attr), attr
            assert type(getattr(n, attr)) is type(getattr(t, attr)), attr


@table
def test_state_dict_layout_matches_torch(case):
    for extra in ({}, {"dtype": torch.float64}):
        t, n = case.make(**extra)
        st, sn = t.state_dict(), n.state_dict()
        assert list(sn.keys()) == list(st.keys())
        for k in st:
            assert sn[k].shape == st[k].shape, k
            assert sn[k].dtype == st[k].dtype, k
            assert torch.equal(sn[k], st[k]), f"default value of {k}"
        assert [k for k, _ in n.named_parameters()] == [k for k, _ in t.named_parameters()]
        assert [k for k, _ in n.named_buffers()] == [k for k, _ in t.named_buffers()]
        for (k, p) in n.named_parameters():
            assert isinstance(p, tnn.Parameter) and p.requires_grad, k
        # None-valued attributes (weight=None when affine=False, running_mean=None without stats)
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert (getattr(n, attr, None) is None) == (getattr(t, attr, None) is None), attr
        assert sn._metadata[""].get("version") == st._metadata[""].get("version")


@table
def test_state_dict_round_trip_with_torch(case):
    t, n = case.make()
    randomize_(t, seed=1)
    res = n.load_state_dict(t.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert_state_equal(t, n, exact=True)
    # and back, into a fresh torch module
    t2, _ = case.make()
    t2.load_state_dict(n.state_dict(), strict=True)
    assert_state_equal(t, t2, exact=True)
    # via serialization too
    buf = io.BytesIO()
    torch.save(n.state_dict(), buf)
    buf.seek(0)
    t3, n3 = case.make()
    t3.load_state_dict(torch.load(buf), strict=True)
    assert_state_equal(t, t3, exact=True)
    # a normlab -> normlab copy (deepcopy) keeps class and state
    n4 = copy.deepcopy(n)
    assert type(n4) is type(n)
    assert_state_equal(n, n4, exact=True)


@table
def test_forward_backward_train_then_eval_matches_torch(case):
    for i, shape in enumerate(case.shapes):
        t, n = case.make()
        randomize_(t, seed=10 + i)
        n.load_state_dict(t.state_dict(), strict=True)
        compare_steps(t, n, shape, seed=100 + i)


@table
def test_fresh_modules_match_torch(case):
    """Default (not randomized) state, e.g. num_batches_tracked starting at 0 for momentum=None."""
    t, n = case.make()
    compare_steps(t, n, case.shapes[0], seed=7)


@table
def test_float64_module(case):
    t, n = case.make()
    randomize_(t, seed=3)
    n.load_state_dict(t.state_dict())
    t = t.double()
    assert n.to(torch.float64) is n
    for _, v in n.state_dict().items():
        assert v.dtype in (torch.float64, torch.long)
    compare_steps(t, n, case.shapes[0], seed=33, dtype=torch.float64, tol=F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
@table
def test_low_precision_module(case, dtype):
    t, n = case.make()
    randomize_(t, seed=4)
    n.load_state_dict(t.state_dict())
    if dtype == torch.float16:
        t, n = t.half(), n.half()
    else:
        t, n = t.bfloat16(), n.bfloat16()
    assert isinstance(n, case.nl_cls)
    for k, v in n.state_dict().items():
        assert v.dtype in (dtype, torch.long), k
    compare_steps(t, n, case.shapes[0], seed=44, dtype=dtype, tol=LOW_TOL[dtype], train_steps=2, eval_steps=1)


@table
def test_train_eval_flags_and_eval_does_not_touch_buffers(case):
    t, n = case.make()
    randomize_(t, seed=5)
    n.load_state_dict(t.state_dict())
    assert n.training
    assert n.eval() is n and not n.training
    g = torch.Generator().manual_seed(55)
    x = make_input(case.shapes[0], g)
    before = copy.deepcopy(n.state_dict())
    t.eval()
    y_n = n(x)
    assert_close(y_n, t(x), **F32_TOL)
    after = n.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"eval forward changed {k}"
    assert n.train() is n and n.training
    n.train(False)
    assert not n.training
    n.train(True)
    y_train = n(x)
    t.train()
    assert_close(y_train, t(x), **F32_TOL)
    assert_state_equal(t, n, exact=False, **F32_TOL)


# --------------------------------------------------------------------------------------------
# Running statistics in closed form
# --------------------------------------------------------------------------------------------
def _batch_stats(x: torch.Tensor):
    """Per-channel batch mean and unbiased variance over all dims but 1, in float64."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return x.mean(1), x.var(1, unbiased=True)


def _instance_stats(x: torch.Tensor):
    """Mean over N of per-instance means / unbiased variances, in float64 (what InstanceNorm tracks)."""
    x = x.double().reshape(x.shape[0], x.shape[1], -1)
    return x.mean(2).mean(0), x.var(2, unbiased=True).mean(0)


def _randomize(m, c: int, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for a norm module of c channels."""
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g))
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


BN_SHAPES = [
    (nlnn.BatchNorm1d, 3, lambda n: (n, 3)),
    (nlnn.BatchNorm1d, 3, lambda n: (n, 3, 4)),
    (nlnn.BatchNorm2d, 3, lambda n: (n, 3, 2, 3)),
    (nlnn.BatchNorm3d, 2, lambda n: (n, 2, 2, 2, 3)),
]


@pytest.mark.parametrize("momentum", [None, 0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("cls,c,shape_of", BN_SHAPES, ids=["bn1d-NC", "bn1d-NCL", "bn2d", "bn3d"])
def test_batchnorm_running_stats_closed_form(cls, c, shape_of, momentum):
    m = cls(c, momentum=momentum, eps=1e-3)
    g = torch.Generator().manual_seed(8)
    _randomize(m, c, g)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    rm, rv = rm0.double(), rv0.double()
    means, variances = [], []
    for k, n in enumerate([3, 5, 2, 4], start=1):  # different batch sizes: the average is per batch
        x = make_input(shape_of(n), g) * (k + 1) + 3 * k  # distinct statistics per batch
        y = m(x)
        mu, var = _batch_stats(x)
        means.append(mu)
        variances.append(var)
        # training output uses the biased batch variance
        xd = x.double()
        view = (1, c) + (1,) * (x.dim() - 2)
        nb = xd.shape[0] * xd[0, 0].numel()
        expect_y = (xd - mu.view(view)) / torch.sqrt(var.view(view) * (nb - 1) / nb + 1e-3)
        expect_y = expect_y * m.weight.double().view(view) + m.bias.double().view(view)
        assert_close(y.double(), expect_y, atol=1e-4, rtol=1e-5)
        if momentum is None:
            rm = torch.stack(means).mean(0)
            rv = torch.stack(variances).mean(0)
        else:
            rm = (1 - momentum) * rm + momentum * mu
            rv = (1 - momentum) * rv + momentum * var
        assert int(m.num_batches_tracked) == k
        assert m.running_mean.dtype == torch.float32
        assert_close(m.running_mean.double(), rm, atol=2e-5, rtol=1e-5)
        assert_close(m.running_var.double(), rv, atol=2e-5, rtol=1e-5)
    if momentum == 0.0:
        assert torch.equal(m.running_mean, rm0) and torch.equal(m.running_var, rv0)
    if momentum == 1.0:
        assert_close(m.running_mean.double(), means[-1], atol=2e-5, rtol=1e-5)
        assert_close(m.running_var.double(), variances[-1], atol=2e-5, rtol=1e-5)
    # eval uses the running statistics, not the batch's
    m.eval()
    x = make_input(shape_of(3), g)
    view = (1, c) + (1,) * (x.dim() - 2)
    expect = (x.double() - m.running_mean.double().view(view)) / torch.sqrt(m.running_var.double().view(view) + 1e-3)
    expect = expect * m.weight.double().view(view) + m.bias.double().view(view)
    assert_close(m(x).double(), expect, atol=1e-5, rtol=1e-5)
    assert int(m.num_batches_tracked) == 4


@pytest.mark.parametrize("momentum", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("cls,shape", [(nlnn.InstanceNorm1d, (4, 3, 6)), (nlnn.InstanceNorm2d, (2, 3, 3, 4)),
                                       (nlnn.InstanceNorm3d, (2, 3, 2, 3, 2))], ids=["in1d", "in2d", "in3d"])
def test_instancenorm_running_stats_closed_form(cls, shape, momentum):
    c = shape[1]
    m = cls(c, momentum=momentum, affine=True, track_running_stats=True)
    g = torch.Generator().manual_seed(9)
    _randomize(m, c, g)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    rm, rv = rm0.double(), rv0.double()
    eff = 0.0 if momentum is None else momentum  # torch's InstanceNorm treats momentum=None as 0
    for k in range(3):
        x = make_input(shape, g) * (k + 1)
        m(x)
        mu, var = _instance_stats(x)
        rm = (1 - eff) * rm + eff * mu
        rv = (1 - eff) * rv + eff * var
        assert_close(m.running_mean.double(), rm, atol=2e-5, rtol=1e-5)
        assert_close(m.running_var.double(), rv, atol=2e-5, rtol=1e-5)
    if eff == 0.0:
        assert torch.equal(m.running_mean, rm0) and torch.equal(m.running_var, rv0)
    m.eval()
    x = make_input(shape, g)
    view = (1, c) + (1,) * (x.dim() - 2)
    expect = (x.double() - m.running_mean.double().view(view)) / torch.sqrt(m.running_var.double().view(view) + m.eps)
    expect = expect * m.weight.double().view(view) + m.bias.double().view(view)
    assert_close(m(x).double(), expect, atol=1e-5, rtol=1e-5)


def test_momentum_none_cumulative_average_continues_from_loaded_counter():
    """momentum=None uses 1/num_batches_tracked, so a loaded counter of 3 weighs the next batch by 1/4."""
    m = nlnn.BatchNorm1d(2, momentum=None)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0]))
        m.running_var.copy_(torch.tensor([2.0, 0.5]))
        m.num_batches_tracked.fill_(3)
    x = make_input((5, 2), torch.Generator().manual_seed(12))
    m(x)
    mu, var = _batch_stats(x)
    assert_close(m.running_mean.double(), torch.tensor([1.0, -2.0], dtype=torch.float64) * 0.75 + mu * 0.25,
                 atol=1e-6, rtol=1e-6)
    assert_close(m.running_var.double(), torch.tensor([2.0, 0.5], dtype=torch.float64) * 0.75 + var * 0.25,
                 atol=1e-6, rtol=1e-6)
    assert int(m.num_batches_tracked) == 4


# --------------------------------------------------------------------------------------------
# Unbatched inputs and BatchNorm1d's two layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape", [(nlnn.InstanceNorm1d, (3, 7)), (nlnn.InstanceNorm2d, (3, 4, 5)),
                                       (nlnn.InstanceNorm3d, (3, 2, 3, 4))], ids=["in1d", "in2d", "in3d"])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=True, track_running_stats=True)], ids=["plain", "affine-stats"])
def test_instancenorm_unbatched_equals_batch_of_one(cls, shape, kwargs):
    g = torch.Generator().manual_seed(13)
    a = cls(shape[0], **kwargs)
    if kwargs:
        randomize_(a, seed=14)
    b = copy.deepcopy(a)
    x = make_input(shape, g)
    ya = a(x)
    yb = b(x.unsqueeze(0)).squeeze(0)
    assert ya.shape == x.shape
    assert_close(ya, yb, **F32_TOL)
    assert_state_equal(a, b, exact=False, **F32_TOL)
    # closed form: per-channel normalization over the spatial dims, biased variance
    xd = x.double().reshape(shape[0], -1)
    expect = (xd - xd.mean(1, keepdim=True)) / torch.sqrt(xd.var(1, unbiased=False, keepdim=True) + a.eps)
    if a.affine:
        expect = expect * a.weight.double()[:, None] + a.bias.double()[:, None]
    assert_close(ya.double().reshape(shape[0], -1), expect, atol=1e-5, rtol=1e-5)
    if kwargs:  # eval with running stats, unbatched
        a.eval()
        b.eval()
        assert_close(a(x), b(x.unsqueeze(0)).squeeze(0), **F32_TOL)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7)], ids=["NC", "NCL"])
def test_batchnorm1d_layouts_closed_form(shape):
    m = randomize_(nlnn.BatchNorm1d(4), seed=15)
    x = make_input(shape, torch.Generator().manual_seed(16))
    y = m(x)
    xd = x.double().transpose(0, 1).reshape(4, -1)
    mu = xd.mean(1)
    var = xd.var(1, unbiased=False)
    view = (1, 4) + (1,) * (len(shape) - 2)
    expect = (x.double() - mu.view(view)) / torch.sqrt(var.view(view) + m.eps)
    expect = expect * m.weight.double().view(view) + m.bias.double().view(view)
    assert y.shape == x.shape
    assert_close(y.double(), expect, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Old checkpoints
# --------------------------------------------------------------------------------------------
def _old_bn_state(cls=tnn.BatchNorm2d, c=3, seed=20, metadata_version="absent"):
    src = randomize_(cls(c), seed=seed)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    if metadata_version != "absent":
        sd = collections.OrderedDict(sd)
        sd._metadata = collections.OrderedDict({"": {"version": metadata_version}})
    return sd


@pytest.mark.parametrize("version", ["absent", None, 1], ids=["no-metadata", "version-None", "version-1"])
@pytest.mark.parametrize("tcls", [tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d])
def test_old_batchnorm_checkpoint_without_num_batches_tracked(tcls, version):
    sd = _old_bn_state(tcls, metadata_version=version)
    n = getattr(nlnn, tcls.__name__)(3)
    t = tcls(3)
    res = n.load_state_dict(copy.copy(sd), strict=True)
    t.load_state_dict(copy.copy(sd), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert int(n.num_batches_tracked) == 0
    assert n.num_batches_tracked.dtype == torch.long
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(n.state_dict()[k], sd[k]), k
    assert_state_equal(t, n, exact=True)


def test_old_batchnorm_checkpoint_into_trained_module_matches_torch():
    sd = _old_bn_state()
    t, n = tnn.BatchNorm2d(3), nlnn.BatchNorm2d(3)
    t.num_batches_tracked.fill_(7)
    n.num_batches_tracked.fill_(7)
    t.load_state_dict(dict(sd))
    n.load_state_dict(dict(sd))
    assert_state_equal(t, n, exact=True)


def test_old_batchnorm_checkpoint_nested_prefix():
    sd = _old_bn_state(seed=21)
    nested = {f"1.{k}": v for k, v in sd.items()}
    conv = tnn.Conv2d(3, 3, 1)
    nested.update({f"0.{k}": v for k, v in conv.state_dict().items()})
    t = tnn.Sequential(tnn.Conv2d(3, 3, 1), tnn.BatchNorm2d(3))
    n = tnn.Sequential(tnn.Conv2d(3, 3, 1), nlnn.BatchNorm2d(3))
    t.load_state_dict(dict(nested), strict=True)
    n.load_state_dict(dict(nested), strict=True)
    assert int(n[1].num_batches_tracked) == 0
    assert_state_equal(t, n, exact=True)


def test_current_checkpoint_missing_num_batches_tracked_fails_like_torch():
    sd = _old_bn_state(metadata_version=2)
    t, n = tnn.BatchNorm2d(3), nlnn.BatchNorm2d(3)
    ot = outcome(lambda: t.load_state_dict(copy.copy(sd), strict=True))
    on = outcome(lambda: n.load_state_dict(copy.copy(sd), strict=True))
    assert ot[0] == "raise" and "num_batches_tracked" in ot[2]
    assert on[:3] == ot[:3]


@pytest.mark.parametrize("tcls", [tnn.InstanceNorm1d, tnn.InstanceNorm2d, tnn.InstanceNorm3d])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("version", ["absent", None, 1], ids=["no-metadata", "version-None", "version-1"])
def test_old_instancenorm_checkpoint_with_running_stats_like_torch(tcls, strict, version):
    sd = {"running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5}
    if version != "absent":
        sd = collections.OrderedDict(sd)
        sd._metadata = collections.OrderedDict({"": {"version": version}})
    t = tcls(3)  # track_running_stats=False
    n = getattr(nlnn, tcls.__name__)(3)
    ot = outcome(lambda: t.load_state_dict(copy.copy(sd), strict=strict))
    on = outcome(lambda: n.load_state_dict(copy.copy(sd), strict=strict))
    if ot[0] == "raise":
        assert on[0] == "raise", f"torch raised {ot[1]}: {ot[2][:100]}; normlab did not"
        assert on[1:] == ot[1:]
    else:
        assert on[0] == "ok", on
        assert sorted(on[1].unexpected_keys) == sorted(ot[1].unexpected_keys)
        assert sorted(on[1].missing_keys) == sorted(ot[1].missing_keys)
    assert n.running_mean is None and n.running_var is None
    # the module still works and matches torch afterwards
    x = make_input((2, 3) + (4,) * (int(tcls.__name__[-2]) ), torch.Generator().manual_seed(22))
    assert_close(n(x), t(x), **F32_TOL)


def test_old_instancenorm_checkpoint_with_tracking_loads():
    sd = {"weight": torch.rand(3) + 0.5, "bias": torch.randn(3), "running_mean": torch.randn(3),
          "running_var": torch.rand(3) + 0.5}
    t = tnn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    n = nlnn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    t.load_state_dict(dict(sd), strict=True)
    n.load_state_dict(dict(sd), strict=True)
    assert int(n.num_batches_tracked) == 0
    assert_state_equal(t, n, exact=True)
    t.eval()
    n.eval()
    x = make_input((2, 3, 4, 4), torch.Generator().manual_seed(23))
    assert_close(n(x), t(x), **F32_TOL)


# --------------------------------------------------------------------------------------------
# Miscellaneous module behaviour
# --------------------------------------------------------------------------------------------
def test_batchnorm_eval_is_per_sample():
    m = randomize_(nlnn.BatchNorm2d(3), seed=24).eval()
    x = make_input((4, 3, 2, 3), torch.Generator().manual_seed(25))
    full = m(x)
    for i in range(4):
        assert_close(m(x[i:i + 1]), full[i:i + 1], **F32_TOL)


def test_batchnorm_without_running_stats_uses_batch_stats_in_eval():
    t = randomize_(tnn.BatchNorm2d(3, track_running_stats=False), seed=26).eval()
    n = nlnn.BatchNorm2d(3, track_running_stats=False)
    n.load_state_dict(t.state_dict())
    n.eval()
    x = make_input((4, 3, 2, 3), torch.Generator().manual_seed(27))
    y = n(x)
    assert_close(y, t(x), **F32_TOL)
    # batch statistics: each channel of the output has mean ~bias
    assert_close(y.mean((0, 2, 3)), n.bias.detach(), atol=1e-5, rtol=1e-5)


def test_momentum_attribute_changed_after_construction_is_honoured():
    t, n = tnn.BatchNorm1d(3), nlnn.BatchNorm1d(3)
    t.momentum = n.momentum = None
    x = make_input((5, 3), torch.Generator().manual_seed(28))
    t(x)
    n(x)
    t.momentum = n.momentum = 0.7
    x = make_input((5, 3), torch.Generator().manual_seed(29))
    t(x)
    n(x)
    assert_state_equal(t, n, exact=False, **F32_TOL)


def test_module_in_a_sequential_and_deepcopy():
    t = tnn.Sequential(tnn.Linear(4, 6), tnn.BatchNorm1d(6), tnn.ReLU(), tnn.LayerNorm(6), tnn.RMSNorm(6))
    n = tnn.Sequential(tnn.Linear(4, 6), nlnn.BatchNorm1d(6), tnn.ReLU(), nlnn.LayerNorm(6), nlnn.RMSNorm(6))
    randomize_(t, seed=30)
    n.load_state_dict(t.state_dict(), strict=True)
    compare_steps(t, n, (5, 4), seed=31)


@table
def test_output_can_be_modified_in_place(case):
    """Drop-in: code like ``F.relu(bn(x), inplace=True)`` (torchvision's ResNet) must work under autograd."""
    t, n = case.make()
    randomize_(t, seed=32)
    n.load_state_dict(t.state_dict())
    g = torch.Generator().manual_seed(34)
    for training in (True, False):
        t.train(training)
        n.train(training)
        x = make_input(case.shapes[0], g)
        up = torch.randn(case.shapes[0], generator=g)
        xt, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt = torch.relu_(t(xt)) * 1.5
        yn = torch.relu_(n(xn)) * 1.5
        assert_close(yn, yt, **F32_TOL)
        yt.backward(up)
        yn.backward(up)
        assert_close(xn.grad, xt.grad, **F32_TOL)
        for (name, pt), (_, pn) in zip(t.named_parameters(), n.named_parameters()):
            assert_close(pn.grad, pt.grad, **F32_TOL, msg=lambda m, name=name: f"{name}.grad: {m}")
        t.zero_grad(set_to_none=True)
        n.zero_grad(set_to_none=True)


@table
def test_empty_batch(case):
    """A zero-size batch gives an empty output, leaves the running statistics alone, and backward works."""
    t, n = case.make()
    randomize_(t, seed=35)
    n.load_state_dict(t.state_dict())
    shape = (0,) + tuple(case.shapes[0][1:])
    instance = "Instance" in case.torch_cls.__name__  # torch itself fails on empty InstanceNorm input
    for training in (True, False):
        t.train(training)
        n.train(training)
        before = copy.deepcopy(n.state_dict())
        x = torch.zeros(shape, requires_grad=True)
        y = n(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        if instance:
            for k in ("weight", "bias", "running_mean", "running_var"):
                if k in before:
                    assert torch.equal(n.state_dict()[k], before[k]), k
        else:
            t(torch.zeros(shape))
            assert_state_equal(t, n, exact=True)
