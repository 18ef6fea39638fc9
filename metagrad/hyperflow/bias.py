"""HyperFlow with the paper's parameter-efficient subset: every bias of the backbone plus the classifier head.

Companion of :mod:`metagrad.hyperflow` (which adapts the head only, on cached
features). Here the adapted parameters ``theta = {"biases": {"Dense_i": b_i},
"head": {"kernel", "bias"}}`` sit *inside* the backbone: the support features
change when the biases move, so gradient-descent fine-tuning of this subset
must run a forward and a backward pass through the backbone at every step,
while HyperFlow runs a few Euler steps, each a forward pass of the backbone
with the current biases followed by one evaluation of the drift network.

The drift network ``h_phi(theta, t | S)`` uses forward-pass information only:

* for the head, the set network of :func:`metagrad.hyperflow.drift` on the
  support features computed under the current biases;
* for the biases of layer ``l``, a per-unit MLP (shared by the units of the
  layer) on a token of forward statistics of the support set under the current
  parameters: for unit ``j`` and class ``c``, its mean activation on class
  ``c``, the correlation over the support set between its activation and the
  logit of class ``c``, and the activation- and firing-weighted means of the
  head's residual ``p_c - y_c``, contracted over classes (sums of products with
  each other and, for the last layer, with the head's kernel entry ``W[j, c]``,
  a parameter the drift conditions on); plus the correlation of the activation
  with the per-example loss, the firing rate, the class spread of the mean
  activation, the unit's bias and ``t``. The tokens are invariant to relabeling
  the classes and to permuting the support examples (any number of them), so
  the drift is equivariant to both. A first version ran a DeepSets network over
  (unit, class) tokens; one drift evaluation cost about 9 GD steps (0.49 ms vs
  0.055 ms on the (512, 64) backbone, 2-core CPU) at the same accuracy, and was
  replaced by these contractions, all from one matrix product per layer
  (0.33 ms per drift evaluation in the same measurement).

That is the *live* drift (``BiasDriftConfig(support="live")``): every Euler
step runs a backbone forward pass. The *encoded* drift
(``support="encoded"``, :func:`encoded_drift`) follows the paper's design,
where integrating runs no pass of the target model: the support set is encoded
once at the starting point (:func:`encode_support`: the same statistics, layer
by layer, so the encoding never holds more than one layer's activations), and
each Euler step evaluates the token MLPs on that encoding, the current
parameters and their displacement from the start.

Meta-training regresses the drift on velocities (the paper's Sec. 3.2) and
then refines it end to end on its own Euler rollouts
(:func:`refine_on_rollouts`, an addition to the paper).

No derivative is taken at adaptation: there is no backward pass and no
transposed weight product -- the correlation features are what the drift
has instead of the backpropagated error.

The backbone is an MLP (``Dense_i`` layers) or a 1-D CNN (``Conv_i`` layers,
:class:`ConvBackbone`). For a CNN a unit is a channel, and its statistics are
taken on the per-example averages over positions (:func:`pooled_forward`),
computed one support example at a time: both drifts then hold one example's
activations, never the support set's (N, L, C) per layer that gradient
descent keeps for its backward pass -- the regime of the paper's vision
transformers, where activations are tokens x channels per layer.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import flow as hf

# ----------------------------------------------------------------------------- target model with explicit biases


def is_conv(backbone) -> bool:
    """Whether the backbone is a 1-D CNN (``Conv_i`` layers) rather than an MLP (``Dense_i`` layers)."""
    return "Conv_0" in backbone


def layer_names(layers) -> list:
    """The hidden layers of a backbone (or the keys of its bias subset) in order: ``Dense_0, Dense_1, ...`` for an
    MLP, ``Conv_0, Conv_1, ...`` for a 1-D CNN."""
    prefix = "Conv_" if is_conv(layers) else "Dense_"
    names = [f"{prefix}{i}" for i in range(len(layers))]
    if set(names) != set(layers):
        raise ValueError(f"a backbone holds hidden layers {prefix}0..{prefix}{len(layers) - 1} only (an MLP's Dense_i "
                         f"or a 1-D CNN's Conv_i), got {sorted(layers)}.")
    return names


def num_layers(backbone) -> int:
    return len(layer_names(backbone))


def get_biases(backbone):
    """The adapted bias subset ``{"Dense_i": bias}`` of a backbone."""
    return {k: v["bias"] for k, v in backbone.items()}


def with_biases(backbone, biases):
    """The backbone with its biases replaced (weights shared, not copied)."""
    return {k: {**v, "bias": biases[k]} for k, v in backbone.items()}


def conv_same(h, kernel):
    """A ``SAME``-padded 1-D convolution of ``h`` (N, L, C_in) with ``kernel`` (width, C_in, C_out), as flax's Conv.

    Computed as a sum over the kernel's taps of shifted matrix products. It is the
    function of :func:`conv_same_xla`; on a CPU, for these small channel counts,
    it is 2-14x faster wherever a backward pass runs through a batch (GD, full
    fine-tuning, a CNN drift's rollout refinement), and it allocates 2-3x more
    memory, because XLA materializes the shifted slices
    (``experiments/benchmarks/conv1d_impl.py``). Adaptation costs are therefore
    reported at each method's best of the two (``experiments/hyperflow.py``).
    """
    width, length = kernel.shape[0], h.shape[1]
    left = (width - 1) // 2
    padded = jnp.pad(h, ((0, 0), (left, width - 1 - left), (0, 0)))
    return sum(padded[:, i:i + length] @ kernel[i] for i in range(width))


def conv_same_xla(h, kernel):
    """:func:`conv_same` by ``lax.conv_general_dilated`` (the reference it is tested and benchmarked against)."""
    return lax.conv_general_dilated(h, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


# A 1-D CNN backbone's convolution, two ways (the same function), chosen by name wherever a backbone runs
# (``convolution=`` of :func:`forward` and the functions above it, :attr:`BiasDriftConfig.convolution`): on a CPU
# the shifted products are 5-8x faster for gradient descent, XLA's convolution keeps 2.5-3x less memory
# (``experiments/benchmarks/conv1d_impl.py``). Names, not functions, so that a config stays hashable and JSON.
CONVOLUTIONS = {"shifted products": conv_same, "XLA convolution": conv_same_xla}
DEFAULT_CONVOLUTION = "shifted products"


def convolution_named(name: str):
    """The convolution of :data:`CONVOLUTIONS` called ``name`` (``ValueError`` naming the choices otherwise)."""
    if name not in CONVOLUTIONS:
        raise ValueError(f"convolution must be one of {sorted(CONVOLUTIONS)}, got {name!r}.")
    return CONVOLUTIONS[name]


def forward(backbone, biases, x, convolution: str = DEFAULT_CONVOLUTION):
    """Forward pass of the ReLU backbone with ``biases``: ``(pre-activations, activations, features)``.

    MLP (``Dense_i``): the same function as :func:`metagrad.hyperflow.features`
    (L2-normalized ReLU of the last layer) for ``biases = get_biases(backbone)``.
    1-D CNN (``Conv_i``, :class:`ConvBackbone`): ``SAME``-padded convolutions
    and ReLUs on ``x`` (N, L), then the last layer's activations averaged over
    positions and L2-normalized; the activations are (N, L, C). ``convolution``: a
    name in :data:`CONVOLUTIONS` (a CNN's; an MLP ignores it).
    """
    conv = is_conv(backbone)
    conv_fn = convolution_named(convolution)
    h = x[..., None] if conv else x.reshape((x.shape[0], -1))
    zs, hs = [], []
    for name in layer_names(backbone):
        kernel = backbone[name]["kernel"]
        z = (conv_fn(h, kernel) if conv else h @ kernel) + biases[name]
        h = jax.nn.relu(z)
        zs.append(z), hs.append(h)
    f = jnp.mean(h, 1) if conv else h
    return zs, hs, f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)


def pooled_forward(backbone, biases, x, convolution: str = DEFAULT_CONVOLUTION):
    """A 1-D CNN backbone's forward pass reduced per example and channel, one support example at a time.

    Returns ``(layers, features)``: for every layer, ``(z, h, firing)`` (N, C) --
    the pre-activation and the activation averaged over positions, and the
    fraction of positions where the channel fires -- and the features of
    :func:`forward`. The examples go through ``lax.map``, so the pass holds one
    example's (L, C) activations at a time, never the support set's (N, L, C)
    that backpropagation keeps for every layer.
    """

    def one(xi):
        zs, hs, f = forward(backbone, biases, xi[None], convolution)
        return [(jnp.mean(z[0], 0), jnp.mean(h[0], 0), jnp.mean((z[0] > 0).astype(z.dtype), 0))
                for z, h in zip(zs, hs)], f[0]

    return lax.map(one, x)


class ConvBackbone(nn.Module):
    """A 1-D CNN backbone for bias-mode HyperFlow: ``SAME`` convolutions and ReLUs (no pooling between them), the
    last layer averaged over positions, then a ``Dense`` classifier (dropped after pretraining: the features are the
    L2-normalized average, :func:`forward`)."""

    channels: tuple = (64, 64, 64)
    kernel_size: int = 5
    num_classes: int = 5

    @nn.compact
    def __call__(self, x):
        h = x[..., None] if x.ndim == 2 else x
        for ch in self.channels:
            h = nn.relu(nn.Conv(ch, (self.kernel_size,), padding="SAME")(h))
        return nn.Dense(self.num_classes)(jnp.mean(h, 1))


def features(backbone, biases, x, convolution: str = DEFAULT_CONVOLUTION):
    return forward(backbone, biases, x, convolution)[2]


def backbone_features(backbone, x, convolution: str = DEFAULT_CONVOLUTION):
    """:func:`features` of a backbone under its own biases: what the head reads once every parameter has been
    fine-tuned (``features_fn`` of :func:`metagrad.hyperflow.finetune_full` for a 1-D CNN)."""
    return features(backbone, get_biases(backbone), x, convolution)


def support_features(backbone, biases, x, convolution: str = DEFAULT_CONVOLUTION):
    """:func:`features` for passes that take no derivative: a 1-D CNN's come from :func:`pooled_forward`, one
    example at a time (an MLP's from :func:`forward`)."""
    if is_conv(backbone):
        return pooled_forward(backbone, biases, x, convolution)[1]
    return features(backbone, biases, x)


def loss(theta, backbone, x, y_onehot, convolution: str = DEFAULT_CONVOLUTION):
    """Support cross-entropy ``L_S(theta)`` of the (biases, head) subset."""
    return hf.head_loss(theta["head"], features(backbone, theta["biases"], x, convolution), y_onehot)


def init_theta(backbone, x, y_onehot, scale, convolution: str = DEFAULT_CONVOLUTION):
    """Starting point of every method: the pretrained biases and the prototype head of the support set."""
    biases = get_biases(backbone)
    feats = support_features(backbone, biases, x, convolution)
    return {"biases": biases, "head": hf.prototype_head(feats, y_onehot, scale)}


def log_probs(theta, backbone, x, convolution: str = DEFAULT_CONVOLUTION):
    """Class log-probabilities of the (biases, head) model ``theta`` on inputs ``x``."""
    logits = hf.head_logits(theta["head"], features(backbone, theta["biases"], x, convolution))
    return jax.nn.log_softmax(logits, -1)


def accuracy(theta, backbone, x, y, convolution: str = DEFAULT_CONVOLUTION):
    return hf.accuracy(theta["head"], features(backbone, theta["biases"], x, convolution), y)


# ----------------------------------------------------------------------------- gradient-descent baselines


def finetune_step(state, meta, t, convolution: str = DEFAULT_CONVOLUTION):
    """One GD step on (biases, head) (metagrad's ``step(state, meta, t)`` contract); backprops through the backbone.

    ``state = {"theta"}``, ``meta = {"backbone", "x", "y_onehot", "lr_bias", "lr_head"}``.
    """
    g = jax.grad(loss)(state["theta"], meta["backbone"], meta["x"], meta["y_onehot"], convolution)
    th = state["theta"]
    return {"theta": {"biases": jax.tree.map(lambda p, d: p - meta["lr_bias"] * d, th["biases"], g["biases"]),
                      "head": jax.tree.map(lambda p, d: p - meta["lr_head"] * d, th["head"], g["head"])}}


def finetune(backbone, support_x, support_y, *, lr_bias, lr_head, num_steps, ways, scale,
             convolution: str = DEFAULT_CONVOLUTION):
    """Baseline: gradient descent on the biases and the head (the subset HyperFlow adapts); uses ``jax.grad``."""
    y1h = jax.nn.one_hot(support_y, ways)
    meta = {"backbone": backbone, "x": support_x, "y_onehot": y1h, "lr_bias": lr_bias, "lr_head": lr_head}
    state = {"theta": init_theta(backbone, support_x, y1h, scale, convolution)}
    return lax.fori_loop(0, num_steps, lambda t, s: finetune_step(s, meta, t, convolution), state)["theta"]


# ----------------------------------------------------------------------------- drift network


@dataclasses.dataclass(frozen=True)
class BiasDriftConfig:
    """Static settings of the bias-mode drift.

    Attributes:
      head: the :class:`metagrad.hyperflow.DriftConfig` of the head part.
      hidden: width of the per-unit MLPs.
      bias_scales: output units of each layer's bias velocity (set by :func:`meta_train`
        to the RMS of that layer's straight-path velocities).
      head_scales: ``{"bias": ., "kernel": .}`` factors on the head drift's outputs (set by
        :func:`meta_train` to each leaf's RMS straight-path velocity over ``head.velocity_scale``):
        the head's bias moves far less than ``T eta`` and is otherwise badly scaled.
      support: how the drift sees the support set. ``"live"`` (:func:`drift`): a backbone forward
        pass under the current biases at every Euler step. ``"encoded"`` (:func:`encoded_drift`, as
        in the paper: no forward pass of the target model while integrating): the support set is
        encoded once at the starting point by :func:`encode_support`, and each Euler step runs only
        the drift network on that encoding and the current parameters.
      convolution: how a 1-D CNN backbone's convolutions are computed (a name in :data:`CONVOLUTIONS`;
        the same function either way, a different time and memory).
    """

    head: hf.DriftConfig = hf.DriftConfig()
    hidden: int = 16
    bias_scales: tuple = ()
    head_scales: tuple = (("bias", 1.0), ("kernel", 1.0))
    support: str = "live"
    convolution: str = DEFAULT_CONVOLUTION

    def __post_init__(self):
        if self.support not in SUPPORT_MODES:
            raise ValueError(f"support must be one of {SUPPORT_MODES}, got {self.support!r}.")
        convolution_named(self.convolution)


SUPPORT_MODES = ("live", "encoded")
_UNIT_IN = 14


def init_drift(key, config: BiasDriftConfig, layers: int):
    h = config.hidden
    unit_in = _UNIT_IN + (config.support == "encoded")  # the encoded drift also sees the bias displacement
    return {"head": hf.init_drift(jax.random.fold_in(key, 0), config.head),
            "units": [hf.mlp_init(jax.random.fold_in(key, 10 + i), (unit_in, h, h, 1)) for i in range(layers)]}


def unit_statistics(z, h, logits, p, y1h, counts, own, classwise: bool, firing=None):
    """Forward statistics of one layer's units on the support set: what their tokens hold besides the bias and ``t``.

    Per (unit j, class c) statistics -- the activation- and firing-weighted means of the residual
    ``p_c - y_c`` (``err_h``, ``err_a``), the mean activation on class c (``mean_c``), the correlation
    of the activation with the logit of c -- are contracted over classes (sums of products, means,
    spreads), so the tokens are invariant to relabeling the classes. Returns ``{"static": (W, 8),
    "classwise": {"err_h", "err_a", "mean_c"} (W, K) or None}``; ``static`` holds, per unit,
    ``corr . err_h``, ``corr . err_a``, ``corr . (own - mean own)``, the correlation with the
    per-example loss, the firing-weighted mean of ``1 - p(true class)``, the firing rate, the class
    spread of the mean activation and the scaled mean pre-activation. ``classwise`` (kept only where
    ``classwise``: the last layer, whose units meet the head's kernel) is contracted with the head's
    kernel row by :func:`_tokens`. Everything comes from two ``(W, N) @ (N, 3K + 2)`` products of
    the activation and the firing indicator with [residual, class-mean weights, standardized logits,
    standardized per-example loss, 1 - p(true class)]; no derivative and no transposed weight
    product is formed. For a 1-D CNN's channels, ``z``, ``h`` and ``firing`` are
    :func:`pooled_forward`'s per-example averages over positions (an MLP's
    ``firing`` is ``z > 0``).
    """
    n, k = y1h.shape
    s = jnp.sqrt(jnp.mean(h * h, 0)) + 1e-6  # (W,) unit scale
    active = (z > 0).astype(h.dtype) if firing is None else firing
    nll = -jnp.log(jnp.sum(p * y1h, -1, keepdims=True) + 1e-9)  # (N, 1) per-example loss

    def standardize(a):
        a = a - a.mean(0)
        return a / (jnp.sqrt(jnp.mean(a * a, 0)) + 1e-6)

    right = jnp.concatenate([p - y1h, y1h * (n / counts), standardize(logits), standardize(nll),
                             1.0 - jnp.exp(-nll)], 1)  # (N, 3K + 2)
    sh = (h.T @ right) / (n * s[:, None])  # statistics of the activation in units of its scale
    sa = active.T @ right / n
    mean_hn = jnp.mean(h, 0) / s
    hstd = jnp.sqrt(jnp.maximum(jnp.mean(h * h, 0) / s**2 - mean_hn**2, 0.0)) + 1e-6
    err_h, err_a, mean_c = 5.0 * sh[:, :k], 5.0 * sa[:, :k], sh[:, k:2 * k]
    corr = sh[:, 2 * k:3 * k] / hstd[:, None]
    static = jnp.stack([jnp.sum(corr * err_h, 1), jnp.sum(corr * err_a, 1), jnp.sum(corr * (own - own.mean()), 1),
                        sh[:, 3 * k] / hstd, 5.0 * sa[:, 3 * k + 1], jnp.mean(active, 0), jnp.std(mean_c, 1),
                        jnp.mean(z, 0) / s], -1)
    return {"static": static, "classwise": {"err_h": err_h, "err_a": err_a, "mean_c": mean_c} if classwise else None}


def _tokens(stats, bias, w_head, t):
    """(W, _UNIT_IN) unit tokens: :func:`unit_statistics` plus the head-kernel contractions, the unit's bias and ``t``.

    ``w_head`` is the last layer's rescaled head kernel (W, K), or None for the other layers (their
    kernel contractions are zero).
    """
    c = stats["static"]
    w = c.shape[0]
    if w_head is None:
        by_head = [jnp.zeros((w,), c.dtype)] * 3
    else:
        cw = stats["classwise"]
        by_head = [jnp.sum(w_head * cw[name], 1) for name in ("err_h", "err_a", "mean_c")]
    tt = jnp.asarray(t, c.dtype)
    feats = [by_head[0], by_head[1], c[:, 0], c[:, 1], c[:, 2], c[:, 3], c[:, 4], c[:, 5], c[:, 6], bias, c[:, 7],
             by_head[2], jnp.full((w,), tt), jnp.full((w,), jnp.sin(jnp.pi * tt))]
    return jnp.stack(feats, -1)


def _head_kernel_rows(theta, config):
    """The head kernel rescaled to the last layer's per-unit class weights."""
    return theta["head"]["kernel"] * jnp.sqrt(theta["head"]["kernel"].shape[0]) / (2 * config.head.scale)


def _head_velocity(phi, theta, t, feats, y_onehot, config):
    v_head = hf.drift(phi["head"], theta["head"], t, feats, y_onehot, config.head)
    return {k: v * dict(config.head_scales)[k] for k, v in v_head.items()}


def confidence(logits, y_onehot):
    """Support-set probabilities of the head (from its ``logits``) and each class's mean confidence in itself."""
    p = jax.nn.softmax(logits, -1)
    counts = jnp.maximum(y_onehot.sum(0), 1.0)
    return p, counts, jnp.sum(p * y_onehot, 0) / counts


def _layer_statistics(layers, logits, y_onehot):
    """Every layer's :func:`unit_statistics` (the last layer's with its classwise part) from its forward
    ``(z, h, firing)`` (``firing`` None for an MLP) and the head's ``logits`` on the support set."""
    p, counts, own = confidence(logits, y_onehot)
    return [unit_statistics(z, h, logits, p, y_onehot, counts, own, classwise=i == len(layers) - 1, firing=firing)
            for i, (z, h, firing) in enumerate(layers)]


def drift(phi, theta, t, backbone, x, y_onehot, config: BiasDriftConfig):
    """``h_phi(theta, t | S)`` for ``theta = {"biases", "head"}``: a backbone forward pass, then the token MLPs."""
    if is_conv(backbone):  # per-example channel averages, one example at a time
        layers, f = pooled_forward(backbone, theta["biases"], x, config.convolution)
    else:
        zs, hs, f = forward(backbone, theta["biases"], x)
        layers = [(z, h, None) for z, h in zip(zs, hs)]
    v_head = _head_velocity(phi, theta, t, f, y_onehot, config)
    units = _layer_statistics(layers, hf.head_logits(theta["head"], f), y_onehot)
    names = layer_names(backbone)
    v_bias = {}
    for i, stats in enumerate(units):
        name, last = names[i], i == len(names) - 1
        tok = _tokens(stats, theta["biases"][name], _head_kernel_rows(theta, config) if last else None, t)
        v = hf.mlp_apply(phi["units"][i], tok)[:, 0]  # (W,)
        v_bias[name] = config.bias_scales[i] * v
    return {"biases": v_bias, "head": v_head}


def encode_support(backbone, theta0, x, y_onehot, convolution: str = DEFAULT_CONVOLUTION):
    """The encoded drift's view of the support set: forward statistics at the starting point, computed once.

    Two forward passes, each keeping only what it needs: the first gives the
    support features and the head's probabilities at ``theta0``; the second
    recomputes the layers one at a time and reduces each to its per-unit
    statistics (:func:`unit_statistics`) before the next. The second pass
    starts from the first one's result, which keeps XLA from merging the two
    into one pass that holds every layer's activations: the encoding's scratch
    memory is that of one layer, not of the whole network (what backprop
    keeps). A 1-D CNN's encoding takes one pass, :func:`pooled_forward`, one
    example at a time: its per-example channel averages are small enough to
    keep until the head's probabilities are known.
    """
    if is_conv(backbone):
        layers, f = pooled_forward(backbone, theta0["biases"], x, convolution)
        units = _layer_statistics(layers, hf.head_logits(theta0["head"], f), y_onehot)
        return {"feats": f, "units": units, "biases0": theta0["biases"]}
    f = features(backbone, theta0["biases"], x)
    logits = hf.head_logits(theta0["head"], f)
    p, counts, own = confidence(logits, y_onehot)
    # The second pass reads x through the first pass's result, so that it can neither be merged with the
    # first pass nor run ahead of it (XLA on CPU drops optimization barriers); the select is the identity
    # unless the head's probabilities are not finite, when the encoding is NaN either way.
    h = jnp.where(jnp.all(jnp.isfinite(p)), x.reshape((x.shape[0], -1)), jnp.nan)
    units, names = [], layer_names(backbone)
    nl = len(names)
    for i, name in enumerate(names):
        z = h @ backbone[name]["kernel"] + theta0["biases"][name]
        h = jax.nn.relu(z)
        units.append(unit_statistics(z, h, logits, p, y_onehot, counts, own, classwise=i == nl - 1))
    return {"feats": f, "units": units, "biases0": theta0["biases"]}


def encoded_drift(phi, theta, t, encoding, y_onehot, config: BiasDriftConfig):
    """``h_phi(theta, t | S)`` with the support set seen only through :func:`encode_support` (no target-model pass).

    As in the paper's drift, integrating it runs no forward pass of the
    backbone: the head part is the set network on the support features at the
    starting point, the bias part the per-unit MLPs on the starting point's
    unit statistics (the last layer's contracted with the *current* head
    kernel), the current bias and its displacement from the start (in units
    of the layer's velocity scale). The drift learns how the statistics would move
    from the rollout refinement (:func:`refine_on_rollouts`).
    """
    v_head = _head_velocity(phi, theta, t, encoding["feats"], y_onehot, config)
    names = layer_names(encoding["biases0"])
    nl = len(names)
    v_bias, ready = {}, jnp.asarray(True)
    for i, stats in enumerate(encoding["units"]):
        name = names[i]
        bias = theta["biases"][name]
        # Layer i's tokens are built only once layer i - 1's velocity exists (the select is the identity
        # unless that velocity is not finite, when the update is NaN either way), so that XLA evaluates the
        # layers one after another and holds one layer's tokens at a time.
        tok = _tokens(stats, bias, _head_kernel_rows(theta, config) if i == nl - 1 else None,
                      jnp.where(ready, t, jnp.nan))
        moved = (bias - encoding["biases0"][name]) / config.bias_scales[i]
        v = hf.mlp_apply(phi["units"][i], jnp.concatenate([tok, moved[:, None]], 1))[:, 0]
        v_bias[name] = config.bias_scales[i] * v
        ready = jnp.all(jnp.isfinite(v))
    return {"biases": v_bias, "head": v_head}


def velocity_field(phi, theta0, backbone, x, y_onehot, config: BiasDriftConfig):
    """``(theta, t) -> h_phi(theta, t | S)`` for an integration that starts at ``theta0`` (per ``config.support``)."""
    if config.support == "encoded":
        encoding = encode_support(backbone, theta0, x, y_onehot, config.convolution)
        return lambda theta, t: encoded_drift(phi, theta, t, encoding, y_onehot, config)
    return lambda theta, t: drift(phi, theta, t, backbone, x, y_onehot, config)


def adapt(phi, backbone, support_x, support_y, *, config: BiasDriftConfig, num_steps: int,
          examples_per_chunk: int | None = hf.ADAPT_EXAMPLES_PER_CHUNK):
    """HyperFlow adaptation of (biases, head): ``num_steps`` Euler steps of size ``1/num_steps`` (forward only).

    ``support_x`` is ``(N, features)``, ``support_y`` ``N`` integer labels in
    ``0..ways-1``; jit-compiled, and usable under ``jax.vmap``/``jax.jit`` (the
    shape checks run on tracers too, the label and finiteness checks only on
    concrete arrays). ``examples_per_chunk``: the head drift's pair tokens are
    evaluated this many support examples at a time (None: all at once; the
    same function, more scratch memory; :class:`metagrad.hyperflow.DriftConfig`).
    """
    _check_support(phi, backbone, support_x, support_y, config)
    config = dataclasses.replace(config, head=hf.with_examples_per_chunk(config.head, examples_per_chunk))
    return _adapt(phi, backbone, support_x, support_y, config=config, num_steps=num_steps)


def _check_support(phi, backbone, support_x, support_y, config: BiasDriftConfig) -> None:
    """Raise ``ValueError`` saying what to change when the support set or the drift does not fit the backbone."""
    layers = num_layers(backbone)
    features = None if is_conv(backbone) else np.shape(backbone["Dense_0"]["kernel"])[0]  # a CNN takes any length
    if len(phi["units"]) != layers:
        raise ValueError(f"the drift was built for {len(phi['units'])} hidden layers but the backbone has {layers}: "
                         f"meta-train it on this backbone (init_drift(key, config, {layers})).")
    hf.check_support_set(support_x, support_y, ways=config.head.ways, features=features)


@functools.partial(jax.jit, static_argnames=("config", "num_steps"))
def _adapt(phi, backbone, support_x, support_y, *, config: BiasDriftConfig, num_steps: int):
    y1h = jax.nn.one_hot(support_y, config.head.ways)
    theta0 = init_theta(backbone, support_x, y1h, config.head.scale, config.convolution)
    field = velocity_field(phi, theta0, backbone, support_x, y1h, config)
    return hf.euler(field, theta0, num_steps, 1.0 / num_steps if num_steps else 0.0)


# ----------------------------------------------------------------------------- trajectories and meta-training


@functools.partial(jax.jit, static_argnames=("num_steps", "num_knots", "num_starts", "ways", "scale", "convolution"))
def simulate_trajectories(backbone, support_x, support_y, key, lr_bias, lr_head, *, num_steps, num_knots,
                          num_starts, ways, scale, convolution: str = DEFAULT_CONVOLUTION):
    """GD fine-tuning trajectories of (biases, head) on a batch of tasks (vmapped over tasks and starts, one program).

    Start 0 is the pretrained biases with the prototype head; the others
    perturb the head as in :func:`metagrad.hyperflow.simulate_trajectories`
    and the biases by Gaussian noise of 0.1 times each layer's bias RMS.
    Knot leaves are shaped ``(B, num_starts, num_knots + 1, ...)``.
    """
    if num_steps % num_knots:
        raise ValueError(f"num_steps={num_steps} must be a multiple of num_knots={num_knots}.")
    every = num_steps // num_knots

    def one_task(sx, sy, k):
        y1h = jax.nn.one_hot(sy, ways)
        theta = init_theta(backbone, sx, y1h, scale, convolution)
        meta = {"backbone": backbone, "x": sx, "y_onehot": y1h, "lr_bias": lr_bias, "lr_head": lr_head}

        def start(r):
            kr = jax.random.fold_in(k, r)
            u = jax.random.uniform(jax.random.fold_in(kr, 0), (), minval=0.5, maxval=1.5)
            head = {n: u * a + jax.random.normal(jax.random.fold_in(kr, j + 1), a.shape) * scale * 0.1
                    for j, (n, a) in enumerate(sorted(theta["head"].items()))}
            biases = {n: a + jax.random.normal(jax.random.fold_in(kr, 10 + j), a.shape)
                      * 0.1 * (jnp.sqrt(jnp.mean(a * a)) + 1e-3)
                      for j, (n, a) in enumerate(sorted(theta["biases"].items()))}
            return jax.tree.map(lambda a, b: jnp.where(r == 0, a, b), theta, {"biases": biases, "head": head})

        def run(th0):
            return hf.run_knots(functools.partial(finetune_step, convolution=convolution), meta, {"theta": th0}, "theta", num_knots, every)

        return jax.vmap(lambda r: run(start(r)))(jnp.arange(num_starts))

    keys = jax.random.split(key, support_x.shape[0])
    knots = jax.vmap(one_task)(support_x, support_y, keys)
    return {"x": support_x, "y": support_y, "knots": knots, "time_scale": lr_head * num_steps}


def meta_train(trajectories, backbone, config: BiasDriftConfig, *, num_iters=2000, batch_tasks=32,
               learning_rate=3e-3, interpolations=("linear",), seed=0, chunk=100, progress=True, checkpoint=None):
    """Regress ``h_phi`` on the velocities of interpolated (biases, head) trajectories.

    Loss per sample: squared error of each leaf's predicted velocity (each
    layer's biases, the head's kernel, the head's bias) in units of that leaf's
    RMS straight-path velocity, averaged over the leaves: the head's bias moves
    the logits directly, so it is not left to be swamped by the kernel. Returns ``(phi, config, history)``.
    ``checkpoint``: see :func:`metagrad.hyperflow.regress_drift` (a killed run resumes mid-way).
    """
    x, y, knots = trajectories["x"], trajectories["y"], trajectories["knots"]
    ways = config.head.ways
    rms = _straight_rms(knots)
    layers = num_layers(backbone)
    config = dataclasses.replace(
        config, head=dataclasses.replace(config.head, velocity_scale=float(trajectories["time_scale"])),
        bias_scales=tuple(rms["biases"][name] for name in layer_names(backbone)),
        head_scales=tuple((k, rms["head"][k] / float(trajectories["time_scale"])) for k in sorted(rms["head"])))
    num_tasks, num_starts = x.shape[0], jax.tree.leaves(knots)[0].shape[1]
    kinds = tuple(interpolations)

    def sample_loss(phi, task, r, s, kind_index):
        point, target = hf.interpolated_sample(knots, task, r, s, kind_index, kinds)
        start = jax.tree.map(lambda a: a[task, r, 0], knots)
        pred = velocity_field(phi, start, backbone, x[task], jax.nn.one_hot(y[task], ways), config)(point, s)
        return _parameter_error(pred, target, rms)

    phi, history = hf.regress_drift(sample_loss, init_drift(jax.random.key(seed), config, layers),
                                    num_tasks=num_tasks, num_starts=num_starts, num_kinds=len(kinds),
                                    batch_tasks=batch_tasks, learning_rate=learning_rate, num_iters=num_iters,
                                    seed=seed, chunk=chunk, progress=progress, checkpoint=checkpoint,
                                    desc="meta-training h_phi (biases + head)")
    return phi, config, history


def _straight_rms(knots):
    """Per leaf, the RMS of the straight-path displacements ``theta_T - theta_0`` (the loss and output units)."""
    straight = jax.tree.map(lambda a: a[:, :, -1] - a[:, :, 0], knots)
    return jax.tree.map(lambda d: float(jnp.sqrt(jnp.mean(d * d))) + 1e-8, straight)


def _parameter_error(theta, target, rms):
    """Squared error per leaf in units of that leaf's straight-path RMS, averaged over the leaves."""
    errs = [jnp.mean((p - q) ** 2) / sc**2
            for p, q, sc in zip(jax.tree.leaves(theta), jax.tree.leaves(target), jax.tree.leaves(rms))]
    return sum(errs) / len(errs)


def refine_on_rollouts(phi, config: BiasDriftConfig, trajectories, backbone, query_x, *, num_euler=5,
                       num_iters=2000, batch_tasks=32, learning_rate=1e-3, parameter_weight=0.1, seed=3, chunk=100,
                       progress=True, checkpoint=None):
    """Fine-tune a regressed drift end to end through its own Euler integration (an addition to the paper).

    Velocity regression (:func:`meta_train`, Sec. 3.2 of the paper) fits
    ``h_phi`` at points of the simulated trajectories; at adaptation the Euler
    integration leaves them, and the bias and head updates only work together
    (on MNIST-1D, the GD-tuned head with the pretrained biases is below the
    prototypes). Here the drift is trained on its rollout instead: from each
    task's start, ``num_euler`` Euler steps of size ``1 / num_euler`` (the
    number used at adaptation), and after step ``k`` the emulated model is
    compared with the GD run at the same time ``k / num_euler``: the KL
    divergence of the emulated model's class probabilities from GD's on the
    task's *query* inputs (held-out examples of the meta-training task, so the
    drift learns the function GD reaches, not the support fit), plus
    ``parameter_weight`` times the per-leaf parameter error of
    :func:`meta_train` (:func:`metagrad.hyperflow.rollout_divergence`).
    Meta-training differentiates through the rollout;
    adaptation still runs forward passes only (:func:`adapt`).

    ``trajectories`` is :func:`simulate_trajectories`'s output (its number of
    knots must be a multiple of ``num_euler``), ``query_x`` the tasks' query
    inputs ``(B, Q, ...)``. Returns ``(phi, history)``. ``checkpoint``: as in :func:`meta_train`.
    """
    x, y, knots = trajectories["x"], trajectories["y"], trajectories["knots"]
    hf.check_rollout_steps(jax.tree.leaves(knots)[0].shape[2] - 1, num_euler)
    if query_x.shape[0] != x.shape[0]:
        raise ValueError(f"query_x holds {query_x.shape[0]} tasks but the trajectories {x.shape[0]}.")
    ways, rms = config.head.ways, _straight_rms(knots)

    def sample_loss(phi, task, r, s, kind_index):  # s, kind_index: unused (whole rollouts)
        path = jax.tree.map(lambda a: a[task, r], knots)
        field = velocity_field(phi, jax.tree.map(lambda a: a[0], path), backbone, x[task],
                               jax.nn.one_hot(y[task], ways), config)
        return hf.rollout_divergence(
            field, lambda theta: log_probs(theta, backbone, query_x[task], config.convolution),
            lambda theta, target: _parameter_error(theta, target, rms), path, num_euler, parameter_weight)

    return hf.regress_drift(sample_loss, phi, num_tasks=x.shape[0], num_starts=jax.tree.leaves(knots)[0].shape[1],
                            num_kinds=1, batch_tasks=batch_tasks, learning_rate=learning_rate, num_iters=num_iters,
                            seed=seed, chunk=chunk, progress=progress, checkpoint=checkpoint,
                            desc=f"refining h_phi on {num_euler}-step rollouts")


def per_leaf_fit(phi, config, trajectories, backbone, num_tasks=64, s=0.5):
    """Relative squared error per leaf of the drift against straight-path velocities (diagnostic)."""
    x, y, knots = trajectories["x"], trajectories["y"], trajectories["knots"]
    idx = np.arange(min(num_tasks, x.shape[0]))

    def one(i):
        path = jax.tree.map(lambda a: a[i, 0], knots)
        point, target = hf.interpolate(path, s, "linear")
        start = jax.tree.map(lambda a: a[0], path)
        pred = velocity_field(phi, start, backbone, x[i], jax.nn.one_hot(y[i], config.head.ways), config)(point, s)
        return jax.tree.map(lambda p, q: (jnp.sum((p - q) ** 2), jnp.sum(q * q)), pred, target)

    out = jax.jit(jax.vmap(one))(jnp.asarray(idx))
    return jax.tree.map(lambda e: float(e[0].sum() / e[1].sum()), out, is_leaf=lambda a: isinstance(a, tuple))
