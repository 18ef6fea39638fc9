"""HyperFlow: few-shot adaptation with forward passes only.

Kim, Kim & Hong, "HyperFlow: Gradient-Free Emulation of Few-Shot Fine-Tuning"
(arXiv 2504.15323). Fine-tuning by gradient descent is the Euler
discretization of the gradient flow ``d theta / dt = -grad L_S(theta)`` on the
support set ``S``. HyperFlow learns a drift network ``h_phi(theta, t | S)``
that predicts the velocity of that flow, by regression on interpolated
fine-tuning trajectories simulated on meta-training tasks (Sec. 3), and at
adaptation time integrates it with a few Euler steps: forward passes of the
target model and of ``h_phi`` only, no backpropagation (Sec. 3.3).

Here the adapted parameters are the classifier head ``{"kernel": (d, K),
"bias": (K,)}`` on the L2-normalized penultimate features of a frozen MLP
backbone pretrained on the meta-training classes; the head starts at the
prototype classifier (``kernel = 2 s mu_c``, ``bias = -s |mu_c|^2``), so that
"no adaptation" is the prototype classifier and every method starts there.

Time is rescaled so that ``t in [0, 1]`` covers the whole simulated
fine-tuning run of ``T`` steps at learning rate ``eta``: the target velocity
of the flow is ``-T eta grad L_S``, and ``adapt(..., num_steps=n)`` takes
``n`` Euler steps of size ``1 / n`` by default.

The drift network (a design choice of this module; the paper's Sec. 3.2
conditions a hypernetwork on a set encoding of ``S``) is a permutation
equivariant set network over support examples and classes: from the forward
pass of the head on the support features it forms per-(example, class)
tokens (log-probability, probability, label, confidence in the true class, t)
and per-class tokens, maps them by small MLPs to coefficients, and returns
``v_kernel[:, c] = mean_i a_ic f_i + alpha_c kernel_c + beta_c mu_c`` and
``v_bias[c] = mean_i e_ic + gamma_c``. The gradient of the cross-entropy lies
in this family, so the architecture can represent the flow exactly; what it
learns is the velocity of the *interpolated* trajectories (straight for the
linear interpolation), which is what lets few Euler steps reach the end of a
long fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ..data import Dataset
from ..models import MLP
from ..progress import progress_bar
from ..training import TrainingProblem

INTERPOLATIONS = ("linear", "piecewise", "cubic")

# ----------------------------------------------------------------------------- integration


def euler(drift_fn, y0, num_steps: int, step_size, t0=0.0):
    """Explicit Euler for ``dy/dt = drift_fn(y, t)`` over pytrees: ``y_{n+1} = y_n + h drift_fn(y_n, t0 + n h)``.

    ``num_steps`` is static (a Python int); ``step_size`` and ``t0`` may be traced.
    This is the only integrator HyperFlow uses at adaptation time (Sec. 3.3).
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative Python int, got {num_steps!r}.")

    def body(n, y):
        t = t0 + n * step_size
        v = drift_fn(y, t)
        return jax.tree.map(lambda a, b: a + jnp.asarray(step_size, a.dtype) * b.astype(a.dtype), y, v)

    return lax.fori_loop(0, num_steps, body, y0)


# ----------------------------------------------------------------------------- target model


def feature_model(hidden) -> MLP:
    """The backbone up to the penultimate layer: an :class:`~metagrad.models.MLP` ending at the last hidden layer."""
    hidden = tuple(hidden)
    if len(hidden) < 1:
        raise ValueError("the backbone needs at least one hidden layer: hidden=(128, 64), say.")
    return MLP(hidden=hidden[:-1], num_classes=hidden[-1])


def features(backbone, x, hidden):
    """L2-normalized penultimate features ``f(x)`` of the frozen backbone (forward pass only)."""
    f = jax.nn.relu(feature_model(hidden).apply({"params": backbone}, x))
    return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)


def prototype_head(feats, y_onehot, scale):
    """The prototype classifier as a linear head: ``logits_c = -s |f - mu_c|^2 + s |f|^2``."""
    counts = jnp.maximum(y_onehot.sum(0), 1.0)
    mu = (y_onehot.T @ feats) / counts[:, None]  # (K, d)
    return {"kernel": 2.0 * scale * mu.T, "bias": -scale * jnp.sum(mu * mu, -1)}


