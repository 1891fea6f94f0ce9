"""The cpu backend's operators under ``torch.library.opcheck`` and ``torch.compile``.

``normlab::cpu_norm`` and ``normlab::cpu_norm_backward`` are registered custom operators with
fake (meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` can
trace models that use them. Checked here: opcheck (schema, fake tensors, autograd registration,
AOT dispatch with dynamic shapes) on several argument sets, and compiled forward/backward that
match eager, through normlab's modules and functions, and through the backend object itself.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

pytest.importorskip("numba")

import normlab  # noqa: E402
import normlab.functional as F  # noqa: E402
from normlab.kernels import cpu  # noqa: E402  (registers the operators)

F32, F64 = torch.float32, torch.float64

@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _t(*shape, seed, dtype=F32, offset=0.5, grad=True, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=F64) * 1.5 + offset).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------
def _forward_args(kind, dtype, channels_last, given_stats=False):
    """(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps) for one call of
    normlab::cpu_norm."""
    if kind in ("layer", "rms"):
        x = _t(3, 5, 8, seed=1, dtype=dtype)
        groups = 1 if not channels_last else 2  # channels_last here: two normalized axes
        if channels_last:
            x = _t(2, 4, 3, 5, seed=1, dtype=dtype, channels_last=True)
        shape = x.shape[x.dim() - groups:]
        w = _t(*shape, seed=2, dtype=dtype)
        b = _t(*shape, seed=3, dtype=dtype) if kind == "layer" else None
        return (x, w, b, None, None, groups, 0, kind == "layer", 1e-5)
    x = _t(2, 6, 4, 5, seed=1, dtype=dtype, channels_last=channels_last)
    w, b = _t(6, seed=2, dtype=dtype), _t(6, seed=3, dtype=dtype)
    mean = var = None
    if given_stats:
        mean = _t(6, seed=4, dtype=dtype, grad=False)
        var = _t(6, seed=5, dtype=dtype, grad=False).abs() + 0.5
    groups = {"group": 3, "instance": 6}.get(kind, 0)  # InstanceNorm: a group per channel
    return (x, w, b, mean, var, 0, groups, True, 1e-5)


OPCHECK_CASES = [  # kind, dtype, channels_last, given statistics
    ("layer", F32, False, False),
    ("layer", F64, True, False),
    ("rms", F32, True, False),
    ("rms", F64, False, False),
    ("group", F32, False, False),
    ("group", F64, True, False),
    ("instance", F32, True, False),
    ("batch", F32, True, False),
    ("batch", F64, False, False),
    ("batch", F32, False, True),
    ("batch", F64, True, True),
]
OPCHECK_IDS = [f"{k}-{str(d)[6:]}-{'cl' if cl else 'contig'}{'-given' if g else ''}"
               for k, d, cl, g in OPCHECK_CASES]


@pytest.mark.parametrize("kind, dtype, channels_last, given", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_forward(kind, dtype, channels_last, given):
    args = _forward_args(kind, dtype, channels_last, given)
    torch.library.opcheck(torch.ops.normlab.cpu_norm.default, args)


def _backward_kwargs(forward_args, need_dx=True):
    """Arguments of normlab::cpu_norm_backward by schema name (optional ones it has beyond
    these, such as a residual's gradient, are None)."""
    x, w, b, mean, var, nd, groups, centered, eps = forward_args
    with torch.no_grad():
        y, stats = torch.ops.normlab.cpu_norm.default(*forward_args)
    known = {
        "dy": _t(*y.shape, seed=9, dtype=y.dtype, grad=False), "x": x.detach(),
        "weight": None if w is None else w.detach(), "stats": stats,
        "normalized_ndim": nd, "groups": groups, "centered": centered, "input_stats": var is None, "need_dx": need_dx,
    }
    kwargs = {}
    for arg in torch.ops.normlab.cpu_norm_backward.default._schema.arguments:
        if arg.name in known:
            kwargs[arg.name] = known[arg.name]
        elif isinstance(arg.type, torch.OptionalType):
            kwargs[arg.name] = None
        else:
            raise AssertionError(f"cpu_norm_backward has a new argument {arg.name}: {arg.type}")
    return kwargs


@pytest.mark.parametrize("kind, dtype, channels_last, given", OPCHECK_CASES, ids=OPCHECK_IDS)
def test_opcheck_backward(kind, dtype, channels_last, given):
    kwargs = _backward_kwargs(_forward_args(kind, dtype, channels_last, given),
                              need_dx=kind != "rms" or dtype != F64)
    torch.library.opcheck(torch.ops.normlab.cpu_norm_backward.default, (), kwargs)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    """Conv2d, then normlab's BatchNorm2d and GroupNorm, then LayerNorm and RMSNorm over the
    channels of the flattened (N, HW, C) activations."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)
        self.bn = normlab.nn.BatchNorm2d(c)
        self.gn = normlab.nn.GroupNorm(4, c)
        self.ln = normlab.nn.LayerNorm(c)
        self.rms = normlab.nn.RMSNorm(c)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.gn(y)
        t = y.flatten(2).transpose(1, 2)
        return self.rms(self.ln(t))


def _eager_and_compiled(make, args, backend="aot_eager", steps=2, forced="cpu"):
    """Runs ``make()``'s callable eagerly and compiled (fullgraph) on the ``forced`` normlab
    backend (None: the default choice) for a few training steps; returns (outputs, grads,
    state) of each."""
    results = []
    for compiled in (False, True):
        fn, params, buffers = make()
        if compiled:
            fn = torch.compile(fn, fullgraph=True, backend=backend)
        outs, grads = [], []
        for step in range(steps):
            xs = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
            with normlab.backend(forced) if forced else contextlib.nullcontext():
                y = fn(*xs)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append(y.detach())
            grads += [a.grad for a in xs if a.requires_grad] + [p.grad.clone() for p in params]
            for p in params:
                p.grad = None
        results.append((outs, grads, [b.clone() for b in buffers]))
    return results


def _assert_same(eager, compiled):
    for what, e, c in zip(("outputs", "grads", "buffers"), eager, compiled):
        assert len(e) == len(c)
        for i, (a, b) in enumerate(zip(c, e)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{what}[{i}]: {m}")


def _module_maker(channels_last):
    torch.manual_seed(0)
    net = Net()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def make():
        m = copy.deepcopy(net).train()
        return (lambda x: m(x)), list(m.parameters()), list(m.buffers())
    return make


def _functional_maker(ops):
    """Every normlab function through ``ops`` (normlab.functional or the cpu backend object,
    whose methods take the already-canonicalized arguments). The eval-mode calls read their
    own fixed statistics: were they the buffers just updated, inductor's own rounding of the
    update (1 ulp) would be amplified down the chain of norms."""
    torch.manual_seed(1)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    lw = torch.randn(5, requires_grad=True)
    em, ev = torch.randn(6), torch.rand(6) + 0.5

    def make():
        ws, bs, lws = (p.detach().clone().requires_grad_() for p in (w, b, lw))
        rm, rv, irm, irv = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)

        def fn(x):
            y = ops.batch_norm(x, rm, rv, ws, bs, True, 0.1, 1e-5)
            y = ops.batch_norm(y, em, ev, ws, bs, False, 0.1, 1e-5)
            y = ops.instance_norm(y, irm, irv, ws, bs, True, 0.1, 1e-5)
            y = ops.instance_norm(y, em, ev, ws, bs, False, 0.1, 1e-5)
            y = ops.group_norm(y, 3, ws, bs, 1e-5)
            y = ops.layer_norm(y, (5,), lws, None, 1e-5)
            return ops.rms_norm(y, (4, 5), None, 1e-6)
        return fn, [ws, bs, lws], [rm, rv, irm, irv]
    return make


X4 = dict(seed=7, offset=2.0)


def test_compiled_modules_match_eager():
    x = _t(4, 3, 6, 5, **X4)
    eager, compiled = _eager_and_compiled(_module_maker(False), [x])
    _assert_same(eager, compiled)


def test_compiled_functional_match_eager():
    x = _t(3, 6, 4, 5, **X4, channels_last=True)
    eager, compiled = _eager_and_compiled(_functional_maker(F), [x])
    _assert_same(eager, compiled)


def test_compiled_modules_on_the_default_backend_match_eager():
    """No backend forced: CPU tensors get the cpu backend by default."""
    x = _t(4, 3, 6, 5, **X4)
    eager, compiled = _eager_and_compiled(_module_maker(True), [x], forced=None)
    _assert_same(eager, compiled)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compiled_backend_operators_match_eager(channels_last):
    """The cpu backend object called directly (normlab's dispatch bypassed): the operators, fake
    implementations, autograd formula and in-place running statistics under dynamo."""
    x = _t(3, 6, 4, 5, **X4, channels_last=channels_last)
    eager, compiled = _eager_and_compiled(_functional_maker(cpu.BACKEND), [x])
    _assert_same(eager, compiled)


def test_compiled_graph_holds_the_fused_operators():
    ops = []

    def record(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn, _, _ = _functional_maker(cpu.BACKEND)()
    torch.compile(fn, fullgraph=True, backend=record)(_t(3, 6, 4, 5, **X4))
    assert sum("normlab.cpu_norm" in o for o in ops) == 7, ops


def test_compiled_function_follows_the_backend_choice():
    """A function compiled under backend("cpu") must not keep running the cpu operator under
    backend("reference") (dynamo has to guard on the choice, or not bake it in)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    fn = torch.compile(lambda x: F.layer_norm(x, (5,)), fullgraph=True, backend=record)
    x = torch.randn(3, 5)
    with normlab.backend("cpu"):
        fn(x)
    with normlab.backend("reference"):
        fn(x)
    assert len(graphs) == 2 and any("cpu_norm" in o for o in graphs[0]) \
        and not any("cpu_norm" in o for o in graphs[1]), graphs


SLOW = pytest.mark.skipif(os.environ.get("NORMLAB_SLOW") != "1",
                          reason="inductor compiles C++ (minutes): set NORMLAB_SLOW=1")


@SLOW
@pytest.mark.parametrize("entry", [
    "modules", "backend_operators"])
def test_inductor_matches_eager(entry):
    if entry == "modules":
        x = _t(4, 3, 6, 5, **X4)
        eager, compiled = _eager_and_compiled(_module_maker(True), [x], backend="inductor")
    else:
        x = _t(3, 6, 4, 5, **X4, channels_last=True)
        eager, compiled = _eager_and_compiled(_functional_maker(cpu.BACKEND), [x],
                                              backend="inductor")
    _assert_same(eager, compiled)
