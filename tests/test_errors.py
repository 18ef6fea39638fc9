"""Bad input gets an error that says what to change."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
import replay
from conftest import tiny_dataset, tiny_problem


def _quadratic():
    def step(state, meta, t):
        return {"w": state["w"] - meta["lr"] * state["w"]}

    def objective(state, meta):
        return jnp.sum(state["w"] ** 2)

    return step, objective


def test_bad_k_and_num_steps():
    step, objective = _quadratic()
    state0, meta = {"w": jnp.ones(2)}, {"lr": jnp.float32(0.1)}
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        replay.value_and_metagrad(step, objective, state0, meta, 5, k=1)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        replay.value_and_metagrad(step, objective, state0, meta, 0)
    with pytest.raises(ValueError, match="either strategy"):
        replay.value_and_metagrad(step, objective, state0, meta, 3, k=2, strategy=replay.FullUnroll())


def test_step_that_changes_the_state_is_rejected():
    def step(state, meta, t):
        return {"w": jnp.concatenate([state["w"], state["w"]])}

    with pytest.raises(replay.StepSignatureError, match=r"changes the state leaf \['w'\]"):
        replay.value_and_metagrad(step, lambda s, m: jnp.sum(s["w"]), {"w": jnp.ones(2)}, {}, 3)

    def objective(state, meta):
        return state["w"]

    with pytest.raises(replay.StepSignatureError, match="real scalar"):
        replay.value_and_metagrad(_quadratic()[0], objective, {"w": jnp.ones(2)}, {"lr": jnp.float32(0.1)}, 3)


def test_diverged_inner_run_names_the_first_bad_step():
    def step(state, meta, t):
        grow = jnp.where(t >= 11, 1e30, 1.0)  # blows up to inf from step 11 (float32)
        return {"w": state["w"] * grow * meta["lr"]}

    with pytest.raises(replay.DivergenceError, match=r"step t=12 of 20") as info:
        replay.value_and_metagrad(step, lambda s, m: jnp.sum(s["w"]), {"w": jnp.ones(2)}, {"lr": jnp.float32(1.0)}, 20)
    assert info.value.step == 12


def test_nonfinite_metagradient_of_a_finite_run():
    def step(state, meta, t):
        return {"w": state["w"] + jnp.sqrt(meta["c"])}  # d/dc sqrt(c) is inf at c = 0

    with pytest.raises(replay.NonFiniteMetagradError, match="reverse pass became non-finite in steps"):
        replay.value_and_metagrad(step, lambda s, m: jnp.sum(s["w"]), {"w": jnp.ones(2)}, {"c": jnp.float32(0.0)}, 9, k=3)


def test_nan_in_meta_is_named():
    step, objective = _quadratic()
    with pytest.raises(replay.NonFiniteMetagradError, match=r"metaparameters hold NaN or inf at \['lr'\]"):
        replay.value_and_metagrad(step, objective, {"w": jnp.ones(2)}, {"lr": jnp.float32(np.nan)}, 3)


def test_training_problem_diverges_with_a_huge_learning_rate():
    problem = tiny_problem("momentum_sgd", "float32", 64)
    meta = problem.init_meta()
    meta["lr_schedule"] = jnp.full_like(meta["lr_schedule"], 1e6)
    with pytest.raises(replay.DivergenceError, match="diverged"):
        problem.value_and_metagrad(meta, k=3)


def test_meta_shapes_must_match_the_data():
    problem = tiny_problem("momentum_sgd", "float32", 7)
    meta = problem.init_meta()
    with pytest.raises(ValueError, match=r"meta\['data_weights'\] has shape \(31,\) but this problem needs \(32,\)"):
        problem.value_and_metagrad(dict(meta, data_weights=meta["data_weights"][:-1]))
    with pytest.raises(ValueError, match="declares"):
        problem.value_and_metagrad({"lr_schedule": meta["lr_schedule"]})
    with pytest.raises(ValueError, match="poison"):
        problem.value_and_metagrad(dict(meta, poison=meta["poison"][:, :2]))


def test_problem_construction_errors():
    data = tiny_dataset()
    with pytest.raises(TypeError, match="GradientTransformation"):
        mg.TrainingProblem(mg.MLP(hidden=(4,), num_classes=3), optax.sgd, data, num_steps=3, batch_size=4)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        mg.TrainingProblem(mg.MLP(num_classes=3), opt, data, num_steps=3, batch_size=1000)
    with pytest.raises(ValueError, match="Poison.indices reach"):
        mg.TrainingProblem(mg.MLP(num_classes=3), opt, data, num_steps=3, batch_size=4, poison=mg.Poison((40,)))
    with pytest.raises(ValueError, match="one label per input"):
        mg.Dataset(np.ones((4, 2)), np.zeros(3, int), np.ones((2, 2)), np.zeros(2, int), np.ones((2, 2)),
                   np.zeros(2, int), num_classes=2)
    with pytest.raises(ValueError, match="NaN or inf"):
        mg.Dataset(np.full((2, 2), np.nan), np.zeros(2, int), np.ones((2, 2)), np.zeros(2, int), np.ones((2, 2)),
                   np.zeros(2, int), num_classes=2)


def test_memory_budget_too_small():
    step, objective = _quadratic()
    with pytest.raises(replay.MemoryBudgetError, match="raise memory_budget_bytes"):
        replay.value_and_metagrad(step, objective, {"w": jnp.ones(1000)}, {"lr": jnp.float32(0.1)}, 10_000,
                                  memory_budget_bytes=10_000)
