"""``normlab bench``: the CLI and module API on tiny shapes (--quick, no torch.compile), the
minimal-bytes arithmetic, and clear errors; the GPU run's pieces that run without a GPU (presets,
peers, the CUDA clock with a stand-in ``torch.cuda``, the device columns, merged CSVs, the
issue-4 targets). Speeds are never asserted, only that every cell and peer is there with a
positive finite time. NORMLAB_SLOW=1 adds one run with torch.compile."""
import csv
import dataclasses
import io
import math
import os
import sys
import time

import pytest
import torch

from normlab import bench
from normlab.bench import env, peers, runner, timing
from normlab.bench.spec import Cell
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
    # per element; per feature: read w, b; read w, write dw, db = 5 x 4 bytes
    cell = Cell("layer_norm", "rows", "float32", (4096, 1024), "fwd+bwd")
    assert cell.bytes == 5 * 4 * 4096 * 1024 + 5 * 4 * 1024 == 83_906_560
    assert Cell("layer_norm", "rows", "float32", (4096, 1024), "fwd").bytes == (
        2 * 4 * 4096 * 1024 + 2 * 4 * 1024)
    # backward alone: read x, dy, write dx; RMSNorm: read w, write dw
    assert Cell("rms_norm", "rows", "bfloat16", (8, 64), "bwd").bytes == 3 * 2 * 512 + 2 * 2 * 64
    # BatchNorm training bf16: 3 x 2 bytes forward (+ w, b and the running stats read and
    # written: 6 per channel), 8 x 2 bytes forward+backward (+ 9 per channel)
    assert Cell("batch_norm", "nchw", "bfloat16", (32, 64, 56, 56), "fwd").bytes == (
        38_535_168 + 6 * 2 * 64)
    assert bench.minimal_bytes("batch_norm", "fwd+bwd", 1000, 2) == 16_000
    assert bench.minimal_bytes("batch_norm", "fwd+bwd", 1000, 2, params=10) == 16_000 + 9 * 20
    assert bench.minimal_bytes("group_norm", "fwd", 1000, 4) == 8_000
    assert bench.minimal_bytes("group_norm", "bwd", 1000, 4, params=8) == 12_000 + 3 * 32
    # 83.9 MB in 10 ms = 8.39 GB/s, 0.42 of a 20 GB/s copy
    r = bench.Result(cell=cell, peer="normlab", impl="reference", ms=10.0, ms_min=9.0,
                     rounds=3, reps=1, copy_gbps=20.0, threads=2)
    assert r.gbps == pytest.approx(8.390656)
    assert r.roofline == pytest.approx(0.4195328)


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
        (["--passes", "back"], "unknown pass 'back'"),
        (["--peers", "eager,onnx"], "unknown peer 'onnx'"),
        (["--preset", "vit"], "invalid choice: 'vit'"),
        (["--preset", "llm", "--shapes", "64x128"], "not allowed with argument"),
        (["--preset", "llm", "--norms", "batch_norm"], "no 4-D (N, C, H, W) shape"),
        (["--time-budget", "0"], "positive number of seconds"),
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
    config = bench.Config(norms=["rms_norm"], passes=["fwd", "bwd", "fwd+bwd"], quick=True,
                          rounds=2, progress=False, copy_mib=8)
    results = bench.run(config)
    comp = [r for r in results if r.peer == "compile"]
    assert len(comp) == 3 and all(r.impl == "inductor" and not r.error for r in comp)
    assert all(r.compile_s > 0 and r.ms > 0 and math.isfinite(r.ms) for r in comp)
    md = bench.to_markdown(results)
    assert "| compile ms |" in md and "over torch.compile (3 cells)" in md


# --- the GPU run's pieces, without a GPU ---------------------------------------------------

_FAST = dict(quick=True, rounds=1, progress=False, copy_mib=8, backend="torch", compile=False)


