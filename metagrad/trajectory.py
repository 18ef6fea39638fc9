"""Recorded training trajectories: parameters at chosen steps of one run.

A :class:`Trajectory` is the exchange format between the training loop and the
systems that reuse a run (learning transfer, :mod:`metagrad.transfer`): the step
indices ``t_0 < t_1 < ... < t_T`` and the parameters at those steps, stacked
along a leading axis of every leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import replay

from .progress import progress_bar


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Parameters ``theta_{t_0}, ..., theta_{t_T}`` of one run.

    Attributes:
      steps: the training steps ``t_0 < ... < t_T`` (a tuple of ints; may be
        fractional positions for a synthesized trajectory, e.g. a linear one).
      params: a pytree of parameters whose leaves carry a leading axis of
        length ``len(steps)``.
    """

    steps: tuple
    params: Any

    def __post_init__(self):
        steps = tuple(float(s) if not float(s).is_integer() else int(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if len(steps) < 2:
            raise ValueError(f"a trajectory needs at least 2 points (start and end), got {len(steps)}.")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"trajectory steps must be strictly increasing, got {steps}.")
        for leaf in jax.tree.leaves(self.params):
            if np.shape(leaf)[:1] != (len(steps),):
                raise ValueError(
                    f"every parameter leaf needs a leading axis of length {len(steps)} (one per step), "
                    f"got shape {np.shape(leaf)}: stack the parameters with Trajectory.from_list."
                )

    @classmethod
    def from_list(cls, steps: Sequence, params_list: Sequence) -> "Trajectory":
        """Stack a list of parameter pytrees (one per step)."""
        if len(steps) != len(params_list):
            raise ValueError(f"{len(steps)} steps but {len(params_list)} parameter pytrees.")
        return cls(tuple(steps), jax.tree.map(lambda *xs: jnp.stack(xs), *params_list))

    def __len__(self) -> int:
        return len(self.steps)

    def at(self, i: int):
        """The parameters at the ``i``-th recorded point."""
        return jax.tree.map(lambda x: x[i], self.params)

    @property
    def initial(self):
        return self.at(0)

    @property
    def final(self):
        return self.at(len(self) - 1)

    def linear(self, num_points: int | None = None) -> "Trajectory":
        """The linearly interpolated trajectory ``theta_0 + (i / T) (theta_T - theta_0)``, ``i = 0..T``.

        This is the trajectory FGMT works on (Chijiwa, ICLR 2024): it
        needs only the two end points. ``num_points`` defaults to ``len(self)``.
        """
        n = len(self) if num_points is None else int(num_points)
        if n < 2:
            raise ValueError(f"num_points must be >= 2, got {n}.")
        lam = np.linspace(0.0, 1.0, n)
        t0, t1 = self.steps[0], self.steps[-1]
        start, end = self.initial, self.final
        params = jax.tree.map(
            lambda a, b: a[None] + jnp.asarray(lam, a.dtype).reshape((-1,) + (1,) * a.ndim) * (b - a)[None],
            start, end)
        steps = tuple(t0 + float(x) * (t1 - t0) for x in lam)
        return Trajectory(steps, params)


def record_trajectory(problem, meta, steps: Sequence[int], *, state=None, progress: bool = False,
                      return_state: bool = False):
    """Run ``problem`` and keep the parameters at ``steps`` (a :class:`Trajectory`).

    Advances segment by segment with the compiled ``replay.advance``
    (one compilation whatever the segment lengths), starting from ``state``
    (default ``problem.init_state()``) at step ``steps[0]``. With
    ``return_state`` also returns the state at ``steps[-1]`` (params and
    optimizer state), e.g. to continue training.
    """
    steps = [int(s) for s in steps]
    if steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be non-negative and strictly increasing, got {steps}.")
    state = problem.init_state() if state is None else state
    kept = [state["params"]]
    for a, b in progress_bar(list(zip(steps, steps[1:])), desc="recording trajectory", disable=not progress):
        state = replay.advance(problem.step, state, meta, a, b)
        kept.append(state["params"])
    trajectory = Trajectory.from_list(steps, kept)
    return (trajectory, state) if return_state else trajectory
