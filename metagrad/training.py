"""The supervised training problem: a flax model, an optax optimizer and a dataset as REPLAY's three functions.

A :class:`TrainingProblem` implements :class:`metagrad.Problem`::

    state_0     = problem.init_state()
    state_{t+1} = problem.step(state_t, meta, t)
    value       = problem.objective(state_T, meta)   # validation loss by default

``meta`` is a dict of the problem's metaparameters (:mod:`metagrad.meta`),
each entering the step through its own hook; the problem never branches on
their names. The state is ``{"params", "opt_state"}`` plus ``"model_state"``
when the model has mutable collections (BatchNorm's ``batch_stats``). The
batch of step ``t``, dropout and every other random choice are functions of
``(seed, t)`` (:func:`metagrad.problem.stream_key`), so any segment recomputes
bit-for-bit. The data reach the compiled programs as arguments:
``problem.step`` and ``problem.objective`` are ``jax.tree_util.Partial``
objects holding the device arrays, placed once (sharded over the data axis
when a mesh is given).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import replay

from .data import Dataset, batch_indices
from .meta import (DataWeights, LRSchedule, Poison, ProblemInfo, StepContext, check_metaparameters, init_metaparameters,
                   injected_learning_rate, project_metaparameters, specs_by_name)
from .models import Classifier, loss_and_accuracy
from .problem import run_key, stream_key

SPLITS = ("train", "val", "test")

#: The device copy of each dataset's splits, by placement (one copy however many problems share the dataset).
_PLACED: "weakref.WeakKeyDictionary[Dataset, dict]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingProblem:
    """A supervised training run whose metaparameters are plugins (LR schedule, data weights, poison, ...).

    Args:
      model: a flax linen module mapping a batch of inputs to logits (``train=``
        is passed when its ``__call__`` takes it). Mutable collections
        (BatchNorm's ``batch_stats``, or those named in ``mutable``) are carried
        in the state as ``state["model_state"]`` and differentiated through.
      optimizer: any optax ``GradientTransformation``, chains included, with or
        without ``optax.inject_hyperparams`` (see :class:`~metagrad.LRSchedule`
        for how a schedule enters each).
      data: a :class:`~metagrad.data.Dataset`.
      num_steps: training steps ``T``.
      batch_size: examples per step.
      seed: keys initialization, batch order and dropout.
      lr_schedule, data_weights, poison: the built-in metaparameter specs
        (``None`` leaves one out; ``lr_schedule=None`` keeps the optimizer's own LR).
      metaparameters: further :class:`~metagrad.meta.Metaparameter` specs (any new kind).
      param_dtype: dtype of parameters and inputs (use ``jnp.float64`` with x64 for exactness checks).
      objective_split: the split whose mean loss is the metaobjective.
      maximize: the metaobjective is the *negative* loss (for attacks), so minimizing it maximizes the loss.
      mesh: a ``jax.sharding.Mesh`` for data-parallel training: each batch is split
        over the mesh axis ``data_axis`` and the training set is stored sharded
        over it; REPLAY's stored states keep the state's sharding. ``None``: one device.
      inner_grad: how the step's gradient is differentiated by the metagradient:
        ``"reverse"`` (``jax.grad``, so reverse-over-reverse) or
        ``"forward_over_reverse"`` (:func:`replay.mixed_mode_grad`: Hessian-vector
        products by forward-over-reverse, Kemaev et al. 2025). Same values.
      model_axis: a second mesh axis over which parameters and optimizer state are
        sharded (``None``: the state is replicated), leaf by leaf by ``state_partition``.
      state_partition: ``(keypath, leaf) -> PartitionSpec`` for every leaf of the
        state; default :func:`shard_last_axis` over ``model_axis``.
      mutable: the model's collections updated in training (default: every
        collection ``model.init`` returns besides ``params``).
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
    metaparameters: tuple = ()
    param_dtype: Any = jnp.float32
    objective_split: str = "val"
    maximize: bool = False
    mesh: Any = None
    data_axis: str = "data"
    inner_grad: str = "reverse"
    model_axis: str | None = None
    state_partition: Callable | None = None
    mutable: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}.")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer must be an optax GradientTransformation (e.g. optax.adamw(1e-3)), "
                f"got {type(self.optimizer).__name__}."
            )
        if not 1 <= self.batch_size <= self.data.num_train:
            raise ValueError(
                f"batch_size={self.batch_size} must be in [1, {self.data.num_train}] (the training set size)."
            )
        if self.objective_split not in SPLITS:
            raise ValueError(f"objective_split={self.objective_split!r}: use one of {SPLITS}.")
        self._check_mesh()
        if self.inner_grad not in ("reverse", "forward_over_reverse"):
            raise ValueError(
                f"inner_grad={self.inner_grad!r}: use 'reverse' (jax.grad) or 'forward_over_reverse' "
                "(replay.mixed_mode_grad)."
            )
        specs = self.meta_specs()
        object.__setattr__(self, "data", self.data.astype(self.param_dtype))
        object.__setattr__(self, "_classifier", Classifier(self.model, self.mutable))
        info = self.info()
        for spec in specs.values():
            spec.check(info)
        object.__setattr__(self, "_info", info)
        object.__setattr__(self, "_diff_inputs", tuple(sorted({k for s in specs.values() for k in s.batch_inputs})))
        grad_fn = (jax.grad(self._batch_loss, has_aux=True) if self.inner_grad == "reverse"
                   else _mixed_mode_with_aux(self._batch_loss))
        object.__setattr__(self, "_grad_fn", grad_fn)
        object.__setattr__(self, "_arrays", self._place_data(specs, info))
        object.__setattr__(self, "step", jax.tree_util.Partial(self.step_on, self._arrays["train"]))
        split = {"x": self._arrays[self.objective_split]["x"], "y": self._arrays[self.objective_split]["y"]}
        object.__setattr__(self, "objective", jax.tree_util.Partial(self.objective_on, split))

    def _check_mesh(self):
        if self.mesh is not None:
            if self.data_axis not in self.mesh.axis_names:
                raise ValueError(f"data_axis={self.data_axis!r} is not an axis of the mesh {self.mesh.axis_names}.")
            devices = self.mesh.shape[self.data_axis]
            if self.batch_size % devices:
                raise ValueError(
                    f"batch_size={self.batch_size} must be divisible by the {devices} devices of mesh axis "
                    f"{self.data_axis!r} for data-parallel training."
                )
        if self.model_axis is not None and (self.mesh is None or self.model_axis not in self.mesh.axis_names):
            axes = None if self.mesh is None else self.mesh.axis_names
            raise ValueError(
                f"model_axis={self.model_axis!r} must name an axis of the mesh (mesh axes: {axes}); "
                "build the mesh with both axes, e.g. Mesh(devices.reshape(2, 2), ('data', 'model'))."
            )
        if self.state_partition is not None and self.mesh is None:
            raise ValueError("state_partition places the state on a mesh: pass mesh= as well.")

    # ----------------------------------------------------------------- metaparameters
    def meta_specs(self) -> dict:
        """The declared metaparameter specs by name (the built-in three, then ``metaparameters``)."""
        return specs_by_name((self.lr_schedule, self.data_weights, self.poison), self.metaparameters)

    def info(self) -> ProblemInfo:
        """What the metaparameters may know of this problem (:class:`~metagrad.meta.ProblemInfo`)."""
        cached = self.__dict__.get("_info")
        if cached is not None:
            return cached
        return ProblemInfo(num_steps=self.num_steps, num_train=self.data.num_train,
                           input_shape=self.data.input_shape, dtype=jnp.dtype(self.param_dtype),
                           x_train=self.data.x_train, input_range=self.data.input_range,
                           learning_rate=injected_learning_rate(self.optimizer, self.param_dtype),
                           feature_scale=self.data.feature_scale)

    def init_meta(self) -> dict:
        """Initial metaparameter values, one entry per declared spec."""
        return init_metaparameters(self.meta_specs(), self._info)

    def check_meta(self, meta) -> None:
        """Raise ``ValueError`` saying what to change when ``meta`` does not fit this problem."""
        check_metaparameters(meta, self.meta_specs(), self._info, extra_parts=("seed",))

    def project_meta(self, meta) -> dict:
        """Map metaparameters back to their feasible sets."""
        return project_metaparameters(meta, self.meta_specs(), self._info)

    def learning_rates(self, meta):
        """The schedule's value at every step under ``meta`` (learning rates, or multipliers; see LRSchedule)."""
        return self.lr_schedule.values(meta["lr_schedule"], self.num_steps)

    # ------------------------------------------------------------------ data on the device
    def _place_data(self, specs, info) -> dict:
        """The splits and the metaparameters' data arrays as device arrays, each split placed once per dataset.

        Problems made from one another (``dataclasses.replace``) share the device copy of their dataset.
        """
        put = jax.device_put
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            devices = self.mesh.shape[self.data_axis]

            def put(a):  # noqa: F811 - sharded over the data axis where the examples divide
                spec = PartitionSpec(self.data_axis) if np.shape(a)[0] % devices == 0 else PartitionSpec()
                return jax.device_put(a, NamedSharding(self.mesh, spec))

        per_placement = _PLACED.setdefault(self.data, {})
        placement = (id(self.mesh), self.data_axis)
        if placement not in per_placement:
            per_placement[placement] = {
                split: {"x": put(np.asarray(x)), "y": put(np.asarray(y, np.int32))}
                for split, (x, y) in ((split, self.data.split(split)) for split in SPLITS)
            }
        arrays = {split: dict(value) for split, value in per_placement[placement].items()}
        arrays["train"]["meta"] = {name: jax.tree.map(put, spec.data_arrays(info)) for name, spec in specs.items()}
        return arrays

    def device_data(self, split: str = "train") -> dict:
        """The device arrays of a split (``{"x", "y"}``; the train split also holds the metaparameters' arrays)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}.")
        return self._arrays[split]

    # ------------------------------------------------------------------ the run
    def seed_of(self, meta):
        """The seed of batch order and dropout: ``meta["seed"]`` when present (see :meth:`value_and_metagrad_at_seed`)."""
        return meta["seed"] if isinstance(meta, dict) and "seed" in meta else self.seed

    def init_state(self, meta=None) -> dict:
        """``state_0``: parameters (and mutable collections) initialized from ``seed``, and the optimizer state."""
        cached = self.__dict__.get("_state0")
        if cached is None:
            cached = self.initial_state_for_seed(self.seed)
            object.__setattr__(self, "_state0", cached)
        return cached

    def initial_state_for_seed(self, seed: int) -> dict:
        """``state_0`` of the run with initialization seed ``seed`` (not cached)."""
        key = stream_key(int(seed), "init")
        params, model_state = self._classifier.init(key, jnp.asarray(self.data.x_train[:1]), self.param_dtype)
        state0 = {"params": params, "opt_state": self.optimizer.init(params)}
        if model_state:
            state0["model_state"] = model_state
        if self.mesh is not None:
            state0 = jax.device_put(state0, self.state_sharding(state0))
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

    def logits(self, params, x, *, train: bool = False, rng=None, model_state=None):
        """The model's logits (evaluation mode unless ``train``; ``model_state`` as in the state)."""
        return self._classifier.logits(params, model_state or {}, x, train=train, rng=rng)[0]

    def batch_on(self, arrays, meta, t, params=None):
        """``(batch, ctx)`` of step ``t``: ``x``, ``y``, ``weights`` after every metaparameter's ``prepare_batch``."""
        idx = batch_indices(stream_key(self.seed_of(meta), "batch"), t, self.data.num_train, self.batch_size)
        x, y = arrays["x"][idx], arrays["y"][idx]
        batch = {"x": x, "y": y, "weights": jnp.ones((self.batch_size,), x.dtype)}
        ctx = StepContext(t=t, num_steps=self.num_steps, indices=idx, params=params, arrays=arrays["meta"])
        for name, spec in self.meta_specs().items():
            batch = spec.prepare_batch(meta[name], batch, ctx)
        if self.mesh is not None:
            split = self._sharding(self.data_axis)
            batch = {k: jax.lax.with_sharding_constraint(v, split) for k, v in batch.items()}
        return batch, ctx

    def training_batch(self, meta, t):
        """``(x, y, weights)`` of the batch of step ``t``, with the metaparameters applied."""
        batch, _ = self.batch_on(self._arrays["train"], meta, t)
        return batch["x"], batch["y"], batch["weights"]

    def step_on(self, arrays, state, meta, t):
        """One optimizer step on the batch of step ``t`` drawn from ``arrays`` (``problem.step`` binds them)."""
        params = state["params"]
        batch, ctx = self.batch_on(arrays, meta, t, params)
        rng = stream_key(self.seed_of(meta), "dropout", t)
        diff = {k: batch[k] for k in self._diff_inputs}
        const = {k: v for k, v in batch.items() if k not in diff}
        const["rng"], const["model_state"] = rng, state.get("model_state", {})
        grads, model_state = self._grad_fn(params, diff, const)
        update = self.optimizer.update
        for name, spec in self.meta_specs().items():
            update = spec.wrap_update(meta[name], update, ctx)
        updates, opt_state = update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        if "model_state" in state:
            new_state["model_state"] = model_state
        if self.mesh is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, self.state_sharding(new_state))
        return new_state

    def _batch_loss(self, params, diff, const):
        """Weighted mean cross-entropy of a training batch, and the updated mutable collections."""
        batch = {**diff, **const}
        logits, model_state = self._classifier.logits(params, batch["model_state"], batch["x"], train=True,
                                                      rng=batch["rng"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(batch["weights"] * losses), model_state

    def loss_and_accuracy_on(self, state, x, y):
        """Mean loss and accuracy of ``state`` (a state, or bare parameters) on inputs ``x``, labels ``y``."""
        params, model_state = _params_and_model_state(state)
        logits, _ = self._classifier.logits(params, model_state, x, train=False)
        return loss_and_accuracy(logits, y)

    def loss_and_accuracy(self, state, split: str = "val"):
        """Mean loss and accuracy of ``state`` (or bare parameters) on a split (one compiled call)."""
        arrays = self.device_data(split)
        return _loss_and_accuracy(self, state, arrays["x"], arrays["y"])

    def objective_on(self, split_arrays, state, meta):
        """The metaobjective on ``split_arrays``: mean loss of the final state (negated if ``maximize``)."""
        loss, _ = self.loss_and_accuracy_on(state, split_arrays["x"], split_arrays["y"])
        return -loss if self.maximize else loss

    # -------------------------------------------------------------- conveniences
    def train(self, meta, num_steps: int | None = None):
        """The final state after ``num_steps`` (default ``T``) steps: one compiled call."""
        return replay.advance(self.step, self.init_state(), meta, 0, num_steps or self.num_steps)

    def evaluate(self, state) -> dict:
        """Loss and accuracy of ``state`` on every split (the Problem contract's ``evaluate``).

        Passing metaparameters instead of a state (the older form) trains under them first.
        """
        if isinstance(state, dict) and "params" not in state:
            warnings.warn("TrainingProblem.evaluate(meta) is deprecated: pass a state, "
                          "e.g. problem.evaluate(problem.train(meta)).", DeprecationWarning, stacklevel=2)
            state = self.train(state)
        out = {}
        for split in SPLITS:
            loss, acc = self.loss_and_accuracy(state, split)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = float(loss), float(acc)
        return out

    def value_and_metagrad(self, meta, **kwargs):
        """``replay.value_and_metagrad`` of this problem's run (kwargs: ``k``, ``strategy``, ...)."""
        self.check_meta(meta)
        return self._diagnosed(meta, self.init_state(), **kwargs)

    def value_and_metagrad_at_seed(self, meta, seed: int, **kwargs):
        """``value_and_metagrad`` of the run with training seed ``seed``, compiled once for every seed.

        Equal to ``dataclasses.replace(self, seed=seed).value_and_metagrad(meta)``,
        but the seed of batch order and dropout enters the step as a traced
        ``meta["seed"]`` (no gradient), so averaging metagradients over many
        training seeds does not recompile REPLAY's programs for each.
        """
        self.check_meta(meta)
        state0 = self.initial_state_for_seed(seed)
        seeded = {**meta, "seed": jnp.asarray(seed, jnp.int32)}
        value, grad = self._diagnosed(seeded, state0, **kwargs)
        return value, {name: g for name, g in grad.items() if name != "seed"}

    def _diagnosed(self, meta, state0, **kwargs):
        """``replay.value_and_metagrad``, with the optimizer-specific causes of a bad metagradient named."""
        try:
            value, grad = replay.value_and_metagrad(self.step, self.objective, state0, meta, self.num_steps, **kwargs)
        except replay.NonFiniteMetagradError as err:
            if _holds(state0["opt_state"], optax.ScaleByAdamState):
                raise replay.NonFiniteMetagradError(
                    f"{err} The optimizer is Adam-like: with eps_root=0 the derivative of sqrt(nu) is infinite "
                    "where a second moment is 0; pass eps_root > 0, e.g. optax.adam(lr, eps_root=1e-12).",
                    paths=err.paths, steps=err.steps) from err
            raise
        if not kwargs.get("wrt_state0"):
            warn_structurally_zero(self, meta, state0, grad)
        return value, grad


def _holds(tree, node_type) -> bool:
    found = []
    jax.tree.map(lambda node: found.append(isinstance(node, node_type)), tree,
                 is_leaf=lambda node: isinstance(node, node_type))
    return any(found)


def warn_structurally_zero(problem, meta, state0, grad) -> None:
    """Warn, saying why, for each metaparameter whose metagradient is identically zero.

    A metagradient that is exactly zero everywhere almost always has a
    structural cause. The one checked here: the parameters do not depend on the
    metaparameter at all (a JVP through two steps is zero) while the optimizer
    state does, which is what a sign update does (``optax.lion``, signSGD:
    ``sign`` has derivative zero, so per-example weights and input
    perturbations cannot change the update).
    """
    for name, g in grad.items():
        if name == "seed" or not jnp.issubdtype(jnp.result_type(g), jnp.inexact) or bool(jnp.any(g != 0)):
            continue
        reason = ("no step of the run depends on it (e.g. the examples it touches are never in a batch of "
                  "these steps)")
        tangent = {k: (jnp.ones_like(v) if k == name else jnp.zeros_like(v)) if jnp.issubdtype(
            jnp.result_type(v), jnp.inexact) else np.zeros(np.shape(v), jax.dtypes.float0) for k, v in meta.items()}

        def two_steps(m):
            s = problem.step(state0, m, jnp.int32(0))
            return problem.step(s, m, jnp.int32(1))

        try:
            _, out = jax.jvp(two_steps, (meta,), (tangent,))
        except TypeError:  # a custom_vjp inner gradient (inner_grad="forward_over_reverse") has no JVP
            warnings.warn(f"the metagradient of {name!r} is identically zero.", RuntimeWarning, stacklevel=3)
            continue
        moves_params = any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(out["params"]))
        moves_opt = any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(out["opt_state"])
                        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))
        if not moves_params and moves_opt:
            if _holds(state0["opt_state"], optax.ScaleByLionState):
                reason = ("it changes the optimizer state but never the parameters: optax.lion's update is the "
                          "sign of its momentum, whose derivative is zero; use an optimizer whose update is smooth "
                          "in the gradients (sgd, adam, ...) to optimize it")
            else:
                reason = ("it changes the optimizer state but never the parameters: the update has zero "
                          "derivative in the gradients here (a learning rate of 0, or a sign update as in signSGD)")
        warnings.warn(f"the metagradient of {name!r} is identically zero: {reason}.", RuntimeWarning, stacklevel=3)


def _params_and_model_state(state):
    if isinstance(state, dict) and "params" in state and "opt_state" in state:
        return state["params"], state.get("model_state", {})
    return state, {}


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_accuracy(problem, state, x, y):
    return problem.loss_and_accuracy_on(state, x, y)


def _mixed_mode_with_aux(loss):
    """:func:`replay.mixed_mode_grad` of the loss, returning the mutable collections as in ``has_aux``.

    The collections' update is recomputed by a forward pass (its value is the
    same); the mixed-mode VJP covers the gradient, and the collections'
    derivative flows through that forward pass by ordinary reverse mode.
    """
    grad_fn = replay.mixed_mode_grad(lambda p, d, c: loss(p, d, c)[0])

    def value(params, diff, const):
        return grad_fn(params, diff, const), loss(params, diff, const)[1]

    return value


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


__all__ = ["SPLITS", "TrainingProblem", "shard_last_axis", "warn_structurally_zero", "run_key"]
