"""``normlab`` command line.

* ``normlab demo``: each norm on the classic 3x3 example, next to torch.nn.
* ``normlab lab [--quick] [--out DIR] [--only NAME ...] [--seed S] [--data [NAME=]PATH]``: rerun
  the classic normalization experiments and write an HTML report (resumable).
* ``normlab explain NORM [--out DIR]``: a norm's reduction spec, a worked example, its axes
  figure.
* ``normlab bench``: time normlab against torch eager and torch.compile; ``normlab bench
  --models``: on whole models (ResNets, a diffusion U-Net, BERT, GPT-2, a Llama).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

SEED_MATRIX = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]


def _demo_cases():
    """(title, what is reduced, normlab module, torch module, input) for the classic example."""
    import normlab.nn as nl

    x = torch.tensor(SEED_MATRIX)
    return [
        ("BatchNorm1d(3), training", "each column (channel) over the 3 rows (batch)",
         nl.BatchNorm1d(3), torch.nn.BatchNorm1d(3), x),
        ("LayerNorm(3)", "each row over its 3 entries",
         nl.LayerNorm(3), torch.nn.LayerNorm(3), x),
        ("RMSNorm(3, eps=1e-8)", "each row by its root mean square, no centering",
         nl.RMSNorm(3, eps=1e-8), torch.nn.RMSNorm(3, eps=1e-8), x),
        ("InstanceNorm1d(3) on the matrix as 1 sample of 3 channels x 3 steps",
         "each row (channel) over its 3 steps", nl.InstanceNorm1d(3), torch.nn.InstanceNorm1d(3),
         x[None]),
        ("GroupNorm(1, 3) on the matrix as 1 sample of 3 channels x 3 steps",
         "the whole matrix (one group)", nl.GroupNorm(1, 3), torch.nn.GroupNorm(1, 3), x[None]),
    ]


def _rows(t: torch.Tensor) -> list[str]:
    return ["  ".join(f"{v:8.4f}" for v in row) for row in t.reshape(3, 3).tolist()]


def demo(out=None) -> float:
    """Print each norm's output on the classic 3x3 matrix next to torch's (to ``out``, default
    stdout); return the largest difference seen."""
    out = out or sys.stdout
    print("normlab vs torch.nn on x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\n", file=out)
    worst = 0.0
    for title, reduced, ours, theirs, x in _demo_cases():
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"{title}\n  normalizes {reduced}", file=out)
        print(f"  {'normlab':^30s}    {'torch':^30s}", file=out)
        for left, right in zip(_rows(a), _rows(b)):
            print(f"  {left}    {right}", file=out)
        print(f"  max |normlab - torch| = {diff:.2e}\n", file=out)
    return worst


def _add_lab(sub) -> argparse.ArgumentParser:
    from .lab import experiments

    p = sub.add_parser(
        "lab", help="rerun the classic normalization experiments; write an HTML report",
        description="Rerun the classic normalization experiments on data that ships with "
        "normlab and write DIR/index.html (self-contained), DIR/results.json and "
        "DIR/figures/. Finished runs are stored as they finish: run the same command again to "
        "resume an interrupted lab.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small settings: the whole lab in under 5 minutes on 2 cores")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full settings, under 30 minutes (the default)")
    p.set_defaults(mode="full")
    p.add_argument("--out", metavar="DIR", default="normlab-lab",
                   help="output folder (default: normlab-lab)")
    p.add_argument("--only", metavar="NAME", nargs="+", type=_experiment_names,
                   help=f"run only these (from {', '.join(experiments.NAMES)}); the report keeps "
                        "the other experiments finished earlier at the same mode and seed")
    p.add_argument("--seed", type=int, default=0, help="the lab's seed (default 0)")
    p.add_argument("--data", metavar="[NAME=]PATH", action="append", default=[],
                   help="your own images (an .npz with arrays x and y, or a folder with one "
                        "sub-folder per class): PATH for the image experiments "
                        "(batch_size, groups, sigmoid, smoothness), NAME=PATH for one; repeatable")
    p.add_argument("--rerun", action="store_true",
                   help="run experiments that finished earlier again (finished runs still load "
                        "from DIR/runs; delete DIR for a clean start)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress output on stderr")
    return p


def _experiment_names(text: str) -> list[str]:
    from .lab import runner

    names = [n for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one experiment name")
    try:
        return runner.select(n.strip() for n in names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_out(parser: argparse.ArgumentParser, path: str, directory: bool = True) -> None:
    """A parser error (exit 2, one line) unless ``--out`` can be written: the folder ``path``
    (or a file ``path``'s folder) is made if missing and a file created in it."""
    import tempfile

    folder = path if directory else (os.path.dirname(os.path.abspath(path)) or ".")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        parser.error(f"--out {path}: cannot write there ({e.strerror or e})")


def _data_arg(items: list[str]) -> dict[str, str] | None:
    """``--data`` values as NAME -> path: ``NAME=PATH`` for one experiment, a plain PATH for
    the image experiments (a path may contain '=' unless what precedes it is an experiment)."""
    from .lab import experiments, runner

    plain, named = [], {}
    for item in items:
        name, eq, path = item.partition("=")
        if eq and name in experiments.NAMES:
            named[name] = path
        else:
            plain.append(item)
    if len(plain) > 1:
        raise ValueError(f"--data PATH given {len(plain)} times ({', '.join(plain)}); give one "
                         "PATH for the image experiments and NAME=PATH for others")
    if not plain and not named:
        return None
    return {**(runner.resolve_data(plain[0]) if plain else {}), **named}


def lab(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``normlab lab``: run, then print where the report is and a line per experiment. Exit
    status 1 when an experiment run now failed, 130 when interrupted."""
    from .lab import runner

    names = runner.select({n for group in args.only for n in group} if args.only else None)
    try:
        data = _data_arg(args.data)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        results = runner.run_lab(names, out=args.out, mode=args.mode, seed=args.seed, data=data,
                                 progress=args.progress, rerun=args.rerun)
    except KeyboardInterrupt:
        print(f"\ninterrupted: what finished is kept in {args.out}; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    index = os.path.join(args.out, "index.html")
    print(f"normlab lab ({args.mode}, seed {args.seed}): {index}")
    exps = results["experiments"]
    width = max(map(len, exps), default=0)
    for name, result in exps.items():
        print(f"  {name:<{width}}  {runner.summary_line(name, result)}")
    failed = [n for n in names if "error" in exps.get(n, {})]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="each norm on the classic 3x3 example, next to torch.nn")
    lab_parser = _add_lab(sub)
    explain = sub.add_parser(
        "explain", help="a norm's reduction spec, a worked 3x3 example, its axes figure",
        description="Print the reduction spec normlab computes NORM with, in words, and the "
        "norm worked through on [[1, 2, 3], [4, 5, 6], [7, 8, 9]] (checked against torch.nn); "
        "write its axes figure to DIR/axes-NORM.png.")
    from .lab.axes import NORMS

    explain.add_argument("norm", type=str.lower, metavar="NORM", choices=tuple(NORMS),
                         help=f"one of {', '.join(NORMS)} (any case)")
    explain.add_argument("--out", metavar="DIR", default=".",
                         help="where to write the figure (default: .)")
    from .bench import cli as bench_cli

    bench = sub.add_parser(
        "bench", help="time normlab against torch eager and torch.compile on realistic shapes",
        description="Time every norm x layout x dtype, forward and forward+backward, against"
        " torch eager and torch.compile, round-robin in one run; report ms, GB/s and the"
        " fraction of the machine's copy bandwidth (markdown on stdout, CSV with --out)."
        " With --models: whole models, torch eager against normlab.patch(model), BatchNorm"
        " folding and torch.compile, with the share of time in norms.")
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "demo":
        worst = demo()
        return 0 if worst < 1e-5 else 1
    if args.command == "bench":
        if getattr(args, "out", None):
            check_out(bench, args.out, directory=not args.out.lower().endswith(".csv"))
        return bench_cli.main(args, bench)
    if args.command == "lab":
        check_out(lab_parser, args.out)
        return lab(args, lab_parser)
    if args.command == "explain":
        from .lab.explain import explain as explain_text

        check_out(explain, args.out)

        print(explain_text(args.norm, args.out))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
