"""Online data mixing by Dynamic Gradient Alignment (metagrad.mixing); tiny problems, 2 CPU cores."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metagrad as mg
import replay
from metagrad.data import batch_indices
from metagrad.mixing import (DGA, MixingProblem, alignment_scores, check_simplex, dga_update, exponentiated_gradient,
                             sample_domains)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gaussian_task(n, seed, centers, random_labels=False):
    """3 classes of Gaussian clusters in 6 dimensions around ``centers``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (centers[y] + 0.8 * rng.normal(size=(n, 6))).astype(np.float32)
    if random_labels:
        y = rng.integers(0, 3, n).astype(np.int32)
    return x, y


CENTERS = np.random.default_rng(123).normal(size=(3, 6)) * 1.5


@functools.lru_cache(maxsize=None)
def tiny(ema: float = 0.3, num_steps: int = 200, alignment: str = "dot") -> MixingProblem:
    """Domains: [equal to the target, same inputs with random labels, a shifted task]; 40 target examples."""
    xt, yt = _gaussian_task(40 + 100 + 100, 0, CENTERS)
    target = mg.Dataset(xt[:40], yt[:40], xt[40:140], yt[40:140], xt[140:], yt[140:], num_classes=3, name="target")
    domains = [
        _gaussian_task(200, 1, CENTERS),                                  # equal to the target
        _gaussian_task(200, 2, CENTERS, random_labels=True),              # unrelated labels
        _gaussian_task(200, 3, CENTERS[::-1].copy()),                     # another task
    ]
    return MixingProblem(mg.MLP(hidden=(8,), num_classes=3), optax.adam(1e-2), domains, target,
                         num_steps=num_steps, batch_size=16, seed=0,
                         dga=DGA(step_size=2.0 if alignment == "dot" else 1.0, update_every=10, ema=ema,
                                 alignment=alignment, domain_batch_size=32))


@functools.lru_cache(maxsize=None)
def trained(ema: float = 0.3):
    return jax.block_until_ready(tiny(ema).train())


def test_exponentiated_gradient_is_the_direct_rule():
    rng = np.random.default_rng(0)
    for _ in range(10):
        k = int(rng.integers(2, 9))
        w = rng.dirichlet(np.ones(k))
        a = rng.normal(size=k) * 3
        eta, ema = float(rng.uniform(0, 5)), float(rng.uniform(0, 0.9))
        direct = w * np.exp(eta * a) / np.sum(w * np.exp(eta * a))
        got = np.asarray(exponentiated_gradient(jnp.asarray(w, jnp.float32), jnp.asarray(a, jnp.float32), eta))
        np.testing.assert_allclose(got, direct, rtol=2e-5, atol=1e-7)
        got = np.asarray(dga_update(jnp.asarray(w, jnp.float32), jnp.asarray(a, jnp.float32), eta, ema))
        np.testing.assert_allclose(got, ema * w + (1 - ema) * direct, rtol=2e-5, atol=1e-7)


def test_update_inside_the_step_is_the_rule_on_per_domain_gradients():
    """The vmapped, jitted update at t = R equals EG + EMA on gradients computed domain by domain."""
    p = tiny()
    R = p.dga.update_every
    state = jax.block_until_ready(p.train({}, R))                       # R steps: no update yet
    np.testing.assert_array_equal(np.asarray(state["weights"]), np.full(3, 1 / 3, np.float32))
    new = replay.advance(p.step, state, {}, R, R + 1)                   # update 1, then step R's training

    params, r = state["params"], 1
    key = jax.random.fold_in(jax.random.key(p.seed), 4)
    loss = lambda prm, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(p.logits(prm, x), y))  # noqa: E731
    flat = lambda g: np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(g)])  # noqa: E731
    g_target = flat(jax.grad(loss)(params, jnp.asarray(p.target.x_train), jnp.asarray(p.target.y_train)))
    scores = []
    for i, (x, y) in enumerate(p.domains):                              # a plain Python loop over domains
        idx = np.asarray(batch_indices(jax.random.fold_in(key, i), r, len(y), p.dga.domain_batch_size))
        scores.append(flat(jax.grad(loss)(params, jnp.asarray(x[idx]), jnp.asarray(y[idx]))) @ g_target)
    scores = np.asarray(scores)
    w = np.full(3, 1 / 3)
    eg = w * np.exp(p.dga.step_size * scores) / np.sum(w * np.exp(p.dga.step_size * scores))
    expected = p.dga.ema * w + (1 - p.dga.ema) * eg

    np.testing.assert_allclose(np.asarray(new["alignment"][1]), scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["weights"]), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["trajectory"][1]), np.asarray(new["weights"]))


