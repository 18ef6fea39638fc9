"""The Problem contract: what every system of metagrad implements or consumes.

A training run is a pure function of its metaparameters (REPLAY's contract,
Engstrom et al., arXiv 2503.13751)::

    meta        = problem.init_meta()                 # a dict of named metaparameters
    state_0     = problem.init_state(meta)
    state_{t+1} = problem.step(state_t, meta, t)      # t = 0 .. num_steps-1, an int32 scalar
    value       = problem.objective(state_T, meta)    # the scalar metaobjective
    meta        = problem.project_meta(meta)          # back to the feasible set after an update
    report      = problem.evaluate(state)             # {"val_loss": ..., ...}: plain floats

The supervised :class:`~metagrad.training.TrainingProblem` and DGA's
:class:`~metagrad.mixing.MixingProblem` implement it; MGD, the applications,
the interactive trainer, trajectory recording and transfer accept any object
that does. A user's own ``step``/``objective`` pair becomes a Problem with
:class:`FunctionProblem`.

Randomness follows one public key schedule (:func:`stream_key`): the key of
stream ``s`` at step ``t`` is ``fold_in(fold_in(key(seed), s), t)``, so any
segment of a run recomputes bit-for-bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

import replay

__all__ = [
    "STREAMS", "FunctionProblem", "Problem", "check_problem", "run_key", "stream_key", "train",
    "train_and_evaluate", "value_and_metagrad",
]


@runtime_checkable
class Problem(Protocol):
    """The contract every training problem of metagrad implements (see the module docstring).

    ``step`` and ``objective`` must be pure and jittable; they may be
    ``jax.tree_util.Partial`` objects holding the data as arguments
    (:func:`replay.as_pytree_function`), so the data is never compiled in.
    """

    num_steps: int

    def init_meta(self) -> dict: ...

    def project_meta(self, meta: dict) -> dict: ...

    def init_state(self, meta: dict | None = None) -> Any: ...

    def step(self, state, meta, t): ...

    def objective(self, state, meta): ...

    def evaluate(self, state) -> dict: ...


def check_problem(problem) -> None:
    """Raise ``TypeError`` naming what is missing unless ``problem`` implements :class:`Problem`."""
    missing = [name for name in ("num_steps", "init_meta", "project_meta", "init_state", "step", "objective",
                                 "evaluate") if not hasattr(problem, name)]
    if missing:
        raise TypeError(
            f"{type(problem).__name__} is not a metagrad Problem: it lacks {', '.join(missing)}. "
            "Implement the contract of metagrad.Problem, or wrap your functions in metagrad.FunctionProblem."
        )


# ------------------------------------------------------------------ the key schedule
#: The random streams of a run, each a fixed integer folded into the run's key.
STREAMS = {
    "init": 0,              # parameter initialization
    "batch": 1,             # the order in which examples are visited
    "dropout": 2,           # dropout and any other stochastic layer, per step
    "domain_sampling": 3,   # DGA: the domain drawn for each batch slot, per step
    "alignment": 4,         # DGA: the batches of the alignment gradients, per update
    "interactive": 7,       # the interactive trainer's data-appending commands
}


def run_key(seed):
    """The key of a whole run: ``jax.random.key(seed)`` (``seed`` may be a traced integer)."""
    return jax.random.key(seed)


def stream_key(seed, stream: str, t=None):
    """The key of random stream ``stream`` (a name of :data:`STREAMS`), at step ``t`` when given.

    ``fold_in(fold_in(key(seed), STREAMS[stream]), t)``: the one schedule every
    problem uses for its batches, dropout and sampling.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; the streams are {sorted(STREAMS)}.")
    key = jax.random.fold_in(run_key(seed), STREAMS[stream])
    return key if t is None else jax.random.fold_in(key, t)


# ------------------------------------------------------------------ functions of any Problem
def train(problem, meta=None, num_steps: int | None = None, *, state=None, start: int = 0):
    """The state after steps ``start .. num_steps-1`` (default all ``problem.num_steps``): one compiled call."""
    meta = problem.init_meta() if meta is None else meta
    state = problem.init_state(meta) if state is None else state
    stop = problem.num_steps if num_steps is None else int(num_steps)
    return replay.advance(problem.step, state, meta, start, stop)


def train_and_evaluate(problem, meta=None) -> dict:
    """``problem.evaluate`` of the final state of a run under ``meta``."""
    return problem.evaluate(train(problem, meta))


def value_and_metagrad(problem, meta, **kwargs):
    """``replay.value_and_metagrad`` of ``problem``'s run (``kwargs``: ``k``, ``strategy``, ...)."""
    return replay.value_and_metagrad(problem.step, problem.objective, problem.init_state(meta), meta,
                                     problem.num_steps, **kwargs)


# ------------------------------------------------------------------ a Problem from plain functions
@dataclasses.dataclass(frozen=True, eq=False)
class FunctionProblem:
    """A :class:`Problem` made of a user's own pure functions.

    Args:
      step: ``(state, meta, t) -> state``.
      objective: ``(state, meta) -> scalar``.
      init_state: ``state_0``: a pytree, or a function ``meta -> state_0``.
      meta: the initial metaparameters (a dict of arrays).
      num_steps: ``T``.
      project: ``meta -> meta`` back to the feasible set (default: identity).
      evaluate: ``state -> dict`` of floats (default: ``{"objective": objective(state, meta)}``).
    """

    step: Callable
    objective: Callable
    init_state_value: Any
    meta: dict
    num_steps: int
    project: Callable | None = None
    evaluate_fn: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}.")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict of named metaparameters, got {type(self.meta).__name__}.")

    def init_meta(self) -> dict:
        return dict(self.meta)

    def project_meta(self, meta):
        return meta if self.project is None else self.project(meta)

    def init_state(self, meta=None):
        value = self.init_state_value
        return value(self.meta if meta is None else meta) if callable(value) else value

    def evaluate(self, state) -> dict:
        if self.evaluate_fn is not None:
            return {k: float(v) for k, v in self.evaluate_fn(state).items()}
        return {"objective": float(self.objective(state, self.meta))}


def as_float_dict(values: dict) -> dict:
    """``{name: float(value)}`` of a dict of scalars (device arrays included)."""
    return {name: float(jnp.asarray(v)) for name, v in values.items()}
