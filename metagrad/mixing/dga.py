"""Online data mixing by Dynamic Gradient Alignment (DGA).

Fan, Grangier, Ablin, "Dynamic Gradient Alignment for Online Data Mixing",
arXiv 2410.02498 (2024). One training run draws each batch from ``k`` generic
data domains with weights ``alpha`` on the simplex. Every ``R`` steps it takes
the gradient of the loss on a small *target* set, ``g_T``, and the gradient of
every domain, ``g_i`` (all ``k`` in one ``vmap``), and moves the weights by an
exponentiated-gradient (EG) step on their alignment ``a_i = <g_i, g_T>``::

    alpha_hat = alpha * exp(eta * a) / sum_j alpha_j * exp(eta * a_j)     # EG on the simplex
    alpha     = ema * alpha + (1 - ema) * alpha_hat                       # EMA damps swings

``a_i`` is, up to the learning rate, minus the derivative of the target loss
after one step on the mixture with respect to ``alpha_i`` (the paper's
one-step bilevel approximation), so EG is mirror descent on that surrogate.
``ema = 0`` is DGA without EMA; the paper's EMA variant is ``0 < ema < 1``.

The run follows metagrad's core contract: :class:`MixingProblem` gives a pure
``step(state, meta, t)`` whose state holds the parameters, the optimizer state,
the domain weights and their recorded trajectory; the DGA update runs inside the
step under ``lax.cond(t % R == 0)``, and a whole run is one compiled
``replay.advance``. The batch of step ``t`` is a pure function of
``(seed, t)`` and of the weights, so a DGA run can be *replayed* from its
recorded weight trajectory (:meth:`MixingProblem.replay_step`) and
differentiated with respect to that trajectory by REPLAY
(:meth:`MixingProblem.value_and_metagrad`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import replay

from ..data import Dataset, batch_indices
from ..models import Classifier, init_params, loss_and_accuracy
from ..problem import stream_key



# ------------------------------------------------------------------ the update rule
def check_simplex(weights, num_domains: int | None = None, *, atol: float = 1e-5, name: str = "domain weights"):
    """Raise ``ValueError`` saying what to change unless ``weights`` is a point of the simplex.

    ``weights`` must be one non-negative, finite value per domain summing to one.
    Returns the weights as a float NumPy array.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector with one weight per domain, got shape {w.shape}.")
    if num_domains is not None and w.shape[0] != num_domains:
        raise ValueError(
            f"{name} has {w.shape[0]} entries but there are {num_domains} domains: give exactly one weight per domain."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > atol:
        raise ValueError(
            f"{name} are not on the simplex (min {w.min():.3g}, sum {w.sum():.6g}): pass finite non-negative "
            "weights that sum to 1, e.g. w / w.sum()."
        )
    return w


def exponentiated_gradient(weights, scores, step_size):
    """One exponentiated-gradient ascent step on the simplex: ``w_i exp(eta s_i) / sum_j w_j exp(eta s_j)``.

    Computed with the largest exponent subtracted (the same value, without
    overflow); a zero weight stays zero.
    """
    z = step_size * scores
    unnormalized = weights * jnp.exp(z - jnp.max(z))
    return unnormalized / jnp.sum(unnormalized)


def dga_update(weights, scores, step_size, ema=0.0):
    """DGA's weight update (Fan et al. 2024): an EG step on the alignment, then an EMA with the old weights.

    ``ema`` is the weight of the old value: ``ema * w + (1 - ema) * EG(w)``; ``ema = 0``
    is plain EG. A convex combination of two simplex points stays on the simplex.
    """
    return ema * weights + (1.0 - ema) * exponentiated_gradient(weights, scores, step_size)


def alignment_scores(domain_grads, target_grad, kind: str = "dot"):
    """``a_i = <g_i, g_T>`` over all parameter leaves (``kind="cosine"`` divides by both norms).

    ``domain_grads`` is a parameter pytree whose leaves carry a leading domain axis.
    """
    d_leaves, t_leaves = jax.tree.leaves(domain_grads), jax.tree.leaves(target_grad)
    k = d_leaves[0].shape[0]
    dots = sum(jnp.sum(d.reshape(k, -1) * t.reshape(1, -1), axis=1) for d, t in zip(d_leaves, t_leaves))
    if kind == "dot":
        return dots
    d_norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.reshape(k, -1)), axis=1) for d in d_leaves))
    t_norm = jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in t_leaves))
    return dots / (d_norm * t_norm + jnp.finfo(dots.dtype).tiny)


