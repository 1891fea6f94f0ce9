"""pytest settings for the whole checkout: ``tests/`` and the doctests of the ``normlab`` package
(``testpaths`` and ``--doctest-modules`` in pyproject.toml), so whichever of them a run collects,
the environment below is set before normlab is imported. ``tests/conftest.py`` adds the test
suite's own settings."""
import importlib.util
import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter on CPU tensors. The variable
# is read when a kernel is decorated, so it is set before any normlab Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# auto prepares the cpu kernels in the background (ATen computing meanwhile) unless told not to:
# the tests need calls whose path does not depend on timing (tests/test_auto.py turns it on)
os.environ.setdefault("NORMLAB_BACKGROUND_WARMUP", "0")

# Doctest collection imports every module of the package: leave out those that cannot be
# imported without an optional dependency (the others import theirs where they use them).
collect_ignore_glob = []
if importlib.util.find_spec("triton") is None:
    collect_ignore_glob.append("normlab/kernels/*triton*.py")
