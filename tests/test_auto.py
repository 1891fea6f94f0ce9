"""``auto`` on CPU: the committed kernels-or-ATen table, and the background warm-up (ATen
computes a cell's calls until the cpu kernels are ready, synchronous mode, failures, fork during
a warm-up, no torch._dynamo at import)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import normlab
import normlab.functional as NF
from normlab import _dispatch
from normlab.kernels import auto


def test_the_committed_table_covers_every_cell():
    """cpu_dispatch.json parses, names only known cells, and has a choice for every
    (norm, layout, dtype, pass) that normlab bench --dispatch measures."""
    from normlab.bench import dispatch

    table = auto.load_table()
    want = {(c.norm, c.layout, auto.DTYPES[c.dtype], c.pass_ == "train")
            for c in dispatch.cells()}
    assert set(table) == want
    assert all(len(row) == len(auto.CLASS_EDGES) + 1 for row in table.values())
    # the figures behind it: RMSNorm's kernels win from 4K elements up in float32 (torch's
    # RMSNorm is unfused on CPU), small LayerNorm forwards go to ATen
    assert not any(table[("rms_norm", "rows", torch.float32, False)][1:])
    assert table[("layer_norm", "rows", torch.float32, False)][0]


def test_a_bad_table_is_an_error(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"choices": {"layer_norm/rows/float32/fwd": "kkq"}}')
    with pytest.raises(ValueError, match="bad dispatch table entry"):
        auto.load_table(bad)
    assert auto.load_table(tmp_path / "missing.json") == {}


def test_auto_follows_the_table_in_the_default_dispatch():
    """A small LayerNorm under auto is ATen's (bitwise); a large RMSNorm is the kernels'."""
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(NF.layer_norm(x, (64,)), torch.layer_norm(x, (64,), None, None, 1e-5))
        big = torch.randn(256, 1024)
        with normlab.backend("cpu"):
            want = NF.rms_norm(big, (1024,))
        assert torch.equal(NF.rms_norm(big, (1024,)), want)


def fresh(background=True, table=None):
    """An Auto of its own (nothing ready yet), on the process's cpu backend."""
    warm = auto.Warmup()
    warm.background = background
    return auto.Auto(lambda: _dispatch._load("cpu"), table or {}, warm)


def test_aten_computes_until_the_kernels_are_ready():
    a = fresh()
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 64, generator=g) * 2 + 1, torch.randn(64, generator=g), \
        torch.randn(64, generator=g)
    with torch.no_grad():
        aten = torch.layer_norm(x, (64,), w, b, 1e-5)
        with normlab.backend("cpu"):
            ours = NF.layer_norm(x, (64,), w, b)
        assert not torch.equal(aten, ours)  # the test can tell the two apart
        first = a.layer_norm(x, (64,), w, b, 1e-5)  # nothing ready: ATen, a warm-up starts
        assert torch.equal(first, aten)
        assert a.warmup.wait(120)
        a.layer_norm(x, (64,), w, b, 1e-5)  # the backend is loaded: this cell's warm-up
        assert a.warmup.wait(120)
        assert torch.equal(a.layer_norm(x, (64,), w, b, 1e-5), ours)
    key = ("layer_norm", "rows", torch.float32, False, False, None)
    assert key in a.warmup._ready


def test_training_calls_warm_up_their_backward():
    """A training cell becomes ready only once its backward ran on the small inputs; then the
    kernels' autograd node records the call."""
    a = fresh()
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    for _ in range(3):
        y = a.group_norm(x, 4, w, None, 1e-5)
        a.warmup.wait(120)
    assert type(y.grad_fn).__name__ == "EagerNormBackward"
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_synchronous_mode_and_deterministic_algorithms():
    x = torch.randn(4, 32)
    with normlab.backend("cpu"):
        ours = NF.rms_norm(x, (32,))
    a = fresh(background=False)
    assert torch.equal(a.rms_norm(x, (32,), None, torch.finfo(torch.float32).eps), ours)
    b = fresh(background=True)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(b.rms_norm(x, (32,), None, torch.finfo(torch.float32).eps), ours)
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_table_sends_cells_to_aten_and_mixed_dtypes_to_the_kernels():
    x = torch.randn(8, 16)
    table = {("layer_norm", "rows", torch.float32, False): (True,) * 8}
    a = fresh(background=False, table=table)
    assert torch.equal(a.layer_norm(x, (16,), None, None, 1e-5),
                       torch.layer_norm(x, (16,), None, None, 1e-5))
    w = torch.ones(16, dtype=torch.float64)  # ATen would compute this call otherwise
    with normlab.backend("cpu"):
        ours = NF.layer_norm(x, (16,), w)
    assert torch.equal(a.layer_norm(x, (16,), w, None, 1e-5), ours)


def test_a_failing_warm_up_warns_once_and_leaves_the_cell_on_aten(monkeypatch):
    import warnings

    a = fresh(background=False)
    a.kernels  # loaded

    def broken(*args, **kwargs):
        raise RuntimeError("no kernels today")
    monkeypatch.setattr(a.kernels, "instance_norm", broken)
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        y = a.instance_norm(x, None, None, None, None, True, 0.1, 1e-5)
        a.instance_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert [str(w.message) for w in said if "no kernels today" in str(w.message)], \
        [str(w.message) for w in said]
    assert len([w for w in said if "no kernels today" in str(w.message)]) == 1  # once
    assert torch.equal(y, torch.instance_norm(x, None, None, None, None, True, 0.1, 1e-5,
                                              True))


def _script(code: str, env=None, timeout=300):
    import os
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    return done.stdout


def test_import_does_not_load_dynamo_or_numba():
    """``import normlab`` and a first call on ATen load neither torch._dynamo (1.7 s) nor
    Numba: the cpu backend loads in the warm-up thread."""
    _script("""
        import sys, torch, normlab, normlab.functional as F
        assert "torch._dynamo" not in sys.modules and "numba" not in sys.modules
        F.layer_norm(torch.randn(2, 8), (8,))  # on ATen; the warm-up thread loads the backend
        normlab.wait_for_kernels(120)
        assert "torch._dynamo" not in sys.modules
        print("OK")
    """, env={"NORMLAB_BACKGROUND_WARMUP": "1"})


def test_fork_while_a_kernel_compiles(tmp_path):
    """Fork while the warm-up thread compiles (an empty Numba cache: seconds of compiling):
    the fork waits for that compilation, and the child computes its norms (no deadlock on
    Numba's compiler lock), with the same results as the parent."""
    _script("""
        import os, torch, normlab, normlab.functional as F
        x = torch.randn(16, 8, 6, 6) * 3
        with torch.no_grad(), normlab.backend("torch"):
            want = F.group_norm(x, 4)
        with torch.no_grad():
            F.group_norm(x, 4)  # ATen; the backend loads in the background
            normlab.wait_for_kernels(120)
            F.group_norm(x, 4)  # ATen; this cell's kernels compile in the background
        pid = os.fork()
        if pid == 0:
            with torch.no_grad():
                torch.set_num_threads(1)
                got = F.group_norm(x, 4)
                with normlab.backend("cpu"):
                    got_cpu = F.group_norm(x, 4)  # compiles in the child
            os._exit(0 if torch.allclose(got, want, atol=1e-5)
                     and torch.allclose(got_cpu, want, atol=1e-5) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
        print("OK")
    """, env={"NORMLAB_BACKGROUND_WARMUP": "1", "NUMBA_CACHE_DIR": str(tmp_path)}, timeout=600)