def head_logits(head, feats):
    return feats @ head["kernel"] + head["bias"]


def head_loss(head, feats, y_onehot):
    """Mean cross-entropy of the head on (features, one-hot labels): ``L_S``."""
    return jnp.mean(optax.softmax_cross_entropy(head_logits(head, feats), y_onehot))


def accuracy(head, feats, y):
    return jnp.mean(jnp.argmax(head_logits(head, feats), -1) == y)


# ----------------------------------------------------------------------------- drift network


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """Static settings of the drift network ``h_phi``.

    Attributes:
      ways: classes per task ``K``.
      hidden: width of the token MLPs.
      scale: temperature ``s`` of the prototype head (and of its normalization in the class tokens).
      velocity_scale: output units, set by :func:`meta_train` to the emulated run's total time ``T eta``
        (steps times learning rate), so that the gradient flow itself has coefficients of order one.
      examples_per_chunk: how many support examples' (example, class) tokens the pair MLP evaluates at a
        time (``lax.map`` over chunks), or None for all ``N x K`` at once. The drift is the same function
        either way (equal to float rounding); chunks bound its scratch memory by one chunk's hidden
        activations instead of ``N x K x hidden``, at some time per evaluation. Meta-training keeps None
        (it differentiates the drift, and a loop is slower to differentiate); the adaptation entry points
        (:meth:`HyperFlow.adapt`, :func:`metagrad.hyperflow.bias.adapt`) set it from their own
        ``examples_per_chunk`` argument, :data:`ADAPT_EXAMPLES_PER_CHUNK` (5) by default. Measured on a
        2-core CPU (5-way 5-shot, pair MLP width 64, 8 Euler steps on a 40-128-64 MLP's features): the
        adaptation's allocation is 72.8 KiB with None, 29.0 KiB with 5 and 21.6 KiB with 1, its time 0.42,
        0.53 and 0.82 ms.
    """

    ways: int = 5
    hidden: int = 32
    scale: float = 10.0
    velocity_scale: float = 1.0
    examples_per_chunk: int | None = None

    def __post_init__(self):
        if self.examples_per_chunk is not None and (not isinstance(self.examples_per_chunk, int)
                                                    or self.examples_per_chunk < 1):
            raise ValueError(f"examples_per_chunk must be a positive int or None, got {self.examples_per_chunk!r}.")


_PAIR_IN, _CLASS_IN = 10, 6

ADAPT_EXAMPLES_PER_CHUNK = 5  # the adaptation entry points' default DriftConfig.examples_per_chunk


def mlp_init(key, sizes):
    """Parameters of a small tanh MLP with layer widths ``sizes`` (the drift's building block)."""
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        w = jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m)
        if i == len(sizes) - 2:
            w = w * 0.1
        layers.append({"w": w, "b": jnp.zeros((n,))})
    return layers


def mlp_apply(layers, x):
    """The MLP of :func:`mlp_init` on ``x`` (tanh between layers, linear output)."""
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = jnp.tanh(x)
    return x


def init_drift(key, config: DriftConfig):
    """Parameters ``phi`` of the drift network (two token MLPs)."""
    return {"pair": mlp_init(jax.random.fold_in(key, 0), (_PAIR_IN, config.hidden, config.hidden, 2)),
            "cls": mlp_init(jax.random.fold_in(key, 1), (_CLASS_IN, config.hidden, 3))}


def _pair_coefficients(pair_mlp, pair, examples_per_chunk):
    """The pair MLP on the (N, K, features) tokens: all at once, or ``examples_per_chunk`` examples at a time."""
    if examples_per_chunk is None or examples_per_chunk >= pair.shape[0]:
        return mlp_apply(pair_mlp, pair)
    return lax.map(functools.partial(mlp_apply, pair_mlp), pair,
                   batch_size=None if examples_per_chunk == 1 else examples_per_chunk)


def with_examples_per_chunk(config: DriftConfig, examples_per_chunk) -> DriftConfig:
    """``config`` evaluated ``examples_per_chunk`` support examples at a time (see :class:`DriftConfig`)."""
    return dataclasses.replace(config, examples_per_chunk=examples_per_chunk)


