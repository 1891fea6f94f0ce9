"""``normlab bench``'s options, and the command itself (``--models``: whole models)."""
from __future__ import annotations

import argparse
import os
import sys

from . import dispatch, models_harness, models_report, report, runner, spec
from . import models as zoo
from ..kernels import auto


def _option(parse):
    """``parse`` as an argparse ``type``: its ValueError's message is the usage error."""
    def option(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return option


def _list(kind: str, known):
    return _option(lambda text: spec._names(kind, text, known))


_shapes = _option(spec.parse_shapes)
_model_names = _option(models_harness.model_names)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        n = 0.0
    if not n > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``normlab bench``."""
    models = p.add_argument_group(
        "whole models (--models)",
        "time torch eager, normlab.patch(model), normlab.fold_batchnorm and torch.compile on"
        " whole models (random weights, nothing downloaded): inference at batch 1 and at the"
        " realistic batch (CNNs 16 images, transformers 8 x 128 tokens), a training step at the"
        " realistic batch, CNNs in NCHW and channels_last; with the eager model's share of time"
        " in norms. Takes --quick, --rounds, --no-compile, --backend, --time-budget, --out and"
        " --no-progress")
    models.add_argument("--models", action="store_true",
                        help="benchmark whole models instead of norm kernels")
    models.add_argument("--model-set", type=_model_names, default=None, metavar="NAMES",
                        help="comma-separated, from " + ",".join(zoo.MODEL_NAMES) + ": resnet18,"
                             " resnet50 (torchvision's, 224x224), unet (diffusion U-Net"
                             " ResBlocks, GroupNorm(32, C), 4x32x32 latents), bert (BERT-base),"
                             " gpt2 (GPT-2 small), llama (a 4-layer Llama at width 2048); the"
                             " last three need transformers and are skipped without it"
                             " (default: all)")
    models.add_argument("--modes", type=_list("mode", models_harness.MODES), default=None,
                        help="from infer,train (default: both)")
    disp = p.add_argument_group(
        "dispatch figures (--dispatch)",
        "time normlab's cpu kernels against ATen through normlab.functional, interleaved, on"
        " one input per cell of auto's table (norm, layout, dtype, size class, pass), and"
        " write the table auto reads (--table). Takes --dtypes (default: all four), --quick"
        " (two size classes), --rounds, --time-budget, --out, --no-progress and --from-csv"
        " (merge earlier runs: each cell's ratio the geometric mean of its runs')")
    disp.add_argument("--dispatch", action="store_true",
                      help="time the cells of auto's kernels-or-ATen table")
    disp.add_argument("--dispatch-norms", type=_list("norm", auto.NORMS), default=None,
                      metavar="NAMES", help="comma-separated, from " + ",".join(auto.NORMS)
                      + " (default: all)")
    disp.add_argument("--dispatch-recheck", metavar="FILE.csv", default=None,
                      help="time only the classes of an earlier run (its dispatch.csv) with a"
                           " ratio within %.2f-%.2f, whose choice its noise could flip; merge"
                           " the runs with --from-csv" % dispatch.CLOSE)
    disp.add_argument("--table", metavar="FILE.json", default=None,
                      help="write the table (cells not measured keep FILE's choice); auto reads"
                           " normlab/kernels/cpu_dispatch.json")
    p.add_argument("--device", choices=spec.DEVICES, default="cpu",
                   help="where the tensors live (default: cpu). cuda: CUDA events, an L2 flush"
                        " before each timed call, a device-to-device copy bandwidth")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and 3 rounds (tests, smoke runs); --models: the tiny"
                        " model configurations, 2 rounds")
    p.add_argument("--norms", type=_list("norm", spec.NORMS), default=None,
                   help=f"comma-separated, from {','.join(spec.NORMS)} (default: every norm"
                        " the shapes can run)")
    p.add_argument("--layouts", type=_list("layout", spec.LAYOUTS), default=spec.LAYOUTS,
                   help="layouts of the channel norms: nchw,channels_last (default: both)")
    p.add_argument("--dtypes", type=_list("dtype", tuple(spec.DTYPES)), default=None,
                   help="comma-separated, e.g. float32,bfloat16 (default: float32; --dispatch:"
                        " all)")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--shapes", type=_shapes, default=None,
                        help="e.g. 32x64x56x56,4096x1024: 4-D for the channel norms, 2-D rows for"
                             " layer_norm and rms_norm (default: the realistic CPU set, or tiny"
                             " with --quick)")
    shapes.add_argument("--preset", choices=tuple(spec.PRESETS), default=None,
                        help="GPU-sized shapes: llm = rows "
                             + ", ".join("x".join(map(str, s)) for s in spec.PRESETS["llm"])
                             + "; cnn = "
                             + ", ".join("x".join(map(str, s)) for s in spec.PRESETS["cnn"])
                             + " (NCHW and channels_last); all = both")
    p.add_argument("--passes", type=_list("pass", spec.PASSES), default=None,
                   help="from fwd,bwd,fwd+bwd; bwd is the backward alone (default: fwd,fwd+bwd"
                        " on cpu, fwd,bwd on cuda)")
    p.add_argument("--peers", type=_list("peer", spec.PEER_OPTIONS), default=None,
                   help="what normlab is timed against, from eager,compile,liger (default:"
                        " eager,compile, and liger on cuda when liger_kernel imports; liger"
                        " only has layer_norm and rms_norm)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="timed rounds per cell, median reported (default 10, 3 with --quick;"
                        " --models: 5, 2 with --quick)")
    p.add_argument("--groups", type=_positive, default=32,
                   help="GroupNorm's G (gcd(G, C) where C is not divisible; default 32)")
    p.add_argument("--backend", default=None,
                   help="force normlab's backend (normlab.backend(NAME)); default: dispatch")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile peer")
    p.add_argument("--copy-mib", type=_positive, default=None,
                   help="buffer size of the copy-bandwidth measurement (default 256 on cpu,"
                        " 1024 on cuda)")
    p.add_argument("--no-flush-l2", dest="flush_l2", action="store_false",
                   help="cuda: time back-to-back calls without flushing the L2 cache")
    p.add_argument("--time-budget", type=_seconds, default=None, metavar="SECONDS",
                   help="start no cell that would end after SECONDS; the rest are reported as"
                        " not run (default: no limit)")
    p.add_argument("--out", metavar="DIR|FILE.csv", default=None,
                   help="write DIR/bench.csv and DIR/bench.md (--models: DIR/models.csv and"
                        " DIR/models.md), or FILE.csv and FILE.md; both are rewritten after"
                        " every cell")
    p.add_argument("--from-csv", metavar="FILE[,FILE]", default=None,
                   help="time nothing: read these CSVs (e.g. the parts of a split GPU run),"
                        " merge them, print the markdown and write --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> spec.Config:
    return spec.Config(
        norms=args.norms, layouts=args.layouts, dtypes=args.dtypes or ("float32",),
        shapes=args.shapes,
        passes=args.passes, rounds=args.rounds, backend=args.backend, compile=args.compile,
        groups=args.groups, quick=args.quick, progress=args.progress, device=args.device,
        peers=args.peers, preset=args.preset, flush_l2=args.flush_l2,
        time_budget_s=args.time_budget, copy_mib=args.copy_mib,
    )


def _write(results, csv_path: str, md_path: str, rep=report) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    md = rep.to_markdown(results)
    rep.to_csv(results, csv_path)
    with open(md_path, "w") as f:
        f.write(md)
    return md


# options of the kernel bench alone, and the value each has when not given
_KERNEL_ONLY = {
    "norms": None, "layouts": spec.LAYOUTS, "dtypes": None, "shapes": None,
    "preset": None, "passes": None, "peers": None, "groups": 32, "copy_mib": None,
    "flush_l2": True, "from_csv": None, "device": "cpu",
}
_MODELS_ONLY = {"model_set": None, "modes": None}
_DISPATCH_ONLY = {"dispatch_norms": None, "dispatch_recheck": None, "table": None}


def _flag(dest: str) -> str:
    return {"flush_l2": "--no-flush-l2"}.get(dest, "--" + dest.replace("_", "-"))


def model_config_from_args(args: argparse.Namespace) -> models_harness.ModelConfig:
    """The ModelConfig of ``normlab bench --models``; a ValueError names a kernel-bench option
    given with it."""
    given = [_flag(k) for k, v in _KERNEL_ONLY.items() if getattr(args, k, v) != v]
    if given:
        raise ValueError(
            f"{', '.join(given)} belong{'s' * (len(given) == 1)} to the kernel bench, not to"
            " --models (whole models on CPU); --models takes --model-set, --modes, --quick,"
            " --rounds, --no-compile, --backend, --time-budget, --out, --no-progress")
    return models_harness.ModelConfig(
        models=args.model_set, modes=args.modes or models_harness.MODES, quick=args.quick,
        rounds=args.rounds, compile=args.compile, backend=args.backend,
        time_budget_s=args.time_budget, progress=args.progress)


def _config(make, args: argparse.Namespace, parser: argparse.ArgumentParser | None):
    """``make(args)``, a Config or ModelConfig; with a ``parser``, its ValueError or RuntimeError
    (a bad option value, an unavailable backend) is the parser's usage error."""
    try:
        return make(args)
    except (ValueError, RuntimeError) as e:  # BackendUnavailableError is a RuntimeError
        if parser is None:
            raise
        parser.error(str(e))


def models_main(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """``normlab bench --models``: run the cases, print the markdown, write ``--out``
    (rewritten after every case)."""
    config = _config(model_config_from_args, args, parser)
    paths = report.out_paths(args.out, "models") if args.out else None
    on_case = (lambda done: _write(done, *paths, rep=models_report)) if paths else None
    results = models_harness.run(config, on_case=on_case)
    print(models_report.to_markdown(results))
    if paths:
        _write(results, *paths, rep=models_report)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


def dispatch_main(args: argparse.Namespace,
                  parser: argparse.ArgumentParser | None = None) -> int:
    """``normlab bench --dispatch`` (:mod:`.dispatch`); kernel-bench and model options other
    than --dtypes are a parser error."""
    given = [_flag(k) for k, v in {**_KERNEL_ONLY, **_MODELS_ONLY}.items()
             if k not in ("dtypes", "from_csv") and getattr(args, k, v) != v]
    if getattr(args, "backend", None) is not None:
        given.append("--backend")
    if given:
        msg = (f"{', '.join(given)} cannot be used with --dispatch (it times the cpu kernels"
               " against ATen on its own grid); --dispatch takes --dispatch-norms, --dtypes,"
               " --dispatch-recheck, --table, --quick, --rounds, --time-budget, --out, --no-progress, --from-csv")
        if parser is None:
            raise ValueError(msg)
        parser.error(msg)
    return dispatch.main(args, parser)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the benchmark of ``args`` (or merge ``--from-csv``); print the markdown, write
    ``--out``. A bad configuration (a shape no chosen norm can use, an unknown or unavailable
    backend, ``--device cuda`` without CUDA) is a parser error. ``--models``: :func:`models_main`.
    """
    if getattr(args, "models", False):
        return models_main(args, parser)
    if getattr(args, "dispatch", False):
        return dispatch_main(args, parser)
    given = [_flag(k) for k, v in _MODELS_ONLY.items() if getattr(args, k, v) != v]
    if given and parser is not None:
        parser.error(f"{', '.join(given)} need{'s' * (len(given) == 1)} --models")
    given = [_flag(k) for k, v in _DISPATCH_ONLY.items() if getattr(args, k, v) != v]
    if given and parser is not None:
        parser.error(f"{', '.join(given)} need{'s' * (len(given) == 1)} --dispatch")
    paths = report.out_paths(args.out) if args.out else None
    if args.from_csv:
        try:
            results = report.from_csv([f for f in args.from_csv.split(",") if f])
        except (OSError, KeyError, ValueError) as e:
            if parser is None:
                raise
            parser.error(f"--from-csv: {type(e).__name__}: {e}")
    else:
        config = _config(config_from_args, args, parser)
        on_cell = (lambda done: _write(done, *paths)) if paths else None
        results = runner.run(config, on_cell=on_cell)
    md = report.to_markdown(results)
    print(md)
    if paths:
        _write(results, *paths)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0
