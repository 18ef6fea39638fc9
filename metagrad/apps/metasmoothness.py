"""The metasmoothness diagnostic: how well a training setup's metagradients predict its behaviour.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 4:
from three deterministic runs at metaparameters ``z``, ``z + h v`` and ``z + 2 h v``

* the curvature ``|f(z+2hv) - 2 f(z+hv) + f(z)| / h^2`` of the metaobjective ``f``;
* the empirical metasmoothness: the agreement of the signs of the parameter
  changes ``d1 = theta_h - theta_0`` and ``d2 = theta_2h - theta_h``, weighted
  by how far each parameter moves,
  ``sum_i (|d1_i| + |d2_i|) sign(d1_i d2_i) / sum_i (|d1_i| + |d2_i|)``,
  in ``[-1, 1]`` (1: the trained model moves along a straight line, smooth);

plus how well the metagradient predicts the change of ``f`` along its own
direction at several step sizes (``f(z - s g/|g|) - f(z)`` against ``-s |g|``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _axpy(meta, direction, scale):
    return jax.tree.map(lambda m, d: m + scale * d, meta, direction)


@jax.jit
def objective_value(objective, state, meta):
    """``objective(state, meta)`` compiled; ``objective`` is a pytree (a problem's ``jax.tree_util.Partial``
    holding its data as arguments), so the data are not compiled in and one program serves every call."""
    return objective(state, meta)


def sign_agreement(d1, d2) -> float:
    """Movement-weighted agreement of the signs of two parameter changes, in [-1, 1]."""
    d1, d2 = _flat(d1), _flat(d2)
    weight = np.abs(d1) + np.abs(d2)
    total = weight.sum()
    if total == 0:
        return 1.0
    return float(np.sum(weight * np.sign(d1 * d2)) / total)


def metasmoothness(problem, meta, direction, h: float) -> dict:
    """Curvature and empirical metasmoothness of ``problem`` at ``meta`` along ``direction`` with step ``h``."""
    thetas, values = [], []
    for i in range(3):
        z = _axpy(meta, direction, i * h)
        state = problem.train(z)
        thetas.append(state["params"])
        values.append(float(objective_value(problem.objective, state, z)))
    d1 = jax.tree.map(jnp.subtract, thetas[1], thetas[0])
    d2 = jax.tree.map(jnp.subtract, thetas[2], thetas[1])
    return {
        "h": h,
        "objective": values,
        "curvature": abs(values[2] - 2 * values[1] + values[0]) / h**2,
        "metasmoothness": sign_agreement(d1, d2),
    }


def gradient_prediction(problem, meta, step_sizes, *, k: int = 8) -> list[dict]:
    """Predicted (first-order) vs actual change of the metaobjective along the normalized metagradient."""
    value, grad = problem.value_and_metagrad(meta, k=k)
    norm = float(np.linalg.norm(_flat(grad)))
    unit = jax.tree.map(lambda g: g / norm, grad)
    rows = []
    for s in step_sizes:
        z = _axpy(meta, unit, -s)
        actual = float(objective_value(problem.objective, problem.train(z), z)) - float(value)
        rows.append({"step": s, "predicted": -s * norm, "actual": actual,
                     "ratio": actual / (-s * norm) if norm > 0 else float("nan")})
    return rows


def random_direction(meta, seed: int = 0):
    """A Gaussian direction with the structure of ``meta``, normalized to unit length."""
    leaves, treedef = jax.tree.flatten(meta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    d = [jax.random.normal(key, jnp.shape(x), jnp.result_type(x)) for key, x in zip(keys, leaves)]
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in d))
    return jax.tree.unflatten(treedef, [x / norm for x in d])
