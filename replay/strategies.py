"""How the reverse pass gets its states: strategies passed as values.

In the style of diffrax's adjoints, every strategy has one call signature, so a
test or a benchmark swaps them on the same problem:

* :class:`Replay` -- REPLAY's lazy k-ary checkpoint tree (Engstrom et al. 2025,
  arXiv 2503.13751): O(k log_k T) stored states, about T log_k T recomputed steps.
* :class:`FullUnroll` -- ``jax.grad`` through one ``lax.scan``: stores all T states.
* :class:`Remat` -- ``jax.checkpoint`` around each step inside the scan: stores
  the T states but recomputes each step's internals in the reverse pass.
"""

from __future__ import annotations

import abc
import dataclasses
import logging

from . import compiled
from .errors import MemoryBudgetError, NonFiniteMetagradError
from .plan import (
    Advance, Backprop, Free, Objective, binomial_plan, kary_plan, leaf_buffer_states, live_state_bound, tree_depth,
)
from .storage import Storage
from .trees import nonfinite_paths, tree_bytes

logger = logging.getLogger("replay")


class Strategy(abc.ABC):
    """A way to compute ``(value, d value/d meta, d value/d state_0)`` of a training run."""

    @abc.abstractmethod
    def value_and_grads(self, step, objective, state0, meta, num_steps):
        """Return ``(value, grad_meta, grad_state0)`` over the differentiable leaves (``None`` elsewhere)."""


@dataclasses.dataclass(frozen=True)
class FullUnroll(Strategy):
    """Reverse-mode through the whole run as one ``lax.scan``; memory grows with T."""

    def value_and_grads(self, step, objective, state0, meta, num_steps):
        return compiled.unrolled_value_and_grad(step, objective, state0, meta, num_steps, False)


@dataclasses.dataclass(frozen=True)
class Remat(Strategy):
    """Full unroll with ``jax.checkpoint`` around every step (stores only the step inputs)."""

    def value_and_grads(self, step, objective, state0, meta, num_steps):
        return compiled.unrolled_value_and_grad(step, objective, state0, meta, num_steps, True)


def recompute_estimate(num_steps: int, k: int, leaf_size: int) -> float:
    """Forward steps REPLAY recomputes beyond the first pass and the leaves: ``T * depth * (k-1)/k`` at most."""
    return num_steps * max(tree_depth(num_steps, k, leaf_size) - 1, 0) * (k - 1) / k


def choose_k(num_steps: int, state_bytes: int, memory_budget_bytes: int) -> int:
    """The ``k`` (with ``leaf_size = k``) that recomputes least among those whose live states fit the budget.

    Larger k recomputes fewer steps (``T log_k T``) but stores more states
    (``k log_k T``); among equally cheap plans the one with fewer states wins.
    """
    max_states = memory_budget_bytes // max(state_bytes, 1)
    candidates = range(2, max(min(num_steps, max_states), 2) + 1)
    fits = [k for k in candidates if live_state_bound(num_steps, k, k) <= max_states]
    if not fits:
        need = live_state_bound(num_steps, 2, 2)
        raise MemoryBudgetError(
            f"a memory budget of {memory_budget_bytes:,} bytes holds {max_states} states of {state_bytes:,} bytes, "
            f"but REPLAY needs at least {need} for {num_steps} steps: "
            f"raise memory_budget_bytes to at least {need * state_bytes:,}."
        )
    return min(fits, key=lambda k: (recompute_estimate(num_steps, k, k), live_state_bound(num_steps, k, k)))


class PlannedStrategy(Strategy):
    """A strategy given by a checkpoint plan (``self.plan``) run by :func:`execute` with ``self.storage``."""

    def value_and_grads(self, step, objective, state0, meta, num_steps):
        plan, leaf = self.plan(num_steps, state0)
        return execute(plan, leaf, step, objective, state0, meta, num_steps, storage=self.storage)


@dataclasses.dataclass(frozen=True)
class Replay(PlannedStrategy):
    """REPLAY: exact metagradients from a lazy k-ary tree of recomputed checkpoints.

    Engstrom, Ilyas, Chen, Feldmann, Moses, Madry, "Optimizing ML Training with
    Metagradient Descent", arXiv 2503.13751 (2025), Sec. 3.

    Args:
      k: branching factor (>= 2). Give ``k`` or ``memory_budget_bytes``.
      memory_budget_bytes: bytes allowed for stored states; ``k`` is then the
        largest whose live-state bound fits (logged at INFO on logger ``replay``).
      leaf_size: segments of at most this many steps are reversed by one compiled
        call (states stacked, then a reverse scan of step VJPs). Defaults to ``k``.
      storage: where stored states live (:class:`~replay.Storage`: device, host,
        disk); default all on the device.
    """

    k: int | None = None
    memory_budget_bytes: int | None = None
    leaf_size: int | None = None
    storage: Storage | None = None

    def __post_init__(self):
        if self.k is None and self.memory_budget_bytes is None:
            object.__setattr__(self, "k", 8)
        if self.k is not None and (not isinstance(self.k, int) or self.k < 2):
            raise ValueError(f"Replay(k={self.k!r}): k must be an integer >= 2 (k=2 uses the least memory).")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"Replay(memory_budget_bytes={self.memory_budget_bytes!r}) must be positive.")
        if self.leaf_size is not None and (not isinstance(self.leaf_size, int) or self.leaf_size < 1):
            raise ValueError(f"Replay(leaf_size={self.leaf_size!r}) must be an integer >= 1.")

    def resolve(self, num_steps: int, state0) -> tuple[int, int]:
        """The ``(k, leaf_size)`` used for a run of ``num_steps`` steps from ``state0``."""
        k = self.k
        if k is None:
            state_bytes = tree_bytes(state0)
            k = choose_k(num_steps, state_bytes, self.memory_budget_bytes)
            logger.info(
                "REPLAY: budget %s bytes, state %s bytes -> k=%d (at most %d live states, %s bytes)",
                f"{self.memory_budget_bytes:,}", f"{state_bytes:,}", k,
                live_state_bound(num_steps, k, k), f"{live_state_bound(num_steps, k, k) * state_bytes:,}",
            )
        return k, self.leaf_size or k

    def plan(self, num_steps: int, state0):
        k, leaf = self.resolve(num_steps, state0)
        return kary_plan(num_steps, k, leaf), leaf

