"""A decoder-only transformer over bytes, in flax.linen, and its next-token loss.

The architecture of GPT-2 (Radford et al., "Language Models are Unsupervised
Multitask Learners", 2019), built from the transformer of Vaswani et al.
("Attention Is All You Need", NeurIPS 2017): token and learned position
embeddings, ``depth`` blocks of causal multi-head self-attention and a GELU
MLP, each behind a LayerNorm (pre-LN) on the residual stream, a final
LayerNorm, and an output layer tied to the token embedding. Weights start as
N(0, 0.02), the residual projections as N(0, 0.02 / sqrt(2 depth)) (GPT-2).

Sizes are values of :class:`TransformerConfig`; :data:`CONFIGS` names four,
from a few thousand parameters (``tiny``, for tests) to about ten million
(``large``). Tokens are bytes (vocabulary 256), so the bits per byte of a
model are its loss in nats per token divided by ``ln 2`` (:func:`bits_per_byte`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CONFIGS", "PARAMETER_RANGES", "Block", "CausalSelfAttention", "FeedForward", "Transformer", "TransformerConfig",
    "bits_per_byte", "config_named", "count_parameters", "token_losses", "window_losses",
]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The sizes of a :class:`Transformer`.

    Args:
      width: the residual stream's width ``d_model``.
      depth: the number of blocks.
      heads: attention heads (``width`` must divide by it).
      context: the longest sequence (learned positions exist for ``0 .. context-1``).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
      vocab_size: tokens (256: bytes).
      dropout: dropout rate on the embeddings and on each block's two outputs (0: none).
    """

    width: int
    depth: int
    heads: int
    context: int
    mlp_ratio: int = 4
    vocab_size: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("width", "depth", "heads", "context", "mlp_ratio", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.width % self.heads:
            raise ValueError(f"TransformerConfig.width={self.width} must be divisible by heads={self.heads}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}.")

    @property
    def head_width(self) -> int:
        return self.width // self.heads


#: Named sizes: ``tiny`` for tests, then about 100k, 1.2M and 10.7M parameters.
CONFIGS = {
    "tiny": TransformerConfig(width=8, depth=1, heads=2, context=16),
    "small": TransformerConfig(width=64, depth=2, heads=4, context=256),
    "medium": TransformerConfig(width=128, depth=6, heads=4, context=256),
    "large": TransformerConfig(width=384, depth=6, heads=6, context=512),
}

#: The parameter count of each named config lies in ``[low, high]`` (checked by the tests).
PARAMETER_RANGES = {
    "tiny": (1_000, 10_000),
    "small": (50_000, 200_000),
    "medium": (1_000_000, 2_000_000),
    "large": (8_000_000, 12_000_000),
}


def config_named(name: str, **changes) -> TransformerConfig:
    """The named config (:data:`CONFIGS`), with ``changes`` (e.g. ``dropout=0.1``, ``context=64``) applied."""
    if name not in CONFIGS:
        raise ValueError(f"unknown transformer config {name!r}; use one of {sorted(CONFIGS)}.")
    return dataclasses.replace(CONFIGS[name], **changes)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``i`` attends to positions ``<= i`` (Vaswani et al. 2017)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        batch, length, _ = x.shape
        qkv = nn.Dense(3 * cfg.width, kernel_init=_normal(0.02), name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3, cfg.heads, cfg.head_width), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))  # (batch, length, heads, head_width)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_width)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, cfg.width)
        out = nn.Dense(cfg.width, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.depth)), name="out")(out)
        return nn.Dropout(cfg.dropout, deterministic=not train)(out)


class FeedForward(nn.Module):
    """The block's MLP: ``width -> mlp_ratio * width -> width`` with a GELU (Radford et al. 2019)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        h = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.width, kernel_init=_normal(0.02), name="up")(x))
        h = nn.Dense(cfg.width, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.depth)), name="down")(h)
        return nn.Dropout(cfg.dropout, deterministic=not train)(h)


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x + CausalSelfAttention(self.config, name="attention")(nn.LayerNorm(name="ln_attention")(x), train)
        return x + FeedForward(self.config, name="mlp")(nn.LayerNorm(name="ln_mlp")(x), train)


class Transformer(nn.Module):
    """A decoder-only transformer (GPT-2, Radford et al. 2019): integer tokens ``(batch, length)`` to logits
    ``(batch, length, vocab_size)``, where the logits at position ``i`` predict token ``i + 1``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"Transformer takes tokens of shape (batch, length), got shape {tokens.shape}.")
        length = tokens.shape[1]
        if length > cfg.context:
            raise ValueError(f"sequences of {length} tokens exceed the model's context of {cfg.context}: raise "
                             "TransformerConfig.context or shorten the sequences.")
        embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=_normal(0.02), name="embed")
        positions = self.param("positions", _normal(0.01), (cfg.context, cfg.width))
        x = embed(tokens) + positions[:length].astype(embed.embedding.dtype)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        for i in range(cfg.depth):
            x = Block(cfg, name=f"block_{i}")(x, train)
        return embed.attend(nn.LayerNorm(name="ln_final")(x))  # tied: the output layer is the embedding


def count_parameters(config: TransformerConfig) -> int:
    """The number of parameters of ``Transformer(config)``, from shapes only (``jax.eval_shape``: no allocation)."""
    model = Transformer(config)
    shapes = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def token_losses(logits, targets):
    """Cross-entropy in nats of every position: ``-log softmax(logits)[target]``, shape ``targets.shape``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def window_losses(logits_fn, windows):
    """The mean next-token loss (nats per token) of each window of ``seq_len + 1`` tokens.

    ``logits_fn(tokens)`` maps ``(n, seq_len)`` tokens to ``(n, seq_len, vocab)``
    logits; the model reads ``windows[:, :-1]`` and is scored on ``windows[:, 1:]``.
    Returns shape ``(n,)``.
    """
    windows = windows.astype(jnp.int32)
    return jnp.mean(token_losses(logits_fn(windows[:, :-1]), windows[:, 1:]), axis=-1)


def bits_per_byte(loss_nats):
    """Bits per byte of a loss in nats per token when the tokens are bytes: ``loss / ln 2``."""
    return loss_nats / math.log(2.0)
