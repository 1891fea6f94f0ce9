"""Regression tests of the adversarial sweep's findings (issue 13): each failed before its fix.

Forward-mode AD, torch.func and torch.jit.trace run torch's functions (normlab._dispatch.wrapped);
torch.jit.script compiles the drop-ins' torch branch or names torch.export; outputs have torch's
layout; modules of classes made at run time pickle; fold_batchnorm checks Linear outputs."""
from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import normlab
import normlab.functional as NF
import normlab.nn as nnl
from normlab._errors import ShapeError

BACKENDS = ["auto", "cpu", "reference", "torch"]


def _backend(name):
    return contextlib.nullcontext() if name == "auto" else normlab.backend(name)


ROW_FNS = {
    "layer_norm": (lambda v, w, b: NF.layer_norm(v, (5,), w, b),
                   lambda v, w, b: TF.layer_norm(v, (5,), w, b)),
    "rms_norm": (lambda v, w, b: NF.rms_norm(v, (5,), w),
                 lambda v, w, b: TF.rms_norm(v, (5,), w)),
    "group_norm": (lambda v, w, b: NF.group_norm(v.reshape(1, 5, -1), 1),
                   lambda v, w, b: TF.group_norm(v.reshape(1, 5, -1), 1)),
    "instance_norm": (lambda v, w, b: NF.instance_norm(v.reshape(1, 5, -1)),
                      lambda v, w, b: TF.instance_norm(v.reshape(1, 5, -1))),
    "batch_norm": (lambda v, w, b: NF.batch_norm(v, None, None, w, b, training=True),
                   lambda v, w, b: TF.batch_norm(v, None, None, w, b, training=True)),
    "add_layer_norm": (lambda v, w, b: NF.add_layer_norm(v, v.cos(), (5,), w, b)[0],
                       lambda v, w, b: TF.layer_norm(v + v.cos(), (5,), w, b)),
}


def _args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g) * 3 + 1
    w = torch.randn(5, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    return x, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", sorted(ROW_FNS))
def test_forward_mode_ad_gives_torchs_tangent(backend, fn):
    ours, theirs = ROW_FNS[fn]
    x, w, b = _args()
    t = torch.randn_like(x)
    with _backend(backend), fwAD.dual_level():
        tan = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), w, b)).tangent
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(theirs(fwAD.make_dual(x, t), w, b)).tangent
    assert tan is not None
    torch.testing.assert_close(tan, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", sorted(ROW_FNS))
def test_torch_func_transforms_compose(backend, fn):
    ours, theirs = ROW_FNS[fn]
    x, w, b = _args()
    with _backend(backend):
        for transform in (jacrev, jacfwd):
            torch.testing.assert_close(transform(ours)(x, w, b), transform(theirs)(x, w, b))
        torch.testing.assert_close(grad(lambda v: ours(v, w, b).sin().sum())(x),
                                   grad(lambda v: theirs(v, w, b).sin().sum())(x))
        torch.testing.assert_close(jvp(lambda v: ours(v, w, b), (x,), (x.cos(),))[1],
                                   jvp(lambda v: theirs(v, w, b), (x,), (x.cos(),))[1])
        torch.testing.assert_close(hessian(lambda v: ours(v, w, b).sin().sum())(x[:2]),
                                   hessian(lambda v: theirs(v, w, b).sin().sum())(x[:2]))
        xs = torch.stack([x, 2 * x + 1, x.flip(0)])
        torch.testing.assert_close(vmap(lambda v: ours(v, w, b))(xs),
                                   vmap(lambda v: theirs(v, w, b))(xs))


def test_per_sample_gradients_of_a_patched_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    ref = copy.deepcopy(model)
    normlab.patch(model)
    x, y = torch.randn(5, 6), torch.randn(5, 1)

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi, yi):
            return ((functional_call(m, p, (xi[None],)) - yi) ** 2).sum()
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    ours, theirs = per_sample(model), per_sample(ref)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k])


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8, affine=True), torch.nn.Flatten(1), torch.nn.LayerNorm(288),
        torch.nn.RMSNorm(288))


