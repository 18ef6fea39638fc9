"""Interactive training without the server: commands, branches, exact replay of the log, metagradients."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pydantic")

from metagrad.interactive import (CommandError, ReplayMismatch, Trainer, build_problem, fingerprint,  # noqa: E402
                                  intervention_metagradients, read_log, replay_log)

SPEC = {"dataset": {"name": "blobs", "num_examples": 300}, "model": {"name": "mlp", "hidden": [12]},
        "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 0.05, "momentum": 0.9}},
        "num_steps": 60, "batch_size": 16, "seed": 0}


def spec(**changes):
    s = copy.deepcopy(SPEC)
    s.update(changes)
    return s


def drive(trainer: Trainer, script, until=None):
    """Apply ``(step, payload)`` pairs, each before its step, then run to the end or stop at step ``until``
    (what the background thread does, in order)."""
    if until is not None:
        script = list(script) + [(until, {"command": "stop"})]
    records = []
    for step, payload in script:
        while trainer.t < step:
            assert trainer.step_once()
        records.append(trainer.submit(payload))
        trainer.apply_pending_commands()
    while trainer.t < trainer.num_steps and not trainer.stopped:
        if not trainer.step_once():
            break
    trainer.finish()
    return [trainer.command_record(r["id"]) for r in records]


def test_commands_branches_and_bitwise_replay(tmp_path):
    log = str(tmp_path / "run.jsonl")
    tr = Trainer(build_problem(SPEC), spec=SPEC, log_path=log, checkpoint_dir=str(tmp_path / "ckpt"), eval_every=20)
    x_new = np.random.default_rng(1).normal(size=(8, 8)).round(3).tolist()
    records = drive(tr, [
        (5, {"command": "set_hyperparams", "values": {"learning_rate": 0.1, "momentum": 0.8}}),
        (10, {"command": "save_checkpoint"}),
        (12, {"command": "freeze_layer", "layer": "Dense_0"}),
        (15, {"command": "reset_layer", "layer": "Dense_1", "seed": 3}),
        (18, {"command": "append_data", "x": x_new, "y": [0, 1, 2, 3, 0, 1, 2, 3], "source": "pushed"}),
        (20, {"command": "set_mixture", "weights": {"base": 0.75, "pushed": 0.25}}),
        (25, {"command": "evaluate"}),
        (30, {"command": "load_checkpoint", "checkpoint": "ckpt-1"}),
        (14, {"command": "set_hyperparams", "values": {"learning_rate": 0.02}}),
        (20, {"command": "load_checkpoint", "checkpoint": "nope"}),
    ])
    assert [r["status"] for r in records] == ["succeeded"] * 9 + ["failed"]
    assert "no checkpoint 'nope'" in records[-1]["reason"]
    # loading forks branch 1 at the checkpoint's step; the checkpoint kept the LR it was saved with
    assert tr.branches[1] == {"id": 1, "parent": 0, "fork_step": 10, "checkpoint": "ckpt-1", "name": None}
    assert tr.branch == 1 and tr.t == SPEC["num_steps"]
    assert tr.hyperparams()["learning_rate"] == pytest.approx(0.02)
    assert tr.frozen["Dense_0"] is False  # the checkpoint was saved before the freeze
    assert tr.dataset_info()["num_train"] == 210 + 8  # data pushes persist across branches
    assert os.path.isdir(tmp_path / "ckpt" / "trees" / "ckpt-1")  # saved in the run's store

    header, interventions, end = read_log(log)
    assert header["spec"] == SPEC
    assert [(r["command"], r["step"], r["branch"]) for r in interventions][-2:] == [
        ("load_checkpoint", 30, 0), ("set_hyperparams", 14, 1)]
    assert end["fingerprint"] == fingerprint(tr.state)

    result = replay_log(log)
    assert result.matches is True
    assert result.trainer.t == tr.t and result.trainer.branch == 1
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(s)) for s in (tr.state, result.trainer.state))):
        np.testing.assert_array_equal(a, b)


def test_freeze_keeps_layer_and_reset_reinitializes():
    tr = Trainer(build_problem(SPEC), eval_every=0)
    for _ in range(3):
        tr.step_once()
    tr.submit({"command": "freeze_layer", "layer": "Dense_0"})
    tr.apply_pending_commands()
    before = np.asarray(tr.state["params"]["Dense_0"]["kernel"]).copy()
    other = np.asarray(tr.state["params"]["Dense_1"]["kernel"]).copy()
    for _ in range(3):
        tr.step_once()
    np.testing.assert_array_equal(before, tr.state["params"]["Dense_0"]["kernel"])
    assert not np.array_equal(other, tr.state["params"]["Dense_1"]["kernel"])
    trained = np.asarray(tr.state["params"]["Dense_1"]["kernel"]).copy()
    tr.submit({"command": "reset_layer", "layer": "Dense_1", "seed": 0})
    tr.apply_pending_commands()
    assert not np.array_equal(trained, tr.state["params"]["Dense_1"]["kernel"])
    # the reset layer's optimizer state (momentum) starts afresh too; the other layer's is kept
    trace = tr.state["opt_state"].inner_state[0].trace
    assert float(np.abs(np.asarray(trace["Dense_1"]["kernel"])).max()) == 0.0
    assert float(np.abs(np.asarray(trace["Dense_0"]["kernel"])).max()) > 0.0


@pytest.mark.parametrize("payload, message", [
    ({"command": "set_hyperparams", "values": {"lr": 0.1}}, "unknown hyperparameter(s) ['lr']"),
    ({"command": "set_hyperparams", "values": {"learning_rate": float("nan")}}, "must be finite"),
    ({"command": "freeze_layer", "layer": "Dense_9"}, "unknown layer 'Dense_9'"),
    ({"command": "append_data", "x": [[0.0] * 3], "y": [0]}, "each input must have 8 values"),
    ({"command": "append_data", "x": [[0.0] * 8], "y": [7]}, "labels must be in [0, 4)"),
    ({"command": "append_data", "x": [[0.0] * 8, [1.0] * 8], "y": [1]}, "give one label per input"),
    ({"command": "set_mixture", "weights": {"web": 1.0}}, "unknown data source(s) ['web']"),
    ({"command": "set_mixture", "weights": {"base": 0.0}}, "must not all be zero"),
    ({"command": "suggest_lr", "window": 0}, "window"),
    ({"command": "launch_missiles"}, "does not match any of the expected tags"),
    ({"values": {"learning_rate": 0.1}}, "command"),
    ("pause", "invalid command"),
])
def test_bad_commands_are_rejected_with_a_reason(payload, message):
    tr = Trainer(build_problem(SPEC), eval_every=0)
    before = fingerprint(tr.state)
    with pytest.raises(CommandError) as err:
        tr.submit(payload)
    assert message in str(err.value)
    assert fingerprint(tr.state) == before and tr.log.interventions() == []


def test_divergence_pauses_at_last_finite_state_and_a_checkpoint_rescues(tmp_path):
    log = str(tmp_path / "div.jsonl")
    tr = Trainer(build_problem(SPEC), spec=SPEC, log_path=log, eval_every=0)
    tr.submit({"command": "save_checkpoint", "name": "start"})
    tr.submit({"command": "set_hyperparams", "values": {"learning_rate": 10.0}})
    tr.apply_pending_commands()
    steps = 0
    while tr.step_once():
        steps += 1
        assert steps < 60, "the run was expected to diverge"
    assert tr.status == "diverged" and tr.paused
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(tr.state["params"]))
    t_div = tr.t
    assert t_div > 0
    tr.submit({"command": "load_checkpoint", "checkpoint": "start"})  # forks branch 1 at step 0, LR 0.05
    tr.submit({"command": "resume"})
    tr.apply_pending_commands()
    assert tr.status == "running" and tr.branch == 1 and tr.t == 0
    while tr.t < tr.num_steps:
        assert tr.step_once()
    tr.finish()
    assert np.isfinite(tr.evaluate()["val_loss"])
    assert replay_log(log).matches is True


def test_intervention_metagradients_match_finite_differences(tmp_path):
    log = str(tmp_path / "lr.jsonl")
    tr = Trainer(build_problem(SPEC), spec=SPEC, log_path=log, eval_every=0)
    drive(tr, [(10, {"command": "set_hyperparams", "values": {"learning_rate": 0.08}}),
               (15, {"command": "save_checkpoint", "name": "a"}),
               (25, {"command": "set_hyperparams", "values": {"learning_rate": 0.03}}),
               (30, {"command": "load_checkpoint", "checkpoint": "a"}),
               (20, {"command": "set_hyperparams", "values": {"learning_rate": 0.02}})], until=40)
    val = tr.evaluate()["val_loss"]
    m = intervention_metagradients(log, k=3)
    assert m["num_steps"] == 40
    assert m["val_loss"] == pytest.approx(val, rel=1e-5)
    rows = {r["seq"]: r for r in m["interventions"]}
    # history of the final state: initial LR (steps 0-9), seq 1 (10-19; its steps after the fork point are on the
    # abandoned branch), seq 5 (20-39); seq 3 was on the abandoned branch only
    assert {seq: r["num_steps"] for seq, r in rows.items()} == {0: 10, 1: 10, 5: 20}
    for seq in (1, 5):
        lr = rows[seq]["lr"]
        eps = 0.002 * lr  # the validation loss is far from linear in the LR beyond ~1%
        vals = []
        for sign in (1, -1):
            r = replay_log(log, overrides={seq: {"values": {"learning_rate": lr + sign * eps}}})
            vals.append(r.trainer.evaluate()["val_loss"])
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert rows[seq]["dval_dlr"] == pytest.approx(fd, rel=0.05, abs=2e-3)


def test_metagradient_refuses_histories_with_a_reset(tmp_path):
    log = str(tmp_path / "reset.jsonl")
    drive(Trainer(build_problem(SPEC), spec=SPEC, log_path=log, eval_every=0),
          [(5, {"command": "reset_layer", "layer": "Dense_0"})], until=20)
    with pytest.raises(ValueError, match="layer reset or a data change before step 5"):
        intervention_metagradients(log)


def test_replay_detects_a_different_problem(tmp_path):
    log = str(tmp_path / "run.jsonl")
    drive(Trainer(build_problem(SPEC), spec=SPEC, log_path=log, eval_every=0), [], until=10)
    with pytest.raises(ReplayMismatch, match="initial state differs"):
        replay_log(log, build_problem(spec(seed=1)))


def test_suggest_lr_reports_a_direction_that_lowers_the_window_loss():
    tr = Trainer(build_problem(SPEC), eval_every=0)
    tr.submit({"command": "set_hyperparams", "values": {"learning_rate": 0.002}})
    tr.apply_pending_commands()
    for _ in range(5):
        tr.step_once()
    rec = tr.submit({"command": "suggest_lr", "window": 40})
    fp = fingerprint(tr.state)
    tr.apply_pending_commands()
    out = tr.command_record(rec["id"])
    assert out["status"] == "succeeded", out["reason"]
    r = out["result"]
    assert r["direction"] == "increase" and r["dval_dlr"] < 0 and r["suggested_lr"] > r["lr"]
    assert r["val_loss_at_suggested"] < r["val_loss"]
    assert fingerprint(tr.state) == fp and tr.t == 5  # a suggestion changes nothing


def test_background_thread_applies_commands_between_steps(tmp_path):
    tr = Trainer(build_problem(SPEC), eval_every=10, min_step_seconds=0.02).start()
    try:
        rec = tr.submit({"command": "set_hyperparams", "values": {"learning_rate": 0.125}})
        deadline = time.monotonic() + 30
        while tr.command_record(rec["id"])["status"] in ("requested", "running") and time.monotonic() < deadline:
            time.sleep(0.01)
        done = tr.command_record(rec["id"])
        assert done["status"] == "succeeded"
        while not any(m["step"] >= done["step"] for m in list(tr.metrics)) and time.monotonic() < deadline:
            time.sleep(0.01)  # the step after the command
        lrs = [m["lr"] for m in list(tr.metrics) if m["step"] >= done["step"]]
        assert lrs and all(lr == pytest.approx(0.125) for lr in lrs)
        assert all(m["lr"] == pytest.approx(0.05) for m in list(tr.metrics) if m["step"] < done["step"])
        tr.submit({"command": "pause"})
        while tr.status != "paused" and time.monotonic() < deadline:
            time.sleep(0.01)
        t = tr.t
        time.sleep(0.3)
        assert tr.t == t and tr.status == "paused"
    finally:
        tr.request_stop()
        tr.join(10)
    assert not tr.alive and tr.status == "stopped" and tr.error is None


def test_replay_log_cli_reproduces_a_run_in_a_fresh_process(tmp_path):
    log = str(tmp_path / "cli.jsonl")
    drive(Trainer(build_problem(SPEC), spec=SPEC, log_path=log, eval_every=0),
          [(7, {"command": "set_hyperparams", "values": {"learning_rate": 0.09}}),
           (9, {"command": "save_checkpoint"}), (20, {"command": "load_checkpoint", "checkpoint": "ckpt-1"})], until=25)
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, "-m", "metagrad.interactive.cli", "replay-log", log, "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches the logged run bitwise" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["matches"] is True and payload["branch"] == 1

    # a tampered log is reported as different, with exit status 1
    lines = open(log).read().splitlines()
    lines = [ln.replace('"learning_rate": 0.09', '"learning_rate": 0.091') for ln in lines]
    bad = tmp_path / "tampered.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "metagrad.interactive.cli", "replay-log", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DIFFERS" in proc.stdout
