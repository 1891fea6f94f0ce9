"""``normlab`` command line: ``normlab demo`` and ``normlab bench`` (the lab arrives later)."""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="each norm on the classic 3x3 example, next to torch.nn")
    from .bench import cli as bench_cli

    bench = sub.add_parser(
        "bench", help="time normlab against torch eager and torch.compile on realistic shapes",
        description="Time every norm x layout x dtype, forward and forward+backward, against"
        " torch eager and torch.compile, round-robin in one run; report ms, GB/s and the"
        " fraction of the machine's copy bandwidth (markdown on stdout, CSV with --out).")
    bench_cli.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "demo":
        worst = demo()
        return 0 if worst < 1e-5 else 1
    if args.command == "bench":
        return bench_cli.main(args, bench)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
