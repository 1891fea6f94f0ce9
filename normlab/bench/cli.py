"""``normlab bench``'s options, and the command itself."""
from __future__ import annotations

import argparse
import os
import sys

from . import harness, report


def _list(kind: str, known):
    def parse(text: str):
        try:
            return harness._names(kind, text, known)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _shapes(text: str):
    try:
        return harness.parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``normlab bench``."""
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and 3 rounds (tests, smoke runs)")
    p.add_argument("--norms", type=_list("norm", harness.NORMS), default=harness.NORMS,
                   help=f"comma-separated, from {','.join(harness.NORMS)} (default: all)")
    p.add_argument("--layouts", type=_list("layout", harness.LAYOUTS), default=harness.LAYOUTS,
                   help="layouts of the channel norms: nchw,channels_last (default: both)")
    p.add_argument("--dtypes", type=_list("dtype", tuple(harness.DTYPES)), default=("float32",),
                   help="comma-separated, e.g. float32,bfloat16 (default: float32)")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="e.g. 32x64x56x56,4096x1024: 4-D for the channel norms, 2-D rows for"
                        " layer_norm and rms_norm (default: the realistic set, or tiny with"
                        " --quick)")
    p.add_argument("--passes", type=_list("pass", harness.PASSES), default=harness.PASSES,
                   help="fwd,fwd+bwd (default: both)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="timed rounds per cell, median reported (default 10, 3 with --quick)")
    p.add_argument("--groups", type=_positive, default=32,
                   help="GroupNorm's G (gcd(G, C) where C is not divisible; default 32)")
    p.add_argument("--backend", default=None,
                   help="force normlab's backend (normlab.backend(NAME)); default: dispatch")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile peer")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write bench.csv and bench.md into DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> harness.Config:
    return harness.Config(
        norms=args.norms, layouts=args.layouts, dtypes=args.dtypes, shapes=args.shapes,
        passes=args.passes, rounds=args.rounds, backend=args.backend, compile=args.compile,
        groups=args.groups, quick=args.quick, progress=args.progress,
    )


def main(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the benchmark of ``args``; print the markdown, write ``--out``. A bad configuration
    (a shape no chosen norm can use, an unknown or unavailable backend) is a parser error."""
    try:
        config = config_from_args(args)
    except (ValueError, RuntimeError) as e:  # BackendUnavailableError is a RuntimeError
        if parser is None:
            raise
        parser.error(str(e))
    results = harness.run(config)
    md = report.to_markdown(results)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report.to_csv(results, os.path.join(args.out, "bench.csv"))
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        print(f"wrote {os.path.join(args.out, 'bench.csv')} and bench.md", file=sys.stderr)
    return 0