def drift(phi, head, t, feats, y_onehot, config: DriftConfig):
    """``h_phi(theta, t | S)``: the predicted velocity of the head (same pytree as ``head``).

    ``feats`` (N, d) are the support features and ``y_onehot`` (N, K) their
    labels. Uses one forward pass of the head on the support set and the token
    MLPs; no derivative of anything is taken.
    """
    n, k = y_onehot.shape
    logits = head_logits(head, feats)
    logp = jax.nn.log_softmax(logits, -1)
    p = jnp.exp(logp)
    p_true = jnp.sum(p * y_onehot, -1, keepdims=True)
    tt = jnp.broadcast_to(jnp.asarray(t, feats.dtype), (n, k))
    counts = jnp.maximum(y_onehot.sum(0), 1.0)
    mu = (y_onehot.T @ feats) / counts[:, None]  # (K, d)
    own = jnp.sum(p * y_onehot, 0) / counts  # mean confidence of class c's examples in c
    other = jnp.sum(p * (1 - y_onehot), 0) / jnp.maximum(n - counts, 1.0)  # mean confidence of others in c
    margin = jnp.sum(logp * y_onehot, -1) - jnp.max(jnp.where(y_onehot > 0, -jnp.inf, logp), -1)
    bc = lambda a: jnp.broadcast_to(a, (n, k))  # noqa: E731
    pair = jnp.stack([jnp.maximum(logp, -20.0) / 5.0, p, y_onehot, bc(p_true), tt, jnp.sin(jnp.pi * tt),
                      (p - y_onehot) * (1.0 - tt), bc(own[None]), bc(other[None]),
                      bc(jnp.clip(margin, -20.0, 20.0)[:, None] / 5.0)], -1)
    coef = _pair_coefficients(phi["pair"], pair, config.examples_per_chunk)  # (N, K, 2)
    kernel = head["kernel"]
    cls_in = jnp.stack([own, other, jnp.linalg.norm(kernel, axis=0) / (2 * config.scale),
                        head["bias"] / config.scale, jnp.full((k,), t, feats.dtype),
                        jnp.sin(jnp.pi * t) * jnp.ones(k)], -1)
    ccoef = mlp_apply(phi["cls"], cls_in)  # (K, 3)
    v_kernel = feats.T @ coef[..., 0] / n + ccoef[:, 0] * kernel / config.scale + ccoef[:, 1] * mu.T
    v_bias = jnp.mean(coef[..., 1], 0) + ccoef[:, 2]
    vs = config.velocity_scale
    return {"kernel": vs * v_kernel, "bias": vs * v_bias}


def check_rollout_steps(num_knots: int, num_euler: int) -> int:
    """Knot intervals per Euler step of a rollout; raises unless ``num_euler`` divides ``num_knots``."""
    if not isinstance(num_euler, int) or num_euler < 1 or num_knots % num_euler:
        raise ValueError(f"num_euler={num_euler} must divide the trajectories' {num_knots} knot intervals: "
                         f"simulate with num_knots a multiple of it.")
    return num_knots // num_euler


def rollout_divergence(drift_fn, log_probs_fn, parameter_error, path, num_euler: int, parameter_weight: float):
    """How far ``num_euler`` Euler steps of a drift stray from one simulated GD run (the rollout refinement's loss).

    From the run's first knot, Euler steps of size ``1 / num_euler`` with
    ``drift_fn(theta, t)``; after step ``k`` the emulated model is compared with
    the GD run's knot at the same time ``k / num_euler``: the KL divergence of
    ``log_probs_fn(theta)`` (class log-probabilities on held-out inputs of the
    task) from GD's, plus ``parameter_weight * parameter_error(theta, knot)``.
    Averaged over the steps. ``path`` leaves have a leading knot axis.
    """
    every = check_rollout_steps(jax.tree.leaves(path)[0].shape[0] - 1, num_euler)
    theta = jax.tree.map(lambda a: a[0], path)
    total = 0.0
    for k in range(num_euler):
        v = drift_fn(theta, k / num_euler)
        theta = jax.tree.map(lambda a, b: a + b / num_euler, theta, v)
        target = jax.tree.map(lambda a: a[(k + 1) * every], path)
        log_p_gd, log_p = log_probs_fn(target), log_probs_fn(theta)
        kl = jnp.mean(jnp.sum(jnp.exp(log_p_gd) * (log_p_gd - log_p), -1))
        total = total + kl + parameter_weight * parameter_error(theta, target)
    return total / num_euler


# ----------------------------------------------------------------------------- adaptation


