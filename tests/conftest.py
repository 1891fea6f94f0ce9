"""Shared test settings: one hypothesis profile, bounded so the suite stays quick on 2 cores."""
import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter on CPU tensors. The variable
# is read when a kernel is decorated, so it is set before any normlab Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# auto prepares the cpu kernels in the background (ATen computing meanwhile) unless told not to:
# the tests need calls whose path does not depend on timing (tests/test_warmup.py turns it on)
os.environ.setdefault("NORMLAB_BACKGROUND_WARMUP", "0")
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
