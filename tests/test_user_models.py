"""A user's own model, optimizer and metaparameter, unchanged: exact metagradients in float64.

BatchNorm + dropout in a 2-D CNN (mutable ``batch_stats`` carried in the
state), ``optax.chain(clip_by_global_norm, adamw)`` without
``inject_hyperparams``, ``optax.lion``, and a metaparameter kind defined here
(a per-step weight-decay schedule) with no edit to the library. Each is checked
against ``jax.grad`` of the fully unrolled run and against central differences.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
import replay
from conftest import max_relative_error, tiny_dataset


class SmallBatchNormCNN(nn.Module):
    """A user's model: conv, BatchNorm, ReLU, dropout, dense, on 4x4 single-channel images."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], 4, 4, 1))
        x = nn.Conv(3, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@dataclasses.dataclass(frozen=True)
class WeightDecaySchedule(mg.Metaparameter):
    """A new kind, defined outside the library: decoupled weight decay ``lambda_t`` at every step, piecewise linear."""

    num_knots: int = 3
    init_value: float = 0.01
    name: ClassVar[str] = "weight_decay"

    def init(self, info):
        return jnp.full((self.num_knots,), self.init_value, info.dtype)

    def project(self, value, info=None):
        return jnp.maximum(value, 0.0)

    def wrap_update(self, knots, update, ctx):
        positions = jnp.linspace(0.0, float(ctx.num_steps - 1), self.num_knots).astype(knots.dtype)
        decay = jnp.interp(jnp.asarray(ctx.t, knots.dtype), positions, knots)

        def decayed(grads, opt_state, params):
            updates, opt_state = update(grads, opt_state, params)
            return jax.tree.map(lambda u, p: u - decay * p, updates, params), opt_state

        return decayed


def _problem(model, optimizer, features=6, num_steps=12, **kwargs):
    return mg.TrainingProblem(model, optimizer, tiny_dataset(np.float64, features=features), num_steps=num_steps,
                              batch_size=8, param_dtype=jnp.float64, **kwargs)


def _perturbed(problem, seed=0):
    rng = np.random.default_rng(seed)
    return {name: value * jnp.asarray(rng.uniform(0.6, 1.4, value.shape), value.dtype) if name != "poison"
            else value + jnp.asarray(0.05 * rng.normal(size=value.shape), value.dtype)
            for name, value in problem.init_meta().items()}


def _check_exact(problem, meta, *, k=3, fd_rel=1e-6):
    value_ref, grad_ref = problem.value_and_metagrad(meta, strategy=replay.FullUnroll())
    value, grad = problem.value_and_metagrad(meta, k=k)
    assert float(value) == pytest.approx(float(value_ref), rel=1e-12)
    for name in meta:
        assert bool(jnp.any(grad_ref[name] != 0)), f"{name}: the reference metagradient is zero, no real check"
    assert max_relative_error(grad_ref, grad) < 1e-10
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda m: jnp.asarray(rng.normal(size=m.shape)), meta)
    predicted = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    h = 1e-5

    def f(m):
        return float(problem.objective(problem.train(m), m))

    fd = (f(jax.tree.map(lambda m, d: m + h * d, meta, direction))
          - f(jax.tree.map(lambda m, d: m - h * d, meta, direction))) / (2 * h)
    assert fd == pytest.approx(predicted, rel=fd_rel, abs=1e-9)
    return grad


def test_batchnorm_dropout_cnn_is_exact(x64):
    problem = _problem(SmallBatchNormCNN(), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
                       features=16, lr_schedule=mg.LRSchedule(3, 0.1), data_weights=mg.DataWeights(),
                       poison=mg.Poison(tuple(range(0, 32, 2)), eps=0.3))
    state0 = problem.init_state()
    assert set(state0["model_state"]) == {"batch_stats"}
    final = problem.train(_perturbed(problem))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state0["model_state"], final["model_state"])
    assert max(jax.tree.leaves(moved)) > 1e-3  # the running statistics are carried and updated
    grad = _check_exact(problem, _perturbed(problem))
    assert set(grad) == {"lr_schedule", "data_weights", "poison"}


