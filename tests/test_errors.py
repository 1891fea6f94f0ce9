"""Bad input raises a clear exception that names the problem.

Shape/size problems raise an exception that is both a ``ValueError`` and a ``RuntimeError``;
dtype problems (integer, bool, complex input) one that is both a ``TypeError`` and a
``RuntimeError``. Each case is written once against a namespace (``ns.F`` functional, ``ns.nn``
modules) and run three ways: torch must reject it too (so the case really is an error), normlab
must raise the documented exception with a message naming the problem, and the same call on
valid input must succeed on normlab and agree with torch.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF
from torch.testing import assert_close

import normlab
import normlab.functional as NF
import normlab.nn as nlnn

TORCH = SimpleNamespace(F=TF, nn=tnn, name="torch")
NL = SimpleNamespace(F=NF, nn=nlnn, name="normlab")


@pytest.fixture(autouse=True)
def _no_hang():
    """A hung call becomes a failure after 10 s instead of blocking the suite; slow tests fail too."""
    def on_alarm(signum, frame):  # pragma: no cover - only when something hangs
        raise TimeoutError("test took more than 10 s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < 5.0, "an error test must be fast"


@contextlib.contextmanager
def shape_error(match: str):
    with pytest.raises(ValueError, match=match) as ei:
        yield ei
    assert isinstance(ei.value, RuntimeError), f"{type(ei.value).__mro__} is not a RuntimeError"


@contextlib.contextmanager
def dtype_error(match: str = r"(?i)dtype|float"):
    with pytest.raises(TypeError, match=match) as ei:
        yield ei
    assert isinstance(ei.value, RuntimeError), f"{type(ei.value).__mro__} is not a RuntimeError"


def R(*shape, dtype=torch.float32, seed=0):
    """Deterministic, non-zero-mean random tensor (the same values on every call)."""
    g = torch.Generator().manual_seed(seed + 31 * len(shape) + sum(shape))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.3 + 0.7).to(dtype)


def P(*shape, seed=1):
    """Deterministic positive tensor (weights, running variances)."""
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.rand(shape, generator=g) + 0.5


@dataclass
class Bad:
    id: str
    match: str
    bad: Callable  # ns -> result, must raise
    good: Callable | None  # ns -> result, the same call on valid input
    torch_raises: bool = True  # torch rejects `bad` too (sanity of the case)
    torch_own_check: bool = False  # raised by torch's inherited input-rank check: a ValueError suffices

    def __repr__(self):
        return self.id


def _check(case: Bad, expect):
    if case.torch_raises:
        with pytest.raises(Exception):
            case.bad(TORCH)
    if case.torch_own_check:
        with pytest.raises(ValueError, match=case.match):
            case.bad(NL)
    else:
        with expect(case.match):
            case.bad(NL)
    if case.good is not None:
        got = case.good(NL)
        want = case.good(TORCH)
        if isinstance(want, torch.Tensor):
            assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Shape / size problems
# --------------------------------------------------------------------------------------------
SHAPE_CASES = [
    # GroupNorm: channels not divisible by groups, weight/bias of the wrong size
    Bad("group_norm-not-divisible", r"num_groups",
        lambda ns: ns.F.group_norm(R(2, 6, 3), 4), lambda ns: ns.F.group_norm(R(2, 6, 3), 3)),
    Bad("group_norm-not-divisible-4d", r"num_groups",
        lambda ns: ns.F.group_norm(R(2, 5, 2, 2), 2, P(5), R(5)),
        lambda ns: ns.F.group_norm(R(2, 5, 2, 2), 5, P(5), R(5))),
    Bad("group_norm-weight-size", r"weight",
        lambda ns: ns.F.group_norm(R(2, 6, 3), 3, P(5)), lambda ns: ns.F.group_norm(R(2, 6, 3), 3, P(6))),
    Bad("group_norm-bias-size", r"bias",
        lambda ns: ns.F.group_norm(R(2, 6, 3), 3, P(6), R(4)), lambda ns: ns.F.group_norm(R(2, 6, 3), 3, P(6), R(6))),
    Bad("GroupNorm-forward-wrong-channels", r"(?i)weight|channel",
        lambda ns: ns.nn.GroupNorm(2, 6)(R(2, 4, 3)), lambda ns: ns.nn.GroupNorm(2, 6)(R(2, 6, 3))),
    # batch_norm: one value per channel in training, fine in eval
    Bad("batch_norm-N1-C", r"more than 1 value per channel",
        lambda ns: ns.F.batch_norm(R(1, 3), None, None, training=True),
        lambda ns: ns.F.batch_norm(R(1, 3), R(3), P(3), training=False)),
    Bad("batch_norm-N1-C11", r"more than 1 value per channel",
        lambda ns: ns.F.batch_norm(R(1, 3, 1, 1), torch.zeros(3), torch.ones(3), training=True),
        lambda ns: ns.F.batch_norm(R(1, 3, 1, 1), R(3), P(3), training=False)),
    Bad("batch_norm-N1-C1", r"more than 1 value per channel",
        lambda ns: ns.F.batch_norm(R(1, 3, 1), None, None, P(3), R(3), training=True),
        lambda ns: ns.F.batch_norm(R(1, 3, 2), None, None, P(3), R(3), training=True)),
    Bad("BatchNorm1d-train-N1", r"more than 1 value per channel",
        lambda ns: ns.nn.BatchNorm1d(3)(R(1, 3)), lambda ns: ns.nn.BatchNorm1d(3).eval()(R(1, 3))),
    Bad("BatchNorm2d-train-N1-11", r"more than 1 value per channel",
        lambda ns: ns.nn.BatchNorm2d(3)(R(1, 3, 1, 1)), lambda ns: ns.nn.BatchNorm2d(3).eval()(R(1, 3, 1, 1))),
    Bad("BatchNorm1d-no-stats-eval-N1", r"more than 1 value per channel",
        lambda ns: ns.nn.BatchNorm1d(3, track_running_stats=False).eval()(R(1, 3)),
        lambda ns: ns.nn.BatchNorm1d(3, track_running_stats=False).eval()(R(2, 3))),
    # instance_norm: one spatial element in training
    Bad("instance_norm-one-spatial-1d", r"(?i)more than 1|spatial",
        lambda ns: ns.F.instance_norm(R(2, 3, 1)), lambda ns: ns.F.instance_norm(R(2, 3, 2))),
    Bad("instance_norm-one-spatial-2d", r"(?i)more than 1|spatial",
        lambda ns: ns.F.instance_norm(R(2, 3, 1, 1)),
        lambda ns: ns.F.instance_norm(R(2, 3, 1, 1), R(3), P(3), use_input_stats=False)),
    Bad("InstanceNorm1d-one-spatial", r"(?i)more than 1|spatial",
        lambda ns: ns.nn.InstanceNorm1d(3)(R(2, 3, 1)),
        lambda ns: ns.nn.InstanceNorm1d(3, track_running_stats=True).eval()(R(2, 3, 1))),
    Bad("InstanceNorm3d-one-spatial", r"(?i)more than 1|spatial",
        lambda ns: ns.nn.InstanceNorm3d(3, affine=True)(R(2, 3, 1, 1, 1)),
        lambda ns: ns.nn.InstanceNorm3d(3, affine=True)(R(2, 3, 1, 1, 2))),
    # layer_norm / rms_norm
    Bad("layer_norm-shape-mismatch", r"normalized_shape",
        lambda ns: ns.F.layer_norm(R(2, 3), (4,)), lambda ns: ns.F.layer_norm(R(2, 3), (3,))),
    Bad("layer_norm-shape-mismatch-2d", r"normalized_shape",
        lambda ns: ns.F.layer_norm(R(2, 3, 4), (4, 3)), lambda ns: ns.F.layer_norm(R(2, 3, 4), (3, 4))),
    Bad("layer_norm-shape-longer-than-input", r"normalized_shape",
        lambda ns: ns.F.layer_norm(R(5), (2, 5)), lambda ns: ns.F.layer_norm(R(5), (5,))),
    Bad("layer_norm-empty-shape", r"normalized_shape",
        lambda ns: ns.F.layer_norm(R(2, 3), ()), lambda ns: ns.F.layer_norm(R(2, 3), (3,))),
    Bad("layer_norm-weight-shape", r"weight",
        lambda ns: ns.F.layer_norm(R(2, 3), (3,), P(4)), lambda ns: ns.F.layer_norm(R(2, 3), (3,), P(3))),
    Bad("layer_norm-weight-shape-2d", r"weight",
        lambda ns: ns.F.layer_norm(R(2, 3, 4), (3, 4), P(12)),
        lambda ns: ns.F.layer_norm(R(2, 3, 4), (3, 4), P(3, 4))),
    Bad("layer_norm-bias-shape", r"bias",
        lambda ns: ns.F.layer_norm(R(2, 5), (5,), P(5), R(4)),
        lambda ns: ns.F.layer_norm(R(2, 5), (5,), P(5), R(5))),
    Bad("rms_norm-shape-mismatch", r"normalized_shape",
        lambda ns: ns.F.rms_norm(R(2, 3), (4,)), lambda ns: ns.F.rms_norm(R(2, 3), (3,))),
    Bad("rms_norm-empty-shape", r"normalized_shape",
        lambda ns: ns.F.rms_norm(R(2, 3), ()), lambda ns: ns.F.rms_norm(R(2, 3), [3])),
    Bad("rms_norm-weight-shape", r"weight",
        lambda ns: ns.F.rms_norm(R(2, 3), (3,), P(4)), lambda ns: ns.F.rms_norm(R(2, 3), (3,), P(3))),
    Bad("LayerNorm-module-wrong-trailing", r"normalized_shape",
        lambda ns: ns.nn.LayerNorm(5)(R(2, 4)), lambda ns: ns.nn.LayerNorm(5)(R(2, 5))),
    Bad("LayerNorm-module-wrong-trailing-2d", r"normalized_shape",
        lambda ns: ns.nn.LayerNorm((3, 5), elementwise_affine=False)(R(2, 5, 3)),
        lambda ns: ns.nn.LayerNorm((3, 5), elementwise_affine=False)(R(2, 3, 5))),
    Bad("RMSNorm-module-wrong-trailing", r"normalized_shape",
        lambda ns: ns.nn.RMSNorm(5)(R(2, 4)), lambda ns: ns.nn.RMSNorm(5)(R(2, 5))),
    # batch_norm: weight / bias / running stats of the wrong size
    Bad("batch_norm-weight-size", r"weight",
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(3), P(3), P(4), training=False),
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(3), P(3), P(3), training=False)),
    Bad("batch_norm-bias-size", r"bias",
        lambda ns: ns.F.batch_norm(R(2, 3, 4), None, None, P(3), R(2), training=True),
        lambda ns: ns.F.batch_norm(R(2, 3, 4), None, None, P(3), R(3), training=True)),
    Bad("batch_norm-running_mean-size", r"running_mean",
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(4), P(3), training=False),
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(3), P(3), training=False)),
    Bad("batch_norm-running_mean-size-train", r"running_mean",
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(4), P(3), training=True),
        lambda ns: ns.F.batch_norm(R(2, 3, 4), R(3), P(3), training=True)),
    Bad("batch_norm-running_var-size", r"running_var",
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(2), training=False),
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=False)),
    # batch_norm eval without running stats; instance_norm without input stats and running stats
    Bad("batch_norm-eval-no-running-stats", r"running",
        lambda ns: ns.F.batch_norm(R(4, 3), None, None, training=False),
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=False)),
    Bad("batch_norm-eval-no-running_var", r"running_var",
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), None, training=False),
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=False)),
    Bad("instance_norm-no-input-stats-no-running-stats", r"running",
        lambda ns: ns.F.instance_norm(R(2, 3, 4), use_input_stats=False),
        lambda ns: ns.F.instance_norm(R(2, 3, 4), R(3), P(3), use_input_stats=False)),
    # module channel mismatch
    Bad("BatchNorm2d-wrong-channels-train", r"(?i)channel|num_features|running_mean|running_var|weight|bias",
        lambda ns: ns.nn.BatchNorm2d(3)(R(2, 4, 3, 3)), lambda ns: ns.nn.BatchNorm2d(3)(R(2, 3, 3, 3))),
    Bad("BatchNorm2d-wrong-channels-eval", r"(?i)channel|num_features|running_mean|running_var|weight|bias",
        lambda ns: ns.nn.BatchNorm2d(3).eval()(R(2, 4, 3, 3)), lambda ns: ns.nn.BatchNorm2d(3).eval()(R(2, 3, 3, 3))),
    Bad("BatchNorm2d-affine-no-stats-wrong-channels", r"(?i)channel|num_features|weight|bias",
        lambda ns: ns.nn.BatchNorm2d(3, track_running_stats=False)(R(2, 4, 3, 3)),
        lambda ns: ns.nn.BatchNorm2d(3, track_running_stats=False)(R(2, 3, 3, 3))),
    Bad("BatchNorm1d-stats-no-affine-wrong-channels", r"(?i)channel|num_features|running_mean|running_var",
        lambda ns: ns.nn.BatchNorm1d(3, affine=False)(R(4, 5)), lambda ns: ns.nn.BatchNorm1d(3, affine=False)(R(4, 3))),
    Bad("InstanceNorm2d-affine-wrong-channels", r"(?i)channel|num_features|weight|bias",
        lambda ns: ns.nn.InstanceNorm2d(3, affine=True)(R(2, 4, 3, 3)),
        lambda ns: ns.nn.InstanceNorm2d(3, affine=True)(R(2, 3, 3, 3)),
        torch_own_check=True),  # torch's inherited forward checks num_features
    Bad("InstanceNorm2d-affine-wrong-channels-unbatched", r"(?i)channel|num_features|weight|bias",
        lambda ns: ns.nn.InstanceNorm2d(3, affine=True)(R(4, 3, 3)),
        lambda ns: ns.nn.InstanceNorm2d(3, affine=True)(R(3, 3, 3)),
        torch_own_check=True),  # torch's inherited forward checks num_features
    Bad("InstanceNorm1d-stats-wrong-channels-eval", r"(?i)channel|num_features|running_mean|running_var",
        lambda ns: ns.nn.InstanceNorm1d(3, track_running_stats=True).eval()(R(2, 4, 5)),
        lambda ns: ns.nn.InstanceNorm1d(3, track_running_stats=True).eval()(R(2, 3, 5))),
    # batch_norm training with eps <= 0 (torch raises ValueError)
    Bad("batch_norm-train-eps-zero", r"eps",
        lambda ns: ns.F.batch_norm(R(4, 3), None, None, training=True, eps=0.0),
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=False, eps=0.0)),
    Bad("batch_norm-train-eps-negative", r"eps",
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=True, eps=-1e-5),
        lambda ns: ns.F.batch_norm(R(4, 3), R(3), P(3), training=True, eps=1e-5)),
    Bad("BatchNorm2d-train-eps-zero", r"eps",
        lambda ns: ns.nn.BatchNorm2d(3, eps=0.0)(R(2, 3, 2, 2)),
        lambda ns: ns.nn.BatchNorm2d(3, eps=0.0).eval()(R(2, 3, 2, 2))),
]

# wrong input rank for the modules that check it
RANK_CASES = [
    ("BatchNorm1d", (3,)), ("BatchNorm1d", (2, 3, 4, 4)),
    ("BatchNorm2d", (2, 3, 4)), ("BatchNorm2d", (2, 3, 4, 4, 4)),
    ("BatchNorm3d", (2, 3, 4, 4)), ("BatchNorm3d", (2, 3, 4, 4, 4, 4)),
    ("InstanceNorm1d", (3,)), ("InstanceNorm1d", (2, 3, 4, 4)),
    ("InstanceNorm2d", (3, 4)), ("InstanceNorm2d", (2, 3, 4, 4, 4)),
    ("InstanceNorm3d", (2, 3, 4)), ("InstanceNorm3d", (2, 3, 4, 4, 4, 4)),
]
GOOD_SHAPE = {"BatchNorm1d": (2, 3, 4), "BatchNorm2d": (2, 3, 4, 4), "BatchNorm3d": (2, 3, 2, 2, 2),
              "InstanceNorm1d": (3, 4), "InstanceNorm2d": (2, 3, 4, 4), "InstanceNorm3d": (3, 2, 2, 2)}
for _name, _shape in RANK_CASES:
    for _train in (True, False):
        SHAPE_CASES.append(Bad(
            f"{_name}-{len(_shape)}D-input-{'train' if _train else 'eval'}", r"D input|dimension",
            lambda ns, n=_name, s=_shape, t=_train: getattr(ns.nn, n)(3).train(t)(R(*s)),
            lambda ns, n=_name, t=_train: getattr(ns.nn, n)(3).train(t)(R(*GOOD_SHAPE[n])),
            torch_own_check=True,  # the brief: torch's own rank checks are fine as long as they are ValueError
        ))


@pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features")
@pytest.mark.parametrize("case", SHAPE_CASES, ids=[c.id for c in SHAPE_CASES])
def test_shape_errors(case):
    _check(case, shape_error)


def test_groupnorm_constructor_channels_not_divisible():
    with pytest.raises(ValueError):
        tnn.GroupNorm(4, 6)
    with shape_error(r"num_groups") as ei:
        nlnn.GroupNorm(4, 6)
    assert "6" in str(ei.value) and "4" in str(ei.value)
    m = nlnn.GroupNorm(3, 6)
    assert isinstance(m, nlnn.GroupNorm)
    x = R(2, 6, 4)
    assert_close(m(x), tnn.GroupNorm(3, 6)(x), atol=1e-5, rtol=1e-5)


def test_shape_error_is_catchable_as_runtime_error_like_torch_code():
    """Code written for torch (``except RuntimeError``) still catches normlab's shape errors."""
    for call in (lambda: NF.layer_norm(R(2, 3), (4,)), lambda: nlnn.BatchNorm2d(3)(R(2, 4, 3, 3)),
                 lambda: NF.group_norm(R(2, 6, 3), 4)):
        try:
            call()
        except RuntimeError as e:
            assert isinstance(e, ValueError)
        else:  # pragma: no cover
            pytest.fail("no error raised")


