"""Interactive training where it used to break, each case against the real server on 127.0.0.1: non-finite
numbers (D1), a long command with the WebSocket connected (D2), the rule agent on the README's own command
(D3), reruns into the same folder (D4), harmful values and finite blow-ups (D5), checkpoint names (D7), Host,
Origin and the token in URLs (D8), SIGTERM (D9) and checkpoints held in memory (D10)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from metagrad.interactive import (AgentRunner, CommandError, RuleAgent, Trainer, build_problem,  # noqa: E402
                                  fingerprint, read_log, replay_log)
from conftest import wait_command  # noqa: E402
from metagrad.interactive.agents import wait_until  # noqa: E402
from metagrad.interactive.commands import parse_command  # noqa: E402
from metagrad.interactive.problems import BUILTIN_SPEC  # noqa: E402
from metagrad.interactive.server import cookie_name  # noqa: E402
from metagrad.interactive.trainer import MAX_MEMORY_CHECKPOINTS  # noqa: E402

SPEC = {"dataset": {"name": "blobs", "num_examples": 300}, "model": {"name": "mlp", "hidden": [12]},
        "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 0.05, "momentum": 0.9}},
        "num_steps": 60, "batch_size": 16, "seed": 0}


def strict_json(text: str):
    """Parse as a browser would: ``NaN`` and ``Infinity`` are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def ws_url(server, **query):
    return server.base_url.replace("http://", "ws://") + "/ws?" + "&".join(f"{k}={v}" for k, v in query.items())