def test_device_cuda_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "cannot use CUDA here" in err and "--device cpu" in err
    with pytest.raises(ValueError, match="cannot use CUDA here"):
        bench.Config(device="cuda")
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_presets_expand_to_their_cells(monkeypatch):
    llm = bench.Config(preset="llm", dtypes="bfloat16,float32", compile=False)
    assert llm.norms == ("layer_norm", "rms_norm") and llm.passes == ("fwd", "fwd+bwd")
    cells = llm.cells()
    assert len(cells) == 2 * 2 * 4 * 2  # dtypes x norms x shapes x passes
    assert {c.shape for c in cells} == {(4096, 1024), (4096, 4096), (16384, 8192), (2048, 65536)}
    assert [c.dtype for c in cells[:16]] == ["bfloat16"] * 16  # dtype by dtype, as given
    assert {c.layout for c in cells} == {"rows"}
    cnn = bench.Config(preset="cnn", compile=False, passes="fwd")
    assert cnn.norms == ("batch_norm", "instance_norm", "group_norm")
    cells = cnn.cells()
    assert len(cells) == 3 * 3 * 2
    assert {(c.shape, c.layout) for c in cells} == {
        (s, lay) for s in ((32, 64, 56, 56), (8, 256, 28, 28), (16, 512, 14, 14))
        for lay in ("nchw", "channels_last")}
    assert {c.groups for c in cells if c.norm == "group_norm"} == {32}
    both = bench.Config(preset="all", compile=False)
    assert both.norms == bench.NORMS and len(both.cells()) == (3 * 3 * 2 + 2 * 4) * 2
    with pytest.raises(ValueError, match="--preset or --shapes, not both"):
        bench.Config(preset="llm", shapes="64x128")
    # the CPU defaults are unchanged; on CUDA the passes are fwd and bwd, the copy 1 GiB
    assert bench.Config().cells() == bench.Config(shapes=bench.DEFAULT_SHAPES).cells()
    assert bench.Config().peers == ("normlab", "torch", "compile")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = bench.Config(device="cuda", preset="all", peers="eager,compile")
    assert gpu.passes == ("fwd", "bwd") and gpu.copy_mib == 1024 and gpu.min_time_s == 1e-3
    assert gpu.peers == ("normlab", "torch", "compile")


def _no_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel -> ImportError
    peers.liger_status.cache_clear()


def test_liger_peer_is_na_when_not_importable(monkeypatch, tmp_path):
    _no_liger(monkeypatch)
    try:
        config = bench.Config(norms="rms_norm,group_norm", peers="eager,liger", passes="fwd",
                              **_FAST)
        assert config.peers == ("normlab", "torch", "liger")
        results = bench.run(config)
        assert peers.liger_status()[0] is None
        # GroupNorm: no Liger row at all; RMSNorm: a Liger row, n/a with the reason
        assert [(r.cell.norm, r.peer) for r in results] == [
            ("rms_norm", "normlab"), ("rms_norm", "torch"), ("rms_norm", "liger"),
            ("group_norm", "normlab"), ("group_norm", "torch"),
            ("group_norm", "normlab"), ("group_norm", "torch")]
        liger = results[2]
        assert liger.error.startswith("liger_kernel is not importable") and math.isnan(liger.ms)
        assert all(not r.error and r.ms > 0 for r in results if r.peer != "liger")
        md = bench.to_markdown(results)
        assert "| liger ms |" in md and "| vs liger |" in md
        row = next(ln for ln in md.splitlines() if ln.startswith("| rms_norm "))
        assert "| n/a |" in row
        assert "liger on 1 cell: liger_kernel is not importable" in md
        assert "Liger-Kernel n/a" in md
        rows = _rows(bench.to_csv(results))
        assert rows[2]["peer"] == "liger" and "not importable" in rows[2]["error"]
        # not asked for: on CPU the default peers leave Liger out
        assert "liger" not in bench.Config(quick=True).peers
    finally:
        peers.liger_status.cache_clear()


def _fake_peer(cell, config, x, cache):
    """Torch eager under another name, writing into its own dy like Liger's RMSNorm."""
    eager = peers._norm_fns(torch.nn.functional)[cell.norm]

    class Clobber(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, dy):
            dy.mul_(1.0)  # in place, as Liger's in_place=True
            return dy

    return peers.PeerFn("fake 1.0", lambda *a: Clobber.apply(eager(*a)), own_dy=True)


def test_a_fake_peer_gets_speedup_columns(monkeypatch):
    monkeypatch.setitem(peers.PEER_FACTORIES, "liger", _fake_peer)
    config = bench.Config(norms="layer_norm,rms_norm", peers="eager,liger",
                          passes="fwd,bwd", **_FAST)
    results = bench.run(config)
    fake = [r for r in results if r.peer == "liger"]
    assert len(fake) == 4 and all(r.impl == "fake 1.0" and not r.error for r in fake)
    assert all(r.ms > 0 and math.isfinite(r.ms) and r.max_abs_diff == 0.0 for r in fake)
    md = bench.to_markdown(results)
    head = next(ln for ln in md.splitlines() if ln.startswith("| norm "))
    assert head == ("| norm | layout | dtype | shape | pass | normlab ms | torch ms | liger ms |"
                    " GB/s | roofline | vs torch | vs liger |")
    assert all(ln.count("x |") == 2 for ln in _table_rows(md))
    assert "over Liger-Kernel (4 cells)" in md and "fake 1.0" in md
    speed = [float(r["normlab_speedup"]) for r in _rows(bench.to_csv(results))
             if r["peer"] == "liger"]
    assert len(speed) == 4 and all(s > 0 for s in speed)


