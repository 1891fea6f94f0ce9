"""``normlab bench --dispatch``: the grid, the choice rule, the table it writes and the merge of
runs. (No timing is asserted: the ratios of a smoke run are whatever this machine gives.)"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from normlab.bench import dispatch
from normlab.cli import main
from normlab.kernels import auto


def test_grid_covers_every_table_cell_with_two_shapes_per_class():
    grid = dispatch.cells()
    keys = {(c.norm, c.layout, c.dtype, c.pass_) for c in grid}
    assert len(keys) == 16 * 4 * 2  # (norm, layout) pairs x dtypes x passes
    for c in grid:
        shape = c.shape
        n = torch.Size(shape).numel()
        k = auto.size_class(n)
        assert k == c.size_class, (c, shape, k)  # each shape lies in its class
        if c.norm == "group_norm":
            assert shape[1] % dispatch.GROUPS == 0
        if c.norm.startswith("instance"):
            assert n // (shape[0] * shape[1]) > 1  # instance statistics need 2 values
    assert {c.variant for c in grid} == {0, 1}


def test_choice_rule():
    assert dispatch.choose([1.3, 1.1]) == auto.KERNELS
    assert dispatch.choose([0.95, 1.2]) == auto.KERNELS  # geometric mean 1.07, none below 0.9
    assert dispatch.choose([0.85, 2.0]) == auto.ATEN  # one shape much slower on the kernels
    assert dispatch.choose([0.99, 1.0]) == auto.ATEN


def test_smoke_run_writes_csv_markdown_and_a_table(tmp_path, capsys):
    table = tmp_path / "table.json"
    code = main(["bench", "--dispatch", "--quick", "--dtypes", "float32", "--dispatch-norms",
                 "rms_norm,batch_norm", "--rounds", "1", "--no-progress", "--out",
                 str(tmp_path / "d.csv"), "--table", str(table)])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    # rms_norm (rows) and batch_norm (3 layouts), 2 passes, 2 classes, 2 shapes each
    assert len(rows) == (1 + 3) * 2 * 2 * 2
    assert all(float(r["kernels_ms"]) > 0 and float(r["aten_ms"]) > 0 for r in rows)
    md = (tmp_path / "d.md").read_text()
    assert "### float32, fwd" in md and "| rms_norm | rows |" in md
    data = json.loads(table.read_text())
    assert set(data["choices"]) == {f"{n}/{lay}/float32/{p}" for n, lays in
                                    (("rms_norm", ["rows"]),
                                     ("batch_norm", ["nchw", "channels_last", "nc"]))
                                    for lay in lays for p in ("fwd", "train")}
    loaded = auto.load_table(table)  # a table auto can read
    assert all(len(v) == 8 for v in loaded.values())
    # merging the run with itself decides the same (the geometric mean of equal ratios)
    merged = dispatch.from_csv([str(tmp_path / "d.csv")] * 2)
    assert dispatch.choices(merged) == dispatch.choices(dispatch.from_csv([str(tmp_path / "d.csv")]))
    assert "wrote" in capsys.readouterr().out


def test_from_csv_merges_runs_by_geometric_mean(tmp_path):
    header = ["norm", "layout", "dtype", "pass", "size_class", "variant", "shape",
              "kernels_ms", "aten_ms", "aten_over_kernels", "rounds"]
    for name, (k, a) in (("a", (1.0, 4.0)), ("b", (4.0, 1.0))):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerow(["layer_norm", "rows", "float32", "fwd", 3, 0, "128x1024", k, a, a / k, 7])
    (t,) = dispatch.from_csv([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert t.ratio == pytest.approx(1.0) and t.rounds == 14


def test_dispatch_rejects_kernel_bench_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--dispatch", "--shapes", "64x128"])
    assert "cannot be used with --dispatch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--table", "t.json"])
    assert "--dispatch" in capsys.readouterr().err


def test_recheck_times_only_the_close_classes():
    grid = dispatch.cells(norms=["rms_norm"], dtypes=["float32"], passes=["fwd"])
    ratios = {0: (1.0, 3.0), 1: (3.0, 3.0), 2: (0.5, 0.5), 3: (0.85, 0.4)}
    timings = [dispatch.Timing(c, 1.0, ratios.get(c.size_class, (2.0, 2.0))[c.variant], 7)
               for c in grid]
    close = dispatch.close_cells(timings)
    # classes 0 and 3 have a ratio within the band: both their shapes, nothing else
    assert sorted({(c.size_class, c.variant) for c in close}) == [(0, 0), (0, 1), (3, 0),
                                                                   (3, 1)]


def test_merge_takes_the_median_run_of_three(tmp_path):
    cell = dispatch.cells(norms=["rms_norm"], dtypes=["float32"], passes=["fwd"])[0]
    paths = []
    for i, aten in enumerate((1.2, 1.3, 40.0)):  # the third run disturbed: ATen 40x slower
        p = tmp_path / f"r{i}.csv"
        dispatch.to_csv([dispatch.Timing(cell, 1.0, aten, 7)], str(p))
        paths.append(str(p))
    (merged,) = dispatch.from_csv(paths)
    assert merged.ratio == pytest.approx(1.3) and merged.rounds == 21
    (two,) = dispatch.from_csv(paths[:2])  # two runs: the geometric mean
    assert two.ratio == pytest.approx((1.2 * 1.3) ** 0.5)
