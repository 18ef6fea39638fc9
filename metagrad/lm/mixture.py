"""Mixture weights over data domains as a metaparameter: each domain's share of the training loss.

With weights ``w`` on the simplex, a step's loss is ``sum_d w_d L_d``, where
``L_d`` is the mean loss of the batch's windows from domain ``d`` -- the
objective whose weights data-mixing methods choose (Fan, Grangier, Ablin,
"Dynamic Gradient Alignment for Online Data Mixing", arXiv 2410.02498, 2024,
choose them online; metagradient descent, Engstrom et al., arXiv 2503.13751,
can optimize them as any other metaparameter). Projection keeps ``w`` on the
simplex (Duchi et al., ICML 2008).

A plugin of :mod:`metagrad.meta`: it enters the step through ``prepare_batch``,
scaling the per-window weights, and needs a problem whose batches say which
domain each window comes from (``batch["domain"]``) and whose
:class:`~metagrad.meta.ProblemInfo` has ``num_domains``, as
:class:`~metagrad.lm.LMProblem` does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from ..meta import Metaparameter, project_to_simplex
from ..mixing import check_simplex

__all__ = ["MixtureWeights"]


@dataclasses.dataclass(frozen=True)
class MixtureWeights(Metaparameter):
    """One weight per domain, on the simplex: the share of the training loss each domain's windows carry.

    Args:
      init_weights: the initial weights (one per domain, summing to one); ``None``: uniform.
    """

    init_weights: tuple[float, ...] | None = None

    name: ClassVar[str] = "mixture_weights"
    batch_inputs: ClassVar[tuple[str, ...]] = ("weights",)

    def __post_init__(self):
        if self.init_weights is not None:
            object.__setattr__(self, "init_weights", tuple(float(w) for w in self.init_weights))
            check_simplex(self.init_weights, name="MixtureWeights.init_weights")

    @staticmethod
    def num_domains(info) -> int:
        k = getattr(info, "num_domains", None)
        if k is None:
            raise ValueError("MixtureWeights needs a problem with data domains (e.g. metagrad.lm.LMProblem); "
                             f"{type(info).__name__} has no num_domains.")
        return int(k)

    def check(self, info) -> None:
        k = self.num_domains(info)
        if self.init_weights is not None:
            check_simplex(self.init_weights, k, name="MixtureWeights.init_weights")

    def init(self, info):
        k = self.num_domains(info)
        w = np.full((k,), 1.0 / k) if self.init_weights is None else np.asarray(self.init_weights)
        return jnp.asarray(w, info.dtype)

    def project(self, weights, info=None):
        return project_to_simplex(weights, total=1.0)

    def shape(self, info) -> tuple[int, ...]:
        return (self.num_domains(info),)

    def describe_shape(self, info) -> str:
        return f"one weight per domain, {self.num_domains(info)} of them"

    def prepare_batch(self, weights, batch, ctx):
        """Window ``i`` of domain ``d`` gets ``w_d * B / n_d`` (``n_d`` of the ``B`` windows are from ``d``).

        The batch's weighted mean loss is then ``sum_d w_d L_d``.
        """
        domain = batch["domain"]
        size = domain.shape[0]
        counts = jnp.zeros(weights.shape, weights.dtype).at[domain].add(1.0)
        share = weights[domain] * size / counts[domain]
        return {**batch, "weights": batch["weights"] * share.astype(batch["weights"].dtype)}
