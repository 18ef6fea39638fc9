"""Errors that say what to change."""


class ReplayError(ValueError):
    """Base class of the errors raised by :mod:`replay`."""


class StepSignatureError(ReplayError):
    """``step`` does not map a state to a state of the same structure, shapes and dtypes."""


class DivergenceError(ReplayError, FloatingPointError):
    """The inner training run produced a NaN or inf; ``.step`` is the first step whose output is non-finite."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class NonFiniteMetagradError(ReplayError, FloatingPointError):
    """The metagradient holds a NaN or inf although the inner run is finite."""

    def __init__(self, message: str, steps: tuple[int, int] | None = None, paths: list[str] | None = None):
        super().__init__(message)
        self.steps = steps
        self.paths = paths or []


class MemoryBudgetError(ReplayError, MemoryError):
    """The memory budget cannot hold the fewest states any plan needs."""
