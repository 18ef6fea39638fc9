"""Metaparameter parametrizations and their projections."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import metagrad as mg
from conftest import tiny_problem


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 30), elements=st.floats(-10, 10, width=32)))
def test_simplex_projection(v):
    w = np.asarray(mg.project_to_simplex(jnp.asarray(v), total=float(len(v))))
    assert np.all(w >= 0) and abs(w.sum() - len(v)) < 1e-3 * len(v)
    # it is the closest point: no random feasible point is closer
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = rng.dirichlet(np.ones(len(v))) * len(v)
        assert np.sum((w - v) ** 2) <= np.sum((other - v) ** 2) + 1e-3


def test_lr_schedule_interpolates_its_knots():
    spec = mg.LRSchedule(num_knots=3, init_value=0.1)
    knots = jnp.asarray([0.0, 1.0, 0.5])
    lrs = np.asarray(spec.values(knots, 101))
    assert lrs[0] == 0.0 and lrs[50] == 1.0 and lrs[100] == 0.5 and abs(lrs[25] - 0.5) < 1e-6
    assert np.all(np.asarray(spec.project(jnp.asarray([-1.0, 2.0]))) == [0.0, 2.0])


def test_projection_keeps_every_part_feasible():
    problem = tiny_problem("momentum_sgd", "float32", 7)
    meta = problem.init_meta()
    wild = {name: value + 100.0 * np.sign(np.random.default_rng(0).normal(size=value.shape)) for name, value in meta.items()}
    projected = problem.project_meta(wild)
    assert np.all(np.asarray(projected["lr_schedule"]) >= 0)
    assert np.all((np.asarray(projected["data_weights"]) >= 0) & (np.asarray(projected["data_weights"]) <= 1))
    delta = np.asarray(projected["poison"])
    bound = problem.poison.eps * problem.data.feature_scale  # in units of each feature's scale
    assert np.all(np.abs(delta) <= bound + 1e-6) and np.any(np.abs(delta) > bound - 1e-6)
    poisoned = problem.data.x_train[list(problem.poison.indices)] + delta
    lo, hi = problem.data.input_range  # per feature
    assert np.all(poisoned >= lo - 1e-6) and np.all(poisoned <= hi + 1e-6)
