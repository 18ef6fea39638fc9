"""``value_and_metagrad``: the metagradient of a whole training run."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import compiled
from .errors import DivergenceError, NonFiniteMetagradError, StepSignatureError
from .strategies import PlannedStrategy, Replay, Strategy, execute
from .trees import fill_nondifferentiable, nonfinite_paths, partition


def check_step(step, state0, meta) -> None:
    """Raise :class:`StepSignatureError` unless ``step(state0, meta, t)`` has ``state0``'s structure, shapes, dtypes."""
    try:
        out = jax.eval_shape(step, state0, meta, jnp.int32(0))
    except Exception as err:  # re-raised with the contract spelled out
        raise StepSignatureError(
            f"calling step(state0, meta, t) with t an int32 scalar failed: {type(err).__name__}: {err}. "
            "step must be a pure function (state, meta, t) -> state."
        ) from err
    want = jax.tree.structure(state0)
    got = jax.tree.structure(out)
    if want != got:
        raise StepSignatureError(
            f"step(state, meta, t) must return a state with the same pytree structure as state0; "
            f"expected {want}, got {got}."
        )
    flat_in = jax.tree_util.tree_flatten_with_path(state0)[0]
    for (path, x), y in zip(flat_in, jax.tree.leaves(out)):
        if jnp.shape(x) != y.shape or jnp.result_type(x) != y.dtype:
            raise StepSignatureError(
                f"step changes the state leaf {jax.tree_util.keystr(path)} from "
                f"{jnp.result_type(x).name}{list(jnp.shape(x))} to {y.dtype.name}{list(y.shape)}; "
                "keep every leaf's shape and dtype fixed (cast the result, or build state0 with the dtype "
                "the step produces, e.g. after enabling float64)."
            )


def check_objective(objective, state0, meta) -> None:
    try:
        out = jax.eval_shape(objective, state0, meta)
    except Exception as err:
        raise StepSignatureError(
            f"calling objective(state, meta) failed: {type(err).__name__}: {err}."
        ) from err
    if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        raise StepSignatureError(
            f"objective(state, meta) must return a real scalar; got {out}. "
            "Reduce it (e.g. take the mean loss) before returning."
        )


def value_and_metagrad(
    step,
    objective,
    state0,
    meta,
    num_steps: int,
    *,
    k: int | None = None,
    memory_budget_bytes: int | None = None,
    strategy: Strategy | None = None,
    wrt_state0: bool = False,
    check_finite: bool = True,
):
    """Value and exact gradient of ``objective(state_T, meta)`` with respect to ``meta``.

    The run is ``state_{t+1} = step(state_t, meta, t)`` for ``t = 0 .. num_steps-1``
    with ``t`` an int32 scalar; ``step`` must be pure and jittable so that any
    segment can be recomputed bit-for-bit. States and metaparameters are arbitrary
    pytrees; integer/boolean leaves get ``float0`` zero gradients.

    Args:
      step, objective: pure functions; pass the same objects across calls to reuse
        their compilations.
      state0, meta: pytrees (``meta`` may hold several named metaparameters).
      num_steps: ``T >= 1``.
      k: REPLAY's branching factor (default 8); or give
      memory_budget_bytes: to derive ``k`` from the measured state size; or give
      strategy: any :class:`~replay.Strategy` (``Replay(k)``, ``FullUnroll()``, ``Remat()``).
      wrt_state0: also return the gradient with respect to ``state0``.
      check_finite: raise :class:`~replay.DivergenceError` if the inner run is
        non-finite (naming the first bad step), or
        :class:`~replay.NonFiniteMetagradError` if only the metagradient is.

    Returns:
      ``(value, grad_meta)``, or ``(value, (grad_meta, grad_state0))`` with ``wrt_state0``;
      each gradient has the structure of its argument.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if strategy is not None and (k is not None or memory_budget_bytes is not None):
        raise ValueError("give either strategy=... or k/memory_budget_bytes, not both.")
    if strategy is None:
        strategy = Replay(k=k, memory_budget_bytes=memory_budget_bytes)
    check_step(step, state0, meta)
    check_objective(objective, state0, meta)

    value, grad_meta, grad_state0 = strategy.value_and_grads(step, objective, state0, meta, num_steps)
    if check_finite:
        _raise_if_nonfinite(strategy, step, objective, state0, meta, num_steps, value, (grad_meta, grad_state0))
    grad_meta = fill_nondifferentiable(grad_meta, meta)
    if wrt_state0:
        return value, (grad_meta, fill_nondifferentiable(grad_state0, state0))
    return value, grad_meta


def _raise_if_nonfinite(strategy, step, objective, state0, meta, num_steps, value, grads):
    grad_meta, grad_state0 = grads
    bad_meta = nonfinite_paths(partition(meta)[0])
    if bad_meta:
        raise NonFiniteMetagradError(
            f"the metaparameters hold NaN or inf at {', '.join(bad_meta[:4])}: fix them before differentiating.",
            paths=bad_meta,
        )
    if not bool(jnp.isfinite(value)):
        t = int(compiled.first_nonfinite_step(step, state0, meta, 0, num_steps))
        if t < num_steps:
            raise DivergenceError(
                f"the inner training run diverged: state_{t + 1} (the output of step t={t} of {num_steps}) "
                "holds NaN or inf. Lower the learning rate around that step, clip gradients, or check the data.",
                step=t,
            )
        raise DivergenceError(
            f"the objective is {float(value)} although all {num_steps} steps are finite: "
            "check the objective (e.g. log of 0) on the final state.",
            step=None,
        )
    bad = nonfinite_paths(grads)
    if bad:
        # Locate where the reverse pass went bad (re-executes REPLAY's plan with a check per leaf).
        diagnose = strategy if isinstance(strategy, PlannedStrategy) else Replay(k=8)
        plan, leaf = diagnose.plan(num_steps, state0)
        execute(plan, leaf, step, objective, state0, meta, num_steps, check_each_leaf=True)
        raise NonFiniteMetagradError(
            f"the metagradient holds NaN or inf at {', '.join(bad[:4])} although the run and its value are finite.",
            paths=bad,
        )
