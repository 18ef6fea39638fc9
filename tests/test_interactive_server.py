"""The control server on loopback: token, REST and WebSocket commands, malformed requests, a fuzz of the
OpenAPI spec, the rule-based agent rescuing a too-high LR, and the OpenAI-compatible adapter."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from metagrad.interactive import (AgentRunner, OpenAIChatAgent, RuleAgent, Trainer, build_problem,  # noqa: E402
                                  fingerprint, parse_action, replay_log)
from conftest import wait_command  # noqa: E402
from metagrad.interactive.agents import wait_until  # noqa: E402
from metagrad.interactive.server import ControlServer  # noqa: E402

SPEC = {"dataset": {"name": "blobs", "num_examples": 300}, "model": {"name": "mlp", "hidden": [12]},
        "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 0.05, "momentum": 0.9}},
        "num_steps": 60, "batch_size": 16, "seed": 0}

# overlapping clusters: at LR 1.0 (momentum 0.9) the training loss climbs by orders of magnitude
RESCUE = {"dataset": {"name": "blobs", "num_examples": 600, "spread": 1.0}, "model": {"name": "mlp", "hidden": [32]},
          "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 1.0, "momentum": 0.9}},
          "num_steps": 200, "batch_size": 32, "seed": 0}


def wait_for(predicate, timeout=30.0, interval=0.02):
    return wait_until(predicate, timeout, interval)


@pytest.fixture
def served(tmp_path, serve):
    """A paused trainer (it steps only when told to resume) behind a real server on 127.0.0.1."""
    trainer = Trainer(build_problem(SPEC), spec=SPEC, log_path=str(tmp_path / "log.jsonl"), eval_every=10,
                      min_step_seconds=0.01, start_paused=True).start()
    server, client = serve(trainer)
    return trainer, server, client


def test_token_is_required_everywhere(served):
    trainer, server, client = served
    assert server.host == "127.0.0.1"
    for path in ("/api/run", "/api/log", "/openapi.json", "/", "/static/app.js", "/api/commands/c1"):
        r = httpx.get(server.base_url + path)
        assert r.status_code == 401, path
        assert "token" in r.json()["detail"]
        assert httpx.get(server.base_url + path, headers={"X-Token": "wrong"}).status_code == 401
    r = httpx.post(server.base_url + "/api/commands", json={"command": "stop"})
    assert r.status_code == 401
    assert client.get("/api/run").status_code == 200
    assert httpx.get(server.base_url + "/api/run", headers={"Authorization": f"Bearer {server.token}"}).status_code == 200
    assert httpx.get(server.base_url + f"/api/run?token={server.token}").status_code == 200
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        with connect(server.base_url.replace("http", "ws") + "/ws?token=wrong", open_timeout=10):
            pass
    assert trainer.alive and not trainer.stopped and trainer.log.interventions() == []


def test_rest_commands_and_info(served):
    trainer, server, client = served
    info = client.get("/api/run").json()
    assert info["status"] == "paused" and info["step"] == 0
    assert client.get("/api/optimizer").json()["settable"] == ["learning_rate", "momentum"]
    assert [layer["name"] for layer in client.get("/api/model").json()["layers"]] == ["Dense_0", "Dense_1"]
    assert client.get("/api/dataset").json()["sources"] == [{"name": "base", "count": 210}]
    r = client.post("/api/commands", json={"command": "set_hyperparams", "values": {"learning_rate": 0.02}})
    assert r.status_code == 202 and r.json()["status"] == "requested"
    assert wait_command(client, r.json()["id"])["status"] == "succeeded"
    assert client.get("/api/run").json()["hyperparams"]["learning_rate"] == pytest.approx(0.02)
    rec = wait_command(client, client.post("/api/commands", json={"command": "resume"}).json()["id"])
    assert rec["status"] == "succeeded"
    assert wait_for(lambda: client.get("/api/run").json()["step"] >= 5)
    rec = wait_command(client, client.post("/api/commands", json={"command": "save_checkpoint", "name": "s"}).json()["id"])
    assert rec["status"] == "succeeded" and rec["result"]["checkpoint"]["id"] == "s"
    saved_step = rec["result"]["checkpoint"]["step"]
    assert wait_for(lambda: client.get("/api/run").json()["step"] >= saved_step + 3)
    rec = wait_command(client, client.post("/api/commands", json={"command": "load_checkpoint", "checkpoint": "s", "branch_name": "from s"}).json()["id"])
    assert rec["status"] == "succeeded"
    branches = client.get("/api/branches").json()
    assert branches[-1] == {"id": 1, "parent": 0, "fork_step": saved_step, "checkpoint": "s",
                            "name": "from s"}
    # a command that is valid but cannot apply fails with its reason, and the run goes on
    rec = wait_command(client, client.post("/api/commands", json={"command": "load_checkpoint", "checkpoint": "zz"}).json()["id"])
    assert rec["status"] == "failed" and "no checkpoint 'zz'" in rec["reason"]
    log = client.get("/api/log").json()
    assert [(e["command"], e["branch"]) for e in log] == [("set_hyperparams", 0), ("resume", 0),
                                                          ("save_checkpoint", 0), ("load_checkpoint", 0)]
    assert log[0]["step"] == 0 and log[2]["step"] == saved_step
    assert client.get("/api/metrics").json()["metrics"]
    assert client.get("/api/checkpoints").json()[0]["id"] == "s"


def test_websocket_streams_events_and_takes_commands(served):
    trainer, server, client = served
    from websockets.sync.client import connect

    with connect(server.base_url.replace("http", "ws") + f"/ws?token={server.token}", open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["run"]["status"] == "paused"
        ws.send(json.dumps({"type": "command", "ref": 7, "command": {"command": "set_hyperparams",
                                                                     "values": {"momentum": 0.5}}}))
        ws.send(json.dumps({"type": "command", "ref": 8, "command": {"command": "resume"}}))
        ws.send("{not json")
        ws.send(json.dumps({"type": "command", "ref": 9, "command": {"command": "set_hyperparams", "values": {}}}))
        ws.send(json.dumps({"type": "command", "ref": 10, "command": {"command": "freeze_layer", "layer": "nope"}}))
        replies, events = {}, []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (len(replies) >= 5 and sum(e["type"] == "metrics" for e in events) >= 5):
            msg = json.loads(ws.recv(timeout=10))
            if msg["type"] == "events":
                events.extend(msg["events"])
            else:
                replies[msg.get("ref", msg["type"])] = msg
    assert replies[7]["type"] == "accepted" and replies[8]["type"] == "accepted"
    assert replies["error"]["detail"].startswith("not JSON")
    assert replies[9]["type"] == "rejected" and "values" in replies[9]["detail"]
    assert replies[10]["type"] == "rejected" and "unknown layer 'nope'" in replies[10]["detail"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) >= 5 and all(set(m) >= {"train_loss", "lr", "grad_norm", "step_time"} for m in metrics)
    statuses = [e["record"]["status"] for e in events if e["type"] == "command" and e["record"]["id"] == replies[7]["record"]["id"]]
    assert statuses[-1] == "succeeded" and "running" in statuses
    assert trainer.hyperparams()["momentum"] == pytest.approx(0.5)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 422, "JSON"),
    (b"[]", 422, "A command is a JSON object with a 'command' field"),
    (json.dumps({"command": "set_hyperparams", "values": {"learning_rate": "fast"}}).encode(), 422, "valid number"),
    (json.dumps({"command": "set_hyperparams", "values": {"learning_rate": 1e300}}).encode(), 422, "must be finite"),
    (json.dumps({"command": "set_hyperparams", "values": {"learning_rte": 0.1}}).encode(), 422, "this optimizer exposes"),
    (json.dumps({"command": "pause", "extra": 1}).encode(), 422, "Extra inputs are not permitted"),
    (json.dumps({"command": "save_checkpoint", "name": "../../etc"}).encode(), 422, "pattern"),
    (json.dumps({"command": "append_data", "x": [[1.0] * 8] * 2, "y": [0, 9]}).encode(), 422, "labels must be in"),
    (b'{"command": "append_data", "x": [[' + b"1.0," * 300000 + b'1.0]], "y": [0]}', 413, "over"),
], ids=["not-json", "array", "string-value", "huge-value", "unknown-hyperparam", "extra-field", "path-name",
        "bad-label", "too-large"])
def test_malformed_commands_are_rejected_with_a_clear_message(served, body, status, message):
    trainer, server, client = served
    before = fingerprint(trainer.state)
    r = client.post("/api/commands", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert trainer.alive and fingerprint(trainer.state) == before and trainer.log.interventions() == []


def test_fuzz_openapi_spec_finds_no_server_errors_and_the_run_stays_intact(served, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    trainer, server, client = served
    client.post("/api/commands", json={"command": "resume"})
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    statuses = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            kwargs = case.as_transport_kwargs(base_url=server.base_url)
            # the generated credentials (from the spec's security schemes) are replaced by the real token
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() == "content-type"}
            headers.update({"X-Token": server.token, "Authorization": f"Bearer {server.token}"})
            response = httpx.request(kwargs["method"], kwargs["url"], headers=headers, timeout=30,
                                     **{k: v for k, v in kwargs.items() if k in ("params", "json", "content")})
            statuses.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, response.text[:300])

        check()
    assert len(statuses) >= 100 and {s[1] for s in statuses} >= {"/api/commands", "/api/run", "/api/log"}
    assert any(s[2] == 202 for s in statuses) and any(s[2] == 422 for s in statuses)
    # the run survived: the thread is alive or stopped cleanly, no internal error, and its log replays exactly
    assert trainer.error is None
    assert client.get("/api/run").status_code == 200
    trainer.request_stop()
    trainer.join(30)
    assert not trainer.alive and trainer.error is None
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(trainer.state["params"]))
    assert replay_log(trainer.log.path).matches is True


def _untouched_val_loss():
    tr = Trainer(build_problem(RESCUE), eval_every=0)
    while tr.t < tr.num_steps and tr.step_once():
        pass
    return tr.evaluate()["val_loss"]


def test_rule_agent_rescues_a_too_high_learning_rate(tmp_path):
    untouched = _untouched_val_loss()
    trainer = Trainer(build_problem(RESCUE), spec=RESCUE, log_path=str(tmp_path / "agent.jsonl"), eval_every=20,
                      min_step_seconds=0.01, start_paused=True).start()
    server = ControlServer(trainer).start()
    agent = AgentRunner(server.base_url, server.token, RuleAgent(), every=5).start()
    try:
        assert wait_for(lambda: agent.view.status == "running" or agent.is_alive(), 10)
        httpx.post(server.base_url + "/api/commands", json={"command": "resume"}, headers={"X-Token": server.token})
        assert wait_for(lambda: trainer.status in ("finished", "stopped", "error"), 120)
    finally:
        agent.stop()
        trainer.request_stop()
        trainer.join(10)
        server.stop()
    rescued = trainer.evaluate()["val_loss"]
    acted = [d for d in agent.decisions if d[1] != "Same"]
    assert acted, agent.decisions
    assert not agent.errors, agent.errors
    assert trainer.hyperparams()["learning_rate"] < 1.0
    assert rescued < untouched, (rescued, untouched, acted)
    assert replay_log(trainer.log.path).matches is True


class _ChatHandler(http.server.BaseHTTPRequestHandler):
    """A local OpenAI-compatible endpoint: answers from the loss history in the prompt it receives."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        line = next(ln for ln in prompt.splitlines() if ln.startswith("Recent training losses"))
        losses = json.loads(line.split(":", 1)[1])
        action = "Half" if losses and losses[-1] > losses[0] else "Same"
        content = f'Looking at the curve: {{"action": "{action}", "reason": "trend"}}'
        payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_compatible_agent_against_a_local_endpoint(served):
    trainer, server, client = served
    _ChatHandler.requests = []
    chat = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    policy = OpenAIChatAgent(f"http://127.0.0.1:{chat.server_port}/v1", model="local", api_key="k", every=5)
    # a rising loss history: the endpoint answers Half, the runner halves the run's LR through the API
    client.post("/api/commands", json={"command": "set_hyperparams", "values": {"learning_rate": 3.0}})
    agent = AgentRunner(server.base_url, server.token, policy, every=5).start()
    try:
        client.post("/api/commands", json={"command": "resume"})
        assert wait_for(lambda: any(d[1] == "Half" and d[3] for d in agent.decisions), 60), agent.decisions
    finally:
        agent.stop()
        chat.shutdown()
    req = _ChatHandler.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k" and req["body"]["model"] == "local"
    prompt = req["body"]["messages"][-1]["content"]
    for part in ("Recent learning rates", "Recent training losses", "Recent validation losses", '"Double", "Half" or "Same"'):
        assert part in prompt
    half = next(d for d in agent.decisions if d[1] == "Half" and d[3])
    rec = wait_command(client, half[3])
    assert rec["status"] == "succeeded"
    assert rec["args"]["values"]["learning_rate"] == pytest.approx(half[2] / 2)
    assert not agent.errors and not policy.errors


