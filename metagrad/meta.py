"""Metaparameters as plugins: each kind is a value with ``init``, ``project`` and the one hook by which it enters a step.

In the style of optax's transformations, a metaparameter *spec* is a static,
hashable value; its *value* is an array in the dict ``meta`` that REPLAY
differentiates and MGD updates (``meta[spec.name]``). A problem loops over its
specs and never branches on their names, so a new kind of metaparameter is one
new subclass of :class:`Metaparameter`:

* ``init(info)`` -- the initial value for a problem described by :class:`ProblemInfo`;
* ``project(value, info)`` -- back to the feasible set after a metagradient step;
* one hook into the step (the others are the identity):

  - ``prepare_batch(value, batch, ctx)`` -- change the batch (``x``, ``y``,
    per-example ``weights``) before the loss: poison perturbs inputs, data
    weights weight the per-example losses; list the batch entries it makes
    depend on the value in ``batch_inputs``;
  - ``wrap_update(value, update, ctx)`` -- wrap the optimizer's
    ``update(grads, opt_state, params) -> (updates, opt_state)``: the LR
    schedule scales the final update, a weight-decay schedule adds its decay.

* ``data_arrays(info)`` (optional) -- arrays the hook needs that grow with the
  data (e.g. poison's slot of every training example); the problem passes them
  to its compiled programs as arguments (``ctx.arrays``), never as constants.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv
2503.13751 (2025), optimize all three built-in kinds.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DataWeights", "LRSchedule", "LogLRSchedule", "Metaparameter", "Poison", "ProblemInfo", "StepContext", "has_injected_lr",
    "project_to_simplex",
]


@dataclasses.dataclass(frozen=True, eq=False)
class ProblemInfo:
    """What a metaparameter may know of the problem it is part of (host-side values, no tracers).

    Attributes:
      num_steps: ``T``.
      num_train: training examples ``N``.
      input_shape: the shape of one input.
      dtype: the dtype of parameters, inputs and metaparameters.
      x_train: the training inputs (a NumPy array), for projections that keep inputs valid.
      input_range: ``(lo, hi)``, the valid range of input values (scalars or per-feature arrays).
      feature_scale: each feature's unit (an array shaped like one input, or ``None`` for 1), in which
        perturbation budgets are expressed.
      learning_rate: the optimizer's injected initial learning rate (``None`` when it has none).
    """

    num_steps: int
    num_train: int
    input_shape: tuple
    dtype: Any
    x_train: Any = None
    input_range: tuple = (-np.inf, np.inf)
    learning_rate: float | None = None
    feature_scale: Any = None


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a hook sees inside a step (traced values).

    Attributes:
      t: the step index (an int32 scalar).
      num_steps: ``T`` (a Python int).
      indices: the training examples of the step's batch.
      params: the parameters before the step.
      arrays: ``{spec.name: data_arrays(info)}`` as device arrays (jit arguments).
    """

    t: Any
    num_steps: int
    indices: Any
    params: Any
    arrays: dict


class Metaparameter(abc.ABC):
    """A kind of metaparameter (see the module docstring). Subclasses are frozen dataclasses.

    ``name`` is the key of its value in ``meta``; two specs of one problem need different names.
    """

    name: ClassVar[str]
    #: entries of the batch that ``prepare_batch`` makes depend on the value (differentiated by the inner gradient).
    batch_inputs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def init(self, info: ProblemInfo):
        """The initial value."""

    def project(self, value, info: ProblemInfo | None = None):
        """``value`` mapped back to its feasible set (default: unconstrained)."""
        return value

    def shape(self, info: ProblemInfo) -> tuple[int, ...]:
        """The shape of the value for this problem."""
        return tuple(np.shape(jax.eval_shape(lambda: self.init(info))))

    def describe_shape(self, info: ProblemInfo) -> str:
        """Why the value has :meth:`shape` (for error messages)."""
        return f"as {type(self).__name__}.init gives"

    def check(self, info: ProblemInfo) -> None:
        """Raise ``ValueError`` saying what to change when the spec does not fit the problem."""

    def data_arrays(self, info: ProblemInfo) -> dict:
        """Arrays the hooks need that grow with the data, passed to the step as ``ctx.arrays[self.name]``."""
        return {}

    def prepare_batch(self, value, batch: dict, ctx: StepContext) -> dict:
        """The batch (``x``, ``y``, ``weights``) with this metaparameter applied (default: unchanged)."""
        return batch

    def wrap_update(self, value, update: Callable, ctx: StepContext) -> Callable:
        """``update(grads, opt_state, params) -> (updates, opt_state)`` with this metaparameter applied."""
        return update


