"""``normlab bench``: the CLI and module API on tiny shapes (--quick, no torch.compile), the
minimal-bytes arithmetic, and clear errors. Speeds are never asserted, only that every cell and
peer is there with a positive finite time. NORMLAB_SLOW=1 adds one run with torch.compile."""
import csv
import io
import math
import os
import sys

import pytest

from normlab import bench
from normlab.bench.harness import Cell
from normlab.cli import main


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _table_rows(md):
    return [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| norm ")]


def test_cli_quick_writes_a_row_per_cell_and_peer(tmp_path, capsys):
    assert main(["bench", "--quick", "--no-compile", "--no-progress", "--rounds", "2",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "bench.md").read_text()
    assert md.strip() in printed
    cells = bench.Config(quick=True, compile=False).cells()
    # 3 channel norms x 2 layouts x 1 shape + 2 row norms x 1 shape, each fwd and fwd+bwd
    assert len(cells) == 16
    rows = _rows((tmp_path / "bench.csv").read_text())
    assert len(rows) == len(cells) * 2
    seen = {(r["norm"], r["layout"], r["dtype"], r["shape"], r["pass"], r["peer"]) for r in rows}
    want = {(c.norm, c.layout, c.dtype, c.shape_str, c.pass_, p)
            for c in cells for p in ("normlab", "torch")}
    assert seen == want
    for r in rows:
        assert math.isfinite(float(r["ms"])) and float(r["ms"]) > 0, r
        assert float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0 and not r["error"]
    assert {r["rounds"] for r in rows} == {"2"}

    assert md.startswith("# normlab bench")
    assert "torch threads:" in md and "copy bandwidth:" in md
    assert "| norm | layout | dtype | shape | pass | normlab ms | torch ms |" in md
    assert "compile ms" not in md
    assert len(_table_rows(md)) == len(cells)
    assert "geometric-mean speedup of normlab" in md and "over torch eager (16 cells)" in md


def test_module_api_subset():
    config = bench.Config(norms=["rms_norm", "batch_norm"], layouts=["channels_last"],
                          dtypes=["float32", "bf16"], passes=["fwd+bwd"], compile=False,
                          quick=True, rounds=2, progress=False)
    assert config.dtypes == ("float32", "bfloat16")  # aliases canonicalized
    results = bench.run(config)
    assert [r.peer for r in results] == ["normlab", "torch"] * 4
    assert {(r.cell.norm, r.cell.dtype) for r in results} == {
        (n, d) for n in ("rms_norm", "batch_norm") for d in ("float32", "bfloat16")}
    for r in results:
        assert r.ms > 0 and math.isfinite(r.ms) and r.ms_min <= r.ms
        assert r.roofline == pytest.approx(r.gbps / r.copy_gbps)
    for r in results:
        if r.peer == "normlab":
            assert r.max_abs_diff < (0.1 if r.cell.dtype == "bfloat16" else 1e-4)
    md = bench.to_markdown(results, copy_gbps=12.5)
    assert "copy bandwidth 12.5 GB/s" in md and len(_table_rows(md)) == 4
    rows = _rows(bench.to_csv(results))
    assert len(rows) == 8 and {r["layout"] for r in rows} == {"channels_last", "rows"}


def test_minimal_bytes_by_hand():
    # LayerNorm fwd+bwd on 4096x1024 fp32: read x, write y; read x, dy, write dx = 5 x 4 bytes
    cell = Cell("layer_norm", "rows", "float32", (4096, 1024), "fwd+bwd")
    assert cell.bytes == 5 * 4 * 4096 * 1024 == 83_886_080
    # BatchNorm training bf16: 3 x 2 bytes forward, 8 x 2 bytes forward+backward
    assert Cell("batch_norm", "nchw", "bfloat16", (32, 64, 56, 56), "fwd").bytes == 38_535_168
    assert bench.minimal_bytes("batch_norm", "fwd+bwd", 1000, 2) == 16_000
    assert bench.minimal_bytes("group_norm", "fwd", 1000, 4) == 8_000
    # 83.9 MB in 10 ms = 8.39 GB/s, 0.42 of a 20 GB/s copy
    r = bench.Result(cell=cell, peer="normlab", impl="reference", ms=10.0, ms_min=9.0,
                     rounds=3, reps=1, copy_gbps=20.0, threads=2)
    assert r.gbps == pytest.approx(8.388608)
    assert r.roofline == pytest.approx(0.4194304)


def test_speedups_and_geomean():
    cell = Cell("rms_norm", "rows", "float32", (8, 8), "fwd")
    cell2 = Cell("rms_norm", "rows", "float32", (8, 16), "fwd")

    def res(c, peer, ms):
        return bench.Result(cell=c, peer=peer, impl="x", ms=ms, ms_min=ms, rounds=1, reps=1,
                            copy_gbps=10.0, threads=1)

    results = [res(cell, "normlab", 1.0), res(cell, "torch", 2.0),
               res(cell2, "normlab", 4.0), res(cell2, "torch", 2.0)]
    assert bench.speedups(results, "torch") == [2.0, 0.5]
    assert bench.geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert "1.00x over torch eager (2 cells)" in bench.summary(results, 10.0)
    assert "torch.compile not run" in bench.summary(results, 10.0)


def test_unknown_norm_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--norms", "layer_norm,foo_norm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown norm 'foo_norm'" in err and "rms_norm" in err
    with pytest.raises(ValueError, match="unknown norm 'foo_norm'; known norms: batch_norm"):
        bench.Config(norms=["foo_norm"])


def test_other_bad_options_are_clear_errors(capsys):
    for argv, msg in [
        (["--dtypes", "float8"], "unknown dtype 'float8'"),
        (["--passes", "bwd"], "unknown pass 'bwd'"),
        (["--shapes", "3x4x5"], "bad shape '3x4x5'"),
        (["--rounds", "0"], "positive integer"),
        (["--norms", "batch_norm", "--shapes", "64x128"], "no 4-D (N, C, H, W) shape"),
        (["--backend", "nope"], "unknown normlab backend 'nope'"),
    ]:
        with pytest.raises(SystemExit):
            main(["bench", "--quick", "--no-progress", *argv])
        assert msg in capsys.readouterr().err, argv


def test_plain_progress_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    results = bench.run(bench.Config(norms=["layer_norm"], passes=["fwd"], compile=False,
                                     quick=True, rounds=1, copy_mib=8))
    assert len(results) == 2
    err = capsys.readouterr().err
    assert "[1/1" in err and "layer_norm rows float32 64x128 fwd" in err


def test_forced_backend_is_used_and_reported():
    results = bench.run(bench.Config(norms=["rms_norm"], passes=["fwd"], backend="torch",
                                     compile=False, quick=True, rounds=1, progress=False,
                                     copy_mib=8))
    ours = [r for r in results if r.peer == "normlab"]
    assert [r.impl for r in ours] == ["torch"] and ours[0].max_abs_diff == 0.0
    assert "normlab backend: torch" in bench.to_markdown(results)


@pytest.mark.skipif(os.environ.get("NORMLAB_SLOW") != "1", reason="torch.compile: NORMLAB_SLOW=1")
def test_compile_peer(tmp_path):
    config = bench.Config(norms=["rms_norm"], passes=["fwd", "fwd+bwd"], quick=True, rounds=2,
                          progress=False, copy_mib=8)
    results = bench.run(config)
    comp = [r for r in results if r.peer == "compile"]
    assert len(comp) == 2 and all(r.impl == "inductor" and not r.error for r in comp)
    assert all(r.compile_s > 0 and r.ms > 0 and math.isfinite(r.ms) for r in comp)
    md = bench.to_markdown(results)
    assert "| compile ms |" in md and "over torch.compile (2 cells)" in md
