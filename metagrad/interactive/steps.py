"""The pure step of a steerable run, and its differentiable form for REPLAY.

:func:`controlled_step` is :meth:`TrainingProblem.step` plus layer freezing;
the trainer jits it together with the step's metrics. :class:`SteeredRun`
turns a stretch of a run into REPLAY's contract, with the per-step learning
rate as the ``lr_schedule`` metaparameter (one knot per step) and the other
hyperparameters and freeze masks as per-step arrays, so
``replay.value_and_metagrad`` gives d(validation loss)/d(LR of every step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

import replay

from ..problem import stream_key
from .hyperparams import injected_hyperparams, with_hyperparams
from ..training import TrainingProblem


def controlled_step(problem: TrainingProblem, state, frozen, data_weights, t):
    """One step of ``problem`` at batch index ``t``; parameters of layers with ``frozen[layer]`` true are kept."""
    new = problem.step(state, {"data_weights": data_weights}, t)
    params = {
        layer: jax.tree.map(lambda old, upd: jnp.where(frozen[layer], old, upd), state["params"][layer], sub)
        for layer, sub in new["params"].items()
    }
    return {**new, "params": params}  # with the optimizer state and any model state (BatchNorm statistics)


def step_metrics(problem: TrainingProblem, state, data_weights, t):
    """Training loss and gradient norm of the batch of step ``t`` at the current parameters."""
    x, y, weights = problem.training_batch({"data_weights": data_weights}, t)
    rng = stream_key(problem.seed, "dropout", t)

    def loss_fn(p):
        logits = problem.logits(p, x, train=True, rng=rng, model_state=state.get("model_state"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(weights * losses)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    return loss, optax.global_norm(grads)


def all_finite(tree):
    """Traced: whether every floating-point leaf of ``tree`` is finite (integer leaves, step counters, pass)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


@functools.partial(jax.jit, static_argnums=0)
def train_step(problem: TrainingProblem, state, frozen, data_weights, t):
    """``(state_{t+1}, metrics)``: the trainer's compiled step (the replay of a log runs this same function)."""
    loss, grad_norm = step_metrics(problem, state, data_weights, t)
    new = controlled_step(problem, state, frozen, data_weights, t)
    return new, {"train_loss": loss, "grad_norm": grad_norm, "finite": all_finite(new["params"]) & jnp.isfinite(loss)}


@functools.partial(jax.jit, static_argnums=0)
def problem_step(problem, state, meta, t):
    """``(state_{t+1}, {"finite": ...})`` of any :class:`metagrad.Problem` at metaparameters ``meta``."""
    new = problem.step(state, meta, t)
    return new, {"finite": all_finite(new)}


@functools.partial(jax.jit, static_argnums=0)
def evaluate(problem: TrainingProblem, state):
    """``(val loss, val accuracy)`` of a state (its parameters and any model state)."""
    return problem.loss_and_accuracy(state, "val")


@dataclasses.dataclass(frozen=True, eq=False)
class SteeredRun:
    """REPLAY's ``step``/``objective`` for a stretch of a steered run starting at batch index ``meta['t0']``.

    ``meta`` = ``{"lr_schedule": (W,) LR of each step, "hyperparams": {name: (W,)}, "frozen": {layer: (W,) bool},
    "data_weights": (N,), "t0": int32}``. Step ``i`` of the stretch trains on the batch of step ``t0 + i``.
    Identity-hashed: keep one per problem so compilations are reused (:func:`steered_run`).
    """

    problem: TrainingProblem

    def step(self, state, meta, i):
        opt_state = state["opt_state"]
        hp = dict(injected_hyperparams(opt_state))
        hp["learning_rate"] = meta["lr_schedule"][i].astype(jnp.result_type(hp["learning_rate"]))
        for name, values in meta["hyperparams"].items():
            hp[name] = values[i].astype(jnp.result_type(hp[name]))
        state = {**state, "opt_state": with_hyperparams(opt_state, hp)}
        frozen = {layer: mask[i] for layer, mask in meta["frozen"].items()}
        return controlled_step(self.problem, state, frozen, meta["data_weights"], meta["t0"] + i)

    def objective(self, state, meta):
        return self.problem.loss_and_accuracy(state, "val")[0]

    def value_and_metagrad(self, state0, meta, num_steps: int, k: int = 4):
        return replay.value_and_metagrad(self.step, self.objective, state0, meta, num_steps, k=k)


_RUNS: dict[int, SteeredRun] = {}


def steered_run(problem: TrainingProblem) -> SteeredRun:
    """The cached :class:`SteeredRun` of ``problem`` (one compilation per problem)."""
    run = _RUNS.get(id(problem))
    if run is None or run.problem is not problem:
        run = SteeredRun(problem)
        _RUNS[id(problem)] = run
    return run


def window_meta(state, frozen: dict, data_weights, t0: int, window: int, lr: float | None = None) -> dict:
    """Metaparameters of the next ``window`` steps holding the current hyperparameters and freeze masks constant."""
    hp = injected_hyperparams(state["opt_state"])
    lr_dtype = jnp.result_type(hp["learning_rate"])
    lr = hp["learning_rate"] if lr is None else lr
    others = {name: jnp.full((window,), value, jnp.result_type(value)) for name, value in hp.items()
              if name != "learning_rate" and jnp.issubdtype(jnp.result_type(value), jnp.floating)}
    return {
        "lr_schedule": jnp.full((window,), lr, lr_dtype),
        "hyperparams": others,
        "frozen": {layer: jnp.full((window,), bool(f)) for layer, f in frozen.items()},
        "data_weights": jnp.asarray(data_weights),
        "t0": jnp.int32(t0),
    }