@pytest.mark.parametrize("train", [False, True])
def test_jit_trace_of_a_patched_model(train):
    ref = _cnn().train(train)
    model = normlab.patch(copy.deepcopy(ref)).train(train)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation and tracer warnings
        traced = torch.jit.trace(model, x, check_trace=not train)
    x2 = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(traced(x2), ref(x2), atol=1e-5, rtol=1e-5)
    assert "aten::batch_norm" in str(traced.inlined_graph) or \
        "aten::_batch_norm" in str(traced.inlined_graph)


@pytest.mark.parametrize("make", [
    lambda: nnl.BatchNorm2d(4), lambda: nnl.BatchNorm2d(4, momentum=None),
    lambda: nnl.InstanceNorm2d(4, affine=True, track_running_stats=True),
    lambda: nnl.GroupNorm(2, 4), lambda: nnl.LayerNorm(3), lambda: nnl.RMSNorm(3)])
def test_jit_script_of_the_drop_ins_computes_torchs_answer(make):
    m = make()
    theirs = copy.deepcopy(m)
    theirs.__class__ = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
    scripted = torch.jit.script(m)
    x = torch.randn(2, 4, 3, 3) * 2 + 1
    for train in (True, False):
        scripted.train(train)
        theirs.train(train)
        torch.testing.assert_close(scripted(x), theirs(x))
    if hasattr(m, "running_mean") and m.running_mean is not None:
        torch.testing.assert_close(m.running_mean, theirs.running_mean)  # shared buffers


def test_jit_script_of_a_patched_model():
    model = normlab.patch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(scripted(x), model(x))
    assert type(model[1]) is nnl.BatchNorm2d  # the model itself stays patched


@pytest.mark.parametrize("make", [
    lambda: nnl.AddLayerNorm(3), lambda: nnl.LayerNorm2d(4), lambda: nnl.DyT(4),
    lambda: normlab.freeze_batchnorm(nnl.BatchNorm2d(4)), lambda: nnl.MaskedBatchNorm1d(4)])
def test_jit_script_of_other_modules_names_torch_export(make):
    with pytest.raises(TypeError, match="torch.export"):
        torch.jit.script(make())


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, 3, generator=g)
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(2, 3)
    yield "permuted", x.permute(0, 2, 1, 3)
    yield "sliced", torch.randn(4, 6, 5, 6, generator=g)[..., ::2]
    yield "3d_transposed", torch.randn(4, 6, 5, generator=g).transpose(1, 2)
    yield "channels_last_3d", torch.randn(2, 6, 3, 4, 5, generator=g).contiguous(
        memory_format=torch.channels_last_3d)


