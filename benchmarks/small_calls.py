"""Per-call time of normlab.nn modules against torch.nn on small inputs, as a model calls them.

    python benchmarks/small_calls.py [--busy] [--rounds N] [--out FILE.md]

Each case builds the torch module and its normlab twin with the same state, then times both in
rounds that alternate which goes first (``calls`` calls per sample, the median over rounds), in
inference (``torch.no_grad()``) under normlab's default dispatch. ``--busy`` starts a process
that keeps one core busy (``while True: pass``) for the whole run, as a DataLoader worker or a
neighbour job would. The ratio is normlab's time over torch's (< 1: normlab is faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import normlab
import normlab.nn as nn

CASES = [  # (label, module factory on a namespace of classes, input shape)
    ("LayerNorm(768), 1x768", lambda m: m.LayerNorm(768), (1, 768)),
    ("LayerNorm(768), 128x768", lambda m: m.LayerNorm(768), (128, 768)),
    ("RMSNorm(4096), 1x4096", lambda m: m.RMSNorm(4096), (1, 4096)),
    ("BatchNorm2d(512) eval, 1x512x7x7", lambda m: m.BatchNorm2d(512).eval(), (1, 512, 7, 7)),
    ("BatchNorm2d(64) eval, 1x64x56x56", lambda m: m.BatchNorm2d(64).eval(), (1, 64, 56, 56)),
    ("GroupNorm(32, 256), 1x256x16x16", lambda m: m.GroupNorm(32, 256), (1, 256, 16, 16)),
]


def _sample(module, x, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - t0) / calls


def run(rounds: int = 15, calls: int = 200) -> list[tuple[str, float, float]]:
    """(label, torch us, normlab us) per case."""
    out = []
    with torch.no_grad():
        for label, make, shape in CASES:
            torch.manual_seed(0)
            theirs = make(torch.nn)
            ours = make(nn)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(shape)
            for _ in range(3):  # warm-up: the backend loaded, then the cell's kernels ready
                theirs(x), ours(x)
                normlab.wait_for_kernels()
            for _ in range(20):
                theirs(x), ours(x)
            t, n = [], []
            for r in range(rounds):
                pair = ((theirs, t), (ours, n)) if r % 2 == 0 else ((ours, n), (theirs, t))
                for module, times in pair:
                    times.append(_sample(module, x, calls))
            out.append((label, statistics.median(t) * 1e6, statistics.median(n) * 1e6))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", action="store_true", help="keep one other core busy meanwhile")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        rows = run(args.rounds)
    finally:
        if busy is not None:
            busy.kill()
    load = os.getloadavg()[0]
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{'one core kept busy' if args.busy else 'quiet'}, 1-minute load {load:.2f}",
             "", "| module call | torch us | normlab us | normlab / torch |", "|---|---|---|---|"]
    lines += [f"| {label} | {t:.1f} | {n:.1f} | {n / t:.2f} |" for label, t, n in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