@functools.partial(jax.jit, static_argnames=("hidden", "config", "num_steps"))
def adapt_head(phi, backbone, head0, support_x, support_y, step_size, *, hidden, config, num_steps):
    """The head after ``num_steps`` Euler steps of the drift on a support set (compiled; no autodiff).

    ``head0=None`` starts from the prototype head of the support features.
    """
    feats = features(backbone, support_x, hidden)
    y1h = jax.nn.one_hot(support_y, config.ways, dtype=feats.dtype)
    if head0 is None:
        head0 = prototype_head(feats, y1h, config.scale)
    return euler(lambda h, t: drift(phi, h, t, feats, y1h, config), head0, num_steps, step_size)


@dataclasses.dataclass(frozen=True, eq=False)
class HyperFlow:
    """A meta-trained drift network with the backbone it adapts.

    Attributes:
      phi: drift network parameters (from :func:`meta_train`).
      config: the drift's :class:`DriftConfig`.
      hidden: the backbone's hidden widths (its last entry is the feature size ``d``).
    """

    phi: dict
    config: DriftConfig
    hidden: tuple

    def adapt(self, params, support_set, num_steps: int = 4, step_size=None, *,
              examples_per_chunk: int | None = ADAPT_EXAMPLES_PER_CHUNK):
        """Adapt the head to ``support_set = (x, y)`` by ``num_steps`` Euler steps of ``h_phi`` (forward passes only).

        ``params`` is ``{"backbone": ..., "head": ...}`` (``"head"`` optional:
        without it the head starts at the prototype classifier of the support
        set). ``step_size`` defaults to ``1 / num_steps`` (the whole emulated
        fine-tuning run). ``examples_per_chunk``: the drift's pair tokens are
        evaluated this many support examples at a time (None: all at once; the
        same function, more scratch memory; :class:`DriftConfig`). Returns
        ``params`` with the adapted head.
        """
        if "backbone" not in params:
            raise ValueError("params must be a dict with a 'backbone' entry (and optionally 'head').")
        x, y = support_set
        check_support_set(x, y, ways=self.config.ways, features=np.shape(params["backbone"]["Dense_0"]["kernel"])[0])
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
        if step_size is None:
            step_size = 1.0 / num_steps if num_steps else 0.0
        head = adapt_head(self.phi, params["backbone"], params.get("head"), jnp.asarray(x), jnp.asarray(y),
                      jnp.asarray(step_size, jnp.float32), hidden=tuple(self.hidden),
                      config=with_examples_per_chunk(self.config, examples_per_chunk),
                      num_steps=int(num_steps))
        return {**params, "head": head}


def check_support_set(x, y, *, ways: int, features: int | None) -> None:
    """Raise ``ValueError`` saying what to change when ``(x, y)`` is not a ``ways``-way support set for the backbone.

    ``x`` must be ``(N, features)`` (any length where ``features`` is None: a
    convolutional backbone) and ``y`` hold ``N`` integer labels. The
    shape checks also run on tracers (under ``jax.vmap``/``jax.jit``); the
    label range and finiteness checks only on concrete arrays.
    """
    if np.ndim(x) != 2 or (features is not None and np.shape(x)[1] != features):
        want = "length" if features is None else features
        raise ValueError(f"support_set: x must be (N, {want}) for this backbone, got shape {np.shape(x)}.")
    if np.ndim(y) != 1 or np.shape(y)[0] != np.shape(x)[0]:
        raise ValueError(f"support_set: y must hold one integer label per input ({np.shape(x)[0]}), got shape "
                         f"{np.shape(y)}.")
    if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        return
    labels = np.asarray(y)
    if labels.size and (labels.min() < 0 or labels.max() >= ways):
        raise ValueError(f"support_set: y holds labels {sorted(set(labels.tolist()))}; a {ways}-way drift needs "
                         f"labels in 0..{ways - 1} (relabel the task's classes).")
    if not np.all(np.isfinite(np.asarray(x))):
        raise ValueError("support_set: x has NaN or inf entries; adaptation would return non-finite parameters.")


# ----------------------------------------------------------------------------- tasks


def class_subset(x, y, classes):
    """Examples of ``classes`` with their original labels."""
    keep = np.isin(y, classes)
    return x[keep], y[keep]


