"""The compiled pieces every strategy is built from.

Each function is jit-compiled once per (step or objective function, shapes, dtypes):
step indices and segment lengths are traced values, never static, so a whole
REPLAY traversal compiles a fixed number of programs whatever ``num_steps`` is.
Pass the same ``step``/``objective`` objects across calls to reuse compilations.

``step`` and ``objective`` are *arguments* of the compiled programs, as pytrees
(:func:`as_pytree_function`): a ``jax.tree_util.Partial(f, data)`` passes the
arrays ``data`` to every program as device buffers, so a training set is never
compiled in as a constant, and changing its contents (not its shape) does not
recompile. A plain function is a pytree with no leaves, compiled per function
object as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .trees import combine, partition


def _index(t):
    return jnp.asarray(t, dtype=jnp.int32)


def as_pytree_function(fn):
    """``fn`` as a pytree whose array leaves are passed to compiled programs as arguments.

    A callable that already is a pytree node (``jax.tree_util.Partial``, an
    equinox module, a registered dataclass) is returned unchanged; any other
    callable is wrapped in a ``jax.tree_util.Partial`` with no arguments (no
    leaves: the function itself is the static part).
    """
    if not callable(fn):
        raise TypeError(f"expected a function, got {type(fn).__name__}.")
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(fn)):
        return jax.tree_util.Partial(fn)
    return fn


@jax.jit
def _advance(step, state, meta, start, stop):
    return lax.fori_loop(_index(start), _index(stop), lambda t, s: step(s, meta, t), state)


def advance(step, state, meta, start, stop):
    """``state_stop`` from ``state_start``: ``stop - start`` steps in one ``fori_loop`` with traced bounds."""
    return _advance(as_pytree_function(step), state, meta, start, stop)


def step_vjp(step, state, meta, t, ct_next):
    """Pull the cotangent of ``state_{t+1}`` (differentiable leaves only) back through one step.

    Returns ``(ct_state_t, ct_meta)`` over the differentiable leaves of state and meta.
    """
    state_diff, state_rest = partition(state)
    meta_diff, meta_rest = partition(meta)

    def differentiable_step(sd, md):
        return partition(step(combine(sd, state_rest), combine(md, meta_rest), t))[0]

    _, pullback = jax.vjp(differentiable_step, state_diff, meta_diff)
    return pullback(ct_next)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def backprop_leaf(step, leaf_size, state, meta, start, length, ct_state, ct_meta):
    """One REPLAY leaf (see :func:`_backprop_leaf`); ``step`` may hold arrays (:func:`as_pytree_function`)."""
    return _backprop_leaf(as_pytree_function(step), leaf_size, state, meta, start, length, ct_state, ct_meta)


@functools.partial(jax.jit, static_argnums=(1,))
def _backprop_leaf(step, leaf_size, state, meta, start, length, ct_state, ct_meta):
    """One REPLAY leaf: recompute ``length <= leaf_size`` states from ``state_start``, then VJP them in reverse.

    The forward states are stacked (one scan), the reverse pass is a second scan of
    step VJPs; lengths shorter than ``leaf_size`` are masked with ``lax.cond`` so
    one compilation serves every leaf.
    """
    start, length = _index(start), _index(length)
    if leaf_size == 1:
        ct_state, ct_m = step_vjp(step, state, meta, start, ct_state)
        return ct_state, _add(ct_meta, ct_m)

    offsets = jnp.arange(leaf_size, dtype=jnp.int32)

    def forward(s, i):
        s_next = lax.cond(i < length - 1, lambda s: step(s, meta, start + i), lambda s: s, s)
        return s_next, s

    _, states = lax.scan(forward, state, offsets)

    def backward(carry, xs):
        i, s = xs
        ct_s, ct_m = carry

        def pull(ct_s, ct_m):
            ct_prev, ct_m_step = step_vjp(step, s, meta, start + i, ct_s)
            return ct_prev, _add(ct_m, ct_m_step)

        return lax.cond(i < length, pull, lambda a, b: (a, b), ct_s, ct_m), None

    (ct_state, ct_meta), _ = lax.scan(backward, (ct_state, ct_meta), (offsets, states), reverse=True)
    return ct_state, ct_meta


def objective_vjp(objective, state, meta):
    """``(value, d value / d state, d value / d meta)`` over differentiable leaves."""
    return _objective_vjp(as_pytree_function(objective), state, meta)


@jax.jit
def _objective_vjp(objective, state, meta):
    state_diff, state_rest = partition(state)
    meta_diff, meta_rest = partition(meta)

    def differentiable_objective(sd, md):
        return objective(combine(sd, state_rest), combine(md, meta_rest))

    value, pullback = jax.vjp(differentiable_objective, state_diff, meta_diff)
    ct_state, ct_meta = pullback(jnp.ones_like(value))
    return value, ct_state, ct_meta


def _run(step, state0, meta, num_steps, remat):
    def body(s, t):
        return step(s, meta, t), None

    if remat:
        body = jax.checkpoint(body)
    final, _ = lax.scan(body, state0, jnp.arange(num_steps, dtype=jnp.int32))
    return final


def unrolled_value_and_grad(step, objective, state0, meta, num_steps, remat):
    """``jax.value_and_grad`` of the whole run as one ``lax.scan`` (optionally remat per step)."""
    return _unrolled_value_and_grad(as_pytree_function(step), as_pytree_function(objective), state0, meta,
                                    num_steps, remat)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _unrolled_value_and_grad(step, objective, state0, meta, num_steps, remat):
    state_diff, state_rest = partition(state0)
    meta_diff, meta_rest = partition(meta)

    def value(sd, md):
        m = combine(md, meta_rest)
        final = _run(step, combine(sd, state_rest), m, num_steps, remat)
        return objective(final, m)

    v, (g_state, g_meta) = jax.value_and_grad(value, argnums=(0, 1))(state_diff, meta_diff)
    return v, g_meta, g_state


def first_nonfinite_step(step, state, meta, start, stop):
    """First ``t`` in ``[start, stop)`` whose output ``state_{t+1}`` is non-finite, else ``stop``."""
    return _first_nonfinite_step(as_pytree_function(step), state, meta, start, stop)


@jax.jit
def _first_nonfinite_step(step, state, meta, start, stop):

    def finite(s):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(partition(s)[0])]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

    def cond(carry):
        t, _, ok = carry
        return (t < stop) & ok

    def body(carry):
        t, s, _ = carry
        s = step(s, meta, t)
        ok = finite(s)
        return jnp.where(ok, t + 1, t), s, ok

    t, _, _ = lax.while_loop(cond, body, (_index(start), state, jnp.bool_(True)))
    return t


def cache_sizes() -> dict:
    """How many programs each compiled piece holds (one per step/objective function, shapes and dtypes)."""
    pieces = {"advance": _advance, "backprop_leaf": _backprop_leaf, "objective_vjp": _objective_vjp,
              "unrolled_value_and_grad": _unrolled_value_and_grad, "first_nonfinite_step": _first_nonfinite_step}
    return {name: fn._cache_size() for name, fn in pieces.items()}
