"""normlab's backends (reference, and the fused Numba cpu kernels) against torch eager (ATen)
on CPU, forward and forward+backward, all interleaved in one run. The full harness
(`normlab bench`: torch.compile, channels_last, GB/s against the copy roofline) is still to
come with issue 3; this records where each backend stands.

    python benchmarks/backends_vs_torch.py  # prints a markdown table
"""
import platform
import time

import torch

import normlab
import normlab.functional as F

CASES = [
    ("batch_norm train NCHW", (32, 64, 56, 56), lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
    ("group_norm(32) NCHW", (8, 256, 28, 28), lambda x, w, b: F.group_norm(x, 32, w, b)),
    ("instance_norm NCHW", (8, 256, 28, 28), lambda x, w, b: F.instance_norm(x, weight=w, bias=b)),
    ("layer_norm rows", (4096, 1024), lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)),
    ("layer_norm rows", (8192, 768), lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)),
    ("layer_norm rows", (2048, 4096), lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)),
    ("rms_norm rows", (4096, 1024), lambda x, w, b: F.rms_norm(x, x.shape[-1:], w)),
    ("rms_norm rows", (8192, 768), lambda x, w, b: F.rms_norm(x, x.shape[-1:], w)),
    ("rms_norm rows", (2048, 4096), lambda x, w, b: F.rms_norm(x, x.shape[-1:], w)),
]
BACKENDS = ("torch", "reference", "cpu")


def _time(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    print(f"CPU: {platform.processor() or platform.machine()}, threads {torch.get_num_threads()},"
          f" torch {torch.__version__}, normlab {normlab.__version__}\n")
    print("| case | shape | mode | torch ms | reference ms | cpu ms | torch / reference |"
          " torch / cpu (speedup) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, fn in CASES:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) + 1).requires_grad_()
        c = shape[-1] if "rows" in name else shape[1]
        w = torch.randn(c, generator=g).requires_grad_()
        b = torch.randn(c, generator=g).requires_grad_()
        dy = torch.randn(shape, generator=g)
        for mode in ("forward", "forward+backward"):
            def run():
                if mode == "forward":
                    with torch.no_grad():
                        fn(x, w, b)
                else:
                    fn(x, w, b).backward(dy)
            times = {}
            for _ in range(2):  # interleave the two backends
                for backend in BACKENDS:
                    with normlab.backend(backend):
                        times[backend] = min(times.get(backend, 1e9), _time(run))
            t, r, c = (times[k] for k in BACKENDS)
            print(f"| {name} | {'x'.join(map(str, shape))} | {mode} | {t * 1e3:.1f} |"
                  f" {r * 1e3:.1f} | {c * 1e3:.1f} | {t / r:.2f} | {t / c:.2f} |")


if __name__ == "__main__":
    main()
