"""normlab before and after a change, in one run: `normlab bench` on two checkouts, alternated.

    python3 benchmarks/before_after.py BEFORE_DIR AFTER_DIR [--rounds 3] [--out FILE.md]
        [-- extra normlab bench arguments]

Each round runs ``python3 -m normlab bench`` (default: float32 and bfloat16, no torch.compile)
in a fresh process in BEFORE_DIR, then in AFTER_DIR (so each imports its own normlab), and
alternates the order every round (ABBA...), so that drift of a noisy machine falls on both.
Per cell it reports the after/before ratio of normlab's median time, and the same ratio of
the torch peer timed beside it in the same processes (a control: the machine, not normlab),
and the ratio of the two (normlab's change net of the machine's), the median over rounds.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_bench(tree: Path, out: Path, extra: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "normlab", "bench", "--no-compile", "--out", str(out), *extra]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)


def times(csv_dir: Path) -> dict:
    """{(norm, layout, dtype, shape, groups, pass, peer): ms} of one bench run."""
    path = next(csv_dir.glob("*.csv"))
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["error"] or not row["ms"]:
                continue
            key = (row["norm"], row["layout"], row["dtype"], row["shape"], row["groups"],
                   row["pass"])
            out.setdefault(key, {})[row["peer"]] = float(row["ms"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args, extra = p.parse_known_args(argv)  # the rest (after --) goes to normlab bench
    extra = [a for a in extra if a != "--"] or ["--dtypes", "float32,bfloat16"]
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                out = Path(tmp) / f"{side}{r}"
                run_bench(getattr(args, side), out, extra)
                runs[side].append(times(out))
                print(f"round {r + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)
    cells = sorted(set.intersection(*(set(t) for t in runs["before"] + runs["after"])))
    lines = ["| norm | layout | dtype | shape | pass | normlab after/before | torch after/before "
             "(control) | net |", "|---|---|---|---|---|---|---|---|"]
    nets = []
    for key in cells:
        ours = [a[key]["normlab"] / b[key]["normlab"] for a, b in zip(runs["after"], runs["before"])]
        peer = [a[key]["torch"] / b[key]["torch"] for a, b in zip(runs["after"], runs["before"])
                if "torch" in a[key] and "torch" in b[key]]
        o = statistics.median(ours)
        c = statistics.median(peer) if peer else float("nan")
        net = o / c if peer else o
        nets.append((net, key))
        norm, layout, dtype, shape, groups, pass_ = key
        lines.append(f"| {norm} | {layout} | {dtype} | {shape} | {pass_} | {o:.3f} | {c:.3f} "
                     f"| {net:.3f} |")
    worst = sorted(nets, reverse=True)[:5]
    g = statistics.geometric_mean([n for n, _ in nets])
    summary = [f"{len(cells)} cells, {args.rounds} rounds each side (alternated). Net after/before "
               f"(normlab's ratio over the torch control's): geometric mean {g:.3f}; slowest: "
               + ", ".join(f"{k[0]} {k[1]} {k[2]} {k[5]} {n:.3f}" for n, k in worst), ""]
    text = "\n".join(summary + lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