class _FakeCuda:
    """A stand-in for ``torch.cuda``: events read the host clock; synchronize is counted."""

    def __init__(self):
        self.syncs = 0
        self.events = 0

    def synchronize(self):
        self.syncs += 1

    def Event(self, enable_timing=False):
        assert enable_timing
        api = self

        class Event:
            def record(self):
                api.events += 1
                self.t = time.perf_counter()

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        return Event()


def test_cuda_clock_with_a_stand_in_torch_cuda():
    api = _FakeCuda()
    timer = timing.CudaTimer(flush_mib=1, device="cpu", api=api)
    assert timer.label == "cuda-events, L2 flush 1 MiB"
    calls = []
    timer.cache.fill_(7)
    s = timer.sample(lambda: calls.append(timer.cache.sum().item()), 3)
    assert s > 0 and calls == [0, 0, 0]  # flushed before each call
    assert api.syncs == 2 and api.events == 6  # synchronize before and after; a pair per call
    timer.cache.fill_(7)
    timer.sample(lambda: None, 4, flush=False)  # one pair around the calls, no flush
    assert api.events == 8 and timer.cache.sum().item() == 7 * timer.cache.numel()
    # the copy bandwidth: one event pair per copy, never flushed
    samples = timing.copy_samples(1, reps=3, device="cpu", timer=timer)
    assert len(samples) == 3 and all(t > 0 for t in samples) and api.events == 14
    # a whole cell on that clock: warm-up and rounds synchronize around the host clock
    config = bench.Config(norms="rms_norm", passes="bwd", peers="eager", **_FAST)
    before = api.syncs
    results = runner.time_cell(config.cells()[0], config, 10.0, timer=timer)
    assert [r.peer for r in results] == ["normlab", "torch"]
    assert all(r.ms > 0 and r.timing == timer.label for r in results)
    assert api.syncs - before >= 2 * (2 + 1 + 1)  # per peer: warm-up 2, once 1, 1 round 1
    assert timing.make_timer(config).label == "perf_counter"


def test_csv_device_columns_out_file_and_merge(tmp_path, capsys):
    base = ["bench", "--quick", "--no-compile", "--no-progress", "--rounds", "1",
            "--backend", "torch", "--copy-mib", "8"]
    a, b = tmp_path / "part_a.csv", tmp_path / "part_b.csv"
    assert main([*base, "--norms", "rms_norm", "--passes", "fwd,bwd", "--out", str(a)]) == 0
    assert main([*base, "--norms", "batch_norm", "--passes", "fwd", "--layouts", "nhwc",
                 "--out", str(b)]) == 0
    assert (tmp_path / "part_a.md").read_text().startswith("# normlab bench")
    rows = _rows(a.read_text())
    assert {r["device"] for r in rows} == {"cpu"} and rows[0]["device_name"]
    assert {r["timing"] for r in rows} == {"perf_counter"} and rows[0]["copy_mib"] == "8"
    assert rows[0]["versions"].startswith("torch ") and rows[0]["torch"] == torch.__version__
    assert [r["pass"] for r in rows] == ["fwd", "fwd", "bwd", "bwd"]
    capsys.readouterr()
    merged = tmp_path / "merged.csv"
    assert main(["bench", "--from-csv", f"{a},{b}", "--out", str(merged)]) == 0
    md = capsys.readouterr().out
    assert len(_table_rows(md)) == 3 and "over torch eager (3 cells)" in md
    again = _rows(merged.read_text())
    derived = ("gbps", "roofline", "normlab_speedup")  # recomputed from the rounded ms
    assert len(again) == 6 and [{k: v for k, v in r.items() if k not in derived}
                                for r in again[:4]] == [
        {k: v for k, v in r.items() if k not in derived} for r in rows]
    assert float(again[0]["gbps"]) == pytest.approx(float(rows[0]["gbps"]), rel=1e-3)
    # a rerun of cells merges over the first run's; a "not run" row never hides a timed one
    first = bench.from_csv(a)
    rerun = [dataclasses.replace(first[0], ms=123.0),
             dataclasses.replace(first[1], ms=math.nan, error="not run: time budget")]
    bench.to_csv(rerun, tmp_path / "rerun.csv")
    merged_rows = bench.from_csv([a, tmp_path / "rerun.csv"])
    assert [r.ms for r in merged_rows] == [123.0] + [r.ms for r in first[1:]]
    assert all(not r.error for r in merged_rows)
    with pytest.raises(SystemExit):
        main(["bench", "--from-csv", str(tmp_path / "missing.csv")])
    assert "--from-csv" in capsys.readouterr().err