TRANSFORMS = {
    "identity": lambda x: x,
    "reverse": lambda x: x[..., ::-1],
    "negate": lambda x: -x,
    "reverse_negate": lambda x: -x[..., ::-1],
}


def sample_tasks(x, y, classes, num_tasks, *, ways=5, shots=5, queries=15, seed=0, transforms=("identity",)):
    """``num_tasks`` few-shot episodes as stacked arrays (host-side numpy).

    Each episode picks ``ways`` of ``classes``, relabels them by a random
    permutation to ``0..ways-1``, draws ``shots`` support and ``queries``
    query examples per class (without overlap), and applies one transformation
    of ``transforms`` (names in :data:`TRANSFORMS`) to all its inputs.
    Returns ``dict(support_x, support_y, query_x, query_y)``.
    """
    classes = list(classes)
    if len(classes) < ways:
        raise ValueError(f"{len(classes)} classes cannot make {ways}-way tasks: lower ways or add classes.")
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; known: {sorted(TRANSFORMS)}.")
    by_class = {c: np.flatnonzero(y == c) for c in classes}
    short = {c: len(i) for c, i in by_class.items() if len(i) < shots + queries}
    if short:
        raise ValueError(f"classes {short} have fewer than shots + queries = {shots + queries} examples.")
    rng = np.random.default_rng(seed)
    sx, sy, qx, qy = [], [], [], []
    for _ in range(num_tasks):
        chosen = rng.choice(classes, ways, replace=False)
        tf = TRANSFORMS[transforms[rng.integers(len(transforms))]]
        s_idx, q_idx, s_lab, q_lab = [], [], [], []
        for label, c in enumerate(chosen):
            idx = rng.choice(by_class[c], shots + queries, replace=False)
            s_idx.append(idx[:shots]), q_idx.append(idx[shots:])
            s_lab += [label] * shots
            q_lab += [label] * queries
        sx.append(tf(x[np.concatenate(s_idx)])), qx.append(tf(x[np.concatenate(q_idx)]))
        sy.append(s_lab), qy.append(q_lab)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return {"support_x": f32(sx), "support_y": i32(sy), "query_x": f32(qx), "query_y": i32(qy)}


# ----------------------------------------------------------------------------- backbone


