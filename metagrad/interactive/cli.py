"""``metagrad interactive`` and ``metagrad replay-log``.

``metagrad/cli.py`` registers them with::

    from .interactive.cli import add_interactive_parser, add_replay_log_parser
    add_interactive_parser(sub)
    add_replay_log_parser(sub)

(``python -m metagrad.interactive.cli interactive|replay-log ...`` runs them without it.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


def add_interactive_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("interactive", help="train the built-in problem under a control server, dashboard and agent")
    p.add_argument("--out", default="metagrad_interactive", help="folder for the intervention log and checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    p.add_argument("--num-steps", type=int, help="training steps (default 3000)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 0.05)")
    p.add_argument("--hidden", type=int, nargs="+", help="MLP widths (default 64 64)")
    p.add_argument("--dataset", choices=("mnist1d", "blobs"), default="mnist1d")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--step-delay", type=float, default=0.01, help="minimum seconds per step, to follow the run")
    p.add_argument("--paused", action="store_true", help="start paused")
    p.add_argument("--agent", choices=("none", "rules", "openai"), default="none",
                   help="an agent in the loop: rule-based, or an OpenAI-compatible endpoint (--agent-url)")
    p.add_argument("--agent-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--agent-model", default="gpt-4o-mini")
    p.add_argument("--agent-every", type=int, default=20, help="steps between agent decisions")
    p.add_argument("--exit-when-done", action="store_true", help="exit when the run finishes (default: keep serving)")
    p.set_defaults(func=run_interactive)
    return p


def add_replay_log_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("replay-log", help="re-run an intervention log and check it reproduces the run exactly")
    p.add_argument("log", help="the intervention log (JSON lines) written by metagrad interactive")
    p.add_argument("--metagrad", action="store_true",
                   help="also print d(val loss)/d(LR of each intervention) by REPLAY")
    p.add_argument("--k", type=int, default=4, help="REPLAY branching factor for --metagrad")
    p.add_argument("--json", dest="json_out", help="write the result as JSON here")
    p.set_defaults(func=run_replay_log)
    return p


def _spec(args) -> dict:
    from .problems import BUILTIN_SPEC

    spec = copy.deepcopy(BUILTIN_SPEC)
    if args.dataset == "blobs":
        spec["dataset"] = {"name": "blobs", "num_examples": 3000}
        spec["batch_size"] = 64
    if args.num_steps is not None:
        spec["num_steps"] = args.num_steps
    if args.lr is not None:
        spec["optimizer"]["hyperparams"]["learning_rate"] = args.lr
    if args.hidden:
        spec["model"]["hidden"] = list(args.hidden)
    return spec


def run_interactive(args) -> int:
    from .agents import AgentRunner, OpenAIChatAgent, RuleAgent
    from .problems import build_problem
    from .server import ControlServer
    from .trainer import Trainer

    spec = _spec(args)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "interventions.jsonl")
    trainer = Trainer(build_problem(spec), spec=spec, log_path=log_path,
                      checkpoint_dir=os.path.join(args.out, "checkpoints"), eval_every=args.eval_every,
                      min_step_seconds=args.step_delay, start_paused=args.paused)
    server = ControlServer(trainer, host=args.host, port=args.port).start()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the server listens on {args.host}, reachable from other machines; anyone with the "
              "token can steer the run.", file=sys.stderr)
    print("metagrad interactive: dashboard at", flush=True)
    print(f"    {server.dashboard_url}", flush=True)
    print(f"API: {server.base_url}/api/run (header 'Authorization: Bearer {server.token}'); "
          f"OpenAPI at {server.base_url}/openapi.json?token={server.token}", flush=True)
    print(f"intervention log: {log_path}  (replay: metagrad replay-log {log_path})", flush=True)
    trainer.start()
    agent = None
    if args.agent != "none":
        if args.agent == "openai" and not args.agent_url:
            raise SystemExit("--agent openai needs --agent-url (an OpenAI-compatible base URL).")
        policy = RuleAgent() if args.agent == "rules" else OpenAIChatAgent(
            args.agent_url, model=args.agent_model, api_key=os.environ.get("OPENAI_API_KEY"), every=args.agent_every)
        agent = AgentRunner(server.base_url, server.token, policy, every=args.agent_every).start()
    try:
        while trainer.alive:
            if args.exit_when_done and trainer.status == "finished":
                trainer.request_stop()
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        trainer.request_stop()
    trainer.join(30)
    end = trainer.finish()
    if agent is not None:
        agent.stop()
    server.stop()
    print(f"run ended at step {end['step']} on branch {end['branch']}; log: {log_path}", flush=True)
    return 0 if trainer.error is None else 1


def run_replay_log(args) -> int:
    from .replay_log import intervention_metagradients, replay_log

    tic = time.perf_counter()
    result = replay_log(args.log)
    seconds = time.perf_counter() - tic
    tr = result.trainer
    print(f"replayed {sum(1 for r in result.interventions if r.get('mutating', True))} interventions "
          f"in {seconds:.1f} s: step {tr.t}, branch {tr.branch}, {len(tr.branches)} branches")
    print(f"final state fingerprint {result.fingerprint}")
    payload = {"step": tr.t, "branch": tr.branch, "fingerprint": result.fingerprint, "matches": result.matches}
    if result.matches is None:
        print("the log has no end record (the run did not finish cleanly): nothing to compare against")
    else:
        print("matches the logged run bitwise" if result.matches else
              f"DIFFERS from the logged run (logged {result.end['fingerprint']})")
    if args.metagrad:
        m = intervention_metagradients(args.log, k=args.k)
        print(f"validation loss of the final state: {m['val_loss']:.6f} ({m['num_steps']} steps of history)")
        print(f"{'seq':>5} {'command':>16} {'step':>6} {'branch':>6} {'lr':>10} {'steps':>6} {'dval/dlr':>12}")
        for row in m["interventions"]:
            print(f"{row['seq']:>5} {row['command']:>16} {row['step']:>6} {row['branch']:>6} {row['lr']:>10.4g} "
                  f"{row['num_steps']:>6} {row['dval_dlr']:>12.5g}")
        payload["metagradients"] = {k: v for k, v in m.items() if k != "per_step"}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(payload, f, indent=2)
    return 0 if result.matches in (True, None) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metagrad")
    sub = parser.add_subparsers(dest="command", required=True)
    add_interactive_parser(sub)
    add_replay_log_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
