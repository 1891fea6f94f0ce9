"""Exception types.

Each one also derives from ``RuntimeError`` because torch raises ``RuntimeError`` for the same
mistakes, so code written against ``torch.nn`` that catches ``RuntimeError`` keeps working.
"""


class ArgumentError(ValueError, RuntimeError):
    """An argument's value cannot be used (for example eps <= 0 in training)."""


class ShapeError(ArgumentError):
    """An input, weight, bias or running statistic has a shape the normalization cannot use."""


class DTypeError(TypeError, RuntimeError):
    """The input is not a real floating-point tensor (integer, bool and complex are refused)."""


class BackendUnavailableError(RuntimeError):
    """A known backend was asked for, but it cannot run here (not built, or a dependency is missing)."""