def test_d1_non_finite_numbers_travel_as_null(serve, tmp_path):
    # a user's validation set with one absurd (finite) input: it overflows, every evaluation is non-finite, and
    # the API must keep answering
    problem = build_problem(SPEC)
    x_val = np.array(problem.data.x_val)
    x_val[0] = 3e38
    problem = dataclasses.replace(problem, data=dataclasses.replace(problem.data, x_val=x_val))
    trainer = Trainer(problem, log_path=str(tmp_path / "log.jsonl"), eval_every=5, start_paused=True).start()
    server, client = serve(trainer)
    rec = wait_command(client, client.post("/api/commands", json={"command": "evaluate"}).json()["id"])
    assert rec["status"] == "succeeded" and rec["result"]["val_loss"] is None
    wait_command(client, client.post("/api/commands", json={"command": "resume"}).json()["id"])
    assert wait_until(lambda: len(trainer.evals) >= 2, 30)
    assert not np.isfinite(trainer.last_eval["val_loss"])  # the run itself holds the NaN ...
    for path in ("/api/run", "/api/metrics", "/api/commands", "/api/events", "/api/log", "/api/checkpoints"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:200])
        strict_json(r.text)  # ... and every answer is strict JSON
    assert strict_json(client.get("/api/run").text)["last_eval"]["val_loss"] is None
    from websockets.sync.client import connect

    with connect(ws_url(server, token=server.token, since=0), open_timeout=10) as ws:
        hello = strict_json(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["run"]["last_eval"]["val_loss"] is None
        events = strict_json(ws.recv(timeout=10))["events"]
        assert any(e["type"] == "eval" and e["val_loss"] is None for e in events)
    trainer.request_stop()
    trainer.join(10)
    with open(tmp_path / "log.jsonl") as f:
        for line in f:
            strict_json(line)


def test_d2_a_long_command_stalls_no_request_and_not_the_websocket(serve):
    trainer = Trainer(build_problem(SPEC), eval_every=0, start_paused=True).start()
    server, client = serve(trainer)
    from websockets.sync.client import connect

    with connect(ws_url(server, token=server.token), open_timeout=10) as ws:  # the dashboard's connection
        strict_json(ws.recv(timeout=10))
        command = client.post("/api/commands", json={"command": "suggest_lr", "window": 2000}).json()
        assert wait_until(lambda: client.get(f"/api/commands/{command['id']}").json()["status"] == "running", 30)
        slowest, checked = 0.0, 0
        while client.get(f"/api/commands/{command['id']}").json()["status"] == "running" and checked < 20:
            for path in ("/static/app.js", "/api/run", "/api/metrics", "/openapi.json"):
                tic = time.perf_counter()
                assert client.get(path).status_code == 200
                slowest = max(slowest, time.perf_counter() - tic)
            ws.send(json.dumps({"type": "command", "ref": checked, "command": {"command": "pause"}}))
            tic = time.perf_counter()
            while True:  # the WebSocket answers the command at once, while suggest_lr is still computing
                msg = strict_json(ws.recv(timeout=5))
                if msg.get("ref") == checked:
                    break
            slowest = max(slowest, time.perf_counter() - tic)
            checked += 1
        assert checked >= 2, "suggest_lr finished before the requests could be timed: make its window longer"
        assert slowest < 1.0, slowest
    assert wait_command(client, command["id"], 120)["status"] == "succeeded"


def test_d3_the_rule_agent_rescues_the_readme_command_on_mnist1d(serve):
    """``metagrad interactive --agent rules --lr 1.0``: at LR 1.0 the MLP stays at chance without diverging."""
    spec = copy.deepcopy(BUILTIN_SPEC)
    spec["optimizer"]["hyperparams"]["learning_rate"] = 1.0
    spec["num_steps"] = 1200  # of the command's 3,000: the rescue is over by step ~300
    # as the command runs it: --step-delay 0.01, --agent-every 20
    trainer = Trainer(build_problem(spec), spec=spec, eval_every=50, min_step_seconds=0.01, start_paused=True).start()
    server, client = serve(trainer)
    agent = AgentRunner(server.base_url, server.token, RuleAgent(), every=20).start()
    try:
        time.sleep(0.5)
        client.post("/api/commands", json={"command": "resume"})
        assert wait_until(lambda: trainer.status in ("finished", "stopped", "error"), 300), trainer.status
    finally:
        agent.stop()
    final = trainer.evaluate()
    acted = [d for d in agent.decisions if d[1] != "Same"]
    assert any(d[1] == "Restart" for d in acted), agent.decisions[-10:]
    assert not agent.errors, agent.errors
    assert trainer.hyperparams()["learning_rate"] < 1.0
    # at LR 1.0 untouched the validation accuracy stays at chance (0.10 measured); the default LR reaches 0.56
    assert final["val_accuracy"] > 0.35, (final, acted)


def test_d4_d9_a_rerun_never_overwrites_and_sigterm_writes_the_end_record(tmp_path):
    out = str(tmp_path / "run")
    base = [sys.executable, "-m", "metagrad.cli", "interactive", "--dataset", "blobs", "--hidden", "8", "--port", "0",
            "--eval-every", "0", "--out", out]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run(base + ["--num-steps", "20", "--step-delay", "0", "--exit-when-done"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(os.path.join(out, "interventions.jsonl")) as f:
        first_log = f.read()
    assert read_log(os.path.join(out, "interventions.jsonl"))[2] is not None
    # the second run with the same --out goes to a new folder, and a SIGTERM ends it with its end record
    proc = subprocess.Popen(base + ["--num-steps", "100000", "--step-delay", "0.01"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("intervention log:") or not line:
                break
        assert any("holds an earlier run" in ln and f"{out}-2" in ln for ln in lines), lines
        second_log = os.path.join(f"{out}-2", "interventions.jsonl")
        assert wait_until(lambda: os.path.exists(second_log), 60)
        time.sleep(2.0)  # some steps
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopping (SIGTERM)" in stdout
    with open(os.path.join(out, "interventions.jsonl")) as f:
        assert f.read() == first_log  # the earlier run's log is whole
    header, interventions, end = read_log(second_log)
    assert end is not None and end["step"] > 0
    with open(os.path.join(f"{out}-2", "metrics.jsonl")) as f:  # every step's metrics, on disk
        assert sum(json.loads(line)["kind"] == "metrics" for line in f) == end["step"]
    assert replay_log(second_log).matches is True


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": -0.05}, "must be in (0, 10]"),
    ({"learning_rate": 1e6}, "must be in (0, 10]"),
    ({"learning_rate": True}, "must be a number"),
    ({"momentum": 1.5}, "must be in [0, 1)"),
], ids=["negative-lr", "huge-lr", "bool-lr", "momentum-above-one"])
def test_d5_harmful_hyperparameters_are_refused(serve, values, message):
    trainer = Trainer(build_problem(SPEC), eval_every=0, start_paused=True).start()
    server, client = serve(trainer)
    r = client.post("/api/commands", json={"command": "set_hyperparams", "values": values})
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert trainer.hyperparams()["learning_rate"] == pytest.approx(0.05) and trainer.log.interventions() == []


def test_d5_a_finite_blow_up_is_caught_like_a_nan():
    trainer = Trainer(build_problem(SPEC), eval_every=0)
    for _ in range(10):
        assert trainer.step_once()
    # examples a thousand thousand times the data's scale, and all the weight on them: the loss stays finite
    big = (np.full((16, 8), 1e6) * np.random.default_rng(0).choice([-1, 1], (16, 8))).tolist()
    for payload in ({"command": "append_data", "x": big, "y": [0] * 16, "source": "huge"},
                    {"command": "set_mixture", "weights": {"base": 0.5, "huge": 0.5}}):
        trainer.apply(parse_command(payload))
    for _ in range(40):  # until a batch holds one of them
        before, t = fingerprint(trainer.state), trainer.t
        if not trainer.step_once():
            break
    assert trainer.status == "diverged" and "times its recent median" in trainer.message, trainer.message
    assert np.isfinite(trainer.metrics[-1]["train_loss"])
    assert fingerprint(trainer.state) == before and trainer.t == t  # the blown-up step was not committed


@pytest.mark.parametrize("payload", [{"command": "save_checkpoint", "name": "."},
                                     {"command": "save_checkpoint", "name": ".."},
                                     {"command": "load_checkpoint", "checkpoint": ".."}], ids=["dot", "dotdot", "load"])
def test_d7_dot_names_are_refused(serve, payload):
    trainer = Trainer(build_problem(SPEC), eval_every=0, start_paused=True).start()
    server, client = serve(trainer)
    r = client.post("/api/commands", json=payload)
    assert r.status_code == 422 and "only dots" in r.json()["detail"], r.text


def test_d8_host_origin_and_the_token_out_of_urls(serve):
    trainer = Trainer(build_problem(SPEC), eval_every=0, start_paused=True).start()
    server, client = serve(trainer)
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example
    r = client.get("/api/run", headers={"Host": "evil.example"})
    assert r.status_code == 403 and "not this server's address" in r.json()["detail"]
    assert client.get("/api/run", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    r = client.post("/api/commands", json={"command": "stop"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and not trainer.stopped
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        with connect(ws_url(server, token=server.token), origin="http://evil.example", open_timeout=10):
            pass
    with connect(ws_url(server, token=server.token), origin=f"http://127.0.0.1:{server.port}", open_timeout=10) as ws:
        assert strict_json(ws.recv(timeout=10))["type"] == "hello"
    # the printed link's token becomes an HttpOnly session cookie; with it alone, the API answers
    page = httpx.get(server.dashboard_url)
    assert page.status_code == 200 and server.token not in page.text
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(server.port)}=") and "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    jar = {cookie_name(server.port): server.token}
    assert httpx.get(server.base_url + "/api/run", cookies=jar).status_code == 200
    assert httpx.get(server.base_url + "/api/run", cookies={cookie_name(server.port): "wrong"}).status_code == 401
    assert trainer.log.interventions() == []


def test_d10_checkpoints_in_memory_are_bounded():
    trainer = Trainer(build_problem(SPEC), eval_every=0)
    for i in range(MAX_MEMORY_CHECKPOINTS):
        trainer.apply(parse_command({"command": "save_checkpoint", "name": f"c{i}"}))
    with pytest.raises(CommandError, match="checkpoint_dir"):
        trainer.apply(parse_command({"command": "save_checkpoint", "name": "one-more"}))
    assert len(trainer.checkpoints) == MAX_MEMORY_CHECKPOINTS


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples")


def test_any_flax_model_is_steered_and_replays_bitwise(tmp_path, monkeypatch):
    """The README's user problem (BatchNorm + dropout CNN, AdamW) under commands, then replayed from its log."""
    monkeypatch.syspath_prepend(EXAMPLE)
    spec = {"problem": "my_problem:problem", "num_steps": 40}
    log = str(tmp_path / "user.jsonl")
    trainer = Trainer(build_problem(spec), spec=spec, log_path=log, eval_every=10)
    assert "model_state" in trainer.state  # BatchNorm statistics travel with the state
    stats0 = fingerprint(trainer.state["model_state"])
    script = {5: {"command": "set_hyperparams", "values": {"learning_rate": 1e-3, "weight_decay": 0.0}},
              10: {"command": "save_checkpoint", "name": "ten"}, 20: {"command": "load_checkpoint", "checkpoint": "ten"},
              25: {"command": "freeze_layer", "layer": "Conv_0"}}
    while trainer.t < trainer.num_steps and not (trainer.branch == 1 and trainer.t >= 30):
        if trainer.branch == 0 and trainer.t in script or trainer.branch == 1 and trainer.t == 25:
            trainer.submit(script[trainer.t])
            trainer.apply_pending_commands()
        assert trainer.step_once()
    trainer.finish()
    assert fingerprint(trainer.state["model_state"]) != stats0  # the statistics were updated by training
    assert trainer.branch == 1 and np.isfinite(trainer.evaluate()["val_loss"])
    assert replay_log(log).matches is True


def test_cli_problem_reference_is_checked_before_anything_starts(tmp_path, monkeypatch):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=EXAMPLE)
    base = [sys.executable, "-m", "metagrad.cli", "interactive", "--port", "0", "--out", str(tmp_path / "run")]
    bad = subprocess.run(base + ["--problem", "my_problem:nothing"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "has no function 'nothing'" in bad.stderr and "Traceback" not in bad.stderr
    mixed = subprocess.run(base + ["--problem", "my_problem:problem", "--lr", "0.1"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert mixed.returncode == 2 and "set them in your problem's function" in mixed.stderr
    assert not os.path.exists(tmp_path / "run")
    ok = subprocess.run(base + ["--problem", "my_problem:problem", "--num-steps", "15", "--step-delay", "0",
                                "--exit-when-done"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    log = str(tmp_path / "run" / "interventions.jsonl")
    assert read_log(log)[0]["spec"] == {"problem": "my_problem:problem", "num_steps": 15}
    monkeypatch.syspath_prepend(EXAMPLE)
    assert replay_log(log).matches is True  # rebuilt from the spec alone


def _mixing_problem():
    """DGA's problem (arXiv 2410.02498): three domains, one target, AdamW with its LR injected."""
    import metagrad as mg
    import optax
    from metagrad.mixing import DGA, MixingProblem

    rng = np.random.default_rng(5)
    centers = rng.normal(size=(3, 6)) * 1.5

    def task(n, labels_random=False):
        y = rng.integers(0, 3, n).astype(np.int32)
        x = (centers[y] + 0.8 * rng.normal(size=(n, 6))).astype(np.float32)
        return x, (rng.integers(0, 3, n).astype(np.int32) if labels_random else y)

    xt, yt = task(240)
    target = mg.Dataset(xt[:40], yt[:40], xt[40:140], yt[40:140], xt[140:], yt[140:], num_classes=3, name="target")
    domains = [task(200), task(200, labels_random=True), task(200)]
    return MixingProblem(mg.MLP(hidden=(8,), num_classes=3), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
                         domains, target, num_steps=60, batch_size=16, seed=0,
                         dga=DGA(step_size=2.0, update_every=10, ema=0.3, domain_batch_size=32))


def test_the_dga_mixing_problem_is_steered_and_replays_bitwise(serve, tmp_path):
    """Any metagrad.Problem: here DGA's, whose state carries the domain weights beside params and optimizer."""
    problem = _mixing_problem()
    log = str(tmp_path / "mixing.jsonl")
    trainer = Trainer(problem, log_path=log, checkpoint_dir=str(tmp_path / "ckpt"), eval_every=10,
                      min_step_seconds=0.05, start_paused=True).start()
    server, client = serve(trainer)
    assert client.get("/api/optimizer").json()["settable"] == ["b1", "b2", "eps", "eps_root", "learning_rate",
                                                               "weight_decay"]
    r = client.post("/api/commands", json={"command": "freeze_layer", "layer": "Dense_0"})
    assert r.status_code == 422 and "needs a metagrad.TrainingProblem" in r.json()["detail"]
    for payload in ({"command": "set_hyperparams", "values": {"learning_rate": 5e-3}}, {"command": "resume"}):
        assert wait_command(client, client.post("/api/commands", json=payload).json()["id"])["status"] == "succeeded"
    assert wait_until(lambda: trainer.t >= 20, 60)
    saved = wait_command(client, client.post("/api/commands", json={"command": "save_checkpoint", "name": "w"}).json()["id"])
    assert saved["status"] == "succeeded"
    assert wait_until(lambda: trainer.t >= saved["result"]["checkpoint"]["step"] + 5, 60)
    loaded = client.post("/api/commands", json={"command": "load_checkpoint", "checkpoint": "w"}).json()
    assert wait_command(client, loaded["id"])["status"] == "succeeded"
    assert wait_until(lambda: trainer.status == "finished", 120), trainer.status
    evals = strict_json(client.get("/api/metrics").text)["evals"]
    assert evals and {"val_loss", "val_accuracy", "test_loss"} <= set(evals[-1])
    assert strict_json(client.get("/api/metrics").text)["metrics"][-1]["train_loss"] is None  # no loss of its own
    trainer.request_stop()
    trainer.join(10)
    assert float(np.sum(trainer.state["weights"])) == pytest.approx(1.0, rel=1e-5)  # the domain weights moved along
    assert replay_log(log, problem).matches is True


def test_a_bare_step_and_objective_are_steered(tmp_path):
    """The README's few lines: your own pure step/objective as a metagrad.FunctionProblem, under the trainer."""
    import jax
    import jax.numpy as jnp
    import metagrad as mg
    import optax

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)), jnp.float32)
    y = x @ jnp.asarray([1.0, -2.0, 0.5])
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)

    def loss(w, rows):
        return jnp.mean((x[rows] @ w - y[rows]) ** 2)

    def step(state, meta, t):
        rows = (t * 8 + jnp.arange(8)) % 64  # the batch of step t: a function of t only
        grads = jax.grad(loss)(state["params"], rows)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

    w0 = jnp.zeros(3)
    problem = mg.FunctionProblem(step, lambda state, meta: loss(state["params"], jnp.arange(64)),
                                 {"params": w0, "opt_state": optimizer.init(w0)}, meta={}, num_steps=40,
                                 evaluate_fn=lambda state: {"val_loss": loss(state["params"], jnp.arange(64))})
    log = str(tmp_path / "fn.jsonl")
    trainer = Trainer(problem, log_path=log, eval_every=0)
    for _ in range(10):
        assert trainer.step_once()
    trainer.apply(parse_command({"command": "set_hyperparams", "values": {"learning_rate": 0.1}}))
    while trainer.t < trainer.num_steps:
        assert trainer.step_once()
    trainer.finish()
    assert trainer.evaluate()["val_loss"] < 1e-3
    assert trainer.metrics[-1]["lr"] == pytest.approx(0.1)
    assert replay_log(log, problem).matches is True


def test_an_optax_chain_with_injected_hyperparameters_is_steered(tmp_path):
    """clip + AdamW, the researcher's daily chain: the injected state sits inside the chain's tuple."""
    import dataclasses as dc

    import optax

    base = build_problem(SPEC)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
    problem = dc.replace(base, optimizer=chain)
    log = str(tmp_path / "chain.jsonl")
    trainer = Trainer(problem, log_path=log, eval_every=0)
    assert trainer.hyperparams()["learning_rate"] == pytest.approx(1e-2)
    for _ in range(5):
        assert trainer.step_once()
    trainer.apply(parse_command({"command": "set_hyperparams", "values": {"learning_rate": 3e-3}}))
    assert trainer.step_once() and trainer.metrics[-1]["lr"] == pytest.approx(3e-3)
    suggestion = trainer.apply(parse_command({"command": "suggest_lr", "window": 5}))
    assert suggestion["lr"] == pytest.approx(3e-3) and np.isfinite(suggestion["dval_dlr"])
    while trainer.t < trainer.num_steps:
        assert trainer.step_once()
    trainer.finish()
    assert replay_log(log, problem).matches is True
    with pytest.raises(TypeError, match="inject_hyperparams"):
        Trainer(dc.replace(base, optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))))
