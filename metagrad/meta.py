"""Metaparameters: named parts of one pytree, each with its parametrization and projection.

A metaparameter *spec* is a static value (hashable, no arrays that change); the
metaparameter *values* live in a dict ``{"lr_schedule": ..., "data_weights": ...,
"poison": ...}`` that REPLAY differentiates and MGD updates. After each
metagradient step, ``spec.project(value)`` maps a value back to its feasible set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """A piecewise-linear learning-rate schedule: ``num_knots`` values evenly spaced over steps ``0 .. T-1``.

    With ``num_knots == T`` it is a per-step learning rate. Projection keeps it non-negative.
    """

    num_knots: int = 10
    init_value: float = 0.1

    def __post_init__(self):
        if self.num_knots < 1:
            raise ValueError(f"LRSchedule needs num_knots >= 1, got {self.num_knots}.")

    def init(self, num_steps: int, dtype=jnp.float32):
        return jnp.full((self.num_knots,), self.init_value, dtype)

    def positions(self, num_steps: int):
        return jnp.linspace(0.0, float(max(num_steps - 1, 1)), self.num_knots)

    def value_at(self, knots, t, num_steps: int):
        """The learning rate at step ``t`` (linear interpolation between knots)."""
        if self.num_knots == 1:
            return knots[0]
        return jnp.interp(jnp.asarray(t, knots.dtype), self.positions(num_steps).astype(knots.dtype), knots)

    def values(self, knots, num_steps: int):
        """The learning rate at every step, as an array of length ``num_steps``."""
        return jax.vmap(lambda t: self.value_at(knots, t, num_steps))(jnp.arange(num_steps))

    def project(self, knots):
        return jnp.maximum(knots, 0.0)

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (self.num_knots,)


def project_to_simplex(v, total: float = 1.0):
    """Euclidean projection of a vector onto ``{w >= 0, sum(w) = total}`` (Duchi et al., ICML 2008)."""
    n = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - total
    ks = jnp.arange(1, n + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - css / ks > 0, ks, 0))
    theta = css[rho.astype(jnp.int32) - 1] / rho
    return jnp.maximum(v - theta, 0.0)


@dataclasses.dataclass(frozen=True)
class DataWeights:
    """One weight per training example, multiplying its loss.

    ``constraint="box"`` clips to ``[lower, upper]``; ``"simplex"`` projects onto
    non-negative weights with mean one (so the loss scale is kept).
    """

    init_value: float = 1.0
    constraint: str = "box"
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self):
        if self.constraint not in ("box", "simplex"):
            raise ValueError(f"DataWeights.constraint must be 'box' or 'simplex', got {self.constraint!r}.")
        if self.lower > self.upper:
            raise ValueError(f"DataWeights needs lower <= upper, got [{self.lower}, {self.upper}].")

    def init(self, num_examples: int, dtype=jnp.float32):
        return jnp.full((num_examples,), self.init_value, dtype)

    def project(self, weights):
        if self.constraint == "box":
            return jnp.clip(weights, self.lower, self.upper)
        return project_to_simplex(weights, total=float(weights.shape[0]))

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (problem.data.num_train,)


@dataclasses.dataclass(frozen=True)
class Poison:
    """Additive perturbations of the training inputs at ``indices``, in an L-inf ball of radius ``eps``.

    Projection clips each perturbation to ``[-eps, eps]`` and keeps the perturbed
    input inside the data's valid range (``Dataset.input_range``).
    """

    indices: tuple[int, ...]
    eps: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("Poison.indices must not repeat an example.")
        if self.eps < 0:
            raise ValueError(f"Poison.eps must be >= 0, got {self.eps}.")

    @classmethod
    def random_subset(cls, num_examples: int, fraction: float, eps: float, seed: int = 0) -> "Poison":
        """Poison a random ``fraction`` of the ``num_examples`` training examples."""
        count = max(1, int(round(fraction * num_examples)))
        chosen = np.sort(np.random.default_rng(seed).choice(num_examples, count, replace=False))
        return cls(tuple(chosen.tolist()), eps)

    def init(self, input_shape, dtype=jnp.float32):
        return jnp.zeros((len(self.indices), *input_shape), dtype)

    def slot_of_example(self, num_examples: int):
        """Array mapping each training example to its row of the perturbation (-1 if not poisoned)."""
        slots = np.full((num_examples,), -1, np.int32)
        slots[list(self.indices)] = np.arange(len(self.indices), dtype=np.int32)
        return slots

    def project(self, delta, clean_inputs, input_range):
        lo, hi = input_range
        delta = jnp.clip(delta, -self.eps, self.eps)
        return jnp.clip(clean_inputs + delta, lo, hi) - clean_inputs

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (len(self.indices), *problem.data.input_shape)