def has_injected_lr(opt_state) -> bool:
    """Whether the outermost optimizer state exposes ``learning_rate`` (``optax.inject_hyperparams``)."""
    return hasattr(opt_state, "hyperparams") and "learning_rate" in opt_state.hyperparams


@dataclasses.dataclass(frozen=True)
class LRSchedule(Metaparameter):
    """A piecewise-linear learning-rate schedule: ``num_knots`` values evenly spaced over steps ``0 .. T-1``.

    With ``num_knots == T`` it is a per-step learning rate. Projection keeps it non-negative.

    How it enters the step depends on the optimizer, so that any optax
    ``GradientTransformation`` works, chains included:

    * when the outermost optimizer state exposes ``learning_rate``
      (``optax.inject_hyperparams``), the schedule *sets* it at every step: its
      values are learning rates;
    * otherwise the schedule *multiplies the optimizer's final update*: its
      values are multipliers of the optimizer's own learning rate (``1.0``
      keeps it). For every optimizer whose update is linear in its learning
      rate (SGD with or without momentum, Adam, AdamW including its decoupled
      weight decay, Lion, RMSProp, and chains that clip the *gradients* before
      them, e.g. ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))``)
      this is exactly a learning-rate schedule. For a chain that transforms the
      update after its learning rate is applied (e.g. clipping the *updates*),
      it is a schedule on the final step size instead.

    ``init_value=None`` starts at the optimizer's own rate (its injected
    learning rate, or a multiplier of 1).
    """

    num_knots: int = 10
    init_value: float | None = None

    name: ClassVar[str] = "lr_schedule"

    def __post_init__(self):
        if not isinstance(self.num_knots, int) or self.num_knots < 1:
            raise ValueError(f"LRSchedule needs num_knots >= 1, got {self.num_knots!r}.")
        if self.init_value is not None and not self.init_value >= 0:
            raise ValueError(f"LRSchedule.init_value must be >= 0 (or None), got {self.init_value}.")

    def init(self, info, dtype=None):
        """``num_knots`` copies of ``init_value`` (of the optimizer's own rate when it is ``None``).

        ``info`` is a :class:`ProblemInfo` (or, as before, the number of steps, with ``dtype``).
        """
        if isinstance(info, ProblemInfo):
            own = 1.0 if info.learning_rate is None else info.learning_rate
            dtype = info.dtype
        else:
            own, dtype = 1.0, dtype or jnp.float32
        return jnp.full((self.num_knots,), own if self.init_value is None else self.init_value, dtype)

    def positions(self, num_steps: int):
        return jnp.linspace(0.0, float(max(num_steps - 1, 1)), self.num_knots)

    def rates(self, knots):
        """The knots as learning rates (here the value itself)."""
        return knots

    def value_at(self, knots, t, num_steps: int):
        """The learning rate at step ``t`` (linear interpolation between knots)."""
        if self.num_knots == 1:
            return knots[0]
        return jnp.interp(jnp.asarray(t, knots.dtype), self.positions(num_steps).astype(knots.dtype), knots)

    def values(self, knots, num_steps: int):
        """The learning rate at every step, as an array of length ``num_steps``."""
        return jax.vmap(lambda t: self.value_at(knots, t, num_steps))(jnp.arange(num_steps))

    def project(self, knots, info=None):
        return jnp.maximum(knots, 0.0)

    def shape(self, info) -> tuple[int, ...]:
        return (self.num_knots,)

    def describe_shape(self, info) -> str:
        return f"one value per knot, num_knots={self.num_knots}"

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (self.num_knots,)

    def wrap_update(self, knots, update, ctx):
        def scheduled(grads, opt_state, params):
            rate = self.value_at(knots, ctx.t, ctx.num_steps)
            if has_injected_lr(opt_state):
                old = opt_state.hyperparams["learning_rate"]
                hyper = {**opt_state.hyperparams, "learning_rate": rate.astype(jnp.result_type(old))}
                return update(grads, opt_state._replace(hyperparams=hyper), params)
            updates, opt_state = update(grads, opt_state, params)
            return jax.tree.map(lambda u: u * rate.astype(u.dtype), updates), opt_state

        return scheduled


