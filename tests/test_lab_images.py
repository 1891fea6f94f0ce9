"""The lab's image experiments (batch_size, groups, sigmoid) in tiny mode, and their models."""
from __future__ import annotations

import json
import math

import pytest
import torch

import normlab.nn
from normlab.lab import api, models
from normlab.lab.experiments import load

EXPERIMENTS = ("batch_size", "groups", "sigmoid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each experiment run twice in separate folders, then again in the first folder."""
    out = {}
    for name in EXPERIMENTS:
        module = load(name)
        a, b = tmp_path_factory.mktemp(f"{name}-a"), tmp_path_factory.mktemp(f"{name}-b")
        first = api.Context(name, a, mode="tiny", seed=0, progress=False)
        second = api.Context(name, b, mode="tiny", seed=0, progress=False)
        again = api.Context(name, a, mode="tiny", seed=0, progress=False)
        out[name] = [(ctx, module.run(ctx)) for ctx in (first, second, again)]
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_result_schema(runs, name):
    module = load(name)
    assert module.NAME == name and module.TITLE and module.DESCRIPTION.startswith("<p>")
    ctx, result = runs[name][0]
    assert set(result) == {"title", "claims", "metrics", "figures"}
    assert result["title"] == module.TITLE
    assert result["claims"]
    for c in result["claims"]:
        assert isinstance(c["holds"], bool) and c["claim"] and c["evidence"]
    assert result["figures"]
    for rel in result["figures"]:
        assert (ctx.out / rel).is_file() and (ctx.out / rel).stat().st_size > 0
    assert "paper" in result["metrics"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result, "plain JSON, no NaN"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_deterministic_and_resumable(runs, name):
    (first, a), (_, b), (again, c) = runs[name]
    assert first.computed, "the first run computes its runs"
    assert a["metrics"] == b["metrics"], "same seed, same numbers"
    assert again.computed == [], "a second run in the same folder loads every run"
    assert c["metrics"] == a["metrics"]


def test_batch_size_metrics(runs):
    m = runs["batch_size"][0][1]["metrics"]
    assert set(m["val_error"]) == {"BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm", "None"}
    for norm, by_batch in m["val_error"].items():
        assert set(by_batch) == {"2", "4", "8", "16", "32"}, norm
        for e in by_batch.values():
            assert math.isfinite(e) and 0 <= e <= 1
    assert set(m["paper"]["val_error"]) == {"BatchNorm", "GroupNorm"}


def test_groups_metrics(runs):
    m = runs["groups"][0][1]["metrics"]
    assert list(m["val_error"]) == ["1", "2", "4", "8", "16", "32"]
    assert all(math.isfinite(e) and 0 <= e <= 1 for e in m["val_error"].values())


def test_sigmoid_metrics(runs):
    m = runs["sigmoid"][0][1]["metrics"]
    for label in ("without BatchNorm", "with BatchNorm"):
        assert len(m[label]["val_accuracy"]) == len(m["steps"])
        assert set(m[label]["unit_percentiles"]) == {"15", "50", "85"}
        q = m[label]["unit_percentiles"]
        assert all(lo <= mid <= hi for lo, mid, hi in zip(q["15"], q["50"], q["85"]))


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("members", [1, 3])
def test_make_cnn(norm, members):
    torch.manual_seed(0)
    model = models.make_cnn(norm, 10, in_channels=2, width=16, groups=4, members=members)
    assert model(torch.randn(5, 2 * members, 8, 8)).shape == (5, 10 * members)
    assert model(torch.randn(3, 2 * members, 12, 9)).shape == (3, 10 * members)
    kinds = {type(m) for m in model.modules()}
    expected = {"BatchNorm": normlab.nn.BatchNorm2d, "GroupNorm": normlab.nn.GroupNorm,
                "LayerNorm": normlab.nn.GroupNorm, "InstanceNorm": normlab.nn.InstanceNorm2d}
    if norm in expected:
        assert expected[norm] in kinds
    else:
        assert not any(issubclass(k, torch.nn.modules.batchnorm._NormBase) for k in kinds)


def _member_0(alone: torch.nn.Module, side_by_side: torch.nn.Module):
    """(tensor of ``alone``, the same tensor of member 0 of ``side_by_side``) pairs."""
    for a, b in zip(alone, side_by_side):
        if isinstance(b, models.MemberNorms):
            b = b.parts[0]
        tensors = dict(list(b.named_parameters()) + list(b.named_buffers()))
        for name, p in list(a.named_parameters()) + list(a.named_buffers()):
            if p.dim():
                yield p, tensors[name][:len(p)]


@pytest.mark.parametrize("norm, norms, hidden", [
    ("BatchNorm", ["BatchNorm", "GroupNorm"], None),
    ("InstanceNorm", ["InstanceNorm", "LayerNorm"], None),
    ("None", ["None", "None"], None),
    ("BatchNorm", ["BatchNorm", "GroupNorm"], 16),     # the batch_size experiment's head
    ("InstanceNorm", ["InstanceNorm", "LayerNorm"], 16)])
def test_members_train_as_separate_models(norm, norms, hidden):
    """Member 0 of a side-by-side model (same norm or another beside it) trains exactly as
    the same CNN alone would."""
    from normlab.lab.datasets import images

    data = models.first(images(), 64)
    stages = 3 if hidden is None else 2
    torch.manual_seed(0)
    alone = models.make_cnn(norm, 10, width=8, groups=4, hidden=hidden, stages=stages)
    torch.manual_seed(1)
    pair = models.make_cnn(norms, 10, width=8, groups=4, hidden=hidden, stages=stages)
    with torch.no_grad():
        for p, q in _member_0(alone, pair):
            q.copy_(p)
    # One epoch: member 0 is shuffled by the generator's first permutation, as alone.
    with models.threads():
        a = models.train_classifier(alone, data, batch_size=4, lr=0.05, epochs=1, seed=3)
        b = models.train_classifier(pair, data, batch_size=4, lr=0.05, epochs=1, seed=3,
                                    members=2)
    assert a["val_errors"][0] == b["val_errors"][0]
    assert a["history"][0] == pytest.approx(b["history"][0], rel=1e-5)
    for p, q in _member_0(alone, pair):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)


def test_hidden_head():
    """The normalized hidden layer: one value per image and unit; InstanceNorm leaves it
    unnormalized (it would normalize a single value)."""
    model = models.make_cnn(list(models.NORMS), 10, width=8, groups=4, hidden=16, stages=2)
    assert model(torch.randn(3, 5, 8, 8)).shape == (3, 50)
    head = model[-4]
    assert isinstance(head, models.MemberNorms) and head.sizes == [16, 16, 16, 32]
    assert isinstance(head.parts[0], normlab.nn.BatchNorm2d) and head.parts[0].num_features == 16
    assert isinstance(head.parts[3], torch.nn.Identity)  # InstanceNorm's and None's members
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == 2


def test_layernorm_is_groupnorm_one():
    norm = models.make_norm("LayerNorm", 6)
    assert isinstance(norm, normlab.nn.GroupNorm) and norm.num_groups == 1
    with pytest.raises(ValueError, match="unknown norm"):
        models.make_norm("WeightNorm", 6)


def test_mean_se():
    p, se = models.mean_se([0.1, 0.2, 0.3], 100)
    assert p == pytest.approx(0.2) and se == pytest.approx(0.1 / math.sqrt(3))
    p, se = models.mean_se([0.0], 400)  # one run without mistakes: counting error, not 0
    assert p == 0 and se > 0


def test_threads_restored():
    before = torch.get_num_threads()
    with models.threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