def test_time_budget_reports_the_cells_not_run():
    seen = []
    config = bench.Config(norms="rms_norm", passes="fwd,fwd+bwd", time_budget_s=1e-9, **_FAST)
    results = bench.run(config, on_cell=seen.append)
    assert len(results) == 4 and seen == []
    assert all(r.error.startswith("not run: time budget") for r in results)
    md = bench.to_markdown(results)
    assert "normlab, torch on 2 cells: not run: time budget of 0 s reached after 0 of 2" in md


def _result(cell, peer, ms, **kw):
    return bench.Result(cell=cell, peer=peer, impl="x", ms=ms, ms_min=ms, rounds=10, reps=1,
                        copy_gbps=3000.0, threads=16, device="cuda",
                        device_name="NVIDIA H100 80GB HBM3", timing="cuda-events, L2 flush 256 MiB",
                        copy_mib=1024, **kw)


def test_gpu_report_and_the_issue_4_targets():
    fwd = Cell("rms_norm", "rows", "bfloat16", (4096, 4096), "fwd")
    bwd = Cell("rms_norm", "rows", "bfloat16", (4096, 4096), "bwd")
    gn = Cell("group_norm", "channels_last", "bfloat16", (8, 256, 28, 28), "fwd", 32)
    # fwd: 67.1 MB in 0.025 ms = 2.68 TB/s = 0.89 of 3000 GB/s; bwd 100.7 MB: 0.56
    results = [_result(fwd, "normlab", 0.025), _result(fwd, "compile", 0.03),
               _result(fwd, "liger", 0.02),
               _result(bwd, "normlab", 0.06), _result(bwd, "compile", 0.07),
               _result(bwd, "liger", math.nan, error="RuntimeError: boom"),
               _result(gn, "normlab", 0.01), _result(gn, "torch", 0.02)]
    md = bench.to_markdown(results)
    assert "- device: NVIDIA H100 80GB HBM3 (cuda)" in md
    assert "copy bandwidth: 3000.0 GB/s (device-to-device `dst.copy_(src)` of 1024 MiB" in md
    assert "CUDA events around each call, the L2 cache flushed (256 MiB written)" in md
    assert "torch.cuda.synchronize()" in md and "bwd reads x and dy, writes dx" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("- ")]
    assert "- LayerNorm/RMSNorm fwd at >= 0.85 of the copy bandwidth: 1 of 1 cells" in lines
    assert any(ln.startswith("- LayerNorm/RMSNorm bwd at >= 0.70 of the copy bandwidth: 0 of 1"
                             " cells; missed: rms_norm rows bfloat16 4096x4096 bwd 0.56")
               for ln in lines)
    assert "- ahead of torch.compile on LayerNorm/RMSNorm: 2 of 2 cells" in lines
    assert any(ln.startswith("- ahead of Liger-Kernel on LayerNorm/RMSNorm: 0 of 2 cells; not:")
               and "0.80x" in ln and "bwd n/a" in ln for ln in lines)
    assert ("- ahead of torch eager on GroupNorm/InstanceNorm/BatchNorm channels_last: 1 of 1"
            " cells") in lines
    assert "Targets" not in bench.to_markdown(results, show_targets=False)


def test_a_peer_failing_mid_run_is_na_and_the_others_stand(monkeypatch):
    calls = []

    def flaky(cell, config, x, cache):
        eager = peers._norm_fns(torch.nn.functional)[cell.norm]

        def fn(*args):
            calls.append(1)
            if len(calls) > 2:  # after the warm-up and the reps estimate
                raise torch.cuda.OutOfMemoryError("boom")
            return eager(*args)
        return peers.PeerFn("flaky", fn)

    monkeypatch.setitem(peers.PEER_FACTORIES, "liger", flaky)
    results = bench.run(bench.Config(norms="rms_norm", passes="fwd", peers="eager,liger",
                                     **{**_FAST, "rounds": 3}))
    assert [(r.peer, bool(r.error)) for r in results] == [
        ("normlab", False), ("torch", False), ("liger", True)]
    assert results[2].error == "OutOfMemoryError: boom" and results[2].impl == "flaky"


def test_liger_arguments_follow_the_installed_signature():
    def new(ctx, X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        pass

    def old(ctx, X, W, eps, offset=0.0, casting_mode="llama"):
        pass

    values = {"X": 1, "W": 2, "eps": 3, "offset": 0.0, "casting_mode": "llama", "in_place": True}
    assert env._positional(new, values) == [1, 2, 3, 0.0, "llama", True]
    assert env._positional(old, values) == [1, 2, 3, 0.0, "llama"]