@dataclasses.dataclass(frozen=True)
class LogLRSchedule(LRSchedule):
    """A piecewise-linear schedule of the *logarithm* of the learning rate: the value holds ``log`` of each knot.

    Enters the step exactly as :class:`LRSchedule` (it sets an injected learning
    rate, or multiplies the final update), at ``exp`` of the interpolated log
    knots. A metagradient step of a fixed size then changes each knot by a fixed
    *factor*, whatever the scale of the learning rate: an Adam step of 0.1 moves
    a knot by about 10%, at 1e-4 as at 1. This makes the meta-step size free of
    the problem's LR scale (a step sized for knots near 0.003 is a leap for knots
    near 1e-4 and a crawl near 1), and keeps every rate positive without a
    projection. Engstrom et al. (arXiv 2503.13751, Sec. 5.3) optimize a
    piecewise-linear schedule's knots; the log parametrization is this library's.

    ``init_value`` is a learning rate (not its log); ``min_rate`` bounds every knot
    from below (the projection clips the log value at ``log(min_rate)``).
    """

    min_rate: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if self.init_value is not None and not self.init_value > 0:
            raise ValueError(f"LogLRSchedule.init_value must be > 0 (its log is stored), got {self.init_value}.")
        if not self.min_rate > 0:
            raise ValueError(f"LogLRSchedule.min_rate must be > 0, got {self.min_rate}.")

    def init(self, info, dtype=None):
        return jnp.log(super().init(info, dtype))

    def project(self, log_knots, info=None):
        return jnp.maximum(log_knots, jnp.log(jnp.asarray(self.min_rate, log_knots.dtype)))

    def rates(self, log_knots):
        """The knots as learning rates."""
        return jnp.exp(log_knots)

    def value_at(self, log_knots, t, num_steps: int):
        return jnp.exp(super().value_at(log_knots, t, num_steps))


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
class DataWeights(Metaparameter):
    """One weight per training example, multiplying its loss.

    ``constraint="box"`` clips to ``[lower, upper]``; ``"simplex"`` projects onto
    non-negative weights with mean one (so the loss scale is kept).
    """

    init_value: float = 1.0
    constraint: str = "box"
    lower: float = 0.0
    upper: float = 1.0

    name: ClassVar[str] = "data_weights"
    batch_inputs: ClassVar[tuple[str, ...]] = ("weights",)

    def __post_init__(self):
        if self.constraint not in ("box", "simplex"):
            raise ValueError(f"DataWeights.constraint must be 'box' or 'simplex', got {self.constraint!r}.")
        if self.lower > self.upper:
            raise ValueError(f"DataWeights needs lower <= upper, got [{self.lower}, {self.upper}].")

    def init(self, info, dtype=None):
        num = info.num_train if isinstance(info, ProblemInfo) else int(info)
        dtype = info.dtype if isinstance(info, ProblemInfo) else (dtype or jnp.float32)
        return jnp.full((num,), self.init_value, dtype)

    def project(self, weights, info=None):
        if self.constraint == "box":
            return jnp.clip(weights, self.lower, self.upper)
        return project_to_simplex(weights, total=float(weights.shape[0]))

    def shape(self, info) -> tuple[int, ...]:
        return (info.num_train,)

    def describe_shape(self, info) -> str:
        return f"one weight per training example, {info.num_train} of them"

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (problem.data.num_train,)

    def prepare_batch(self, weights, batch, ctx):
        return {**batch, "weights": batch["weights"] * weights[ctx.indices]}


