"""The lab's smoothness and speed experiments: the smoothness measurements on quadratics with
known answers, and each experiment end to end in tiny mode (result shape, metrics, determinism
for a seed, resumability)."""
import math

import pytest
import torch

from normlab.lab import api
from normlab.lab.experiments import smoothness, speed

# --- the measurement helpers on cases with closed forms -----------------------------------------


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 10.0, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T, q, eig


def _quadratic(a):
    return lambda ps: 0.5 * ps[0] @ a @ ps[0]


def test_along_gradient_on_a_quadratic_matches_the_closed_form():
    a, _, _ = _spd(6, 0)
    x = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    etas = [0.01, 0.05, 0.2]
    got = smoothness.along_gradient(_quadratic(a), [x], etas)
    g = a @ x
    want_losses = [(0.5 * (x - e * g) @ a @ (x - e * g)).item() for e in etas]
    want_dists = [e * (a @ g).norm().item() for e in etas]
    assert got["loss"] == pytest.approx((0.5 * x @ a @ x).item(), rel=1e-12)
    assert got["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)
    assert got["losses"] == pytest.approx(want_losses, rel=1e-12)
    assert got["grad_dists"] == pytest.approx(want_dists, rel=1e-10)
    assert got["loss_range"] == pytest.approx(max(want_losses) - min(want_losses), rel=1e-10)
    assert got["grad_pred"] == pytest.approx(max(want_dists), rel=1e-10)
    # beta = ||A g|| / ||g||: between the extreme eigenvalues, and not A's largest one here
    beta = ((a @ g).norm() / g.norm()).item()
    assert got["beta"] == pytest.approx(beta, rel=1e-10)
    assert got["betas"] == pytest.approx([beta] * 3, rel=1e-10)


@pytest.mark.parametrize("k", [0, 3, 5])
def test_effective_beta_along_an_eigenvector_is_its_eigenvalue(k):
    a, q, eig = _spd(6, 2)
    x = 3.0 * q[:, k]  # the gradient A x is along the eigenvector: beta is its eigenvalue
    got = smoothness.along_gradient(_quadratic(a), [x], [0.02, 0.1])
    assert got["beta"] == pytest.approx(eig[k].item(), rel=1e-9)


def test_along_gradient_splits_the_step_over_several_parameters():
    """Two parameter tensors hold one vector: the same answer as one tensor."""
    a, _, _ = _spd(5, 3)
    x = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = smoothness.along_gradient(_quadratic(a), [x], [0.03, 0.3])
    split = smoothness.along_gradient(lambda ps: _quadratic(a)([torch.cat(ps)]),
                                      [x[:2].clone(), x[2:].clone()], [0.03, 0.3])
    for key in ("losses", "grad_dists", "betas"):
        assert split[key] == pytest.approx(whole[key], rel=1e-12)


def test_ics_of_a_two_layer_linear_net_matches_the_closed_form():
    g = torch.Generator().manual_seed(5)
    w1, w2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 4), (2, 3)))
    x, t = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(2, generator=g,
                                                                         dtype=torch.float64)
    loss_of = lambda ps: 0.5 * ((ps[1] @ ps[0] @ x - t) ** 2).sum()
    lr = 0.1
    r = w2 @ w1 @ x - t
    g1, g2 = torch.outer(w2.T @ r, x), torch.outer(r, w1 @ x)
    w1n, w2n = w1 - lr * g1, w2 - lr * g2
    g2_after = torch.outer(w2 @ w1n @ x - t, w1n @ x)  # layer 2's gradient after layer 1 moved
    got = smoothness.ics(loss_of, [w1, w2], [w1n, w2n], 1)
    assert got["l2"] == pytest.approx((g2 - g2_after).norm().item(), rel=1e-10)
    assert got["rel_l2"] == pytest.approx(((g2 - g2_after).norm() / g2.norm()).item(), rel=1e-10)
    cos = ((g2 * g2_after).sum() / (g2.norm() * g2_after.norm())).item()
    assert got["cosine"] == pytest.approx(cos, rel=1e-10)
    assert got["l2"] > 1e-3  # the case is not trivial
    assert smoothness.ics(loss_of, [w1, w2], [w1n, w2n], 1, grad=g2) == pytest.approx(got)
    first = smoothness.ics(loss_of, [w1, w2], [w1n, w2n], 0)  # no earlier layer: no shift
    assert first["l2"] == 0 and first["cosine"] == pytest.approx(1.0)


