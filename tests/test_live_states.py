"""The live-state bound holds in the real traversal (the executor instrumented), not only in the plan."""

import pytest

import replay
from conftest import perturbed_meta, tiny_problem


@pytest.mark.parametrize("T, k, leaf", [(300, 2, 1), (300, 3, 3), (300, 8, 8), (7, 8, 8), (64, 3, 1)])
def test_executor_never_holds_more_than_the_bound(T, k, leaf):
    problem = tiny_problem("momentum_sgd", "float32", T)
    meta = perturbed_meta(problem)
    live = []
    plan = replay.kary_plan(T, k, leaf)
    value, grad_meta, _ = replay.execute(plan, leaf, problem.step, problem.objective, problem.init_state(), meta, T,
                                         monitor=lambda op, n: live.append(n))
    bound = replay.live_state_bound(T, k, leaf)
    assert max(live) <= bound
    expected, _ = replay.simulate(replay.kary_plan(T, k, leaf), T, leaf_size=leaf)
    assert max(live) == expected.peak_live_states
    # the instrumented run is the real one: same value as the plain call
    ref_value, _ = problem.value_and_metagrad(meta, strategy=replay.Replay(k=k, leaf_size=leaf))
    assert float(value) == float(ref_value)


def test_live_states_grow_logarithmically():
    peaks = [replay.simulate(replay.kary_plan(T, 4, 4), T, leaf_size=4)[0].peak_live_states for T in (10**2, 10**3, 10**4, 10**5)]
    assert peaks == sorted(peaks) and peaks[-1] <= 4 * 8 + 5  # ~ (k-1) log_k T, far below T
