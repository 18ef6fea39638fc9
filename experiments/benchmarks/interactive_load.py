"""A load test of the interactive control server on loopback, bounded in requests and time.

    python experiments/benchmarks/interactive_load.py [--requests 10000] [--clients 8] [--smoke]

A live run (the built-in MLP on MNIST-1D, or ``--dataset blobs``) behind the real
server; one WebSocket client follows the event stream as the dashboard does;
``--clients`` threads send ``--requests`` requests in all, a seeded mix of

* reads: ``/api/run``, ``/api/metrics``, ``/api/commands``, ``/api/events``, the dashboard's ``app.js``;
* valid commands: LR changes in range, evaluations, checkpoint saves, and the rescue after a divergence
  (load the first checkpoint, a safe LR, resume);
* malformed ones: not JSON, unknown commands, extra fields, strings for numbers, negative and boolean LRs,
  ``..`` checkpoint names;
* LR changes to the top of the declared range (10), which blow the run up: the divergence guard pauses it.

It records every answer's status and latency (p50, p99, max), transport errors (must be 0) and 5xx answers
(must be 0), how far the run went and in what state it ended, whether the WebSocket kept streaming, and
whether the intervention log replays bitwise afterwards. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time

SAFE_LR = 0.05


def request_mix(rng: random.Random, client: int, i: int) -> tuple[str, str, dict]:
    """One request: ``(kind, method+path, httpx keyword arguments)``."""
    u = rng.random()
    if u < 0.45:
        path = rng.choice(["/api/run", "/api/run", "/api/metrics?since_step=-1&limit=200", "/api/commands?limit=50",
                           "/api/events?since=0&limit=100", "/static/app.js", "/api/checkpoints"])
        return "read", "GET " + path.split("?")[0], {"method": "GET", "url": path}
    if u < 0.70:
        body = rng.choices([
            {"command": "set_hyperparams", "values": {"learning_rate": rng.uniform(0.01, 0.1)}},
            {"command": "evaluate"},
            {"command": "resume"},
            {"command": "save_checkpoint", "name": f"c{client}-{i}"},
            {"command": "load_checkpoint", "checkpoint": "load-start"},
            {"command": "set_hyperparams", "values": {"learning_rate": SAFE_LR}},
        ], weights=[40, 30, 15, 2, 1, 12])[0]
        return "valid", "POST " + body["command"], {"method": "POST", "url": "/api/commands", "json": body}
    if u < 0.95:
        kind = rng.randrange(7)
        if kind == 0:
            args = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
        else:
            body = [{"command": "warp"}, {"command": "pause", "extra": 1},
                    {"command": "set_hyperparams", "values": {"learning_rate": "fast"}},
                    {"command": "set_hyperparams", "values": {"learning_rate": -0.05}},
                    {"command": "set_hyperparams", "values": {"learning_rate": True}},
                    {"command": "save_checkpoint", "name": ".."}][kind - 1]
            args = {"json": body}
        return "malformed", "POST malformed", {"method": "POST", "url": "/api/commands", **args}
    body = {"command": "set_hyperparams", "values": {"learning_rate": 10.0}}
    return "blow-up", "POST blow-up LR", {"method": "POST", "url": "/api/commands", "json": body}


def resident_mb() -> float:
    """This process's resident memory now (Linux), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, q):
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000, help="requests in all (default 10000)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--dataset", choices=("mnist1d", "blobs"), default="mnist1d")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds before the clients stop anyway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="400 requests from 4 clients on blobs (tests)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "interactive_load.json"))
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.clients, args.dataset = 400, 4, "blobs"

    import copy

    import httpx
    from websockets.sync.client import connect

    from metagrad.interactive import Trainer, build_problem, replay_log
    from metagrad.interactive.problems import BUILTIN_SPEC
    from metagrad.interactive.server import ControlServer
    from metagrad.report import format_table, write_json

    spec = copy.deepcopy(BUILTIN_SPEC)
    spec["num_steps"] = 1_000_000  # the run outlasts the load
    if args.dataset == "blobs":
        spec["dataset"], spec["batch_size"], spec["model"]["hidden"] = {"name": "blobs", "num_examples": 600}, 32, [16]
    folder = tempfile.mkdtemp(prefix="metagrad-load-")
    log_path = os.path.join(folder, "interventions.jsonl")
    trainer = Trainer(build_problem(spec), spec=spec, log_path=log_path, checkpoint_dir=os.path.join(folder, "ckpt"),
                      eval_every=100, min_step_seconds=0.002).start()
    server = ControlServer(trainer).start()
    headers = {"X-Token": server.token}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as c:
        first = c.post("/api/commands", json={"command": "save_checkpoint", "name": "load-start"}).json()["id"]
        while c.get(f"/api/commands/{first}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)

    # the dashboard's WebSocket
    ws_stats = {"messages": 0, "events": 0, "steps_streamed": 0, "gaps_over_1s": 0, "longest_gap_s": 0.0, "error": None}
    stop_ws = threading.Event()

    def follow():
        url = server.base_url.replace("http://", "ws://") + f"/ws?token={server.token}"
        try:
            with connect(url, open_timeout=10, max_size=2**24) as ws:
                last = time.monotonic()
                while not stop_ws.is_set():
                    try:
                        msg = json.loads(ws.recv(timeout=0.5), parse_constant=lambda name: 1 / 0)
                    except TimeoutError:
                        msg = None
                    now = time.monotonic()
                    if msg is not None:
                        ws_stats["messages"] += 1
                        ws_stats["events"] += len(msg.get("events", []))
                        ws_stats["steps_streamed"] += sum(e.get("type") == "metrics" for e in msg.get("events", []))
                        gap, last = now - last, now
                        ws_stats["longest_gap_s"] = max(ws_stats["longest_gap_s"], gap)
                        ws_stats["gaps_over_1s"] += gap > 1.0
        except Exception as err:  # recorded: the table shows it
            ws_stats["error"] = f"{type(err).__name__}: {err}"

    ws_thread = threading.Thread(target=follow, daemon=True)
    ws_thread.start()

    results, lock = [], threading.Lock()
    counter = iter(range(args.requests))
    deadline = time.monotonic() + args.time_limit

    def client(index):
        rng = random.Random(args.seed * 1000 + index)
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                kind, name, kwargs = request_mix(rng, index, i)
                tic = time.perf_counter()
                try:
                    status = c.request(**kwargs).status_code
                except httpx.HTTPError as err:
                    status = f"{type(err).__name__}"
                with lock:
                    results.append((kind, name, status, time.perf_counter() - tic))

    rss_before, tic = resident_mb(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - tic
    stop_ws.set()
    ws_thread.join(5)
    run = httpx.get(server.base_url + "/api/run", headers=headers, timeout=30).json()
    rss_after = resident_mb()
    trainer.request_stop()
    trainer.join(60)
    server.stop()
    replay_tic = time.perf_counter()
    replayed = replay_log(log_path)
    replay_seconds = time.perf_counter() - replay_tic

    latencies = [r[3] for r in results]
    transport_errors = sum(not isinstance(r[2], int) for r in results)
    server_errors = sum(isinstance(r[2], int) and r[2] >= 500 for r in results)
    by_kind = {}
    for kind, name, status, seconds_taken in results:
        row = by_kind.setdefault(kind, {"requests": 0, "statuses": {}, "latencies": []})
        row["requests"] += 1
        row["statuses"][str(status)] = row["statuses"].get(str(status), 0) + 1
        row["latencies"].append(seconds_taken)
    diverged = sum(1 for e in trainer.events_since(0, 10**6) if e.get("type") == "status" and e.get("status") == "diverged")
    payload = {
        "smoke": args.smoke, "device": platform.processor() or platform.machine(), "dataset": args.dataset,
        "requests": len(results), "clients": args.clients, "seconds": seconds,
        "requests_per_second": len(results) / seconds,
        "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": max(latencies)},
        "transport_errors": transport_errors, "server_errors": server_errors,
        "by_kind": {k: {"requests": v["requests"], "statuses": v["statuses"], "p99_s": percentile(v["latencies"], 99)}
                    for k, v in by_kind.items()},
        "steps_during_load": ws_stats["steps_streamed"], "final_step": run["step"], "final_status": run["status"], "final_message": run.get("message"),
        "divergences_caught": diverged, "interventions_logged": len(trainer.log.interventions()),
        "resident_mb": {"before_load": rss_before, "after_load": rss_after},
        "websocket": ws_stats, "replay_matches": replayed.matches, "replay_seconds": replay_seconds,
        "log": log_path,
    }
    rows = [[k, v["requests"], " ".join(f"{s}:{n}" for s, n in sorted(v["statuses"].items())),
             f"{1e3 * percentile(v['latencies'], 99):.1f}"] for k, v in sorted(by_kind.items())]
    print(format_table(["requests", "count", "statuses", "p99 ms"], rows))
    print(f"{len(results)} requests from {args.clients} clients in {seconds:.1f} s ({payload['requests_per_second']:.0f}/s);"
          f" latency p50 {1e3 * payload['latency_s']['p50']:.1f} ms, p99 {1e3 * payload['latency_s']['p99']:.1f} ms, "
          f"max {1e3 * payload['latency_s']['max']:.0f} ms; transport errors {transport_errors}, 5xx {server_errors}")
    print(f"run: {payload['steps_during_load']} steps during the load, {diverged} divergences caught, ended "
          f"{run['status']}; WebSocket: {ws_stats['events']} events, longest gap {ws_stats['longest_gap_s']:.2f} s, "
          f"error {ws_stats['error']}; the log ({payload['interventions_logged']} interventions) replays bitwise: "
          f"{replayed.matches} ({replay_seconds:.1f} s); resident memory {rss_before:.0f} -> {rss_after:.0f} MB")
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    ok = transport_errors == 0 and server_errors == 0 and replayed.matches is True and ws_stats["error"] is None
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
