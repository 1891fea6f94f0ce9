"""Backends: ``reference`` (readable torch-op code from the formulas, the oracle of the tests)
and ``torch`` (ATen's own kernels, the peer); fused ``cpu`` and ``triton`` backends to come."""
