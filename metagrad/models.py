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
