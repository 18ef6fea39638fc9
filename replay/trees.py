"""Pytree helpers: split a pytree into its differentiable (inexact) leaves and the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_differentiable(leaf) -> bool:
    """True for floating or complex array-likes; integer, boolean and key leaves get no gradient."""
    try:
        dtype = jnp.result_type(leaf)
    except TypeError:
        return False
    return jnp.issubdtype(dtype, jnp.inexact)


def partition(tree):
    """Split ``tree`` into ``(differentiable, rest)``, each with ``None`` where the other has a leaf."""
    diff = jax.tree.map(lambda x: x if is_differentiable(x) else None, tree)
    rest = jax.tree.map(lambda x: None if is_differentiable(x) else x, tree)
    return diff, rest


def combine(diff, rest):
    """Inverse of :func:`partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, diff, rest, is_leaf=lambda x: x is None)


def fill_nondifferentiable(grad_diff, like):
    """Give ``grad_diff`` (``None`` at non-differentiable leaves) the structure of ``like``.

    Non-differentiable leaves get ``float0`` zeros, as ``jax.grad(..., allow_int=True)`` does.
    """
    return jax.tree.map(
        lambda g, x: np.zeros(np.shape(x), dtype=jax.dtypes.float0) if g is None else g,
        grad_diff,
        like,
        is_leaf=lambda x: x is None,
    )


def tree_bytes(tree) -> int:
    """Bytes held by the array leaves of ``tree`` (its measured size as a stored state)."""
    return int(sum(np.dtype(jnp.result_type(x)).itemsize * int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> bool:
    """True when every inexact leaf of ``tree`` is finite (blocks until computed)."""
    leaves = [x for x in jax.tree.leaves(tree) if is_differentiable(x)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def nonfinite_paths(tree) -> list[str]:
    """Key paths of the inexact leaves of ``tree`` that hold a NaN or inf."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_differentiable(x) and not bool(jnp.all(jnp.isfinite(x))):
            bad.append(jax.tree_util.keystr(path))
    return bad
