"""The baseline optimizer of the language models: AdamW with gradient clipping, linear warmup and cosine decay.

The recipe of GPT-2-style training (Radford et al. 2019; Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019, for AdamW): clip the
gradients' global norm, then AdamW with ``b2 = 0.95`` and weight decay on the
matrices only (not on biases and LayerNorm scales), at a learning rate that
warms up linearly from 0 and decays along a cosine.

Its update is linear in the learning rate, so a :class:`~metagrad.LRSchedule`
that multiplies the final update is exactly a learning-rate schedule on top
of the warmup and cosine (a multiplier of 1 keeps them).
:func:`scheduled_adamw` is the same clip + AdamW chain with its learning rate
injected (``optax.inject_hyperparams``), for a schedule that *sets* the rate
at every step instead (Engstrom et al., arXiv 2503.13751, Sec. 5.3: the
learning-rate schedule as the metaparameter).
"""

from __future__ import annotations

import jax
import optax

__all__ = ["adamw_chain", "baseline_optimizer", "matrices_only", "scheduled_adamw", "warmup_cosine"]


def warmup_cosine(peak_lr: float, num_steps: int, warmup_steps: int | None = None, final_fraction: float = 0.1):
    """A linear warmup from 0 to ``peak_lr`` over ``warmup_steps`` (default 5% of the run, at least one step), then
    a cosine decay to ``final_fraction * peak_lr`` at step ``num_steps``."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}.")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}.")
    warmup = max(1, num_steps // 20) if warmup_steps is None else int(warmup_steps)
    if not 0 <= warmup < max(num_steps, 2):
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, num_steps={num_steps}).")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
                                              decay_steps=max(num_steps, warmup + 1),
                                              end_value=final_fraction * peak_lr)


def matrices_only(params):
    """The weight-decay mask: ``True`` for leaves of two or more dimensions (kernels, embeddings)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw_chain(learning_rate, *, weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                b2: float = 0.95, eps: float = 1e-8, eps_root: float = 1e-12) -> optax.GradientTransformation:
    """``optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, ...))``, weight decay on the
    matrices only (:func:`matrices_only`); ``learning_rate`` is a number or an optax schedule.

    ``eps_root > 0`` keeps the metagradient finite: a byte that never occurs in
    a run leaves its embedding's second moment at 0, where ``sqrt`` has an
    infinite derivative; ``sqrt(nu + 1e-12)`` has a finite one and differs from
    ``sqrt(nu)`` only where ``nu`` is below about ``1e-12``.
    """
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
                    mask=matrices_only),
    )


def baseline_optimizer(peak_lr: float = 3e-3, num_steps: int = 1000, *, warmup_steps: int | None = None,
                       final_fraction: float = 0.1, weight_decay: float = 0.1, clip_norm: float = 1.0,
                       b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                       eps_root: float = 1e-12) -> optax.GradientTransformation:
    """:func:`adamw_chain` at the rate :func:`warmup_cosine` (``peak_lr``, ``num_steps``, ...) sets."""
    schedule = warmup_cosine(peak_lr, num_steps, warmup_steps, final_fraction)
    return adamw_chain(schedule, weight_decay=weight_decay, clip_norm=clip_norm, b1=b1, b2=b2, eps=eps,
                       eps_root=eps_root)


def scheduled_adamw(**settings) -> optax.GradientTransformation:
    """:func:`adamw_chain` (``settings``: its keyword arguments) whose learning rate is injected, starting at 0.

    ``optax.inject_hyperparams`` puts the rate in the outermost optimizer state
    (``opt_state.hyperparams["learning_rate"]``), so a :class:`~metagrad.LRSchedule`
    *sets* it at every step (:func:`metagrad.meta.has_injected_lr`): the
    schedule's values are AdamW's learning rates, with no warmup or decay of the
    optimizer's own on top. Only the rate is injected; the other settings stay constants.
    """
    def factory(learning_rate):
        return adamw_chain(learning_rate, **settings)

    return optax.inject_hyperparams(factory)(learning_rate=0.0)