def test_cosine_alignment_is_scale_free():
    g = {"a": jnp.asarray([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])}
    t = {"a": jnp.asarray([5.0, 0.0])}
    np.testing.assert_allclose(np.asarray(alignment_scores(g, t, "cosine")), [1.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(alignment_scores(g, t, "dot")), [5.0, 0.0, -15.0])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.floats(0, 100), st.floats(0, 0.99), st.floats(0.1, 1e3), st.integers(0, 2**31 - 1))
def test_weights_stay_on_the_simplex(k, step_size, ema, scale, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.dirichlet(np.ones(k)), jnp.float32)
    a = jnp.asarray(rng.normal(size=k) * scale, jnp.float32)
    new = np.asarray(dga_update(w, a, step_size, ema))
    assert np.all(np.isfinite(new)) and np.all(new >= 0) and abs(new.sum() - 1) < 1e-5


def test_run_trajectory_is_on_the_simplex_and_favours_the_domain_equal_to_the_target():
    p, state = tiny(), trained()
    traj = np.asarray(state["trajectory"])
    assert traj.shape == (p.num_rows, 3) == (20, 3)
    for row in traj:
        check_simplex(row, 3)
    final = traj[-1]
    # domain 0 is drawn like the target, domain 1 has the target's inputs with random labels
    assert final[0] > final[1] and final[0] > 0.5 and final[1] < 0.2, final
    assert np.all(np.asarray(state["alignment"])[1:, 0] > np.asarray(state["alignment"])[1:, 1])


def test_sampling_follows_the_weights():
    w = jnp.asarray([0.5, 0.0, 0.3, 0.2])
    for t in range(5):
        d = np.asarray(sample_domains(w, jax.random.fold_in(jax.random.key(0), t), 64))
        counts = np.bincount(d, minlength=4)
        assert counts[1] == 0 and counts.sum() == 64
        assert np.all(np.abs(counts - 64 * np.asarray(w)) < 1.0 + 1e-6), counts


def test_a_dga_run_replays_exactly_and_differentiates_through_its_trajectory():
    p, state = tiny(), trained()
    replayed = p.replay(state["trajectory"])
    for a, b in zip(jax.tree.leaves(replayed["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    value, grad = p.value_and_metagrad(state["trajectory"], k=4)
    assert abs(float(value) - float(p.objective(replayed, None))) < 1e-5
    grad = np.asarray(grad)
    assert grad.shape == (p.num_rows, 3) and np.all(np.isfinite(grad)) and np.any(grad != 0)
    # more weight on the target's twin instead of the random-label domain lowers the target loss
    assert np.sum(grad[:, 0] - grad[:, 1]) < 0


def test_errors_say_what_to_change():
    p = tiny()
    with pytest.raises(ValueError, match="simplex"):
        dataclasses.replace(p, init_weights=[0.5, 0.6, -0.1])
    with pytest.raises(ValueError, match="3 domains"):
        dataclasses.replace(p, init_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="ema"):
        DGA(ema=1.0)
    with pytest.raises(ValueError, match="update_every"):
        DGA(update_every=0)
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(p, batch_size=500)
    with pytest.raises(ValueError, match="trajectory has shape"):
        p.replay(np.full((3, 3), 1 / 3))


def test_reduced_experiment_shows_the_direction_of_effect():
    spec = importlib.util.spec_from_file_location("dga_mixing", os.path.join(ROOT, "experiments", "dga_mixing.py"))
    exp = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dga_mixing", exp)  # its dataclasses look their module up there
    spec.loader.exec_module(exp)
    cfg = dataclasses.replace(exp.Config(), num_steps=600, hidden=(32,), seeds=(0,), domain_size=400, timing_repeats=1)
    result = exp.run(cfg, progress=False, methods=("uniform", "dga_ema"))
    s = result["summary"]
    assert s["dga_ema"]["test_loss"]["mean"] < s["uniform"]["test_loss"]["mean"], s
    final = np.asarray(result["trajectories"]["dga_ema"][0])[-1]
    names = result["domains"]
    assert final[names.index("random labels")] < 1 / len(names) < final[names.index("near-clean")], final
