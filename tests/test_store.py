"""metagrad.store.RunStore: the one resumable store (settings checked on reopen, atomic saves, torn-write fallback)."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
from metagrad.mgd import mgd
from metagrad.store import RunStore, SettingsMismatchError, StoreError


def test_settings_are_stored_and_a_rerun_with_other_settings_is_refused(tmp_path):
    store = RunStore(str(tmp_path / "run"), {"lr": 0.1, "steps": 10})
    store.put("part", {"value": np.float32(1.5)})
    assert RunStore(str(tmp_path / "run"), {"steps": 10, "lr": 0.1}).get("part") == {"value": 1.5}
    with pytest.raises(SettingsMismatchError, match=r"other settings \(steps: 10 -> 20\): pass fresh=True") as err:
        RunStore(str(tmp_path / "run"), {"lr": 0.1, "steps": 20})
    assert err.value.changed == ["steps"]
    assert RunStore(str(tmp_path / "run"), {"lr": 0.1, "steps": 20}, fresh=True).get("part") is None
    # settings may change freely while nothing was saved
    RunStore(str(tmp_path / "empty"), {"a": 1})
    RunStore(str(tmp_path / "empty"), {"a": 2})


def test_nested_settings_are_named_by_their_path(tmp_path):
    store = RunStore(str(tmp_path / "run"), {"mgd": {"meta_lr": 0.1, "k": 4}, "seed": 0})
    store.put("part", 1)
    with pytest.raises(SettingsMismatchError, match=r"\(mgd\.meta_lr: 0\.1 -> 0\.2, seed: 0 -> '\(not set\)'\)") as err:
        RunStore(str(tmp_path / "run"), {"mgd": {"meta_lr": 0.2, "k": 4}})
    assert err.value.changed == ["mgd.meta_lr", "seed"]


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("{}")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        RunStore(str(path))


def test_trees_restore_exactly_and_a_torn_latest_falls_back(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7, "n": jnp.int32(3)}
    store.save_tree("state", 1, tree, {"note": "first"})
    store.save_tree("state", 2, {"w": tree["w"] * 2, "n": jnp.int32(4)}, {"note": "second"})
    step, restored, meta = RunStore(str(tmp_path / "run")).restore_tree("state", tree)
    assert step == 2 and meta == {"note": "second"} and int(restored["n"]) == 4
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"] * 2))
    # tear the latest checkpoint: every file of its tree is emptied
    latest = tmp_path / "run" / "trees" / "state" / "2"
    for root, _, files in os.walk(latest):
        for name in files:
            open(os.path.join(root, name), "w").close()
    step, restored, meta = RunStore(str(tmp_path / "run")).restore_tree("state", tree)
    assert step == 1 and meta == {"note": "first"}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))


def test_mgd_resumes_from_its_store_and_refuses_another_runs(tmp_path):
    target = jnp.asarray([1.0, -2.0, 0.5])

    def value_and_grad(meta):
        return jnp.sum((meta["x"] - target) ** 2), {"x": 2 * (meta["x"] - target)}

    meta0 = {"x": jnp.zeros(3)}
    whole = mgd(value_and_grad, meta0, optimizer=optax.sgd(0.1), num_meta_steps=6, progress=False)
    first = mgd(value_and_grad, meta0, optimizer=optax.sgd(0.1), num_meta_steps=3, progress=False,
                store=RunStore(str(tmp_path / "mgd"), {"lr": 0.1}))
    assert first.resumed_from == 0
    resumed = mgd(value_and_grad, meta0, optimizer=optax.sgd(0.1), num_meta_steps=6, progress=False,
                  store=RunStore(str(tmp_path / "mgd"), {"lr": 0.1}))
    assert resumed.resumed_from == 3 and len(resumed.history) == 6
    np.testing.assert_array_equal(np.asarray(resumed.meta["x"]), np.asarray(whole.meta["x"]))
    with pytest.raises(SettingsMismatchError, match="lr: 0.1 -> 0.2"):
        RunStore(str(tmp_path / "mgd"), {"lr": 0.2})


def test_mgd_takes_any_problem():
    problem = mg.FunctionProblem(
        step=lambda s, m, t: {"w": s["w"] - 0.1 * (s["w"] - m["target"])},
        objective=lambda s, m: jnp.sum((s["w"] - 1.0) ** 2),
        init_state_value={"w": jnp.zeros(2)}, meta={"target": jnp.zeros(2)}, num_steps=5,
        project=lambda m: {"target": jnp.clip(m["target"], -3.0, 3.0)})
    mg.check_problem(problem)
    assert isinstance(problem, mg.Problem)
    result = mgd(problem, optimizer=optax.sgd(2.0), num_meta_steps=20, progress=False, metagrad_options={"k": 2})
    assert result.history[-1]["objective"] < 0.25 * result.history[0]["objective"]
    assert float(jnp.max(result.meta["target"])) <= 3.0
    with pytest.raises(TypeError, match="not a metagrad Problem: it lacks"):
        mg.check_problem(object())
