"""REPLAY compiles a fixed set of programs, whatever the run length: no retracing per step or segment."""

import jax.numpy as jnp

import replay


def _counting_run():
    traces = {"step": 0, "objective": 0}

    def step(state, meta, t):
        traces["step"] += 1  # runs only while tracing
        w = state["w"] - meta["lr"] * (state["w"] - meta["target"]) * jnp.cos(t.astype(state["w"].dtype))
        return {"w": w}

    def objective(state, meta):
        traces["objective"] += 1
        return jnp.sum(state["w"] ** 2)

    return traces, step, objective


def test_traces_do_not_grow_with_num_steps_or_calls():
    traces, step, objective = _counting_run()
    state0 = {"w": jnp.ones(4)}
    meta = {"lr": jnp.float32(0.1), "target": jnp.zeros(4)}
    replay.value_and_metagrad(step, objective, state0, meta, 50, k=4)
    after_first = dict(traces)
    for T in (7, 300, 1001):
        replay.value_and_metagrad(step, objective, state0, meta, T, k=4)
    assert traces == after_first, (after_first, traces)
    # a handful of traces in all: eval_shape checks, advance, leaf (forward + VJP), objective
    assert traces["step"] <= 6 and traces["objective"] <= 3


def test_jit_cache_holds_one_program_per_piece():
    traces, step, objective = _counting_run()
    state0 = {"w": jnp.ones(4)}
    meta = {"lr": jnp.float32(0.1), "target": jnp.zeros(4)}
    before = replay.compiled.cache_sizes()
    for T in (10, 99, 500):
        replay.value_and_metagrad(step, objective, state0, meta, T, k=3)
    after = replay.compiled.cache_sizes()
    assert after["backprop_leaf"] - before["backprop_leaf"] == 1 and after["advance"] - before["advance"] == 1