OPS = {
    "batch_norm": lambda F, x: F.batch_norm(x, None, None, training=True),
    "batch_norm_eval": lambda F, x: F.batch_norm(x, torch.zeros(x.shape[1]),
                                                 torch.ones(x.shape[1])),
    "instance_norm": lambda F, x: F.instance_norm(x),
    "group_norm": lambda F, x: F.group_norm(x, 3 if x.shape[1] % 3 == 0 else 1),
    "layer_norm": lambda F, x: F.layer_norm(x, x.shape[-1:]),
    "layer_norm_2d": lambda F, x: F.layer_norm(x, x.shape[-2:]),
    "rms_norm": lambda F, x: F.rms_norm(x, x.shape[-1:]),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_outputs_have_torchs_layout(backend, op):
    for name, x in _inputs():
        for grad_ in (False, True):
            xx = x.detach().requires_grad_(grad_)
            want = OPS[op](TF, xx)
            with normlab.backend(backend):
                got = OPS[op](NF, xx)
            assert got.stride() == want.stride(), (name, grad_)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layer_norm_output_of_a_transposed_input_views_as_torchs():
    x = torch.randn(2, 16, 10).transpose(1, 2)
    with normlab.backend("cpu"):
        y = nnl.LayerNorm(16)(x)
    assert y.view(2, -1).shape == (2, 160)


class UserBatchNorm(torch.nn.BatchNorm2d):
    pass


class UserLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * 2


@pytest.mark.parametrize("make", [
    lambda: normlab.patch(torch.nn.Sequential(UserBatchNorm(4), UserLayerNorm(3))),
    lambda: normlab.freeze_batchnorm(normlab.patch(torch.nn.Sequential(UserBatchNorm(4)))),
    lambda: normlab.patch(normlab.freeze_batchnorm(torch.nn.Sequential(UserBatchNorm(4)))),
])
def test_patched_and_frozen_subclasses_pickle_and_save_whole(make):
    model = make()
    for copy_ in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert [type(m) for m in copy_.modules()] == [type(m) for m in model.modules()]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(loaded[0].eval()(x), model[0].eval()(x))


def _linear_bn():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    return m


def test_fold_of_linear_batchnorm1d_checks_the_activation_rank():
    m = _linear_bn()
    x2, x3 = torch.randn(4, 8), torch.randn(4, 8, 8)
    folded = normlab.fold_batchnorm(m)
    torch.testing.assert_close(folded(x2), m(x2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="example_inputs"):
        folded(x3)  # before: outputs changed by up to 2.26, silently
    kept, unfolded = normlab.fold_batchnorm(m, example_inputs=x3, report=True)
    assert list(unfolded) == ["1"] and "3-D" in unfolded["1"]
    torch.testing.assert_close(kept(x3), m(x3))
    folded2, unfolded2 = normlab.fold_batchnorm(m, example_inputs=x2, report=True)
    assert unfolded2 == {} and isinstance(folded2[1], torch.nn.Identity)
    torch.testing.assert_close(folded2(x2), m(x2), atol=1e-5, rtol=1e-5)
    pickle.loads(pickle.dumps(folded))  # the guard pickles


# --- the Numba cache (item 7): damaged or missing, the kernels compile, warned once

_CACHE_SCRIPT = r"""
import warnings, torch, normlab, normlab.functional as F
warnings.simplefilter("always")
x = torch.randn(6, 40) * 3 + 1
with warnings.catch_warnings(record=True) as w:
    with normlab.backend("cpu"):
        y = F.layer_norm(x, (40,)); y2 = F.layer_norm(x, (40,))
ref = torch.nn.functional.layer_norm(x, (40,))
print("OK", float((y - ref).abs().max()), float((y2 - ref).abs().max()),
      sum("Numba's cache" in str(m.message) for m in w))
"""


def _run(code, env):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    line = [s for s in done.stdout.splitlines() if s.startswith("OK")][-1].split()
    return float(line[1]), float(line[2]), int(line[3])


def test_damaged_numba_cache_files_are_a_miss_with_one_warning(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NORMLAB_BACKGROUND_WARMUP": "0"}
    assert _run(_CACHE_SCRIPT, env)[2] == 0  # fills the cache
    files = [p for p in tmp_path.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert files
    for p in files:
        p.write_bytes(b"\x80\x04garbage, not a pickle")
    e1, e2, warned = _run(_CACHE_SCRIPT, env)
    assert e1 < 1e-5 and e2 < 1e-5 and warned == 1


def test_no_cache_location_compiles_uncached_with_one_warning(tmp_path):
    # Numba finds no cache locator (as on a read-only install without a writable home): its
    # cache=True raises "no locator available" at decoration, which every import hit before
    no_locator = "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NORMLAB_BACKGROUND_WARMUP": "0"}
    e1, e2, warned = _run(no_locator + _CACHE_SCRIPT, env)
    assert e1 < 1e-5 and e2 < 1e-5 and warned == 1


# --- var + eps == 0 and other degenerate values (item 8): torch's answers, no SystemError

DEGENERATE = {
    "layer_norm": (lambda F: F.layer_norm(torch.ones(2, 4), (4,), eps=0.0)),
    "rms_norm": (lambda F: F.rms_norm(torch.zeros(2, 4), (4,), eps=0.0)),
    "group_norm": (lambda F: F.group_norm(torch.ones(2, 4, 3), 2, eps=0.0)),
    "instance_norm": (lambda F: F.instance_norm(torch.ones(2, 4, 3), eps=0.0)),
    "layer_norm_neg_eps": (lambda F: F.layer_norm(torch.tensor([[0., 2.]]), (2,), eps=-1.0)),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "torch", "auto"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_zero_variance_plus_eps_gives_torchs_nan(backend, case):
    want = DEGENERATE[case](TF)
    with _backend(backend):
        got = DEGENERATE[case](NF)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_add_norms_with_zero_variance_give_nan(backend):
    x = torch.ones(2, 4)
    with normlab.backend(backend):
        y, h = NF.add_layer_norm(x, x, (4,), eps=0.0)
        y2, _ = NF.add_rms_norm(torch.zeros(2, 4), torch.zeros(2, 4), (4,), eps=0.0)
    assert torch.isnan(y).all() and torch.isnan(y2).all()
    torch.testing.assert_close(h, 2 * x)


# --- accepted where torch raises, rejected where torch accepts (items 9 and 10)

X = torch.randn(3, 5)
X4 = torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize("shape", [(5.7,), "5", torch.tensor([5]), np.array([5]),
                                   5.0, True, None])
def test_normalized_shape_types_torch_rejects(shape):
    with pytest.raises(TypeError):
        TF.layer_norm(X, shape)
    for backend in ("cpu", "reference"):
        with normlab.backend(backend), pytest.raises(TypeError, match="normalized_shape"):
            NF.layer_norm(X, shape)


@pytest.mark.parametrize("shape", [[5], (np.int64(5),), torch.Size([5])])
def test_normalized_shape_types_torch_accepts(shape):
    torch.testing.assert_close(NF.layer_norm(X, shape), TF.layer_norm(X, shape))
    # an int is normlab's extension (torch's modules take one, its functions do not)
    torch.testing.assert_close(NF.layer_norm(X, 5), TF.layer_norm(X, (5,)))


@pytest.mark.parametrize("momentum", [np.float32(0.25), np.int64(0), torch.tensor(0.25), True, 1])
def test_momentum_types_torch_accepts(momentum):
    rm, rv = torch.zeros(4), torch.ones(4)
    rm2, rv2 = rm.clone(), rv.clone()
    y = NF.batch_norm(X4, rm, rv, training=True, momentum=momentum)
    want = TF.batch_norm(X4, rm2, rv2, training=True, momentum=momentum)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_num_groups_as_a_numpy_integer():
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(nnl.GroupNorm(np.int64(4), 8)(x), torch.nn.GroupNorm(4, 8)(x))
    torch.testing.assert_close(NF.group_norm(x, np.int64(2)), TF.group_norm(x, 2))
    with pytest.raises(ShapeError, match="num_groups"):
        NF.group_norm(x, 2.0)


def test_rms_norm_integer_weight_warns_and_computes_as_torch():
    w = torch.tensor([1, 2, 3, 4, 5])
    with pytest.warns(UserWarning, match="Mismatch dtype"):
        want = TF.rms_norm(X, (5,), w)
    with pytest.warns(UserWarning, match="Mismatch dtype"):
        got = NF.rms_norm(X, (5,), w)
    torch.testing.assert_close(got, want)


def test_batch_norm_of_an_empty_1d_input():
    for training in (True, False):
        x = torch.randn(0)
        got = NF.batch_norm(x, torch.zeros(0), torch.ones(0), training=training)
        assert got.shape == (0,)


def test_batch_norm_eps_rules():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="non-negative"):
        NF.batch_norm(X4, rm, rv, eps=-0.5)
    y = NF.batch_norm(X4, None, None, training=True, eps=float("nan"))
    assert torch.isnan(y).all()  # torch returns NaN; normlab raised before
    with pytest.raises(ValueError, match="positive"):
        NF.batch_norm(X4, None, None, training=True, eps=0.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_running_statistics_torch_rejects(backend):
    rm, rv = torch.zeros(4), torch.ones(4)
    bad = {
        "other device": lambda: NF.batch_norm(X4, rm.to("meta"), rv.to("meta"), training=True),
        "shape (1, C)": lambda: NF.batch_norm(X4, rm[None].clone(), rv[None].clone(),
                                              training=True),
        "only running_mean": lambda: NF.batch_norm(X4, rm.clone(), None, training=True),
        "only running_var": lambda: NF.batch_norm(X4, None, rv.clone(), training=True),
        "requires grad in eval": lambda: NF.batch_norm(
            X4, rm.clone().requires_grad_(), rv.clone().requires_grad_()),
    }
    for name, call in bad.items():
        with normlab.backend(backend), pytest.raises((RuntimeError, ValueError)):
            call()


# --- the lab and the CLI (item 11)


def test_lab_cache_file_of_the_wrong_json_type_is_recomputed(tmp_path):
    from normlab.lab.api import Context

    ctx = Context("exp", tmp_path)
    ctx.runs_dir.mkdir(parents=True)
    for content in ("[1, 2, 3]", "null", '"text"', '{"key": "other", "value": 5}'):
        path = ctx.runs_dir / "k.json"
        path.write_text(content)
        assert ctx.cached("k", lambda: 7) == 7
        assert ctx.cached("k", lambda: 8) == 7  # then stored
        path.unlink()


@pytest.mark.parametrize("argv", [
    ["lab", "--quick", "--out"], ["explain", "batchnorm", "--out"], ["bench", "--quick", "--out"]])
def test_unwritable_out_is_a_one_line_error(tmp_path, argv, capsys):
    from normlab.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        main(argv + [str(blocker / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write there" in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["", "not,a,bench\n1,2,3\n", "norm,layout\nrms_norm\n",
                                     "\x00\x01binary"])
@pytest.mark.parametrize("dispatch", [False, True])
def test_bench_from_csv_of_a_bad_file_is_an_error(tmp_path, content, dispatch, capsys):
    from normlab.cli import main

    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["bench"] + (["--dispatch"] if dispatch else []) + ["--from-csv", str(path)])
    assert e.value.code == 2
    assert str(path) in capsys.readouterr().err


def test_lab_only_empty_is_an_error(capsys):
    from normlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lab", "--only", ""])
    assert e.value.code == 2 and "experiment name" in capsys.readouterr().err


def _npz(tmp_path, x, y):
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    return path


def test_user_labels_are_mapped_to_classes(tmp_path):
    from normlab.lab.datasets import _load_user_images

    x = np.random.default_rng(0).normal(size=(12, 6, 6)).astype(np.float32)
    y = np.array([10**9, -3] * 6)
    _, labels = _load_user_images(_npz(tmp_path, x, y))
    assert sorted(set(labels.tolist())) == [0, 1] and labels[0] == 1 and labels[1] == 0


@pytest.mark.parametrize("bad, match", [("nan", "NaN or infinite"), ("one class", "two classes")])
def test_user_data_that_cannot_train_is_an_error(tmp_path, bad, match):
    from normlab.lab.datasets import _load_user_images

    x = np.random.default_rng(0).normal(size=(12, 6, 6)).astype(np.float32)
    y = np.array([0, 1] * 6)
    if bad == "nan":
        x[:] = np.nan
    else:
        y[:] = 4
    with pytest.raises(ValueError, match=match):
        _load_user_images(_npz(tmp_path, x, y))
