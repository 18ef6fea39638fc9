"""REPLAY equals jax.grad of the fully unrolled run, and finite differences.

Each problem has momentum SGD or AdamW (with weight decay) and all three
metaparameter kinds at once: a learning-rate schedule, per-example data weights
and a poison perturbation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replay
from conftest import max_relative_error, perturbed_meta, tiny_problem

STEPS = (1, 2, 7, 64, 300)
KS = (2, 3, 8)
OPTIMIZERS = ("momentum_sgd", "adamw")


def _reference(problem, meta):
    return problem.value_and_metagrad(meta, strategy=replay.FullUnroll())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("T", STEPS)
def test_replay_equals_full_unroll_float64(x64, optimizer, T):
    problem = tiny_problem(optimizer, "float64", T)
    meta = perturbed_meta(problem)
    value_ref, grad_ref = _reference(problem, meta)
    nonzero = [bool(np.any(np.asarray(g) != 0)) for g in jax.tree.leaves(grad_ref)]
    # short runs may not visit the poisoned examples; long ones exercise every part
    assert all(nonzero) if T >= 64 else any(nonzero)
    for k in KS:
        value, grad = problem.value_and_metagrad(meta, k=k)
        assert float(value) == pytest.approx(float(value_ref), rel=1e-12)
        assert jax.tree.structure(grad) == jax.tree.structure(meta)
        assert max_relative_error(grad_ref, grad) < 1e-10, (k, T)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("T", STEPS)
def test_replay_equals_full_unroll_float32(optimizer, T):
    problem = tiny_problem(optimizer, "float32", T)
    meta = perturbed_meta(problem)
    _, grad_ref = _reference(problem, meta)
    for k in KS:
        _, grad = problem.value_and_metagrad(meta, k=k)
        assert max_relative_error(grad_ref, grad) < 1e-4, (k, T)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_strategies_agree_with_leaf_sizes_and_remat(x64, optimizer):
    problem = tiny_problem(optimizer, "float64", 64)
    meta = perturbed_meta(problem, seed=1)
    _, grad_ref = _reference(problem, meta)
    for strategy in (replay.Remat(), replay.Replay(k=3, leaf_size=1), replay.Replay(k=2, leaf_size=5),
                     replay.Replay(memory_budget_bytes=40 * replay.tree_bytes(problem.init_state()))):
        _, grad = problem.value_and_metagrad(meta, strategy=strategy)
        assert max_relative_error(grad_ref, grad) < 1e-10, strategy


def _directional_fd(f, meta, direction, h):
    plus = jax.tree.map(lambda m, d: m + h * d, meta, direction)
    minus = jax.tree.map(lambda m, d: m - h * d, meta, direction)
    return (float(f(plus)) - float(f(minus))) / (2 * h)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_replay_matches_central_finite_difference(x64, optimizer):
    problem = tiny_problem(optimizer, "float64", 64)
    meta = perturbed_meta(problem, seed=2)
    rng = np.random.default_rng(3)
    direction = jax.tree.map(lambda m: jnp.asarray(rng.normal(size=m.shape)), meta)
    _, grad = problem.value_and_metagrad(meta, k=3)
    predicted = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    value = lambda m: problem.objective(problem.train(m), m)  # noqa: E731
    fd = _directional_fd(value, meta, direction, 1e-5)
    assert fd == pytest.approx(predicted, rel=1e-6, abs=1e-9)
    # and the check can fail: a wrong direction gives a different number
    assert abs(predicted - _directional_fd(value, meta, jax.tree.map(lambda d: -d, direction), 1e-5)) > 1e-3 * abs(predicted)


def test_dropout_keyed_by_step_gives_the_exact_metagradient(x64):
    problem = tiny_problem("adamw", "float64", 40, dropout=0.3)
    meta = perturbed_meta(problem)
    value_ref, grad_ref = _reference(problem, meta)
    for k in (2, 8):
        value, grad = problem.value_and_metagrad(meta, k=k)
        assert float(value) == pytest.approx(float(value_ref), rel=1e-12)
        assert max_relative_error(grad_ref, grad) < 1e-10
    # the dropout masks really vary: without dropout the value differs
    no_dropout = tiny_problem("adamw", "float64", 40)
    assert float(no_dropout.value_and_metagrad(meta, k=8)[0]) != pytest.approx(float(value_ref), rel=1e-6)


def test_gradient_with_respect_to_initial_state(x64):
    problem = tiny_problem("momentum_sgd", "float64", 30)
    meta = perturbed_meta(problem)
    state0 = problem.init_state()
    ref = replay.value_and_metagrad(problem.step, problem.objective, state0, meta, 30,
                                    strategy=replay.FullUnroll(), wrt_state0=True)
    value, (grad_meta, grad_state0) = replay.value_and_metagrad(
        problem.step, problem.objective, state0, meta, 30, k=3, wrt_state0=True)
    assert max_relative_error(ref[1][0], grad_meta) < 1e-10
    assert max_relative_error(ref[1][1]["params"], grad_state0["params"]) < 1e-10
    # integer leaves of the state (optax's step counters) get float0 zeros
    counts = grad_state0["opt_state"].count
    assert counts.dtype == jax.dtypes.float0
    # finite difference on the initial parameters along a random direction
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), state0["params"])

    def value_from(params):
        s0 = dict(state0, params=params)
        final = replay.advance(problem.step, s0, meta, 0, 30)
        return problem.objective(final, meta)

    fd = _directional_fd(value_from, state0["params"], direction, 1e-5)
    predicted = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad_state0["params"]), jax.tree.leaves(direction)))
    assert fd == pytest.approx(predicted, rel=1e-6)


def test_generic_pytrees_with_integer_meta_leaves(x64):
    """replay knows nothing about models: a hand-written run with an integer metaparameter leaf."""

    def step(state, meta, t):
        x, v = state["x"], state["v"]
        v = meta["beta"] * v - meta["lr"][t] * (x - meta["target"]) * meta["scale"]
        return {"x": x + v, "v": v, "count": state["count"] + 1}

    def objective(state, meta):
        return jnp.sum(state["x"] ** 2) + 0.1 * jnp.sum(state["v"] ** 2)

    T = 37
    state0 = {"x": jnp.arange(3.0), "v": jnp.zeros(3), "count": jnp.int32(0)}
    meta = {"lr": jnp.linspace(0.1, 0.3, T), "beta": jnp.float64(0.8), "target": jnp.ones(3), "scale": jnp.int32(2)}
    v_ref, g_ref = replay.value_and_metagrad(step, objective, state0, meta, T, strategy=replay.FullUnroll())
    v, g = replay.value_and_metagrad(step, objective, state0, meta, T, k=2)
    assert g["scale"].dtype == jax.dtypes.float0
    diff = {name: g[name] for name in ("lr", "beta", "target")}
    assert max_relative_error({n: g_ref[n] for n in diff}, diff) < 1e-12
    assert float(v) == pytest.approx(float(v_ref), rel=1e-14)


def test_cnn_model_exact(x64):
    """The 1-D CNN (conv, average pooling) through REPLAY equals the full unroll."""
    import optax

    import metagrad as mg
    from conftest import tiny_dataset

    data = tiny_dataset(np.float64, features=8)
    problem = mg.TrainingProblem(mg.CNN1D(channels=(3,), kernel_size=3, num_classes=3),
                                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9), data,
                                 num_steps=9, batch_size=8, lr_schedule=mg.LRSchedule(3, 0.1),
                                 data_weights=mg.DataWeights(), param_dtype=jnp.float64)
    meta = problem.init_meta()
    _, grad_ref = _reference(problem, meta)
    _, grad = problem.value_and_metagrad(meta, k=2)
    assert max_relative_error(grad_ref, grad) < 1e-10


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_forward_over_reverse_inner_gradient_is_exact(x64, optimizer):
    """``inner_grad="forward_over_reverse"``: REPLAY and remat equal jax.grad of the plain unrolled run, and FD."""
    import dataclasses

    plain = tiny_problem(optimizer, "float64", 64, dropout=0.1)
    mixed = dataclasses.replace(plain, inner_grad="forward_over_reverse")
    meta = perturbed_meta(plain, seed=4)
    value_ref, grad_ref = _reference(plain, meta)
    for strategy in (replay.Replay(k=3), replay.Binomial(checkpoints=3, leaf_size=4), replay.Remat()):
        value, grad = mixed.value_and_metagrad(meta, strategy=strategy)
        assert float(value) == pytest.approx(float(value_ref), rel=1e-12)
        assert max_relative_error(grad_ref, grad) < 1e-10, strategy
    rng = np.random.default_rng(5)
    direction = jax.tree.map(lambda m: jnp.asarray(rng.normal(size=m.shape)), meta)
    predicted = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    fd = _directional_fd(lambda m: mixed.objective(mixed.train(m), m), meta, direction, 1e-5)
    assert fd == pytest.approx(predicted, rel=1e-6, abs=1e-9)


def test_mixed_mode_grad_vjp_equals_reverse_over_reverse(x64):
    """The custom VJP gives the Hessian-vector product and the cross term; const inputs get zero cotangents."""
    def loss(p, diff, const):
        z = jnp.tanh(diff["x"] @ p["w"] + p["b"]) * diff["scale"]
        return jnp.sum(z ** 2 * const["c"]) + 0.1 * jnp.sum(p["w"] ** 3) + 0.0 * const["n"]

    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(2,)))}
    diff = {"x": jnp.asarray(rng.normal(size=(4, 3))), "scale": jnp.asarray(1.3)}
    const = {"c": jnp.asarray(rng.uniform(size=(4, 2))), "n": jnp.asarray(2)}
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    mixed = replay.mixed_mode_grad(loss)
    value = mixed(p, diff, const)
    reference = jax.grad(loss)(p, diff, const)
    assert max_relative_error(reference, value) == 0.0
    ct_mixed = jax.vjp(lambda a, b: mixed(a, b, const), p, diff)[1](v)
    ct_ref = jax.vjp(lambda a, b: jax.grad(loss)(a, b, const), p, diff)[1](v)
    assert max_relative_error(ct_ref, ct_mixed) < 1e-12
    assert max_relative_error(ct_ref, jax.tree.map(jnp.zeros_like, ct_ref)) > 0.1  # a real check
    assert float(jnp.max(jnp.abs(jax.grad(lambda c: jnp.sum(mixed(p, diff, {**const, "c": c})["w"]))(const["c"])))) == 0.0
