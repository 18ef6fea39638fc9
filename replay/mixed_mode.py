"""The inner gradient of a training step, differentiated forward-over-reverse.

A metagradient pulls cotangents back through ``g = grad_theta L(theta, a)``
inside every step. Plain ``jax.vjp`` of ``jax.grad`` does that reverse-over-reverse.
Kemaev, Calian, Zintgraf, Farquhar, van Hasselt, "Scalable Meta-Learning via
Mixed-Mode Differentiation" (ICML 2025) instead compute the Hessian-vector product
``H v`` forward-over-reverse (``jax.jvp`` of ``jax.grad``) and the cross term
``d/da <v, grad_theta L>`` reverse-over-forward, which on accelerators saves memory
traffic and time. :func:`mixed_mode_grad` is a drop-in ``jax.grad`` whose VJP is
computed that way (a ``jax.custom_vjp``); its values and derivatives are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _zero_cotangent(x):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def mixed_mode_grad(loss):
    """``jax.grad(loss)`` for ``loss(params, diff_aux, const_aux) -> scalar``, with a mixed-mode VJP.

    ``diff_aux`` holds the inputs the metagradient flows into besides the
    parameters (e.g. poisoned inputs, per-example weights); ``const_aux`` holds
    the rest (labels, keys, constant weights) and gets a zero cotangent, so it
    must not depend on differentiated values. ``loss`` must not close over traced
    values. Forward-mode differentiation *through* the returned function
    (``jax.jvp``, ``jax.jacfwd``) is not available: it is a ``jax.custom_vjp``.
    """
    grad_params = jax.grad(loss)

    @jax.custom_vjp
    def inner_grad(params, diff_aux, const_aux):
        return grad_params(params, diff_aux, const_aux)

    def forward(params, diff_aux, const_aux):
        return grad_params(params, diff_aux, const_aux), (params, diff_aux, const_aux)

    def backward(residuals, v):
        params, diff_aux, const_aux = residuals
        hvp = jax.jvp(lambda p: grad_params(p, diff_aux, const_aux), (params,), (v,))[1]
        if jax.tree.leaves(diff_aux):
            def directional(a):
                return jax.jvp(lambda p: loss(p, a, const_aux), (params,), (v,))[1]

            ct_diff = jax.grad(directional)(diff_aux)
        else:
            ct_diff = diff_aux
        return hvp, ct_diff, jax.tree.map(_zero_cotangent, const_aux)

    inner_grad.defvjp(forward, backward)
    return inner_grad
