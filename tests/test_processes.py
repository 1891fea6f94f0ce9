"""normlab's kernels in other processes and threads: forked DataLoader workers and
``torch.multiprocessing`` children (fork, spawn, forkserver) after the parent used the kernels,
fork of a fork, Python threads; and the serial and parallel versions of every kernel giving the
same bits.

Each multi-process case runs in a fresh interpreter with a timeout, so that an abort or a hang
fails the test instead of the test process. The parent always starts Numba's thread pool first
(an input above the serial threshold): that is what made forked children abort
("fork() called from a process already using GNU OpenMP").
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import normlab
import normlab.functional as NF
from normlab.kernels import cpu

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")

# A model with every norm, as a user writes it with torch.nn, then patched; and the inputs.
PRELUDE = textwrap.dedent("""
    import os, sys, torch, normlab
    import torch.nn as tnn
    from normlab.kernels import cpu

    def model():
        torch.manual_seed(0)
        return normlab.patch(tnn.Sequential(
            tnn.Conv2d(3, 16, 3, padding=1), tnn.BatchNorm2d(16), tnn.GroupNorm(4, 16),
            tnn.InstanceNorm2d(16, affine=True), tnn.Flatten(1), tnn.LayerNorm(16 * 32 * 32),
            tnn.Unflatten(1, (16, 1024)), tnn.RMSNorm(1024)))

    def step(m, x):
        # a training step's outputs: forward (BatchNorm in training), input and weight grads
        x = x.clone().requires_grad_()
        y = m(x)
        y.backward(torch.ones_like(y) / y.numel() + y * 1e-3)
        return [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]

    def inputs(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(4, 3, 32, 32, generator=g) * 3 + 1

    def check(got, want, what):
        for a, b in zip(got, want):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise SystemExit(f"{what}: {(a - b).abs().max().item()} off")

    # the parent runs the kernels on inputs large enough to start Numba's thread pool (a
    # spawned child imports this file as __mp_main__ and skips it)
    if __name__ == "__main__":
        REF = [step(model(), inputs(i)) for i in range(2)]
        assert cpu._pool_started, "the parent did not start Numba's pool: nothing is tested"
""")


def _run(tmp_path, body: str, timeout: float = 300, background: bool = False) -> str:
    """Run PRELUDE + body as a script in a fresh interpreter; it must exit 0 and print OK.
    ``background``: auto's background warm-up on (the default outside the tests)."""
    script = tmp_path / "case.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "NORMLAB_BACKGROUND_WARMUP": "1" if background else "0"}
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert done.returncode == 0 and "OK" in done.stdout, (
        f"exit code {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_dataloader_workers_after_the_parent_used_the_kernels(tmp_path, background):
    """A DataLoader with fork workers (the Linux default) whose dataset runs normlab norms,
    after the main process ran them: torch's workers run one thread; normlab's, serial kernels;
    the workers' results are the parent's. With auto's background warm-up (the default), the
    workers are forked while warm-ups may be pending or running."""
    _run(tmp_path, background=background, body="""
        from torch.utils.data import DataLoader, Dataset

        class Steps(Dataset):
            def __len__(self):
                return 2
            def __getitem__(self, i):
                return step(model(), inputs(i))

        ctx = torch.multiprocessing.get_context("fork")
        for epoch in range(2):  # workers are forked again each epoch
            got = list(DataLoader(Steps(), batch_size=None, num_workers=2,
                                  multiprocessing_context=ctx))
            for i in range(2):
                check(got[i], REF[i], f"worker, epoch {epoch}, item {i}")
        print("OK")
    """)


@pytest.mark.parametrize("method,threads", [("fork", 1), ("spawn", 1), ("spawn", 2),
                                            ("forkserver", 2)])
def test_multiprocessing_children(tmp_path, method, threads):
    """``torch.multiprocessing`` children run a patched model after the parent did, with the
    parent's results: forked ones with ``torch.set_num_threads(1)`` (PyTorch's advice for fork:
    torch's own ops hang in a fork child that keeps two threads), spawned and forkserver ones
    with one or two threads."""
    _run(tmp_path, f"""
        import torch.multiprocessing as mp

        def child(q, i):
            torch.set_num_threads({threads})
            out = step(model(), inputs(i))
            q.put([i] + [t.numpy().copy() for t in out])
            q.put(("forked", cpu._forked, "pool", cpu._pool_started))

        if __name__ == "__main__":
            ctx = mp.get_context("{method}")
            q = ctx.Queue()
            procs = [ctx.Process(target=child, args=(q, i)) for i in range(2)]
            for p in procs:
                p.start()
            results = [q.get(timeout=240) for _ in range(4)]
            for p in procs:
                p.join(60)
                assert p.exitcode == 0, p.exitcode
            arrays = [r for r in results if isinstance(r, list)]
            flags = [r for r in results if isinstance(r, tuple)]
            got = {{r[0]: [torch.from_numpy(a) for a in r[1:]] for r in arrays}}
            assert sorted(got) == [0, 1], sorted(got)
            for k in range(2):  # child k ran inputs(k)
                check(got[k], REF[k], "{method} child")
            # fork children of a parent whose pool started run serial kernels; spawned and
            # forkserver children are new processes and may start their own pool
            assert all(f[1] == ("{method}" == "fork") for f in flags), flags
            print("OK")
    """)


def test_fork_of_a_fork_and_threads_in_a_child(tmp_path):
    """A grandchild (fork of a fork; Numba's own check only looks at the direct parent) and
    Python threads inside a forked child run the kernels."""
    _run(tmp_path, """
        import threading

        pid = os.fork()
        if pid == 0:
            try:
                torch.set_num_threads(1)  # torch's own ops hang in a fork child otherwise
                pid2 = os.fork()
                if pid2 == 0:
                    try:
                        check(step(model(), inputs(1)), REF[1], "grandchild")
                        os._exit(0)
                    except BaseException as e:
                        print("grandchild:", e, file=sys.stderr)
                        os._exit(3)
                _, status = os.waitpid(pid2, 0)
                errors = []

                models = [model() for _ in range(4)]  # (the global RNG: one thread)

                def run(k, i):
                    try:
                        check(step(models[k], inputs(i)), REF[i], f"thread {k}")
                    except BaseException as e:
                        errors.append(e)
                ts = [threading.Thread(target=run, args=(k, k % 2)) for k in range(4)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                for e in errors:
                    print("thread:", repr(e), file=sys.stderr)
                sys.stderr.flush()
                os._exit(0 if status == 0 and not errors else 4)
            except BaseException as e:
                print("child:", e, file=sys.stderr)
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
        print("OK")
    """)


# --- serial and parallel versions: the same bits ------------------------------------------

CASES = [
    ("layer_norm", (64, 1024), lambda x, w, b: NF.layer_norm(x, (1024,), w, b)),
    ("rms_norm", (64, 1024), lambda x, w, b: NF.rms_norm(x, (1024,), w)),
    ("group_norm", (4, 32, 32, 32), lambda x, w, b: NF.group_norm(x, 8, w, b)),
    ("instance_norm", (4, 32, 32, 32), lambda x, w, b: NF.instance_norm(x, weight=w, bias=b)),
    ("batch_norm", (8, 32, 24, 24), lambda x, w, b: NF.batch_norm(x, None, None, w, b, True)),
    ("batch_norm_eval", (8, 32, 24, 24), lambda x, w, b: NF.batch_norm(
        x, torch.full((32,), 0.5, dtype=x.dtype), torch.full((32,), 2.0, dtype=x.dtype), w, b)),
]


def _grads(fn, shape, dtype, layout):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[-1] if len(shape) == 2 else shape[1]
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(c, generator=g)).to(dtype).requires_grad_()
    x.requires_grad_()
    with normlab.backend("cpu"):
        y = fn(x, w, b)
        y.backward(torch.randn(y.shape, generator=g).to(dtype))
    return [y.detach(), x.grad, w.grad, b.grad if b.grad is not None else torch.zeros(())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,shape,fn", CASES, ids=[c[0] for c in CASES])
def test_serial_and_parallel_kernels_give_the_same_bits(monkeypatch, name, shape, fn, dtype,
                                                        layout):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("rows have one layout")
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the parallel version would run on one thread")
    monkeypatch.setattr(cpu, "_MIN_PARALLEL", 1 << 40)
    serial = _grads(fn, shape, dtype, layout)
    monkeypatch.setattr(cpu, "_MIN_PARALLEL", 0)
    parallel = _grads(fn, shape, dtype, layout)
    for k, (a, b) in enumerate(zip(serial, parallel)):
        assert torch.equal(a, b), f"{name} {dtype} {layout}: output {k} differs"


def test_small_inputs_never_start_the_pool():
    """Below the threshold no parallel region runs: a fresh process that only normalizes small
    inputs never loads Numba's thread pool (nothing to abort a later fork, nothing to wake)."""
    code = textwrap.dedent("""
        import torch, normlab.functional as F
        from numba.np.ufunc import parallel
        from normlab.kernels import cpu
        with __import__("normlab").backend("cpu"):
            x = torch.randn(4, 256, requires_grad=True)
            F.layer_norm(x, (256,)).sum().backward()
            F.batch_norm(torch.randn(4, 8, 5, 5), None, None, training=True)
        assert not parallel._is_initialized and not cpu._pool_started
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
