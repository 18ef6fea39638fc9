"""HyperFlow: few-shot adaptation emulated by forward passes of a learned drift.

Kim, Kim & Hong, "HyperFlow", arXiv 2504.15323 (2025). :mod:`.flow` holds the
head-mode drift over a frozen MLP backbone's features (the :class:`HyperFlow`
model, tasks, meta-training); :mod:`.bias` the bias-mode drift that moves every
layer's biases and the head (MLP and 1-D CNN backbones); :mod:`.cost` the time and
memory of an adaptation (compiled program, XLA's memory analysis).
"""

from . import bias, cost, flow
from .cost import best_cost, compiled_cost, cost_per_episode
from .flow import (
    ADAPT_EXAMPLES_PER_CHUNK, INTERPOLATIONS, TRANSFORMS, DriftConfig, HyperFlow, accuracy, adapt_head,
    check_rollout_steps, check_support_set, class_subset, drift, euler, feature_model, features, finetune_full,
    finetune_head, finetune_step, head_logits, head_loss, init_drift, interpolate, interpolated_sample, meta_train,
    mlp_apply, mlp_init, pretrain_backbone, prototype_head, regress_drift, rollout_divergence, run_knots,
    sample_tasks, simulate_trajectories, with_examples_per_chunk,
)

__all__ = [
    "ADAPT_EXAMPLES_PER_CHUNK", "INTERPOLATIONS", "TRANSFORMS", "DriftConfig", "HyperFlow", "accuracy", "adapt_head",
    "best_cost", "bias", "check_rollout_steps", "check_support_set", "class_subset", "compiled_cost", "cost", "cost_per_episode", "drift", "euler", "feature_model", "features",
    "finetune_full", "finetune_head", "finetune_step", "flow", "head_logits", "head_loss", "init_drift", "interpolate",
    "interpolated_sample", "meta_train", "mlp_apply", "mlp_init", "pretrain_backbone", "prototype_head",
    "regress_drift", "rollout_divergence", "run_knots", "sample_tasks", "simulate_trajectories",
    "with_examples_per_chunk",
]