def sample_domains(weights, key, batch_size: int):
    """The domain of every batch slot, by systematic sampling from ``weights``.

    Slot ``j`` takes the domain whose cumulative-weight interval holds
    ``(j + u) / B`` with one ``u ~ U[0, 1)`` from ``key``: each domain gets
    ``floor`` or ``ceil`` of ``B * w_i`` slots (exactly ``B * w_i`` in
    expectation), and a domain of weight zero none.
    """
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(key, (), dtype=weights.dtype)
    points = (jnp.arange(batch_size, dtype=weights.dtype) + u) / batch_size * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, points, side="right"), weights.shape[0] - 1).astype(jnp.int32)


# ------------------------------------------------------------------ the method's settings
@dataclasses.dataclass(frozen=True)
class DGA:
    """Settings of Dynamic Gradient Alignment.

    Args:
      step_size: ``eta`` of the exponentiated-gradient step.
      update_every: ``R``; the weights change at steps ``R, 2R, ...`` (after ``R`` steps of training).
      ema: weight of the old domain weights in the EMA after each EG step (``0``: no EMA).
      alignment: ``"dot"`` (the paper's inner product) or ``"cosine"`` (scale-free).
      domain_batch_size: examples per domain for its gradient.
      target_batch_size: examples of the target set per target gradient (``None``: all of them).
    """

    step_size: float = 1.0
    update_every: int = 10
    ema: float = 0.0
    alignment: str = "dot"
    domain_batch_size: int = 64
    target_batch_size: int | None = None

    def __post_init__(self):
        if not (isinstance(self.update_every, int) and self.update_every >= 1):
            raise ValueError(f"DGA.update_every must be an integer >= 1, got {self.update_every!r}.")
        if not self.step_size >= 0:
            raise ValueError(f"DGA.step_size must be >= 0, got {self.step_size}.")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"DGA.ema must be in [0, 1) (0 means no EMA), got {self.ema}.")
        if self.alignment not in ("dot", "cosine"):
            raise ValueError(f"DGA.alignment must be 'dot' or 'cosine', got {self.alignment!r}.")
        if self.domain_batch_size < 1 or (self.target_batch_size is not None and self.target_batch_size < 1):
            raise ValueError("DGA.domain_batch_size and DGA.target_batch_size must be >= 1.")


def _as_arrays(domain):
    if isinstance(domain, Dataset):
        return np.asarray(domain.x_train), np.asarray(domain.y_train)
    x, y = domain
    return np.asarray(x), np.asarray(y)