@dataclasses.dataclass(frozen=True)
class Binomial(PlannedStrategy):
    """The binomial (revolve-optimal) checkpoint plan executed by the same engine as :class:`Replay`.

    Griewank & Walther, "Algorithm 799: revolve", ACM TOMS (2000). For the same
    number of live states it recomputes fewer steps than REPLAY's k-ary tree.

    Args:
      checkpoints: stored states beyond ``state_0``; or give
      memory_budget_bytes: from which ``checkpoints = budget // state_bytes - 2 - leaf_size``.
      leaf_size: steps per compiled leaf (default 8).
      storage: where stored states live (see :class:`~replay.Storage`).
    """

    checkpoints: int | None = None
    memory_budget_bytes: int | None = None
    leaf_size: int = 8
    storage: Storage | None = None

    def resolve(self, num_steps: int, state0) -> int:
        if self.checkpoints is not None:
            return self.checkpoints
        if self.memory_budget_bytes is None:
            raise ValueError("Binomial needs checkpoints=... or memory_budget_bytes=....")
        state_bytes = tree_bytes(state0)
        c = self.memory_budget_bytes // max(state_bytes, 1) - 2 - self.leaf_size
        if c < 1:
            need = (3 + self.leaf_size) * state_bytes
            raise MemoryBudgetError(
                f"a memory budget of {self.memory_budget_bytes:,} bytes leaves no checkpoint for states of "
                f"{state_bytes:,} bytes with leaf_size={self.leaf_size}: raise it to at least {need:,} "
                "or lower leaf_size."
            )
        logger.info("binomial plan: budget %s bytes -> %d checkpoints", f"{self.memory_budget_bytes:,}", c)
        return c

    def plan(self, num_steps: int, state0):
        return binomial_plan(num_steps, self.resolve(num_steps, state0), self.leaf_size), self.leaf_size

def execute(plan, leaf_size, step, objective, state0, meta, num_steps, *, check_each_leaf=False, monitor=None,
            storage: Storage | None = None):
    """Run a checkpoint plan with the compiled pieces; return ``(value, grad_meta, grad_state0)``.

    ``monitor(op, live_states)``, when given, is called after every op with the
    number of states held at that moment (stored ones plus a running leaf's buffer).

    With ``check_each_leaf`` the cotangent is checked after every leaf and a
    :class:`~replay.errors.NonFiniteMetagradError` names the first (latest) steps
    where it became non-finite; this synchronizes, so it is used for diagnosis only.
    """
    states = (storage or Storage()).open(state0)
    try:
        return _run_plan(plan, leaf_size, step, objective, meta, states, state0, check_each_leaf, monitor)
    finally:
        states.close()


def _run_plan(plan, leaf_size, step, objective, meta, states, state0, check_each_leaf, monitor):
    states[0] = state0
    value = ct_state = ct_meta = None
    for op in plan:
        if isinstance(op, Advance):
            states[op.dst] = compiled.advance(step, states[op.src], meta, op.src, op.dst)
        elif isinstance(op, Backprop):
            ct_state, ct_meta = compiled.backprop_leaf(
                step, leaf_size, states[op.start], meta, op.start, op.stop - op.start, ct_state, ct_meta
            )
            if check_each_leaf:
                bad = nonfinite_paths((ct_state, ct_meta))
                if bad:
                    raise NonFiniteMetagradError(
                        f"the reverse pass became non-finite in steps [{op.start}, {op.stop}) "
                        f"(first seen in {', '.join(bad[:4])}) although the forward run is finite: "
                        "the run is too sensitive to its metaparameters there (lower the learning rate or "
                        "shorten the run), or the step's derivative is undefined (e.g. sqrt at 0).",
                        steps=(op.start, op.stop),
                        paths=bad,
                    )
        elif isinstance(op, Free):
            del states[op.t]
        elif isinstance(op, Objective):
            value, ct_state, ct_meta = compiled.objective_vjp(objective, states[op.t], meta)
        else:  # pragma: no cover - plans are built by this package
            raise TypeError(f"unknown plan op {op!r}")
        if monitor is not None:
            extra = leaf_buffer_states(op, leaf_size) if isinstance(op, Backprop) else 0
            monitor(op, len(states) + extra)
    return value, ct_meta, ct_state
