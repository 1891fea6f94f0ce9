"""The hand-written backward of every norm against finite differences in float64
(torch.autograd.gradcheck), for x, weight and bias, in every mode that has a distinct backward:
statistics from the input (training), given statistics (BatchNorm eval, InstanceNorm without
input statistics), uncentered (RMSNorm), grouped views (GroupNorm), several normalized axes,
and channels_last inputs."""
import pytest
import torch
from torch.autograd import gradcheck

import normlab.functional as F


def _t(*shape, seed, scale=1.5, offset=0.7, grad=True, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _pos(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5


CASES = {
    "batch_norm-train": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (3, 4, 5)),
    "batch_norm-train-4d-running": (
        lambda x, w, b: F.batch_norm(
            x, torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype), w, b,
            training=True, momentum=0.3, eps=1e-3),
        (2, 4, 3, 3)),
    "batch_norm-eval": (
        lambda x, w, b: F.batch_norm(
            x, _t(4, seed=9, grad=False), _pos(4, seed=10), w, b, training=False),
        (3, 4, 5)),
    "instance_norm": (
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-3), (2, 4, 6)),
    "instance_norm-running": (
        lambda x, w, b: F.instance_norm(
            x, _t(4, seed=11, grad=False), _pos(4, seed=12), w, b, use_input_stats=False),
        (2, 4, 6)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-3), (2, 4, 3, 2)),
    "group_norm-2d-input": (lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-3), (3, 6)),
}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_channel_norms_gradcheck(name, channels_last):
    fn, shape = CASES[name]
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-D input")
    c = shape[1]
    x = _t(*shape, seed=1, channels_last=channels_last)
    w, b = _t(c, seed=2), _t(c, seed=3)
    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalized", [(5,), (3, 4)])
def test_layer_norm_gradcheck(normalized):
    x = _t(2, 3, *normalized, seed=4) if len(normalized) == 1 else _t(2, *normalized, seed=4)
    w, b = _t(*normalized, seed=5), _t(*normalized, seed=6)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, normalized, w, b, eps=1e-3), (x, w, b),
                     eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalized", [(5,), (3, 4)])
def test_rms_norm_gradcheck(normalized):
    x = _t(2, 3, *normalized, seed=7) if len(normalized) == 1 else _t(2, *normalized, seed=7)
    w = _t(*normalized, seed=8)
    assert gradcheck(lambda x, w: F.rms_norm(x, normalized, w, eps=1e-3), (x, w),
                     eps=1e-6, atol=1e-6, rtol=1e-5)


def test_unbatched_rows_gradcheck():
    # An input of exactly normalized_shape: the parameters vary along every axis.
    x, w, b = _t(6, seed=13), _t(6, seed=14), _t(6, seed=15)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, 6, w, b), (x, w, b), eps=1e-6, atol=1e-6)
    assert gradcheck(lambda x, w: F.rms_norm(x, 6, w), (x, w), eps=1e-6, atol=1e-6)


def test_without_affine_gradcheck():
    x = _t(3, 4, 5, seed=16)
    for fn in (
        lambda x: F.batch_norm(x, None, None, training=True),
        lambda x: F.instance_norm(x),
        lambda x: F.group_norm(x, 2),
        lambda x: F.layer_norm(x, (4, 5)),
        lambda x: F.rms_norm(x, 5),
    ):
        assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward_is_refused_not_wrong():
    x = _t(3, 4, seed=17)
    y = F.layer_norm(x, 4)
    (g,) = torch.autograd.grad((y * y.detach()).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
