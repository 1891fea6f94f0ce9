"""The lab's sequence-side experiments in tiny mode: the invariance table computed from the norms
(a real check of normlab.functional against the papers' Table 1), and the padding experiment's
result shape, determinism and resumability."""
from __future__ import annotations

import json
import math

import pytest

from normlab.lab.api import Context
from normlab.lab.experiments import invariance, load, padding


def _run(name, out, mode="tiny", seed=0):
    ctx = Context(name, out, mode=mode, seed=seed, progress=False)
    return load(name).run(ctx), ctx


def _check_shape(result, out):
    assert set(result) == {"title", "claims", "metrics", "figures"}
    json.dumps(result, allow_nan=False)  # JSON-able, no NaN
    assert result["claims"] and all(
        set(c) - {"why"} == {"claim", "holds", "evidence"} and isinstance(c["holds"], bool)
        and ("why" not in c or not c["holds"])  # an explanation only for what does not hold
        for c in result["claims"])
    assert result["figures"]
    for rel in result["figures"]:
        assert (out / rel).is_file()


@pytest.fixture(scope="module")
def invariance_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("invariance")
    result, ctx = _run("invariance", out)
    return out, result, ctx


def test_invariance_table_matches_the_papers(invariance_run):
    out, result, _ = invariance_run
    _check_shape(result, out)
    m = result["metrics"]
    assert set(m["table"]) == set(invariance.NORMS) == set(m["paper"])
    for norm in invariance.NORMS:
        assert set(m["table"][norm]) == set(invariance.PERTURBATIONS)
        assert m["table"][norm] == m["paper"][norm], norm
    # The paper's rows, spelled out here so a typo in PAPER cannot hide a wrong table.
    yes, no = True, False
    expected = {
        "BatchNorm": [yes, no, yes, yes, yes, no],
        "WeightNorm": [yes, no, yes, no, no, no],
        "LayerNorm": [yes, yes, no, yes, no, yes],
        "RMSNorm": [yes, no, no, yes, no, yes],
    }
    for norm, row in expected.items():
        assert [m["table"][norm][p] for p in invariance.PERTURBATIONS] == row, norm
    assert all(c["holds"] for c in result["claims"])
    # An unambiguous verdict: invariant cells at rounding level, the others far from it.
    assert m["largest_invariant_change"] < 1e-8
    assert m["smallest_non_invariant_change"] > 1e-2


def test_invariance_is_resumable_and_deterministic(invariance_run, tmp_path):
    out, result, _ = invariance_run
    again, ctx = _run("invariance", out)
    assert ctx.computed == [] and again["metrics"] == result["metrics"]
    fresh, _ = _run("invariance", tmp_path)
    assert fresh["metrics"] == result["metrics"]


@pytest.fixture(scope="module")
def padding_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("padding")
    result, ctx = _run("padding", out)
    return out, result, ctx


def test_padding_result_shape(padding_run):
    out, result, ctx = padding_run
    _check_shape(result, out)
    acc = result["metrics"]["accuracy"]
    keys = {"0", "0.25", "0.5", "0.75"}
    assert set(acc) == {"BatchNorm", "MaskedBatchNorm", "LayerNorm", "RMSNorm"}
    for norm, row in acc.items():
        assert set(row) == keys, norm
        assert all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in row.values()), (norm, row)
    measured = result["metrics"]["pad_fraction_measured"]
    assert set(measured) == keys
    for k, v in measured.items():
        assert abs(v - float(k)) < 0.03, (k, v)
    assert set(result["metrics"]["bn_stat_distance"]) == keys
    assert len(ctx.computed) == 16  # 4 norms x 4 padded fractions x 1 seed


def test_padding_is_resumable(padding_run):
    out, result, _ = padding_run
    again, ctx = _run("padding", out)
    assert ctx.computed == []
    assert again["metrics"] == result["metrics"]


def test_padding_is_deterministic_for_a_seed(padding_run, tmp_path):
    _, result, _ = padding_run
    fresh, _ = _run("padding", tmp_path)
    assert fresh["metrics"] == result["metrics"]
    assert padding.PAD_FRACTIONS == (0.0, 0.25, 0.5, 0.75)


def test_padding_only_changes_naive_batchnorm():
    """The padding-independent norms compute the same function on the real tokens whatever the
    padding: the same training run, bit for bit, at p = 0 and p = 0.75 (tiny sizes)."""
    s = padding.Setting(steps=3, batch=4, width=4, test_batches=1, seeds=1)
    for norm in ("MaskedBatchNorm", "LayerNorm", "RMSNorm"):
        a = padding._train(norm, 0.0, s, seed=1, data_seed=2)
        b = padding._train(norm, 0.75, s, seed=1, data_seed=2)
        assert abs(a["final_loss"] - b["final_loss"]) < 1e-5, norm
    a = padding._train("BatchNorm", 0.0, s, seed=1, data_seed=2)
    b = padding._train("BatchNorm", 0.75, s, seed=1, data_seed=2)
    assert abs(a["final_loss"] - b["final_loss"]) > 1e-4
