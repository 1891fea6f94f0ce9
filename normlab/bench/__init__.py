"""The benchmark harness behind ``normlab bench``: normlab against torch eager, ``torch.compile``
and (on CUDA) Liger-Kernel on realistic shapes, every norm x layout x dtype, forward, backward
and forward+backward, timed round-robin in one run and judged against the device's copy
bandwidth measured in the same run.

Command line::

    normlab bench                          # CPU, fp32, all norms, with torch.compile (minutes)
    normlab bench --quick --no-compile     # tiny shapes, 3 rounds: a smoke run (seconds)
    normlab bench --dtypes float32,bfloat16 --norms layer_norm,rms_norm --backend cpu \\
        --rounds 20 --out results/         # writes results/bench.csv and results/bench.md
    normlab bench --device cuda --preset all --dtypes bfloat16,float32 \\
        --time-budget 480 --out gpu.csv    # the GPU run (benchmarks/gpu_run.sh): gpu.csv, gpu.md
    normlab bench --from-csv a.csv,b.csv --out all.csv   # merge saved runs, time nothing

From Python::

    from normlab import bench
    results = bench.run(bench.Config(norms=["rms_norm"], compile=False, quick=True))
    print(bench.to_markdown(results))
    bench.to_csv(results, "bench.csv")

Cells (CPU default): batch_norm (training, running stats), instance_norm and group_norm (G=32)
on 32x64x56x56 and 8x256x28x28 in NCHW and channels_last; layer_norm (weight, bias) and
rms_norm (weight) on rows 4096x1024, 8192x768, 2048x4096; passes fwd and fwd+bwd. ``--preset``
llm/cnn/all selects GPU-sized shapes (``PRESETS``); on CUDA the passes default to fwd and bwd
(the backward alone). Peers: ``normlab`` (``normlab.functional``, default dispatch or
``--backend``), ``torch`` (``torch.nn.functional`` eager), ``compile`` (``torch.compile`` of the
same call, compile time reported apart) and ``liger`` (Liger-Kernel's LayerNorm/RMSNorm autograd
functions, where ``liger_kernel`` imports); ``--peers`` picks among eager, compile, liger.

Whole models (:mod:`.models`, :mod:`.models_harness`, :mod:`.models_report`)::

    normlab bench --models --quick --no-compile    # the tiny configurations: a smoke run
    normlab bench --models --model-set resnet50,bert --modes infer --out results/
        # writes results/models.csv and results/models.md

    from normlab import bench
    results = bench.run_models(bench.ModelConfig(models=["unet"], quick=True))

ResNet-18/50 (NCHW and channels_last), a diffusion U-Net block stack, and where transformers
imports BERT-base, GPT-2 small and a 4-layer Llama, with random weights: inference at batch 1
and at the realistic batch, a training step; peers torch eager, ``normlab.patch(model)``,
``normlab.fold_batchnorm(normlab.patch(model))`` (CNN inference) and ``torch.compile``; the
eager model's share of time in norms from ``torch.profiler``.

Modules, in import order: each imports only ones above it (``tests/test_structure.py``)::

    progress        the progress bar
    env             probes: the CPU, versions, the device's name, Liger-Kernel
    spec            names, shapes, presets; Cell, Config, Result; the minimal-bytes model
    peers           the peers and how each calls a norm
    timing          the clocks, the round-robin loop, the copy bandwidth, the time budget
    runner          a cell's inputs and passes, time_cell, run
    report          CSV in and out, the markdown, the summary, issue 4's targets
    dispatch        --dispatch: the kernels against ATen, auto's table
    models          --models: the models; then models_harness (timing), models_report
    cli             the options and the command
"""
from .models_harness import ModelConfig, ModelResult
from .models_harness import run as run_models
from .peers import PEER_FACTORIES, PeerFn, liger_status
from .report import from_csv, geomean, speedups, summary, targets, to_csv, to_markdown
from .runner import run, time_cell
from .spec import (DEFAULT_SHAPES, DEVICES, DTYPES, LAYOUTS, NORMS, PASSES, PEERS, PRESETS,
                   QUICK_SHAPES, Cell, Config, Result, minimal_bytes)
from .timing import CpuTimer, CudaTimer, copy_bandwidth

__all__ = [
    "Config", "Cell", "Result", "run", "time_cell", "copy_bandwidth", "to_markdown", "to_csv",
    "from_csv", "summary", "targets", "speedups", "geomean", "minimal_bytes", "NORMS",
    "LAYOUTS", "PASSES", "PEERS", "DTYPES", "DEVICES", "PRESETS", "DEFAULT_SHAPES",
    "QUICK_SHAPES", "CpuTimer", "CudaTimer", "PeerFn", "PEER_FACTORIES", "liger_status",
    "ModelConfig", "ModelResult", "run_models",
]
