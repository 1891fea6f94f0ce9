"""``normlab lab``'s runner: every experiment in turn, each result stored the moment it finishes,
``results.json`` and ``index.html`` rewritten after each one.

Layout of the output folder ``out``::

    index.html                      the report (self-contained: figures embedded)
    results.json                    {"experiments": {NAME: result}, "settings", ...}
    figures/                        the PNGs (axes.png, <experiment>-<name>.png)
    results/<mode>-seed<S>/NAME.json  each experiment's finished result (atomic)
    runs/...                        each experiment's finished runs (api.Context.cached)

``results.json`` is always rebuilt from ``results/<mode>-seed<S>/``, so it holds every
experiment finished at that mode and seed, not only those of the last ``--only``; an
interrupted lab loses nothing finished, and running it again skips finished experiments and
finished runs. An experiment that raises is recorded with its error and traceback and the
others still run; KeyboardInterrupt stops the lab (the report stays as it was after the last
finished experiment).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import __version__
from .._dispatch import synchronous_warmup
from . import api, axes, experiments, report

#: the experiments a single ``data`` path applies to (those that train on images)
IMAGE_EXPERIMENTS = ("batch_size", "groups", "sigmoid", "smoothness")


def select(names: Iterable[str] | None = None) -> list[str]:
    """``names`` (all when None) checked against the known experiments, in report order."""
    known = list(experiments.NAMES)
    if names is None:
        return known
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown lab experiment(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)}")
    return [n for n in known if n in names]


def resolve_data(data: str | os.PathLike | Mapping | None) -> dict[str, str]:
    """The user's data per experiment: one path applies to the image experiments, a mapping
    NAME -> path to those named. Paths are checked and made absolute (the run cache is keyed by
    them, so a resumed run finds its runs from any working directory)."""
    if data is None:
        return {}
    if isinstance(data, Mapping):
        unknown = [n for n in data if n not in experiments.NAMES]
        if unknown:
            raise ValueError(f"data for unknown experiment(s) {', '.join(unknown)}; "
                             f"known: {', '.join(experiments.NAMES)}")
        mapping = {name: _existing(path, name) for name, path in data.items()}
    else:
        path = _existing(data, "the image experiments")
        mapping = {n: path for n in IMAGE_EXPERIMENTS if n in experiments.NAMES}
    return mapping


def _existing(path, what: str) -> str:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data for {what}: no such file or folder: {path}")
    return str(path.resolve())


@synchronous_warmup()  # no call runs on ATen because its kernel is still compiling
def run_lab(names: Iterable[str] | None = None, out: str | os.PathLike = "normlab-lab",
            mode: str = "quick", seed: int = 0, data=None, progress: bool = True,
            rerun: bool = False) -> dict:
    """Run the lab's experiments ``names`` (all by default) into ``out``; return the results
    dict written to ``results.json``.

    Args:
        mode: ``"quick"``, ``"full"`` (or ``"tiny"``, for tests).
        data: None (bundled data), one path (for :data:`IMAGE_EXPERIMENTS`), or NAME -> path.
        progress: print a line per experiment and show the experiments' progress bars.
        rerun: run experiments that already finished at this mode, seed and data again
            (their finished runs still load from ``runs/``).
    """
    if mode not in api.MODES:
        raise ValueError(f"mode must be one of {api.MODES}, got {mode!r}")
    names = select(names)
    data_for = resolve_data(data)
    out = Path(out)
    axes.draw(out / report.AXES_FIGURE)
    say = _printer(progress)
    pending = list(names)
    results = rebuild(out, mode, seed, pending)
    for i, name in enumerate(names, 1):
        stored = _load(_store(out, mode, seed) / f"{name}.json")
        done = (stored is not None and stored.get("data") == data_for.get(name)
                and "error" not in stored["result"])
        if done and not rerun:
            say(f"[{i}/{len(names)}] {name}: finished earlier "
                f"({summary_line(name, stored['result'])})")
        else:
            say(f"[{i}/{len(names)}] {name}")
            result = run_one(name, out, mode, seed, data_for.get(name), progress)
            record = {"name": name, "mode": mode, "seed": seed, "data": data_for.get(name),
                      "result": result}  # not sorted: the experiment's key order is kept
            _atomic_write_text(_store(out, mode, seed) / f"{name}.json",
                               json.dumps(record, indent=1, allow_nan=True))
            say(f"    {summary_line(name, result)}")
        pending.remove(name)
        results = rebuild(out, mode, seed, pending)
    return results


def run_one(name: str, out: Path, mode: str, seed: int, data: str | None,
            progress: bool) -> dict:
    """One experiment's result, with ``seconds``; an exception becomes ``error`` and
    ``traceback`` (KeyboardInterrupt and SystemExit pass through)."""
    ctx = api.Context(name, Path(out), mode=mode, seed=seed, data=data, progress=progress)
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"title": name}
    try:
        module = experiments.load(name)
        meta = {"title": str(getattr(module, "TITLE", name)),
                "description": str(getattr(module, "DESCRIPTION", ""))}
        _seed_everything(ctx.seed_for("experiment"))
        result = {**meta, **_checked(module.run(ctx))}
    except Exception as e:
        result = {**meta, "claims": [], "metrics": {}, "figures": [],
                  "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    if data is not None:
        result["data"] = data
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def rebuild(out: str | os.PathLike, mode: str = "quick", seed: int = 0,
            pending: Iterable[str] = ()) -> dict:
    """Rewrite ``results.json`` and ``index.html`` from the results stored for ``mode`` and
    ``seed`` (atomically); ``pending``: experiments still to come, named in the report."""
    out = Path(out)
    found = {n: _load(_store(out, mode, seed) / f"{n}.json") for n in experiments.NAMES}
    found = {n: rec for n, rec in found.items() if rec is not None}
    results = {
        "experiments": {n: rec["result"] for n, rec in found.items()},
        "settings": {"mode": mode, "seed": seed,
                     "data": {n: rec["data"] for n, rec in found.items() if rec.get("data")}},
        "pending": list(pending),
        "normlab_version": __version__,
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
    }
    _atomic_write_text(out / "results.json", json.dumps(results, indent=1, allow_nan=True))
    _atomic_write_text(out / "index.html", report.render(results, out))
    return results


def summary_line(name: str, result: dict) -> str:
    """``"3/4 claims supported, 41.2 s"``, or the error."""
    if "error" in result:
        return f"ERROR {result['error'].splitlines()[0] if result['error'] else ''}"
    claims = result.get("claims", [])
    held = sum(bool(c["holds"]) for c in claims)
    return f"{held}/{len(claims)} claims supported, {result.get('seconds', 0):.1f} s"


# --- helpers


def _store(out: Path, mode: str, seed: int) -> Path:
    return Path(out) / "results" / f"{mode}-seed{seed}"


def _load(path: Path) -> dict | None:
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) and isinstance(rec.get("result"), dict) else None
    except (OSError, ValueError):
        return None


def _atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename; readable by others as the umask allows
    (the report is meant to be shared), not mkstemp's owner-only mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _seed_everything(seed: int) -> None:
    """Seed python, numpy and torch before an experiment, so its result does not depend on
    which experiments ran before it (experiments should still seed their runs themselves)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _checked(result: Any) -> dict:
    """An experiment's result checked against the API's shape, made JSON-able."""
    if not isinstance(result, dict):
        raise TypeError(f"run(ctx) must return a dict, got {type(result).__name__}")
    missing = [k for k in ("claims", "metrics", "figures") if k not in result]
    if missing:
        raise TypeError(f"run(ctx)'s result lacks {', '.join(missing)}")
    claims = []
    for c in result["claims"]:
        if not isinstance(c, dict) or not {"claim", "holds", "evidence"} <= set(c):
            raise TypeError(f"a claim must be api.claim(text, holds, evidence), got {c!r}")
        claims.append({**c, "holds": bool(c["holds"])})
    checked = {**result, "claims": claims, "figures": [str(f) for f in result["figures"]]}
    return _jsonable(checked)


def _jsonable(v: Any, where: str = "result") -> Any:
    """Numbers, strings, lists and dicts as JSON has them (numpy and torch scalars and arrays
    converted); anything else is an error naming where it is."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x, f"{where}[{k!r}]") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if hasattr(v, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(v.tolist(), where)
    raise TypeError(f"{where} is a {type(v).__name__}, which results.json cannot hold")


def _printer(enabled: bool):
    if not enabled:
        return lambda text: None
    try:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
        return lambda text: console.print(text, markup=False, soft_wrap=True)
    except ImportError:
        return lambda text: print(text, file=sys.stderr, flush=True)
