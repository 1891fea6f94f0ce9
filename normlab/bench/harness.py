"""The old home of the kernel bench's pieces, kept for one caller outside :mod:`normlab.bench`:
:mod:`normlab.lab.experiments.speed` uses ``harness.X`` for the names below. New code imports
from :mod:`.spec`, :mod:`.peers` and :mod:`.runner`; drop this module once that caller does."""
from .peers import _norm_fns
from .runner import _inputs, _step, time_cell
from .spec import LAYOUTS, Cell, Config

__all__ = ["Cell", "Config", "LAYOUTS", "_inputs", "_norm_fns", "_step", "time_cell"]