# ------------------------------------------------------------------ the training run
@dataclasses.dataclass(frozen=True, eq=False)
class MixingProblem:
    """A training run on a mixture of data domains, optionally re-weighted online by DGA.

    Args:
      model: a flax linen module mapping a batch of inputs to logits.
      optimizer: any optax optimizer (its own learning rate or schedule is used).
      domains: the ``k`` generic domains, each a :class:`~metagrad.data.Dataset`
        (its train split) or an ``(x, y)`` pair; every domain needs at least ``batch_size`` examples.
      target: a :class:`~metagrad.data.Dataset` of the target domain: its (small) train
        split is the set DGA aligns with, its val split defines :meth:`objective`,
        its test split is for reporting.
      num_steps: training steps ``T``.
      batch_size: examples per step, drawn from the domains by the current weights.
      seed: keys initialization, batch order, domain sampling and dropout.
      dga: :class:`DGA` settings, or ``None`` for a fixed mixture.
      init_weights: initial domain weights on the simplex (``None``: uniform).
      domain_names: optional names, for reports.
      param_dtype: dtype of parameters, inputs and weights.
    """

    model: nn.Module
    optimizer: optax.GradientTransformation
    domains: Sequence[Any]
    target: Dataset
    num_steps: int
    batch_size: int = 64
    seed: int = 0
    dga: DGA | None = None
    init_weights: Any = None
    domain_names: tuple[str, ...] | None = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}.")
        arrays = [_as_arrays(d) for d in self.domains]
        if not arrays:
            raise ValueError("MixingProblem needs at least one domain.")
        shape = self.target.input_shape
        for i, (x, y) in enumerate(arrays):
            if x.shape[1:] != shape:
                raise ValueError(f"domain {i} has inputs of shape {x.shape[1:]} but the target's are {shape}.")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"domain {i} has {x.shape[0]} inputs but {y.shape[0]} labels.")
            if x.shape[0] < self.batch_size:
                raise ValueError(
                    f"domain {i} has {x.shape[0]} examples, fewer than batch_size={self.batch_size}: "
                    "lower batch_size or give the domain more examples."
                )
            if self.dga is not None and x.shape[0] < self.dga.domain_batch_size:
                raise ValueError(
                    f"domain {i} has {x.shape[0]} examples, fewer than DGA.domain_batch_size="
                    f"{self.dga.domain_batch_size}: lower it."
                )
        k = len(arrays)
        if self.domain_names is not None and len(self.domain_names) != k:
            raise ValueError(f"domain_names has {len(self.domain_names)} names for {k} domains.")
        if self.init_weights is None:
            w0 = np.full((k,), 1.0 / k)
        else:
            w0 = check_simplex(self.init_weights, k, name="init_weights")
        sizes = [x.shape[0] for x, _ in arrays]
        object.__setattr__(self, "_sizes", tuple(sizes))
        object.__setattr__(self, "_offsets", tuple(int(o) for o in np.cumsum([0] + sizes[:-1])))
        object.__setattr__(self, "_w0", np.asarray(w0, self.param_dtype))
        object.__setattr__(self, "_classifier", Classifier(self.model))
        object.__setattr__(self, "_target", self.target.astype(self.param_dtype))
        target = {split: {"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.int32)}
                  for split, (x, y) in ((split, self._target.split(split)) for split in ("train", "val", "test"))}
        arrays = {"x": jax.device_put(np.concatenate([x for x, _ in arrays]).astype(self.param_dtype)),
                  "y": jax.device_put(np.concatenate([y for _, y in arrays]).astype(np.int32)),
                  "target": target["train"]}
        object.__setattr__(self, "_arrays", arrays)
        object.__setattr__(self, "_target_arrays", target)
        object.__setattr__(self, "step", jax.tree_util.Partial(self.step_on, arrays))
        object.__setattr__(self, "replay_step", jax.tree_util.Partial(self.replay_step_on, arrays))
        object.__setattr__(self, "objective", jax.tree_util.Partial(self.objective_on, target["val"]))

    # ----------------------------------------------------------------- sizes
    @property
    def num_domains(self) -> int:
        return len(self._sizes)

    @property
    def update_every(self) -> int:
        """``R``: steps per row of the weight trajectory (``T`` for a fixed mixture)."""
        return self.dga.update_every if self.dga is not None else self.num_steps

    @property
    def num_rows(self) -> int:
        """Rows of the weight trajectory: row ``r`` holds the weights of steps ``[rR, (r+1)R)``."""
        return math.ceil(self.num_steps / self.update_every)

    # ----------------------------------------------------------------- the model and losses
    def logits(self, params, x, *, train: bool = False, rng=None):
        return self._classifier.logits(params, {}, x, train=train, rng=rng)[0]

    def _mean_loss(self, params, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(self.logits(params, x), y))

    def loss_and_accuracy(self, params, split: str = "test"):
        """Mean loss and accuracy of ``params`` (or a state) on a split of the target domain (one compiled call)."""
        if split not in self._target_arrays:
            raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test'.")
        arrays = self._target_arrays[split]
        return _loss_and_accuracy(self, _params_of(params), arrays["x"], arrays["y"])

    # ----------------------------------------------------------------- the Problem contract
    def init_meta(self) -> dict:
        """A DGA run has no metaparameters: ``{}`` (its replayed form has the weight trajectory, see :meth:`replay`)."""
        return {}

    def project_meta(self, meta) -> dict:
        return meta

    def init_state(self, meta=None) -> dict:
        """``state_0`` of a DGA (or fixed-mixture) run.

        Keys: ``params``, ``opt_state``, ``weights`` (the current mixture),
        ``trajectory`` (``num_rows x k``; rows not reached yet hold the initial
        weights) and ``alignment`` (``num_rows x k``, the scores behind each row; row 0 is zero).
        """
        cached = self.__dict__.get("_state0")
        if cached is not None:
            return cached
        key = stream_key(self.seed, "init")
        params = init_params(self.model, key, jnp.asarray(self._target.x_train[:1]), self.param_dtype)
        w0 = jnp.asarray(self._w0)
        state0 = {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "weights": w0,
            "trajectory": jnp.tile(w0, (self.num_rows, 1)),
            "alignment": jnp.zeros((self.num_rows, self.num_domains), self.param_dtype),
        }
        object.__setattr__(self, "_state0", state0)
        return state0

    def replay_init_state(self) -> dict:
        """``state_0`` of a replayed run: parameters and optimizer state only (the weights are the metaparameter)."""
        s = self.init_state()
        return {"params": s["params"], "opt_state": s["opt_state"]}

    # ----------------------------------------------------------------- batches
    def _domain_indices(self, key, t, batch_size):
        """``(k, batch_size)`` global indices: the deterministic batch of position ``t`` of every domain."""
        return jnp.stack([
            off + batch_indices(jax.random.fold_in(key, i), t, n, batch_size)
            for i, (off, n) in enumerate(zip(self._offsets, self._sizes))
        ])

    def batch_on(self, arrays, weights, t):
        """``(x, y, domain)`` of the batch of step ``t`` under mixture ``weights``, drawn from ``arrays``.

        Each domain's candidates are its own deterministic batch of step ``t``;
        slot ``j`` takes the candidate at position ``j`` of the domain drawn for
        it by :func:`sample_domains` (key ``stream_key(seed, "domain_sampling", t)``).
        """
        candidates = self._domain_indices(stream_key(self.seed, "batch"), t, self.batch_size)
        domain = sample_domains(weights, stream_key(self.seed, "domain_sampling", t), self.batch_size)
        idx = candidates[domain, jnp.arange(self.batch_size)]
        return arrays["x"][idx], arrays["y"][idx], domain

    def training_batch(self, weights, t):
        """``(x, y, domain)`` of the batch of step ``t`` under mixture ``weights``."""
        return self.batch_on(self._arrays, weights, t)

    def _train_update(self, arrays, params, opt_state, weights, t):
        x, y, domain = self.batch_on(arrays, weights, t)
        rng = stream_key(self.seed, "dropout", t)
        # value 1 per slot; d/d w_i is (slots of domain i) / w_i, an unbiased estimate of the
        # derivative of the mixture loss sum_i w_i L_i, so REPLAY can differentiate a replayed run.
        w_slot = weights[domain]
        safe = jnp.where(w_slot > 0, lax.stop_gradient(w_slot), 1.0)
        factor = w_slot / safe

        def loss_fn(p):
            losses = optax.softmax_cross_entropy_with_integer_labels(self.logits(p, x, train=True, rng=rng), y)
            return jnp.mean(factor * losses)

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # ----------------------------------------------------------------- DGA
    def gradients_on(self, arrays, params, r):
        """``(domain_grads, target_grad)`` for update ``r``: all ``k`` domain gradients in one ``vmap``.

        Domain ``i`` contributes its deterministic batch ``r`` of ``domain_batch_size``
        examples; the target gradient uses the whole target train set or its batch ``r``.
        """
        dga = self.dga
        key = stream_key(self.seed, "alignment")
        idx = self._domain_indices(key, r, dga.domain_batch_size)
        xd, yd = arrays["x"][idx], arrays["y"][idx]
        grad_fn = jax.grad(self._mean_loss)
        domain_grads = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, xd, yd)
        xt, yt = arrays["target"]["x"], arrays["target"]["y"]
        n_target = xt.shape[0]
        if dga.target_batch_size is not None and dga.target_batch_size < n_target:
            ti = batch_indices(jax.random.fold_in(key, -1), r, n_target, dga.target_batch_size)
            xt, yt = xt[ti], yt[ti]
        return domain_grads, grad_fn(params, xt, yt)

    def gradients(self, params, r):
        """:meth:`gradients_on` the problem's own data."""
        return self.gradients_on(self._arrays, params, r)

    def dga_state_update(self, arrays, state, t):
        """The DGA update at step ``t = rR``: alignment of the current parameters, EG step, EMA, record row ``r``."""
        dga = self.dga
        r = t // dga.update_every
        domain_grads, target_grad = self.gradients_on(arrays, state["params"], r)
        scores = alignment_scores(domain_grads, target_grad, dga.alignment).astype(state["weights"].dtype)
        weights = dga_update(state["weights"], scores, dga.step_size, dga.ema)
        return {
            **state,
            "weights": weights,
            "trajectory": state["trajectory"].at[r].set(weights),
            "alignment": state["alignment"].at[r].set(scores),
        }

    # ----------------------------------------------------------------- steps
    def step_on(self, arrays, state, meta, t):
        """One step of the run on ``arrays`` (pure; ``meta`` is unused; ``problem.step`` binds the arrays).

        A DGA update when ``t`` is a positive multiple of ``R``, then a training step on the mixture.
        """
        t = jnp.asarray(t, jnp.int32)
        if self.dga is not None:
            due = (t > 0) & (t % self.dga.update_every == 0)
            state = lax.cond(due, lambda s, tt: self.dga_state_update(arrays, s, tt), lambda s, _: s, state, t)
        params, opt_state = self._train_update(arrays, state["params"], state["opt_state"], state["weights"], t)
        return {**state, "params": params, "opt_state": opt_state}

    def replay_step_on(self, arrays, state, meta, t):
        """One training step with the recorded weights ``meta["domain_weights"][t // R]`` (REPLAY's ``step``).

        Given the trajectory a DGA run recorded, a replayed run reproduces it
        step for step, and REPLAY differentiates it with respect to the trajectory.
        """
        t = jnp.asarray(t, jnp.int32)
        weights = meta["domain_weights"][t // self.update_every]
        params, opt_state = self._train_update(arrays, state["params"], state["opt_state"], weights, t)
        return {"params": params, "opt_state": opt_state}

    def objective_on(self, split_arrays, state, meta):
        """Mean loss on the target's val split of the final parameters."""
        return loss_and_accuracy(self.logits(state["params"], split_arrays["x"]), split_arrays["y"])[0]

    # ----------------------------------------------------------------- conveniences
    def train(self, meta=None, num_steps: int | None = None) -> dict:
        """The state after ``num_steps`` (default ``T``) steps: one compiled call."""
        if isinstance(meta, int) and not isinstance(meta, bool):
            warnings.warn("MixingProblem.train(num_steps) is deprecated: call train(meta, num_steps) "
                          "(meta is {} for a DGA run), as for every Problem.", DeprecationWarning, stacklevel=2)
            meta, num_steps = None, meta
        return replay.advance(self.step, self.init_state(), {} if meta is None else meta, 0,
                              num_steps or self.num_steps)

    def check_trajectory(self, trajectory):
        """Raise ``ValueError`` unless ``trajectory`` has ``num_rows x k`` rows, each on the simplex."""
        traj = np.asarray(trajectory)
        if traj.shape != (self.num_rows, self.num_domains):
            raise ValueError(
                f"the weight trajectory has shape {traj.shape} but this run needs {(self.num_rows, self.num_domains)} "
                f"(one row per {self.update_every} steps, one column per domain): use state['trajectory'] of a run."
            )
        for r, row in enumerate(traj):
            check_simplex(row, self.num_domains, atol=1e-4, name=f"row {r} of the weight trajectory")

    def replay(self, trajectory) -> dict:
        """The final state of a run replayed from a recorded weight trajectory."""
        self.check_trajectory(trajectory)
        meta = {"domain_weights": jnp.asarray(trajectory, self.param_dtype)}
        return replay.advance(self.replay_step, self.replay_init_state(), meta, 0, self.num_steps)

    def value_and_metagrad(self, trajectory, **kwargs):
        """``(target val loss, d loss / d trajectory)`` of the run replayed from ``trajectory``, by REPLAY."""
        self.check_trajectory(trajectory)
        meta = {"domain_weights": jnp.asarray(trajectory, self.param_dtype)}
        value, grad = replay.value_and_metagrad(
            self.replay_step, self.objective, self.replay_init_state(), meta, self.num_steps, **kwargs)
        return value, grad["domain_weights"]

    def evaluate(self, state) -> dict:
        """Target loss and accuracy of ``state["params"]`` on every split."""
        out = {}
        for split in ("train", "val", "test"):
            loss, acc = self.loss_and_accuracy(state["params"], split)
            out[f"{split}_loss"], out[f"{split}_accuracy"] = float(loss), float(acc)
        return out


def _params_of(state):
    return state["params"] if isinstance(state, dict) and "params" in state and "opt_state" in state else state


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_accuracy(problem, params, x, y):
    return loss_and_accuracy(problem.logits(params, x), y)


# ------------------------------------------------------------------ a baseline
def importance_sampling_weights(domains, target_x, *, hidden: int = 64, num_steps: int = 500, batch_size: int = 64,
                                learning_rate: float = 3e-3, seed: int = 0):
    """Static domain weights by importance sampling with a domain classifier.

    A small MLP is trained to tell the ``k`` domains apart from their inputs
    (class-balanced batches, so domain sizes do not act as a prior); the weight
    of domain ``i`` is the mean of its predicted probability ``p(i | x)`` over
    the target inputs, i.e. the share of the target set the classifier
    attributes to it (the importance-sampling baseline of Fan et al. 2024 with a
    classifier in place of embedding clusters). Inputs only: labels are ignored.
    """
    from ..models import MLP

    xs = [np.asarray(_as_arrays(d)[0], np.float32).reshape(len(_as_arrays(d)[0]), -1) for d in domains]
    k = len(xs)
    model = MLP(hidden=(hidden,), num_classes=k)
    x_all = jnp.asarray(np.concatenate(xs))
    offsets = np.cumsum([0] + [len(x) for x in xs[:-1]])
    key = jax.random.key(seed)
    params = model.init(jax.random.fold_in(key, 0), x_all[:1])["params"]
    opt = optax.adam(learning_rate)
    per = max(1, batch_size // k)
    labels = jnp.repeat(jnp.arange(k), per)

    def step(carry, t):
        params, opt_state = carry
        idx = jnp.concatenate([off + batch_indices(jax.random.fold_in(key, i + 1), t, len(x), per)
                               for i, (off, x) in enumerate(zip(offsets, xs))])

        def loss_fn(p):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x_all[idx]), labels))

        updates, opt_state = opt.update(jax.grad(loss_fn)(params), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.jit(lambda c: lax.scan(step, c, jnp.arange(num_steps)))((params, opt.init(params)))
    tx = jnp.asarray(np.asarray(target_x, np.float32).reshape(len(target_x), -1))
    probs = jax.nn.softmax(model.apply({"params": params}, tx), axis=-1)
    w = np.asarray(jnp.mean(probs, axis=0), np.float64)
    return w / w.sum()
