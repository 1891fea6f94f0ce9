"""What every lab experiment is written against: the run :class:`Context` and the result shape.

An experiment is a module in :mod:`normlab.lab.experiments` with

* ``NAME`` (its key in ``results.json``), ``TITLE``, ``DESCRIPTION`` (a paragraph of plain
  HTML: the question, the setting, the paper it mirrors);
* ``run(ctx: Context) -> dict`` returning ``{"title", "claims", "metrics", "figures"}``:
  ``claims`` a list of :func:`claim` dicts, ``metrics`` JSON-able numbers, ``figures`` the
  relative paths :meth:`Context.save_figure` returned. The runner adds ``"seconds"``.

Resumability: an experiment splits its work into *runs* (one training run, one measurement) and
computes each through :meth:`Context.cached`. A run's result is stored in its own JSON file the
moment it finishes (written to a temporary file, then renamed: atomic), so an interrupted lab
re-run skips every finished run and a crash loses nothing finished.

Sizes: ``ctx.mode`` is ``"tiny"`` (tests: seconds), ``"quick"`` (``--quick``: the whole lab under
5 minutes on 2 cores) or ``"full"`` (under 30 minutes); :meth:`Context.pick` chooses a setting
per mode.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

MODES = ("tiny", "quick", "full")


def claim(text: str, holds: bool, evidence: str, why: str | None = None) -> dict:
    """One claim of a paper and whether our numbers support it, with the numbers that decide.
    ``why``: where the claim is not supported, why this small setting may disagree with the
    paper's (kept only then; the report shows it under the evidence)."""
    out = {"claim": text, "holds": bool(holds), "evidence": evidence}
    if why and not holds:
        out["why"] = why
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Context:
    """One experiment's view of a lab run: its output folder, size, seed and run cache.

    Attributes:
        experiment: the experiment's ``NAME``.
        out: the lab's output folder (``index.html``, ``results.json``, ``figures/``, ``runs/``).
        mode: ``"tiny"``, ``"quick"`` or ``"full"``.
        seed: the lab's seed; :meth:`seed_for` derives one per run.
        data: the user's own data for this experiment (a path), or None for the bundled data.
        progress: whether to show progress bars.
        computed: names of the runs computed (not loaded from the cache) in this process.
    """

    experiment: str
    out: Path
    mode: str = "quick"
    seed: int = 0
    data: str | None = None
    progress: bool = True
    computed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.out = Path(self.out)

    @property
    def quick(self) -> bool:
        return self.mode != "full"

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The setting for this run's mode."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.mode]

    def seed_for(self, key: str) -> int:
        """A seed that depends only on the lab seed, the experiment and ``key``."""
        return zlib.crc32(f"{self.seed}:{self.experiment}:{key}".encode()) & 0x7FFFFFFF

    @property
    def runs_dir(self) -> Path:
        """Where finished runs are stored: one folder per mode, seed and data source, so a
        ``--quick`` result never stands in for a full one."""
        data = "bundled" if self.data is None else "data-%08x" % zlib.crc32(str(self.data).encode())
        return self.out / "runs" / f"{self.mode}-seed{self.seed}-{data}" / self.experiment

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s JSON-able result, computed once: stored atomically under ``key`` when it
        finishes and loaded from there by later calls (and later lab runs)."""
        path = self.runs_dir / (_slug(key) + ".json")
        if path.exists():
            try:
                with open(path) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                rec = None
            if isinstance(rec, dict) and "value" in rec and rec.get("key", key) == key:
                return rec["value"]
            # a damaged or foreign file (ours are renamed into place whole): recompute
        value = fn()
        atomic_write_json(path, {"key": key, "value": value})
        self.computed.append(key)
        return value

    def save_figure(self, fig, name: str) -> str:
        """Save a matplotlib figure as ``figures/<experiment>-<name>.png``, close it, and return
        the path relative to ``out`` (what goes into the result's ``figures``)."""
        import matplotlib.pyplot as plt

        rel = Path("figures") / f"{self.experiment}-{_slug(name)}.png"
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out / rel, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return rel.as_posix()

    @contextlib.contextmanager
    def bar(self, total: int, description: str) -> Iterator[Any]:
        """A progress bar over ``total`` steps: ``describe(text)``, ``advance()``."""
        from ..bench.progress import progress_bar

        with progress_bar(total, enabled=self.progress) as bar:
            bar.describe(f"{self.experiment}: {description}")
            yield bar


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[:150]


def figure(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
