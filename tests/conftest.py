"""Shared test settings: one hypothesis profile, bounded so the suite stays quick on 2 cores.
The environment normlab reads at import (``TRITON_INTERPRET`` without a GPU, no background
warm-up) is set by the checkout's top-level ``conftest.py``, loaded before this one."""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "normlab",
    max_examples=int(os.environ.get("NORMLAB_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, CI never flakes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("normlab")

torch.set_num_threads(min(2, torch.get_num_threads()))
