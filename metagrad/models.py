"""Small flax models for CPU-sized problems, and the adapter to a pure ``apply``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs (ReLU, optional LayerNorm before the activation, dropout)."""

    hidden: Sequence[int] = (128, 128)
    num_classes: int = 10
    dropout_rate: float = 0.0
    normalize: bool = False
    logit_scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.normalize:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x) * self.logit_scale


class CNN1D(nn.Module):
    """A small 1-D convolutional network (conv, ReLU, pooling) for sequences like MNIST-1D."""

    channels: Sequence[int] = (32, 32)
    kernel_size: int = 5
    num_classes: int = 10
    pooling: str = "avg"  # "avg" or "max"
    normalize: bool = False
    logit_scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim == 2:
            x = x[..., None]
        pool = {"avg": nn.avg_pool, "max": nn.max_pool}[self.pooling]
        for ch in self.channels:
            x = nn.Conv(ch, (self.kernel_size,))(x)
            if self.normalize:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
            x = pool(x, (2,), strides=(2,))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x) * self.logit_scale


class ResidualCNN(nn.Module):
    """A small ResNet-9-shaped 2-D CNN with BatchNorm (Page's ResNet-9, as in Engstrom et al. 2025, scaled down).

    With ``channels = (c1, c2, c3)``: a stem conv of ``c1``; stage 1: a conv of
    ``c2`` and a 2x2 pool, then a residual block of two convs; stage 2: a conv of
    ``c3`` and a pool; stage 3: a conv of ``c3`` and a pool, then a residual block;
    global pooling and a dense head, its logits multiplied by ``logit_scale``. Every conv is
    conv-BatchNorm-ReLU. The options are the metasmoothness choices of
    Engstrom et al. (arXiv 2503.13751, section 4): where BatchNorm sits
    (``norm="before"`` the ReLU, ``"after"`` it, or ``"none"``), the pooling
    (``"max"`` or ``"avg"``), the width (``channels``) and the logit scale.
    Inputs are ``(N, H, W)`` or ``(N, H, W, C)`` images.
    """

    channels: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    norm: str = "before"      # "before" | "after" | "none"
    pooling: str = "max"      # "max" | "avg"
    logit_scale: float = 0.125
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.norm not in ("before", "after", "none"):
            raise ValueError(f"ResidualCNN.norm must be 'before', 'after' or 'none', got {self.norm!r}.")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"ResidualCNN.pooling must be 'max' or 'avg', got {self.pooling!r}.")
        if x.ndim == 3:
            x = x[..., None]
        pool = {"max": nn.max_pool, "avg": nn.avg_pool}[self.pooling]
        c1, c2, c3 = self.channels

        def conv_block(h, features):
            h = nn.Conv(features, (3, 3), use_bias=self.norm == "none")(h)
            bn = lambda z: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(z)  # noqa: E731
            if self.norm == "before":
                h = bn(h)
            h = nn.relu(h)
            return bn(h) if self.norm == "after" else h

        def residual(h, features):
            return h + conv_block(conv_block(h, features), features)

        x = conv_block(x, c1)
        x = residual(pool(conv_block(x, c2), (2, 2), strides=(2, 2)), c2)
        x = pool(conv_block(x, c3), (2, 2), strides=(2, 2))
        x = residual(pool(conv_block(x, c3), (2, 2), strides=(2, 2), padding="SAME"), c3)
        x = jnp.max(x, axis=(1, 2)) if self.pooling == "max" else jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x) * self.logit_scale


def takes_train_flag(model: nn.Module) -> bool:
    """Whether ``model.__call__`` accepts ``train=`` (then dropout etc. are switched by it)."""
    return "train" in inspect.signature(type(model).__call__).parameters



def _cast_floating(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def init_params(model: nn.Module, key, example_x, dtype):
    """``model``'s parameters initialized from ``key`` on ``example_x``, floating leaves cast to ``dtype``."""
    return _cast_floating(model.init(key, example_x)["params"], dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A flax module as pure functions of ``(params, model_state, x)``: the one adapter every problem uses.

    ``model_state`` holds the module's collections besides ``params`` (BatchNorm's
    ``batch_stats``, or any other); those in ``mutable`` (default: all of them)
    are updated in training mode and returned, in evaluation mode they are read
    only. ``train=`` is passed when the module's ``__call__`` takes it, and the
    ``dropout`` RNG stream in training mode.
    """

    model: nn.Module
    mutable: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "takes_train", takes_train_flag(self.model))

    def init(self, key, example_x, dtype):
        """``(params, model_state)`` initialized from ``key``, floating leaves cast to ``dtype``."""
        variables = dict(self.model.init(key, example_x))
        params = variables.pop("params")
        if self.mutable is not None:
            unknown = set(self.mutable) - set(variables)
            if unknown:
                raise ValueError(
                    f"mutable names collections {sorted(unknown)} that the model does not create "
                    f"(it has {sorted(variables)}): name only those, or leave mutable=None for all of them."
                )
        return _cast_floating(params, dtype), _cast_floating(variables, dtype)

    def logits(self, params, model_state, x, *, train: bool, rng=None):
        """``(logits, model_state')``: the model in training or evaluation mode."""
        kwargs = {"train": train} if self.takes_train else {}
        rngs = {"dropout": rng} if (train and rng is not None) else None
        variables = {"params": params, **model_state}
        mutable = list(model_state) if self.mutable is None else list(self.mutable)
        if not (train and mutable):
            return self.model.apply(variables, x, rngs=rngs, **kwargs), model_state
        logits, updated = self.model.apply(variables, x, rngs=rngs, mutable=mutable, **kwargs)
        return logits, {**model_state, **updated}


def loss_and_accuracy(logits, labels):
    """Mean softmax cross-entropy and accuracy of ``logits`` against integer ``labels``."""
    import optax

    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


MODEL_KINDS = ("mlp", "cnn")


def model_named(kind: str, input_shape: tuple, num_classes: int) -> nn.Module:
    """The applications' default model of ``kind`` for inputs of ``input_shape`` (one example's shape).

    ``"mlp"``: :class:`MLP` 64-64 on the flattened input. ``"cnn"``: for images
    (``(H, W)`` or ``(H, W, C)``) the residual BatchNorm :class:`ResidualCNN`
    with channels 16-32-64; for sequences (``(L,)`` or ``(L, C)``) the :class:`CNN1D` 32-32.
    """
    if kind == "mlp":
        return MLP(hidden=(64, 64), num_classes=num_classes)
    if kind == "cnn":
        if len(input_shape) == 1 or (len(input_shape) == 2 and input_shape[-1] <= 4):
            return CNN1D(num_classes=num_classes)
        if len(input_shape) in (2, 3):
            return ResidualCNN(num_classes=num_classes)
        raise ValueError(f"no CNN for inputs of shape {tuple(input_shape)}: give images (H, W[, C]) or "
                         "sequences (L[, C]), or model='mlp'.")
    raise ValueError(f"unknown model {kind!r}; use one of {MODEL_KINDS}.")
