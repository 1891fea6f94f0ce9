"""The lab's experiments, in report order; each a module with ``NAME``, ``TITLE``,
``DESCRIPTION`` and ``run(ctx)`` (see :mod:`normlab.lab.api`). Imported on demand."""
from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("batch_size", "groups", "sigmoid", "invariance", "padding", "smoothness", "speed")


def load(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown lab experiment {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")
