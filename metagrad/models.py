"""Small flax models for CPU-sized problems, and the adapter to a pure ``apply``."""

from __future__ import annotations

import inspect
from typing import Sequence

import flax.linen as nn


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



def init_params(model: nn.Module, key, example_x, dtype):
    """``model``'s parameters initialized from ``key`` on ``example_x``, floating leaves cast to ``dtype``."""
    import jax
    import jax.numpy as jnp

    params = model.init(key, example_x)["params"]
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