def pretrain_backbone(data: Dataset, classes, *, hidden=(128, 64), num_steps=3000, learning_rate=1e-3,
                      batch_size=128, seed=0, model=None):
    """Pretrain a backbone (an MLP by default) on the meta-training ``classes`` of ``data`` with metagrad's loop.

    Returns ``(backbone_params, info)`` where the backbone is the feature part
    (the classifier layer, the last ``Dense``, is dropped) and ``info`` holds
    the test accuracy on those classes and the wall time. ``model`` replaces
    the MLP of widths ``hidden`` (e.g. a
    :class:`metagrad.hyperflow.bias.ConvBackbone` with ``num_classes=len(classes)``).
    """
    classes = list(classes)
    remap = np.full(data.num_classes, -1, np.int32)
    remap[classes] = np.arange(len(classes))
    parts = []
    for split in ("train", "val", "test"):
        xs, ys = class_subset(*data.split(split), classes)
        parts += [xs, remap[ys]]
    subset = Dataset(*parts, num_classes=len(classes), name=f"{data.name}[{classes}]")
    model = MLP(hidden=tuple(hidden), num_classes=len(classes)) if model is None else model
    problem = TrainingProblem(model, optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate), subset,
                              num_steps=num_steps, batch_size=min(batch_size, subset.num_train), seed=seed,
                              lr_schedule=None)
    tic = time.perf_counter()
    params = problem.train({})["params"]
    _, acc = problem.loss_and_accuracy(params, "test")
    acc = float(acc)
    seconds = time.perf_counter() - tic
    classifier = max((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    backbone = {k: v for k, v in params.items() if k != classifier}
    return backbone, {"test_accuracy": acc, "seconds": seconds, "num_steps": num_steps}


# ----------------------------------------------------------------------------- fine-tuning baselines


def finetune_step(state, meta, t):
    """One gradient-descent step on the head (metagrad's ``step(state, meta, t)`` contract).

    ``state = {"head"}``, ``meta = {"feats", "y_onehot", "lr"}``.
    """
    g = jax.grad(head_loss)(state["head"], meta["feats"], meta["y_onehot"])
    return {"head": jax.tree.map(lambda p, d: p - meta["lr"] * d, state["head"], g)}


def finetune_head(backbone, support_x, support_y, *, lr, num_steps, hidden, ways, scale, head0=None):
    """Baseline: gradient descent on the head (the same parameter subset HyperFlow adapts); uses ``jax.grad``."""
    feats = features(backbone, support_x, hidden)
    y1h = jax.nn.one_hot(support_y, ways, dtype=feats.dtype)
    head = prototype_head(feats, y1h, scale) if head0 is None else head0
    meta = {"feats": feats, "y_onehot": y1h, "lr": lr}
    return lax.fori_loop(0, num_steps, lambda t, s: finetune_step(s, meta, t), {"head": head})["head"]


def finetune_full(backbone, support_x, support_y, *, lr, num_steps, ways, scale, hidden=None, features_fn=None):
    """Baseline: gradient descent on every parameter (backbone and head) from the prototype head.

    The features are the MLP's of :func:`features` with widths ``hidden``, or
    ``features_fn(backbone, x)`` for another kind of backbone (e.g.
    :func:`metagrad.hyperflow.bias.backbone_features` for a 1-D CNN).
    """
    if features_fn is None:
        if hidden is None:
            raise ValueError("finetune_full needs the MLP's hidden widths (hidden=) or, for another backbone, its "
                             "features function (features_fn=).")
        features_fn = lambda b, x: features(b, x, hidden)  # noqa: E731
    y1h = jax.nn.one_hot(support_y, ways)
    head = prototype_head(features_fn(backbone, support_x), y1h, scale)

    def loss(p):
        return head_loss(p["head"], features_fn(p["backbone"], support_x), y1h)

    def body(_, p):
        g = jax.grad(loss)(p)
        return jax.tree.map(lambda a, d: a - lr * d, p, g)

    return lax.fori_loop(0, num_steps, body, {"backbone": backbone, "head": head})


# ----------------------------------------------------------------------------- trajectories and meta-training


@functools.partial(jax.jit, static_argnames=("num_steps", "num_knots", "num_starts", "hidden", "ways", "scale"))
def simulate_trajectories(backbone, support_x, support_y, key, lr, *, num_steps, num_knots, num_starts, hidden,
                          ways, scale):
    """Fine-tuning trajectories of the head on a batch of tasks from several starting points (vmapped, one program).

    Start 0 is the prototype head; the others rescale it by ``U(0.5, 1.5)`` and
    add Gaussian noise. Each run is ``num_steps`` steps of :func:`finetune_step`
    at ``lr``; ``num_knots + 1`` evenly spaced parameters are kept. Returns
    ``dict(feats (B, N, d), y_onehot (B, N, K), knots, time_scale)`` with knot
    leaves shaped ``(B, num_starts, num_knots + 1, ...)`` and ``time_scale = T lr``.
    """
    if num_steps % num_knots:
        raise ValueError(f"num_steps={num_steps} must be a multiple of num_knots={num_knots}.")
    every = num_steps // num_knots

    def one_task(sx, sy, k):
        feats = features(backbone, sx, hidden)
        y1h = jax.nn.one_hot(sy, ways, dtype=feats.dtype)
        proto = prototype_head(feats, y1h, scale)
        meta = {"feats": feats, "y_onehot": y1h, "lr": lr}

        def start(r):
            kr = jax.random.fold_in(k, r)
            u = jax.random.uniform(jax.random.fold_in(kr, 0), (), minval=0.5, maxval=1.5)
            noise = jax.tree.map(lambda a: jax.random.normal(jax.random.fold_in(kr, a.ndim), a.shape) * scale * 0.1,
                                 proto)
            perturbed = jax.tree.map(lambda a, e: u * a + e, proto, noise)
            return jax.tree.map(lambda a, b: jnp.where(r == 0, a, b), proto, perturbed)

        def run(h0):
            return run_knots(finetune_step, meta, {"head": h0}, "head", num_knots, every)

        knots = jax.vmap(lambda r: run(start(r)))(jnp.arange(num_starts))
        return feats, y1h, knots

    keys = jax.random.split(key, support_x.shape[0])
    feats, y1h, knots = jax.vmap(one_task)(support_x, support_y, keys)
    return {"feats": feats, "y_onehot": y1h, "knots": knots, "time_scale": lr * num_steps}


def interpolate(knots, s, kind: str):
    """Point and velocity at ``s in [0, 1]`` of a trajectory given by ``M + 1`` evenly spaced knots.

    ``kind``: ``"linear"`` (the straight path from the first to the last knot),
    ``"piecewise"`` (piecewise linear through all knots) or ``"cubic"``
    (Catmull-Rom cubic Hermite through all knots). Knot leaves have a leading
    axis of length ``M + 1``; velocities are per unit of ``s``.
    """
    m = jax.tree.leaves(knots)[0].shape[0] - 1
    if kind == "linear":
        point = jax.tree.map(lambda a: a[0] + s * (a[-1] - a[0]), knots)
        return point, jax.tree.map(lambda a: a[-1] - a[0], knots)
    if kind not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {kind!r}; use one of {INTERPOLATIONS}.")
    pos = jnp.clip(s * m, 0.0, m - 1e-6)
    i = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, m - 1)
    u = pos - i
    take = lambda a, j: a[jnp.clip(j, 0, m)]  # noqa: E731
    if kind == "piecewise":
        point = jax.tree.map(lambda a: take(a, i) + u * (take(a, i + 1) - take(a, i)), knots)
        return point, jax.tree.map(lambda a: m * (take(a, i + 1) - take(a, i)), knots)

    def tangent(a, j):  # Catmull-Rom tangents, one-sided at the ends (per knot interval)
        lo, hi = jnp.maximum(j - 1, 0), jnp.minimum(j + 1, m)
        return (take(a, hi) - take(a, lo)) / (hi - lo).astype(a.dtype)

    h00, h10, h01, h11 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, -2 * u**3 + 3 * u**2, u**3 - u**2
    d00, d10, d01, d11 = 6 * u**2 - 6 * u, 3 * u**2 - 4 * u + 1, -6 * u**2 + 6 * u, 3 * u**2 - 2 * u

    def cubic(a, w00, w10, w01, w11):
        return w00 * take(a, i) + w10 * tangent(a, i) + w01 * take(a, i + 1) + w11 * tangent(a, i + 1)

    point = jax.tree.map(lambda a: cubic(a, h00, h10, h01, h11), knots)
    return point, jax.tree.map(lambda a: m * cubic(a, d00, d10, d01, d11), knots)


def _velocity_rms(knots):
    """RMS per-entry size of the straight-path velocity ``theta_T - theta_0``."""
    sq = sum(jnp.sum((a[:, :, -1] - a[:, :, 0]) ** 2) for a in jax.tree.leaves(knots))
    size = sum(a[:, :, 0].size for a in jax.tree.leaves(knots))
    return float(jnp.sqrt(sq / size))


def run_knots(step, meta, state0, name, num_knots, every):
    """``state0[name]`` and its value after each of ``num_knots`` segments of ``every`` steps, stacked on a new axis 0.

    Each segment runs ``step(state, meta, t)`` for ``t = 0 .. every-1`` in a ``lax.fori_loop``.
    """
    def segment(state, _):
        state = lax.fori_loop(0, every, lambda t, s: step(s, meta, t), state)
        return state, state[name]

    _, later = lax.scan(segment, state0, None, length=num_knots)
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), state0[name], later)