# The default (BatchNorm before the ReLU, max pooling). norm="none" passes the same check; norm="after" (BatchNorm
# after the ReLU) is exact too, but on maps this small so curved that central differences agree only at h ~ 1e-7
# (-0.006021964 against -0.006021964 predicted; at h = 1e-5: +0.225).
def test_the_residual_batchnorm_cnn_is_exact(x64, norm="before", pooling="max"):
    base = tiny_dataset(np.float64, features=64)
    images = dataclasses.replace(base, x_train=base.x_train.reshape(-1, 8, 8), x_val=base.x_val.reshape(-1, 8, 8),
                                 x_test=base.x_test.reshape(-1, 8, 8))
    problem = mg.TrainingProblem(mg.ResidualCNN(channels=(2, 3, 3), num_classes=3, norm=norm, pooling=pooling),
                                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9), images,
                                 num_steps=6, batch_size=8, param_dtype=jnp.float64,
                                 lr_schedule=mg.LRSchedule(3, 0.1), data_weights=mg.DataWeights())
    assert set(problem.init_state().get("model_state", {})) == ({"batch_stats"} if norm != "none" else set())
    _check_exact(problem, _perturbed(problem), k=2)


def test_mutable_collections_are_checked():
    with pytest.raises(ValueError, match="mutable names collections"):
        mg.TrainingProblem(SmallBatchNormCNN(), optax.sgd(0.1), tiny_dataset(features=16), num_steps=2,
                           batch_size=4, mutable=("cache",)).init_state()


def test_chain_of_clip_and_adamw_without_inject_hyperparams_is_exact(x64):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-2, weight_decay=1e-2))
    problem = _problem(mg.MLP(hidden=(8,), num_classes=3), optimizer, lr_schedule=mg.LRSchedule(4),
                       data_weights=mg.DataWeights(), poison=mg.Poison((1, 3, 5, 7), eps=0.3))
    meta = problem.init_meta()
    assert np.all(np.asarray(meta["lr_schedule"]) == 1.0)  # multipliers of the optimizer's own rate
    _check_exact(problem, _perturbed(problem, seed=1))


def test_schedule_multiplier_is_the_learning_rate_for_a_linear_optimizer(x64):
    """Scaling adamw's final update by s equals adamw at learning rate s * lr (its update is linear in lr)."""
    data = tiny_dataset(np.float64)
    common = dict(num_steps=10, batch_size=8, param_dtype=jnp.float64)
    scaled = mg.TrainingProblem(mg.MLP(hidden=(8,), num_classes=3), optax.adamw(1e-2, weight_decay=1e-2), data,
                                lr_schedule=mg.LRSchedule(1, 0.5), **common)
    direct = mg.TrainingProblem(mg.MLP(hidden=(8,), num_classes=3), optax.adamw(5e-3, weight_decay=1e-2), data,
                                lr_schedule=None, **common)
    a = scaled.train(scaled.init_meta())["params"]
    b = direct.train({})["params"]
    assert max_relative_error(a, b) < 1e-12


def test_lion_schedule_is_exact_and_its_data_weights_warn(x64):
    problem = _problem(mg.MLP(hidden=(8,), num_classes=3), optax.lion(1e-2), lr_schedule=mg.LRSchedule(3),
                       data_weights=mg.DataWeights())
    meta = _perturbed(problem)
    with pytest.warns(RuntimeWarning, match="'data_weights' is identically zero.*sign"):
        _, grad = problem.value_and_metagrad(meta, k=3)
    assert float(jnp.max(jnp.abs(grad["data_weights"]))) == 0.0
    lr_only = dataclasses.replace(problem, data_weights=None)
    _check_exact(lr_only, _perturbed(lr_only))


def test_a_new_metaparameter_kind_needs_no_edit_elsewhere(x64):
    problem = _problem(mg.MLP(hidden=(8,), num_classes=3),
                       optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
                       lr_schedule=mg.LRSchedule(3, 0.1), metaparameters=(WeightDecaySchedule(),))
    meta = problem.init_meta()
    assert set(meta) == {"lr_schedule", "weight_decay"}
    projected = problem.project_meta({**meta, "weight_decay": -meta["weight_decay"]})
    assert float(jnp.min(projected["weight_decay"])) == 0.0
    with pytest.raises(ValueError, match="weight_decay"):
        problem.value_and_metagrad({**meta, "weight_decay": meta["weight_decay"][:2]})
    grad = _check_exact(problem, _perturbed(problem, seed=2))
    assert grad["weight_decay"].shape == (3,)


