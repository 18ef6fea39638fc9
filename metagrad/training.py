"""The functional training loop shared by every system of metagrad.

A :class:`TrainingProblem` turns a flax model, an optax optimizer and a dataset
into the three pure functions of REPLAY's contract::

    state_0     = problem.init_state()
    state_{t+1} = problem.step(state_t, meta, t)
    value       = problem.objective(state_T, meta)   # validation loss by default

where ``meta`` is a dict of the named metaparameters the problem declares
(:mod:`metagrad.meta`). The batch of step ``t``, dropout and every other random
choice are functions of ``(seed, t)``, so any segment recomputes bit-for-bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import replay

from .data import Dataset, batch_indices
from .meta import DataWeights, LRSchedule, Poison
from .models import init_params, takes_train_flag


def _has_injected_lr(opt_state) -> bool:
    return hasattr(opt_state, "hyperparams") and "learning_rate" in opt_state.hyperparams


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingProblem:
    """A training run whose learning-rate schedule, data weights and poison are metaparameters.

    Args:
      model: a flax linen module mapping a batch of inputs to logits (``train=``
        is passed when its ``__call__`` takes it).
      optimizer: an optax optimizer built with ``optax.inject_hyperparams`` so
        that its learning rate can be set at every step, e.g.
        ``optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)``.
      data: a :class:`~metagrad.data.Dataset`.
      num_steps: training steps ``T``.
      batch_size: examples per step.
      seed: keys initialization, batch order and dropout.
      lr_schedule: the LR metaparameter's spec (``None`` keeps the optimizer's own LR).
      data_weights, poison: optional metaparameter specs.
      param_dtype: dtype of parameters and inputs (use ``jnp.float64`` with x64 for exactness checks).
      objective_split: the split whose mean loss is the metaobjective.
      maximize: the metaobjective is the *negative* loss (for attacks), so minimizing it maximizes the loss.
      mesh: a ``jax.sharding.Mesh`` for data-parallel training: each batch is split
        over the mesh axis ``data_axis``; REPLAY's stored states keep the state's
        sharding. ``None``: one device.
      inner_grad: how the step's gradient is differentiated by the metagradient:
        ``"reverse"`` (``jax.grad``, so reverse-over-reverse) or
        ``"forward_over_reverse"`` (:func:`replay.mixed_mode_grad`: Hessian-vector
        products by forward-over-reverse, Kemaev et al. 2025). Same values;
        which is faster depends on the hardware and model (see BUILD_NOTES.md).
      model_axis: a second mesh axis over which parameters and optimizer state are
        sharded (``None``: the state is replicated). Each state leaf is placed by
        ``state_partition``.
      state_partition: ``(keypath, leaf) -> PartitionSpec`` for every leaf of the
        state (parameters and optimizer state); default
        :func:`shard_last_axis` over ``model_axis`` (a kernel's output features,
        as in column-parallel layers; leaves that don't divide stay replicated).
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    data: Dataset
    num_steps: int
    batch_size: int = 128
    seed: int = 0
    lr_schedule: LRSchedule | None = dataclasses.field(default_factory=LRSchedule)
    data_weights: DataWeights | None = None
    poison: Poison | None = None
    param_dtype: Any = jnp.float32
    objective_split: str = "val"
    maximize: bool = False
    mesh: Any = None
    data_axis: str = "data"
    inner_grad: str = "reverse"
    model_axis: str | None = None
    state_partition: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}.")
        if not 1 <= self.batch_size <= self.data.num_train:
            raise ValueError(
                f"batch_size={self.batch_size} must be in [1, {self.data.num_train}] (the training set size)."
            )
        if self.poison is not None and max(self.poison.indices, default=-1) >= self.data.num_train:
            raise ValueError(
                f"Poison.indices reach {max(self.poison.indices)} but the training set has "
                f"{self.data.num_train} examples."
            )
        if self.mesh is not None:
            if self.data_axis not in self.mesh.axis_names:
                raise ValueError(f"data_axis={self.data_axis!r} is not an axis of the mesh {self.mesh.axis_names}.")
            devices = self.mesh.shape[self.data_axis]
            if self.batch_size % devices:
                raise ValueError(
                    f"batch_size={self.batch_size} must be divisible by the {devices} devices of mesh axis "
                    f"{self.data_axis!r} for data-parallel training."
                )
        if self.inner_grad not in ("reverse", "forward_over_reverse"):
            raise ValueError(
                f"inner_grad={self.inner_grad!r}: use 'reverse' (jax.grad) or 'forward_over_reverse' "
                "(replay.mixed_mode_grad)."
            )
        if self.model_axis is not None and (self.mesh is None or self.model_axis not in self.mesh.axis_names):
            axes = None if self.mesh is None else self.mesh.axis_names
            raise ValueError(
                f"model_axis={self.model_axis!r} must name an axis of the mesh (mesh axes: {axes}); "
                "build the mesh with both axes, e.g. Mesh(devices.reshape(2, 2), ('data', 'model'))."
            )
        if self.state_partition is not None and self.mesh is None:
            raise ValueError("state_partition places the state on a mesh: pass mesh= as well.")
        object.__setattr__(self, "data", self.data.astype(self.param_dtype))
        object.__setattr__(self, "_train_flag", takes_train_flag(self.model))
        grad_fn = jax.grad(self._batch_loss) if self.inner_grad == "reverse" else replay.mixed_mode_grad(self._batch_loss)
        object.__setattr__(self, "_grad_fn", grad_fn)
        slots = None if self.poison is None else self.poison.slot_of_example(self.data.num_train)
        object.__setattr__(self, "_poison_slots", slots)
        probe = self.optimizer.init({"w": jnp.zeros((1,), self.param_dtype)})
        if self.lr_schedule is not None and not _has_injected_lr(probe):
            raise TypeError(
                "the optimizer must expose its learning rate as an injected hyperparameter so the schedule "
                "can set it each step: build it as optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, ...)."
            )

    # ----------------------------------------------------------------- metaparameters
    def meta_specs(self) -> dict:
        """The declared metaparameter specs by name."""
        specs = {"lr_schedule": self.lr_schedule, "data_weights": self.data_weights, "poison": self.poison}
        return {name: spec for name, spec in specs.items() if spec is not None}

    def init_meta(self) -> dict:
        """Initial metaparameter values, one entry per declared spec."""
        meta = {}
        if self.lr_schedule is not None:
            meta["lr_schedule"] = self.lr_schedule.init(self.num_steps, self.param_dtype)
        if self.data_weights is not None:
            meta["data_weights"] = self.data_weights.init(self.data.num_train, self.param_dtype)
        if self.poison is not None:
            meta["poison"] = self.poison.init(self.data.input_shape, self.param_dtype)
        return meta

    def check_meta(self, meta) -> None:
        """Raise ``ValueError`` saying what to change when ``meta`` does not fit this problem."""
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict of named metaparameters, got {type(meta).__name__}.")
        specs = self.meta_specs()
        if set(meta) != set(specs):
            raise ValueError(
                f"meta has parts {sorted(meta)} but the problem declares {sorted(specs)}: "
                "build it with problem.init_meta()."
            )
        for name, spec in specs.items():
            want = spec.expected_shape(self)
            got = tuple(np.shape(meta[name]))
            if got != want:
                raise ValueError(
                    f"meta[{name!r}] has shape {got} but this problem needs {want} "
                    f"({self._shape_reason(name)}): build it with problem.init_meta()."
                )

    def _shape_reason(self, name):
        return {
            "lr_schedule": f"one value per knot, num_knots={self.lr_schedule.num_knots if self.lr_schedule else 0}",
            "data_weights": f"one weight per training example, {self.data.num_train} of them",
            "poison": "one perturbation per poisoned example, shaped like an input",
        }[name]

    def project_meta(self, meta) -> dict:
        """Map metaparameters back to their feasible sets."""
        out = dict(meta)
        if "lr_schedule" in meta:
            out["lr_schedule"] = self.lr_schedule.project(meta["lr_schedule"])
        if "data_weights" in meta:
            out["data_weights"] = self.data_weights.project(meta["data_weights"])
        if "poison" in meta:
            clean = jnp.asarray(self.data.x_train[list(self.poison.indices)])
            out["poison"] = self.poison.project(meta["poison"], clean, self.data.input_range)
        return out

    def learning_rates(self, meta):
        """The learning rate of every step under ``meta``."""
        return self.lr_schedule.values(meta["lr_schedule"], self.num_steps)

    # ------------------------------------------------------------------ the run
    def _key(self):
        return jax.random.key(self.seed)

    def init_state(self) -> dict:
        """``state_0``: parameters initialized from ``seed`` and the optimizer state."""
        cached = self.__dict__.get("_state0")
        if cached is not None:
            return cached
        key = jax.random.fold_in(self._key(), 0)
        params = init_params(self.model, key, jnp.asarray(self.data.x_train[:1]), self.param_dtype)
        state0 = {"params": params, "opt_state": self.optimizer.init(params)}
        if self.mesh is not None:
            state0 = jax.device_put(state0, self.state_sharding(state0))
        object.__setattr__(self, "_state0", state0)
        return state0

    def _sharding(self, *spec):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def state_sharding(self, state):
        """The ``NamedSharding`` of every leaf of ``state`` on the mesh (see ``state_partition``)."""
        from jax.sharding import NamedSharding, PartitionSpec

        rule = self.state_partition
        if rule is None:
            if self.model_axis is None:
                return jax.tree.map(lambda _: self._sharding(), state)
            rule = shard_last_axis(self.model_axis, self.mesh.shape[self.model_axis])
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(self.mesh, rule(path, leaf) or PartitionSpec()), state
        )

    def logits(self, params, x, *, train: bool = False, rng=None):
        kwargs = {"train": train} if self._train_flag else {}
        rngs = {"dropout": rng} if (train and rng is not None) else None
        return self.model.apply({"params": params}, x, rngs=rngs, **kwargs)

    def _run_key(self, meta):
        """The key of batch order and dropout: ``meta["seed"]`` when present (see :meth:`value_and_metagrad_at_seed`)."""
        return jax.random.key(meta["seed"]) if "seed" in meta else self._key()

    def training_batch(self, meta, t):
        """``(x, y, weights)`` of the batch of step ``t``, with poison and data weights applied."""
        idx = batch_indices(jax.random.fold_in(self._run_key(meta), 1), t, self.data.num_train, self.batch_size)
        x = jnp.asarray(self.data.x_train)[idx]
        y = jnp.asarray(self.data.y_train)[idx]
        if self.poison is not None:
            slot = jnp.asarray(self._poison_slots)[idx]
            delta = meta["poison"][jnp.maximum(slot, 0)]
            mask = (slot >= 0).reshape((-1,) + (1,) * (x.ndim - 1))
            x = x + jnp.where(mask, delta, jnp.zeros_like(delta))
        weights = meta["data_weights"][idx] if self.data_weights is not None else jnp.ones((self.batch_size,), x.dtype)
        if self.mesh is not None:
            split = self._sharding(self.data_axis)
            x, y, weights = (jax.lax.with_sharding_constraint(a, split) for a in (x, y, weights))
        return x, y, weights

    def step(self, state, meta, t):
        """One optimizer step on the batch of step ``t`` (pure; REPLAY's ``step``)."""
        params, opt_state = state["params"], state["opt_state"]
        x, y, weights = self.training_batch(meta, t)
        rng = jax.random.fold_in(jax.random.fold_in(self._run_key(meta), 2), t)
        # the inputs the metagradient flows into (besides params) vs constants of the step
        diff, const = {}, {"y": y, "rng": rng}
        (diff if self.poison is not None else const)["x"] = x
        (diff if self.data_weights is not None else const)["weights"] = weights
        grads = self._grad_fn(params, diff, const)
        if self.lr_schedule is not None:
            old = opt_state.hyperparams["learning_rate"]
            lr = self.lr_schedule.value_at(meta["lr_schedule"], t, self.num_steps).astype(jnp.result_type(old))
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        if self.mesh is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, self.state_sharding(new_state))
        return new_state

    def _batch_loss(self, params, diff, const):
        """Weighted mean cross-entropy of a training batch (``x``, ``weights``, ``y``, ``rng`` split over two dicts)."""
        batch = {**diff, **const}
        logits = self.logits(params, batch["x"], train=True, rng=batch["rng"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(batch["weights"] * losses)

    def loss_and_accuracy(self, params, split: str = "val"):
        x, y = self.data.split(split)
        logits = self.logits(params, jnp.asarray(x))
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)))
        return loss, jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y))

    def objective(self, state, meta):
        """The metaobjective: mean loss on ``objective_split`` of the final parameters (negated if ``maximize``)."""
        loss, _ = self.loss_and_accuracy(state["params"], self.objective_split)
        return -loss if self.maximize else loss

    # -------------------------------------------------------------- conveniences
    def train(self, meta, num_steps: int | None = None):
        """The final state after ``num_steps`` (default ``T``) steps: one compiled call."""
        return replay.compiled.advance(self.step, self.init_state(), meta, 0, num_steps or self.num_steps)

    def evaluate(self, meta) -> dict:
        """Train under ``meta`` and report loss and accuracy on every split."""
        params = self.train(meta)["params"]
        out = {}
        for split in ("train", "val", "test"):
            loss, acc = self.loss_and_accuracy(params, split)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = float(loss), float(acc)
        return out

    def value_and_metagrad(self, meta, **kwargs):
        """``replay.value_and_metagrad`` of this problem's run (kwargs: ``k``, ``strategy``, ...)."""
        self.check_meta(meta)
        return replay.value_and_metagrad(self.step, self.objective, self.init_state(), meta, self.num_steps, **kwargs)

    def value_and_metagrad_at_seed(self, meta, seed: int, **kwargs):
        """``value_and_metagrad`` of the run with training seed ``seed``, compiled once for every seed.

        Equal to ``dataclasses.replace(self, seed=seed).value_and_metagrad(meta)``,
        but the seed of batch order and dropout enters the step as a traced
        ``meta["seed"]`` (no gradient), so averaging metagradients over many
        training seeds does not recompile REPLAY's programs for each.
        """
        self.check_meta(meta)
        state0 = dataclasses.replace(self, seed=int(seed)).init_state()
        seeded = {**meta, "seed": jnp.asarray(seed, jnp.int32)}
        value, grad = replay.value_and_metagrad(self.step, self.objective, state0, seeded, self.num_steps, **kwargs)
        return value, {name: g for name, g in grad.items() if name != "seed"}


def shard_last_axis(axis: str, num_devices: int) -> Callable:
    """A ``state_partition`` rule: split each leaf's last axis over mesh axis ``axis`` where it divides.

    For dense kernels ``(in, out)`` this is column parallelism (Shoeybi et al.,
    "Megatron-LM", 2019): each device holds a slice of the output features, their
    bias and the matching optimizer moments. Scalars and leaves whose last axis
    doesn't divide by ``num_devices`` are replicated.
    """
    from jax.sharding import PartitionSpec

    def rule(path, leaf):
        shape = np.shape(leaf)
        if len(shape) == 0 or shape[-1] % num_devices or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            return PartitionSpec()
        return PartitionSpec(*([None] * (len(shape) - 1)), axis)

    return rule