@pytest.mark.parametrize("text, action", [
    ('{"action": "Double"}', "Double"), ('Sure. {"action": "half", "reason": "spike"}', "Half"),
    ('```json\n{"action": "Same"}\n```', "Same")])
def test_parse_action(text, action):
    assert parse_action(text) == action


@pytest.mark.parametrize("text", ["", "Half", '{"action": "Triple"}', '{"act": "Half"}'])
def test_parse_action_rejects_replies_without_a_valid_action(text):
    with pytest.raises(ValueError, match="no JSON action"):
        parse_action(text)


def test_rule_agent_decisions():
    from metagrad.interactive import AgentView

    agent = RuleAgent(window=3)
    flat = AgentView(lr=[0.1] * 6, train_loss=[1.0] * 6, steps_since_change=6)
    assert agent.decide(flat) == "Double"
    spike = AgentView(lr=[0.1] * 6, train_loss=[1.0, 1.0, 1.0, 3.0, 3.0, 3.0], steps_since_change=6)
    assert agent.decide(spike) == "Half"
    spike.has_checkpoint = True
    assert agent.decide(spike) == "Rollback"
    falling = AgentView(lr=[0.1] * 6, train_loss=[2.0, 1.9, 1.8, 1.5, 1.4, 1.3], steps_since_change=6)
    assert agent.decide(falling) == "Same"
    assert agent.decide(AgentView(lr=[0.1], diverged=True)) == "Half"
    assert agent.decide(dataclasses.replace(falling, steps_since_change=1)) == "Same"