def test_adam_without_eps_root_names_the_fix(x64):
    data = tiny_dataset(np.float64)
    x_train = np.array(data.x_train)
    x_train[:, 0] = 0.0  # a feature that is always zero: its first-layer weights never get a gradient (nu = 0)
    data = dataclasses.replace(data, x_train=x_train)
    problem = mg.TrainingProblem(mg.MLP(hidden=(4,), num_classes=3), optax.adam(1e-2), data, num_steps=4,
                                 batch_size=8, lr_schedule=mg.LRSchedule(2), param_dtype=jnp.float64)
    with pytest.raises(replay.NonFiniteMetagradError, match="eps_root"):
        problem.value_and_metagrad(problem.init_meta(), k=2)
    fixed = dataclasses.replace(problem, optimizer=optax.adam(1e-2, eps_root=1e-12))
    _, grad = fixed.value_and_metagrad(fixed.init_meta(), k=2)
    assert bool(jnp.all(jnp.isfinite(grad["lr_schedule"])))


def test_the_optimizer_must_be_an_optax_transformation():
    with pytest.raises(TypeError, match="GradientTransformation"):
        mg.TrainingProblem(mg.MLP(num_classes=3), "sgd", tiny_dataset(), num_steps=2, batch_size=4)


@pytest.mark.parametrize("n_small, n_large", [(64, 4096)])
def test_the_compiled_programs_do_not_embed_the_data(n_small, n_large):
    """The lowered step and objective have the same text whatever the training set's size."""
    sizes = {}
    for n in (n_small, n_large):
        data = tiny_dataset(n_train=n, features=6)
        problem = mg.TrainingProblem(mg.MLP(hidden=(8,), num_classes=3),
                                     optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), data, num_steps=5,
                                     batch_size=8, lr_schedule=mg.LRSchedule(2, 0.1), data_weights=mg.DataWeights(),
                                     poison=mg.Poison((1, 2, 3)))
        meta, state0 = problem.init_meta(), problem.init_state()
        advance = jax.jit(replay.advance).lower(problem.step, state0, meta, 0, 5).as_text()
        objective = jax.jit(lambda f, s, m: f(s, m)).lower(problem.objective, state0, meta).as_text()
        sizes[n] = (len(advance), len(objective))
        # the data are the programs' arguments: a training set of n rows appears as a parameter
        assert f"tensor<{n}x6xf32>" in advance
    # n = 4096 x 6 float32 inputs are 98 kB, far more than any difference in the programs' text
    assert abs(sizes[n_large][0] - sizes[n_small][0]) < 500, sizes
    assert sizes[n_large][1] == sizes[n_small][1], sizes


def test_a_log_space_schedule_is_exact_and_sets_the_rates_of_its_knots(x64):
    problem = _problem(mg.MLP(hidden=(8,), num_classes=3),
                       optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9),
                       lr_schedule=mg.LogLRSchedule(4, 0.1))
    meta = _perturbed(problem)
    spec = problem.lr_schedule
    at_knots = jax.jit(lambda knots: jnp.stack([spec.value_at(knots, t, 12) for t in (0, 11)]))
    np.testing.assert_allclose(np.asarray(at_knots(meta["lr_schedule"])),
                               np.exp(np.asarray(meta["lr_schedule"]))[[0, 3]], rtol=1e-12)
    _check_exact(problem, meta)
    per_step = dataclasses.replace(problem, lr_schedule=mg.LogLRSchedule(12, 0.1))
    rates = jnp.asarray(np.random.default_rng(3).uniform(0.01, 0.2, 12))
    linear = dataclasses.replace(problem, lr_schedule=mg.LRSchedule(12, 0.1))
    same = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                        per_step.train({"lr_schedule": jnp.log(rates)})["params"],
                        linear.train({"lr_schedule": rates})["params"])
    assert max(jax.tree.leaves(same)) < 1e-12
    assert float(spec.project(jnp.asarray([-100.0]))[0]) == pytest.approx(np.log(1e-8))
    with pytest.raises(ValueError, match="must be > 0"):
        mg.LogLRSchedule(4, 0.0)