# --------------------------------------------------------------------------------------------
# dtype problems: integer, bool and complex inputs to every functional and every module
# --------------------------------------------------------------------------------------------
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


def _as(x, dtype):
    if dtype == torch.bool:
        return x > 0.7
    if dtype.is_complex:
        return torch.complex(x, R(*x.shape, seed=5))
    return (x * 3).round().abs().to(dtype)


FUNCTIONAL_CALLS = {
    "batch_norm-train": lambda F, x: F.batch_norm(x, None, None, training=True),
    "batch_norm-eval": lambda F, x: F.batch_norm(x, R(3), P(3), P(3), R(3), training=False),
    "layer_norm": lambda F, x: F.layer_norm(x, (4,)),
    "layer_norm-affine": lambda F, x: F.layer_norm(x, (3, 4), P(3, 4), R(3, 4)),
    "group_norm": lambda F, x: F.group_norm(x, 3),
    "group_norm-affine": lambda F, x: F.group_norm(x, 1, P(3), R(3)),
    "instance_norm": lambda F, x: F.instance_norm(x),
    "instance_norm-stats": lambda F, x: F.instance_norm(x, R(3), P(3), use_input_stats=False),
    "rms_norm": lambda F, x: F.rms_norm(x, (4,)),
    "rms_norm-weight": lambda F, x: F.rms_norm(x, (4,), P(4)),
}


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(FUNCTIONAL_CALLS))
def test_functional_rejects_non_float_input(name, dtype):
    call = FUNCTIONAL_CALLS[name]
    x = R(2, 3, 4)
    with dtype_error():
        call(NF, _as(x, dtype))
    assert_close(call(NF, x), call(TF, x), atol=1e-5, rtol=1e-5)


