"""The benchmark harness behind ``normlab bench``: normlab against torch eager and
``torch.compile`` on realistic shapes, every norm x layout x dtype, forward and forward+backward,
timed round-robin in one run and judged against the machine's copy bandwidth.

Command line::

    normlab bench                          # fp32, all norms, with torch.compile (minutes)
    normlab bench --quick --no-compile     # tiny shapes, 3 rounds: a smoke run (seconds)
    normlab bench --dtypes float32,bfloat16 --norms layer_norm,rms_norm --backend cpu \\
        --rounds 20 --out results/         # writes results/bench.csv and results/bench.md

From Python::

    from normlab import bench
    results = bench.run(bench.Config(norms=["rms_norm"], compile=False, quick=True))
    print(bench.to_markdown(results))
    bench.to_csv(results, "bench.csv")

Cells: batch_norm (training, running stats), instance_norm and group_norm (G=32) on
32x64x56x56 and 8x256x28x28 in NCHW and channels_last; layer_norm (weight, bias) and rms_norm
(weight) on rows 4096x1024, 8192x768, 2048x4096. Peers: ``normlab`` (``normlab.functional``,
default dispatch or ``--backend``), ``torch`` (``torch.nn.functional`` eager) and ``compile``
(``torch.compile`` of the same ``torch.nn.functional`` call, compile time reported apart).
"""
from .harness import (DEFAULT_SHAPES, DTYPES, LAYOUTS, NORMS, PASSES, PEERS, QUICK_SHAPES, Cell,
                      Config, Result, copy_bandwidth, run, time_cell)
from .report import geomean, minimal_bytes, speedups, summary, to_csv, to_markdown

__all__ = [
    "Config", "Cell", "Result", "run", "time_cell", "copy_bandwidth", "to_markdown", "to_csv",
    "summary", "speedups", "geomean", "minimal_bytes", "NORMS", "LAYOUTS", "PASSES", "PEERS",
    "DTYPES", "DEFAULT_SHAPES", "QUICK_SHAPES",
]