def interpolated_sample(knots, task, start, s, kind_index, kinds):
    """``(theta(s), d theta/ds)`` on trajectory ``(task, start)`` of ``knots`` under interpolation ``kinds[kind_index]``."""
    path = jax.tree.map(lambda a: a[task, start], knots)
    branches = [functools.partial(interpolate, kind=k) for k in kinds]
    return lax.switch(kind_index, [lambda pth, ss, b=b: b(pth, ss) for b in branches], path, s)


def regress_drift(sample_loss, phi, *, num_tasks, num_starts, num_kinds, batch_tasks, learning_rate, num_iters,
                  seed, chunk, progress, desc, checkpoint=None):
    """Adam (cosine-decayed LR) on ``sample_loss(phi, task, start, s, kind)`` averaged over random draws.

    Each iteration draws ``batch_tasks`` distinct tasks and, per task, a start,
    a time ``s ~ U[0, 1]`` and an interpolation kind; ``chunk`` iterations run
    in one compiled ``lax.scan``. Returns ``(phi, history)``: the mean loss of each chunk.

    ``checkpoint`` (e.g. :class:`metagrad.report.LoopProgress`) keeps the
    progress after each chunk, ``(chunks done, (phi, Adam state), history)``,
    and a run given the progress of a killed one continues from it; the draws
    depend on the iteration index only, so the result equals an uninterrupted run's.
    """
    batch_tasks = min(batch_tasks, num_tasks)
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_iters, 0.05))
    opt_state = opt.init(phi)

    def loss_fn(phi, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        tasks = jax.random.choice(k1, num_tasks, (batch_tasks,), replace=False)
        starts = jax.random.randint(k2, (batch_tasks,), 0, num_starts)
        s = jax.random.uniform(k3, (batch_tasks,))
        kind = jax.random.randint(k4, (batch_tasks,), 0, num_kinds)
        return jnp.mean(jax.vmap(sample_loss, (None, 0, 0, 0, 0))(phi, tasks, starts, s, kind))

    @jax.jit
    def run_chunk(phi, opt_state, start):
        def body(carry, i):
            phi, opt_state = carry
            loss, g = jax.value_and_grad(loss_fn)(phi, jax.random.fold_in(jax.random.key(seed + 1), i))
            updates, opt_state = opt.update(g, opt_state, phi)
            return (optax.apply_updates(phi, updates), opt_state), loss

        (phi, opt_state), losses = lax.scan(body, (phi, opt_state), start + jnp.arange(chunk))
        return phi, opt_state, losses

    done, history, num_chunks = 0, [], -(-num_iters // chunk)
    saved = None if checkpoint is None else checkpoint.load((phi, opt_state))
    if saved is not None:
        done, (phi, opt_state), history = saved
    for c in progress_bar(range(done, num_chunks), total=num_chunks, initial=done, desc=desc, disable=not progress):
        phi, opt_state, losses = run_chunk(phi, opt_state, c * chunk)
        history.append(float(jnp.mean(losses)))
        if checkpoint is not None:
            checkpoint.save(c + 1, (phi, opt_state), history, last=c + 1 == num_chunks)
    return phi, history


def meta_train(trajectories, config: DriftConfig, *, num_iters=2000, batch_tasks=32, learning_rate=3e-3,
               interpolations=INTERPOLATIONS, seed=0, chunk=100, progress=True):
    """Regress ``h_phi`` on the velocities of interpolated fine-tuning trajectories (Sec. 3.2).

    ``trajectories`` is the output of :func:`simulate_trajectories`. Each
    iteration draws ``batch_tasks`` tasks, a start, a time ``s ~ U[0, 1]`` and
    an interpolation kind per task; the loss (vmapped over tasks, jit-compiled,
    ``chunk`` iterations per compiled call) is the squared error between
    ``h_phi(theta(s), s | S)`` and the interpolated velocity, in units of the
    straight-path velocities' RMS. Returns ``(phi, config, history)`` with the
    config's ``velocity_scale`` set to the trajectories' ``time_scale``.
    """
    feats, y1h, knots = trajectories["feats"], trajectories["y_onehot"], trajectories["knots"]
    unknown = set(interpolations) - set(INTERPOLATIONS)
    if unknown or not interpolations:
        raise ValueError(f"interpolations must be a non-empty subset of {INTERPOLATIONS}, got {interpolations}.")
    config = dataclasses.replace(config, ways=int(y1h.shape[-1]), velocity_scale=float(trajectories["time_scale"]))
    rms = _velocity_rms(knots)
    num_tasks, num_starts = feats.shape[0], jax.tree.leaves(knots)[0].shape[1]
    kinds = tuple(interpolations)

    def sample_loss(phi, task, r, s, kind_index):
        point, target = interpolated_sample(knots, task, r, s, kind_index, kinds)
        pred = drift(phi, point, s, feats[task], y1h[task], config)
        err = sum(jnp.sum((p - q) ** 2) for p, q in zip(jax.tree.leaves(pred), jax.tree.leaves(target)))
        size = sum(q.size for q in jax.tree.leaves(target))
        return err / (size * rms**2)

    phi, history = regress_drift(sample_loss, init_drift(jax.random.key(seed), config), num_tasks=num_tasks,
                                 num_starts=num_starts, num_kinds=len(kinds), batch_tasks=batch_tasks,
                                 learning_rate=learning_rate, num_iters=num_iters, seed=seed, chunk=chunk,
                                 progress=progress, desc="meta-training h_phi")
    return phi, config, history
