"""The traversal plan on its own: pure Python, no JAX."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replay
from replay.plan import Advance, Backprop, Free, Objective, kary_plan, simulate, split_points


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 3000), k=st.integers(2, 12), leaf=st.integers(1, 12))
def test_every_vjp_once_in_reverse_order_within_the_live_bound(T, k, leaf):
    stats, order = simulate(kary_plan(T, k, leaf), T, leaf_size=leaf)
    assert order == list(range(T - 1, -1, -1))
    assert stats.leaf_steps == T
    assert stats.peak_live_states <= replay.live_state_bound(T, k, leaf)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(2, 5000), k=st.integers(2, 10))
def test_recomputation_is_about_T_log_k_T(T, k):
    stats, _ = simulate(kary_plan(T, k, 1), T)
    depth = replay.tree_depth(T, k, 1)
    # first forward pass (T) plus at most T (k-1)/k per deeper level
    assert T <= stats.forward_steps <= T + (depth - 1) * T * (k - 1) / k + k
    assert depth <= max(1, int(__import__("math").ceil(__import__("math").log(T, k) + 1e-9)))


@given(start=st.integers(0, 100), n=st.integers(1, 500), parts=st.integers(2, 20))
def test_split_points_are_near_equal(start, n, parts):
    pts = split_points(start, start + n, parts)
    assert pts[0] == start and pts[-1] == start + n
    sizes = [b - a for a, b in zip(pts[:-1], pts[1:])]
    assert len(sizes) == min(parts, n) and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_small_runs_have_the_expected_plan():
    # T < k: one leaf per step at the top level.
    assert list(kary_plan(2, 3, 1)) == [Advance(0, 1), Advance(1, 2), Objective(2), Free(2),
                                         Backprop(1, 2), Free(1), Backprop(0, 1)]
    assert list(kary_plan(1, 8, 8)) == [Advance(0, 1), Objective(1), Free(1), Backprop(0, 1)]


def test_simulate_rejects_a_plan_out_of_order():
    bad = [Advance(0, 2), Objective(2), Free(2), Backprop(0, 1)]
    with pytest.raises(AssertionError):
        simulate(bad, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0, k=2), "num_steps"),
    (dict(num_steps=5, k=1), "k must be"),
    (dict(num_steps=5, k=2, leaf_size=0), "leaf_size"),
])
def test_bad_plan_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        list(kary_plan(**kwargs))


def test_k_from_a_memory_budget_fits_the_budget():
    state_bytes = 1_000_000
    for budget in (20_000_000, 60_000_000, 256 * 2**20):
        k = replay.choose_k(10_000, state_bytes, budget)
        assert replay.live_state_bound(10_000, k, k) * state_bytes <= budget
    # more memory never costs more recomputation
    small, large = replay.choose_k(10_000, state_bytes, 20_000_000), replay.choose_k(10_000, state_bytes, 256 * 2**20)
    s_small, _ = simulate(kary_plan(10_000, small, small), 10_000)
    s_large, _ = simulate(kary_plan(10_000, large, large), 10_000)
    assert s_large.forward_steps <= s_small.forward_steps


def test_too_small_a_budget_says_how_much_is_needed():
    with pytest.raises(replay.MemoryBudgetError, match="raise memory_budget_bytes to at least"):
        replay.choose_k(10_000, 1_000_000, 3_000_000)
