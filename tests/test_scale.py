"""REPLAY at scale: the binomial plan, memory tiers (device, host, orbax on disk)."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replay
from conftest import max_relative_error, perturbed_meta, tiny_problem
from replay.plan import binomial_plan, kary_plan, simulate


@functools.lru_cache(maxsize=None)
def _optimal_forward_steps(n, c):
    """Fewest advanced blocks to reverse n blocks with c checkpoints (dynamic programming)."""
    if n == 1:
        return 0
    if c == 0:
        return float("inf")
    return min(m + _optimal_forward_steps(n - m, c - 1) + _optimal_forward_steps(m, c) for m in range(1, n))


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 1000), c=st.integers(1, 30), leaf=st.integers(1, 10))
def test_binomial_plan_is_valid_and_within_its_memory(T, c, leaf):
    stats, order = simulate(binomial_plan(T, c, leaf), T, leaf_size=leaf)
    assert order == list(range(T - 1, -1, -1))
    assert stats.peak_live_states <= 2 + c + leaf


def test_binomial_plan_recomputes_the_optimal_number_of_steps():
    for n in range(1, 45):
        for c in range(1, 6):
            stats, _ = simulate(binomial_plan(n, c, 1), n, leaf_size=1)
            assert stats.forward_steps - 1 == _optimal_forward_steps(n, c), (n, c)  # -1: the step that reaches T


@pytest.mark.parametrize("T, k", [(10_000, 4), (10_000, 16), (100_000, 8)])
def test_binomial_recomputes_less_than_the_kary_tree_at_equal_memory(T, k):
    kary, _ = simulate(kary_plan(T, k, k), T, leaf_size=k)
    c = kary.peak_live_states - 2 - k
    binom, _ = simulate(binomial_plan(T, c, k), T, leaf_size=k)
    assert binom.peak_live_states <= kary.peak_live_states
    assert binom.forward_steps - T < 0.8 * (kary.forward_steps - T)


def test_binomial_strategy_is_exact(x64):
    problem = tiny_problem("adamw", "float64", 64)
    meta = perturbed_meta(problem)
    _, ref = problem.value_and_metagrad(meta, strategy=replay.FullUnroll())
    for strategy in (replay.Binomial(checkpoints=3, leaf_size=4), replay.Binomial(checkpoints=1, leaf_size=1),
                     replay.Binomial(memory_budget_bytes=12 * replay.tree_bytes(problem.init_state()), leaf_size=2)):
        _, grad = problem.value_and_metagrad(meta, strategy=strategy)
        assert max_relative_error(ref, grad) < 1e-10, strategy


def test_every_storage_tier_gives_the_same_exact_metagradient(x64, tmp_path):
    problem = tiny_problem("momentum_sgd", "float64", 64)
    meta = perturbed_meta(problem)
    _, ref = problem.value_and_metagrad(meta, strategy=replay.FullUnroll())
    size = replay.tree_bytes(problem.init_state())
    tiers = {
        "device": replay.Storage(),
        "host": replay.Storage(device_bytes=2 * size),
        "disk": replay.Storage(device_bytes=2 * size, host_bytes=1 * size, directory=str(tmp_path / "states")),
    }
    grads = {}
    for name, storage in tiers.items():
        _, grads[name] = problem.value_and_metagrad(meta, strategy=replay.Replay(k=3, storage=storage))
        assert max_relative_error(ref, grads[name]) < 1e-10, name
    for name in ("host", "disk"):  # moving states keeps them bit for bit
        for a, b in zip(jax.tree.leaves(grads["device"]), jax.tree.leaves(grads[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any((tmp_path / "states").iterdir())  # freed states leave nothing on disk


def test_tiered_store_spills_the_state_needed_last():
    store = replay.TieredStore(device_slots=2, host_slots=1, directory=None)
    try:
        for t in (0, 10, 20, 30):
            store[t] = {"w": np.full(3, float(t), np.float32)}
        assert [store.tier_of(t) for t in (0, 10, 20, 30)] == ["disk", "host", "device", "device"]
        assert float(store[0]["w"][0]) == 0.0 and float(store[10]["w"][1]) == 10.0
        del store[0]
        assert len(store) == 3
    finally:
        store.close()