MODULES = {
    "BatchNorm1d": (lambda nn: nn.BatchNorm1d(3), (2, 3, 4)),
    "BatchNorm2d": (lambda nn: nn.BatchNorm2d(3), (2, 3, 2, 2)),
    "BatchNorm3d": (lambda nn: nn.BatchNorm3d(3), (2, 3, 2, 2, 2)),
    "LayerNorm": (lambda nn: nn.LayerNorm(4), (2, 3, 4)),
    "GroupNorm": (lambda nn: nn.GroupNorm(3, 3), (2, 3, 4)),
    "InstanceNorm1d": (lambda nn: nn.InstanceNorm1d(3, affine=True), (2, 3, 4)),
    "InstanceNorm2d": (lambda nn: nn.InstanceNorm2d(3), (2, 3, 2, 2)),
    "InstanceNorm3d": (lambda nn: nn.InstanceNorm3d(3, track_running_stats=True), (2, 3, 2, 2, 2)),
    "RMSNorm": (lambda nn: nn.RMSNorm(4), (2, 3, 4)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_rejects_non_float_input(name, dtype, training):
    make, shape = MODULES[name]
    m = make(nlnn).train(training)
    x = R(*shape)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with dtype_error():
        m(_as(x, dtype))
    for k, v in m.state_dict().items():  # a refused call leaves the running stats alone
        if k != "num_batches_tracked":  # torch's forward counts the batch before the kernel refuses it
            assert torch.equal(v, before[k]), k
    assert_close(m(x), make(tnn).train(training)(x), atol=1e-5, rtol=1e-5)


def test_dtype_error_is_catchable_as_runtime_error_like_torch_code():
    try:
        NF.layer_norm(torch.ones(2, 3, dtype=torch.long), (3,))
    except RuntimeError as e:
        assert isinstance(e, TypeError)
    else:  # pragma: no cover
        pytest.fail("no error raised")


def test_error_types_are_exported():
    """The exception classes behind the errors are reachable (at least BackendUnavailableError)."""
    assert issubclass(normlab.BackendUnavailableError, RuntimeError)


@pytest.mark.parametrize("call", [
    lambda F, w: F.layer_norm(R(2, 3), (3,), w),
    lambda F, w: F.group_norm(R(2, 3, 4), 1, w),
    lambda F, w: F.batch_norm(R(2, 3, 4), None, None, w, training=True),
], ids=["layer_norm", "group_norm", "batch_norm"])
def test_integer_weight_is_a_dtype_error(call):
    w_int = torch.tensor([1, 2, 3])
    with pytest.raises(Exception):
        call(TF, w_int)
    with dtype_error(r"weight") as ei:
        call(NF, w_int)
    assert_close(call(NF, w_int.float()), call(TF, w_int.float()), atol=1e-5, rtol=1e-5)
