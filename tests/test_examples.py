"""The seeds' worked examples, checked against closed forms derived by hand and against torch,
plus the demo command that prints them."""
import io
import math

import pytest
import torch

import normlab
import normlab.nn as nl
from normlab.cli import demo, main

X3 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
X2422 = torch.arange(32.0).reshape(2, 4, 2, 2)


def test_batchnorm1d_3x3():
    # Each column is (c, c+3, c+6): mean c+3, biased variance (9+0+9)/3 = 6.
    m = nl.BatchNorm1d(3)
    y = m(X3).detach()
    z = 3 / math.sqrt(6 + 1e-5)
    expected = torch.tensor([[-z] * 3, [0.0] * 3, [z] * 3])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, torch.nn.BatchNorm1d(3)(X3).detach())
    # Running statistics after one step, momentum 0.1: mean 0.1*(4,5,6), var 0.9 + 0.1*9 (unbiased).
    torch.testing.assert_close(m.running_mean, torch.tensor([0.4, 0.5, 0.6]))
    torch.testing.assert_close(m.running_var, torch.full((3,), 0.9 + 0.1 * 9.0))
    assert m.num_batches_tracked.item() == 1


def test_layernorm_3x3():
    # Each row is (a, a+1, a+2): mean a+1, biased variance 2/3.
    y = nl.LayerNorm(3)(X3).detach()
    z = 1 / math.sqrt(2 / 3 + 1e-5)
    torch.testing.assert_close(y, torch.tensor([[-z, 0.0, z]] * 3))
    torch.testing.assert_close(y, torch.nn.LayerNorm(3)(X3).detach())


def test_rmsnorm_eps_1e8():
    y = nl.RMSNorm(3, eps=1e-8)(X3).detach()
    rms = (X3.double().square().mean(1, keepdim=True) + 1e-8).sqrt()
    torch.testing.assert_close(y, (X3.double() / rms).float())
    # The first row by hand: rms = sqrt(14/3).
    torch.testing.assert_close(y[0], torch.tensor([1.0, 2.0, 3.0]) / math.sqrt(14 / 3))
    torch.testing.assert_close(y, torch.nn.RMSNorm(3, eps=1e-8)(X3).detach())


def test_instancenorm2d_2x4x2x2():
    # Every (sample, channel) holds (k, k+1, k+2, k+3): mean k+1.5, biased variance 1.25.
    y = nl.InstanceNorm2d(4)(X2422)
    z = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25 + 1e-5)
    torch.testing.assert_close(y.reshape(8, 4), z.expand(8, 4))
    torch.testing.assert_close(y, torch.nn.InstanceNorm2d(4)(X2422))


def test_groupnorm2_2x4x2x2():
    # Each group is 2 channels x 4 positions = 8 consecutive values: mean k+3.5, variance 5.25.
    y = nl.GroupNorm(2, 4)(X2422).detach()
    z = (torch.arange(8.0) - 3.5) / math.sqrt(5.25 + 1e-5)
    torch.testing.assert_close(y.reshape(4, 8), z.expand(4, 8))
    torch.testing.assert_close(y, torch.nn.GroupNorm(2, 4)(X2422).detach())


def test_groupnorm_ends_are_layernorm_and_instancenorm():
    x = torch.randn(3, 6, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    F = normlab.functional
    torch.testing.assert_close(F.group_norm(x, 1), F.layer_norm(x, x.shape[1:]))
    torch.testing.assert_close(F.group_norm(x, 6), F.instance_norm(x))


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_mean_fp32_beats_one_pass_error(offset):
    # fp32 rounding of the mean alone is ulp(offset)/2 = 4.9e-4 at 1e4 and 3.9e-3 at 1e5; the
    # corrected two-pass keeps the output within 1e-5 of float64 regardless.
    # (normlab's kernels forced: auto hands a call this small to ATen, whose error is torch's)
    x = offset + torch.randn(16, 1000, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.layer_norm(x.double(), [1000])
    with normlab.backend("cpu" if "cpu" in normlab.available_backends() else "reference"):
        err = (normlab.functional.layer_norm(x, 1000).double() - ref).abs().max().item()
    assert err < 1e-5, err


def test_demo_prints_every_norm_and_agrees_with_torch():
    out = io.StringIO()
    worst = demo(out)
    text = out.getvalue()
    for name in ("BatchNorm1d", "LayerNorm", "RMSNorm", "InstanceNorm1d", "GroupNorm"):
        assert name in text
    assert "-1.2247" in text and "0.4629" in text
    assert worst < 1e-6


def test_cli_demo_exit_code(capsys):
    assert main(["demo"]) == 0
    assert "max |normlab - torch|" in capsys.readouterr().out