def test_model_loss_is_the_training_loss_and_leaves_running_stats_alone():
    torch.manual_seed(0)
    model = smoothness.make_net("BatchNorm", (1, 8, 8), 10, ((4,), (8,)), 8)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_of = smoothness.model_loss(model, x, y)
    params = [p.detach() for p in model.parameters()]
    value = loss_of(params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    want = torch.nn.functional.cross_entropy(model(x), y)
    assert value.item() == pytest.approx(want.item(), rel=1e-6)


def test_noise_changes_every_step_with_nonzero_mean_and_uses_its_mean_in_eval():
    noise = smoothness.ChannelNoise(1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(2, 1000, 3, 3)
    noise.resample(gen)
    a = noise(x)
    noise.resample(gen)
    b = noise(x)
    assert not torch.equal(a, b)
    assert a.mean().item() == pytest.approx(1.25 + 0.5, abs=0.1)  # E[scale] + E[shift]
    assert a[0, :, 0, 0].std().item() > 0.3
    noise.eval()
    assert torch.allclose(noise(x), torch.full_like(x, 1.75))


# --- the experiments end to end, tiny -----------------------------------------------------------


def _run(module, out):
    ctx = api.Context(module.NAME, out, mode="tiny", seed=0, progress=False)
    return ctx, module.run(ctx)


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoothness")
    ctx, result = _run(smoothness, out)
    return out, ctx, result


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    ctx, result = _run(speed, out)
    return out, ctx, result


def _check_result(module, out, ctx, result):
    assert set(result) >= {"title", "claims", "metrics", "figures"}
    assert result["title"] == module.TITLE
    assert module.DESCRIPTION.startswith("<p>") and module.DESCRIPTION.endswith("</p>")
    assert result["claims"]
    for c in result["claims"]:
        assert set(c) - {"why"} == {"claim", "holds", "evidence"}
        assert "why" not in c or (not c["holds"] and c["why"].strip())
        assert isinstance(c["holds"], bool) and c["claim"] and c["evidence"].strip()
    assert result["figures"]
    for f in result["figures"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 1000
    assert ctx.computed  # a fresh folder: every run computed


def _finite(v, where):
    if isinstance(v, dict):
        assert v, f"{where} is empty"
        for k, x in v.items():
            _finite(x, f"{where}[{k}]")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _finite(x, f"{where}[{i}]")
    else:
        assert isinstance(v, (int, float)) and math.isfinite(v), f"{where} = {v!r}"


def test_smoothness_result(smooth):
    out, ctx, result = smooth
    _check_result(smoothness, out, ctx, result)
    m = result["metrics"]
    for part in (m, m["high_lr"]):
        for key in ("loss_range", "grad_pred", "beta", "train_loss", "val_acc"):
            assert set(part[key]) == set(smoothness.NETS), key
            _finite(part[key], key)
            assert all("0" in part[key][n] for n in smoothness.NETS)  # measured from step 0
        for net in smoothness.NETS:
            assert set(part["ics"][net]) >= {"l2", "cosine"}
            _finite(part["ics"][net]["l2"], "ics l2")
            assert -1 <= part["ics"][net]["cosine"] <= 1
            assert all(0 <= a <= 1 for a in part["val_acc"][net].values())
            assert part["diverged_at"][net] is None
    assert m["lr_high"] > m["lr"]
    assert len(result["claims"]) == 6


def test_smoothness_is_deterministic_for_a_seed(smooth, tmp_path):
    _, _, first = smooth
    _, again = _run(smoothness, tmp_path)
    assert again["metrics"] == first["metrics"]
    assert [c["holds"] for c in again["claims"]] == [c["holds"] for c in first["claims"]]


def test_smoothness_resumes_without_recomputing(smooth):
    out, _, first = smooth
    ctx, again = _run(smoothness, out)
    assert ctx.computed == []
    assert again["metrics"] == first["metrics"]


def test_speed_result(fast):
    out, ctx, result = fast
    _check_result(speed, out, ctx, result)
    m = result["metrics"]
    assert set(m["time_ms"]) == set(speed.NORMS)
    for norm in speed.NORMS:
        assert set(m["time_ms"][norm]) == {"normlab", "torch"}
        shapes = set(m["time_ms"][norm]["normlab"])
        assert shapes and shapes == set(m["time_ms"][norm]["torch"]) == set(m["speedup"][norm])
        for impl in ("normlab", "torch"):
            assert all(v > 0 for v in m["time_ms"][norm][impl].values())
    # the channel norms run on both layouts
    assert {k.split()[-1] for k in m["time_ms"]["GroupNorm"]["torch"]} == {"nchw",
                                                                           "channels_last"}
    for key in ("time_ms", "speedup", "rms_vs_layer", "first_call_s", "max_abs_diff"):
        _finite(m[key], key)
    assert set(m["rms_vs_layer"]) == {"normlab", "torch"}
    assert all(d < 1e-4 for s in m["max_abs_diff"].values() for d in s.values())
    # the speedups are ratios of the medians of the same run
    for norm, by in m["speedup"].items():
        for shape, r in by.items():
            t = m["time_ms"][norm]
            assert r == pytest.approx(t["torch"][shape] / t["normlab"][shape])
    assert len(result["claims"]) == 2 + len(speed.NORMS)


def test_speed_resumes_without_remeasuring(fast):
    out, _, first = fast
    ctx, again = _run(speed, out)
    assert ctx.computed == []
    assert again["metrics"] == first["metrics"]