@dataclasses.dataclass(frozen=True)
class Poison(Metaparameter):
    """Additive perturbations of the training inputs at ``indices``, in an L-inf ball of radius ``eps``
    measured in units of each feature's scale.

    Projection clips feature ``j`` of each perturbation to ``[-eps * s_j, eps * s_j]``,
    where ``s`` is the data's ``feature_scale`` (each feature's standard deviation
    by default, so ``eps`` means the same on any data set), and keeps the
    perturbed input inside the data's valid range (``Dataset.input_range``,
    per feature). Without a scale (``feature_scale=None``) the bound is ``eps``.
    """

    indices: tuple[int, ...]
    eps: float = 0.5

    name: ClassVar[str] = "poison"
    batch_inputs: ClassVar[tuple[str, ...]] = ("x",)

    def __post_init__(self):
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("Poison.indices must not repeat an example.")
        if self.eps < 0:
            raise ValueError(f"Poison.eps must be >= 0, got {self.eps}.")

    @classmethod
    def random_subset(cls, num_examples: int, fraction: float, eps: float, seed: int = 0) -> "Poison":
        """Poison a random ``fraction`` of the ``num_examples`` training examples."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        count = max(1, int(round(fraction * num_examples)))
        chosen = np.sort(np.random.default_rng(seed).choice(num_examples, count, replace=False))
        return cls(tuple(chosen.tolist()), eps)

    def init(self, info, dtype=None):
        shape = info.input_shape if isinstance(info, ProblemInfo) else tuple(info)
        dtype = info.dtype if isinstance(info, ProblemInfo) else (dtype or jnp.float32)
        return jnp.zeros((len(self.indices), *shape), dtype)

    def check(self, info) -> None:
        if max(self.indices, default=-1) >= info.num_train or min(self.indices, default=0) < 0:
            raise ValueError(
                f"Poison.indices reach {max(self.indices)} but the training set has {info.num_train} examples."
            )

    def slot_of_example(self, num_examples: int):
        """Array mapping each training example to its row of the perturbation (-1 if not poisoned)."""
        slots = np.full((num_examples,), -1, np.int32)
        slots[list(self.indices)] = np.arange(len(self.indices), dtype=np.int32)
        return slots

    def data_arrays(self, info) -> dict:
        return {"slots": self.slot_of_example(info.num_train)}

    def bound(self, feature_scale=None):
        """The largest ``|delta|`` allowed per feature: ``eps * feature_scale`` (``eps`` without a scale)."""
        return self.eps if feature_scale is None else self.eps * jnp.asarray(feature_scale)

    def project(self, delta, clean_inputs=None, input_range=None, feature_scale=None):
        if isinstance(clean_inputs, ProblemInfo):
            info = clean_inputs
            clean_inputs, input_range = jnp.asarray(info.x_train[list(self.indices)]), info.input_range
            feature_scale = info.feature_scale
        lo, hi = (jnp.asarray(b, delta.dtype) for b in input_range)
        bound = jnp.asarray(self.bound(feature_scale), delta.dtype)
        delta = jnp.clip(delta, -bound, bound)
        return jnp.clip(clean_inputs + delta, lo, hi) - clean_inputs

    def shape(self, info) -> tuple[int, ...]:
        return (len(self.indices), *info.input_shape)

    def describe_shape(self, info) -> str:
        return "one perturbation per poisoned example, shaped like an input"

    def expected_shape(self, problem) -> tuple[int, ...]:
        return (len(self.indices), *problem.data.input_shape)

    def prepare_batch(self, delta, batch, ctx):
        x = batch["x"]
        slot = ctx.arrays[self.name]["slots"][ctx.indices]
        rows = delta[jnp.maximum(slot, 0)]
        mask = (slot >= 0).reshape((-1,) + (1,) * (x.ndim - 1))
        return {**batch, "x": x + jnp.where(mask, rows, jnp.zeros_like(rows))}


# ------------------------------------------------------------------ what every problem does with its specs
def specs_by_name(builtin, extra=()) -> dict:
    """The metaparameter specs by name: the ``builtin`` ones a problem declares (``None``: left out), then
    ``extra``; each checked to be a :class:`Metaparameter` and each name given once."""
    out = {}
    for spec in [s for s in builtin if s is not None] + list(extra):
        if not isinstance(spec, Metaparameter):
            raise TypeError(f"{spec!r} is not a metagrad.meta.Metaparameter: subclass it to add a new kind.")
        if spec.name in out:
            raise ValueError(f"two metaparameters are named {spec.name!r}: give each kind once.")
        out[spec.name] = spec
    return out


def injected_learning_rate(optimizer, dtype) -> float | None:
    """The initial learning rate ``optimizer`` injects (``optax.inject_hyperparams``), or ``None``."""
    probe = optimizer.init({"w": jnp.zeros((1,), dtype)})
    return float(probe.hyperparams["learning_rate"]) if has_injected_lr(probe) else None


def init_metaparameters(specs: dict, info) -> dict:
    """Initial metaparameter values, one entry per spec of ``specs`` (by name)."""
    return {name: spec.init(info) for name, spec in specs.items()}


def check_metaparameters(meta, specs: dict, info, *, extra_parts=()) -> None:
    """Raise ``ValueError`` saying what to change when ``meta`` does not fit ``specs`` (by name);
    ``extra_parts`` are further entries ``meta`` may hold (e.g. a traced ``"seed"``)."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict of named metaparameters, got {type(meta).__name__}.")
    if set(meta) - set(extra_parts) != set(specs):
        raise ValueError(
            f"meta has parts {sorted(meta)} but the problem declares {sorted(specs)}: "
            "build it with problem.init_meta()."
        )
    for name, spec in specs.items():
        want, got = spec.shape(info), tuple(np.shape(meta[name]))
        if got != want:
            raise ValueError(
                f"meta[{name!r}] has shape {got} but this problem needs {want} "
                f"({spec.describe_shape(info)}): build it with problem.init_meta()."
            )


def project_metaparameters(meta, specs: dict, info) -> dict:
    """``meta`` with every part that has a spec mapped back to its feasible set."""
    return {name: specs[name].project(value, info) if name in specs else value for name, value in meta.items()}
