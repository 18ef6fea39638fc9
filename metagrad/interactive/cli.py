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

from ..cli import (UsageError, branching_factor, existing_file, nonnegative_float, nonnegative_int, output_file,
                   output_folder, port_number, positive_float, positive_int)


def add_interactive_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("interactive", help="train the built-in problem under a control server, dashboard and agent")
    p.add_argument("--out", type=output_folder, default="metagrad_interactive",
                   help="folder for the intervention log and checkpoints (default: ./metagrad_interactive); when it "
                        "holds an earlier run, this run goes to the next free OUT-2, OUT-3, ... (never overwritten)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8765, help="port (0: any free one)")
    p.add_argument("--num-steps", type=positive_int, help="training steps (default 3000)")
    p.add_argument("--lr", type=positive_float, help="initial learning rate (default 0.05)")
    p.add_argument("--hidden", type=positive_int, nargs="+", help="MLP widths (default 64 64)")
    p.add_argument("--dataset", choices=("mnist1d", "blobs"), help="the built-in problem's data (default mnist1d)")
    p.add_argument("--problem", metavar="MODULE:FUNCTION",
                   help="steer your own problem: FUNCTION() in MODULE returns a metagrad.TrainingProblem (any flax "
                        "model and data; its optimizer from optax.inject_hyperparams) or any metagrad.Problem")
    p.add_argument("--eval-every", type=nonnegative_int, default=50,
                   help="steps between validation evaluations (0: only on request)")
    p.add_argument("--step-delay", type=nonnegative_float, default=0.01,
                   help="minimum seconds per step, to follow the run")
    p.add_argument("--paused", action="store_true", help="start paused")
    p.add_argument("--agent", choices=("none", "rules", "openai"), default="none",
                   help="an agent in the loop: rule-based, or an OpenAI-compatible endpoint (--agent-url)")
    p.add_argument("--agent-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--agent-model", default="gpt-4o-mini")
    p.add_argument("--agent-every", type=positive_int, default=20, help="steps between agent decisions")
    p.add_argument("--exit-when-done", action="store_true", help="exit when the run finishes (default: keep serving)")
    p.set_defaults(func=run_interactive)
    return p


def add_replay_log_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("replay-log", help="re-run an intervention log and check it reproduces the run exactly")
    p.add_argument("log", metavar="LOG", type=existing_file,
                   help="the intervention log (JSON lines) written by metagrad interactive")
    p.add_argument("--metagrad", action="store_true",
                   help="also print d(val loss)/d(LR of each intervention) by REPLAY")
    p.add_argument("--k", type=branching_factor, default=4, help="REPLAY branching factor for --metagrad (>= 2)")
    p.add_argument("--json", dest="json_out", type=output_file, help="write the result as JSON here")
    p.set_defaults(func=run_replay_log)
    return p


def _spec(args) -> dict:
    from .problems import BUILTIN_SPEC

    if args.problem:
        given = [flag for flag, value in (("--dataset", args.dataset), ("--lr", args.lr), ("--hidden", args.hidden))
                 if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} describe the built-in problem; with --problem, set them in your "
                             "problem's function instead")
        return {"problem": args.problem, "num_steps": args.num_steps}
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


def _check_extra(agent: str) -> None:
    """The ``[interactive]`` extra's packages import, or a :class:`UsageError` says how to install them."""
    import importlib

    for module in ("fastapi", "uvicorn", "websockets") + (("httpx",) if agent != "none" else ()):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"the dashboard server needs the [interactive] extra, which is not installed ({err}): "
                             "run pip install -e '.[interactive]' in a checkout, or pip install "
                             "'metagrad[interactive]'") from None


def _listen_error(err: OSError, host: str, port: int) -> UsageError:
    import errno

    if err.errno == errno.EADDRINUSE:
        return UsageError(f"port {port} on {host} is in use (another metagrad interactive?): pass --port 0 to pick "
                          "a free port, or another --port")
    if err.errno == errno.EACCES:
        return UsageError(f"no permission to listen on port {port}: pass --port 0 to pick a free port, or a --port "
                          ">= 1024")
    return UsageError(f"cannot listen on --host {host} --port {port} ({err.strerror or err}): give an IPv4 address "
                      "of this machine, e.g. --host 127.0.0.1, or --port 0")


def _check_port(host: str, port: int) -> None:
    """Binds ``host:port`` as the server will (then lets go), so a busy port is reported before any work."""
    import socket

    if port == 0:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
    except OSError as err:
        raise _listen_error(err, host, port) from None
    finally:
        sock.close()


def new_run_folder(out: str) -> str:
    """``out`` when it holds no run yet, else the first of ``out-2``, ``out-3``, ... that holds none.

    A run folder holds the intervention log and the checkpoints that the log's ``load_checkpoint`` lines name,
    so a rerun must never write into an earlier run's folder."""
    def holds_run(folder):
        return os.path.exists(os.path.join(folder, "interventions.jsonl")) or os.path.exists(
            os.path.join(folder, "checkpoints"))

    candidate, number = out, 1
    while holds_run(candidate):
        number += 1
        candidate = f"{out.rstrip(os.sep)}-{number}"
    return candidate


def end_on_signals(trainer) -> None:
    """SIGTERM (and SIGHUP) stop the run like Ctrl-C: the loop ends and the log gets its end record."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def run_interactive(args) -> int:
    # Everything that can fail on an ordinary mistake is checked before the log is opened or anything is trained.
    _check_extra(args.agent)
    if args.agent == "openai" and not args.agent_url:
        raise UsageError("--agent openai needs --agent-url (an OpenAI-compatible base URL, e.g. "
                         "http://127.0.0.1:8000/v1)")
    _check_port(args.host, args.port)

    from .agents import AgentRunner, OpenAIChatAgent, RuleAgent
    from .problems import build_problem
    from .server import ControlServer
    from .trainer import Trainer

    spec = _spec(args)
    problem = build_problem(spec)  # a user's --problem that cannot be steered is refused before anything starts
    out = new_run_folder(args.out)
    if out != args.out:
        print(f"{args.out} holds an earlier run (kept as it is); this run writes to {out}", flush=True)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "interventions.jsonl")
    trainer = Trainer(problem, spec=spec, log_path=log_path, metrics_path=os.path.join(out, "metrics.jsonl"),
                      checkpoint_dir=os.path.join(out, "checkpoints"), eval_every=args.eval_every,
                      min_step_seconds=args.step_delay, start_paused=args.paused)
    try:
        server = ControlServer(trainer, host=args.host, port=args.port).start()
    except OSError as err:  # taken since _check_port
        trainer.finish()
        raise _listen_error(err, args.host, args.port) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the server listens on {args.host}, reachable from other machines; anyone with the "
              "token can steer the run.", file=sys.stderr)
    print("metagrad interactive: dashboard at", flush=True)
    print(f"    {server.dashboard_url}", flush=True)
    print(f"API: {server.base_url}/api/run (header 'Authorization: Bearer {server.token}'); "
          f"OpenAPI at {server.base_url}/openapi.json?token={server.token}", flush=True)
    print(f"intervention log: {log_path}  (replay: metagrad replay-log {log_path})", flush=True)
    end_on_signals(trainer)
    trainer.start()
    agent = None
    if args.agent != "none":
        policy = RuleAgent() if args.agent == "rules" else OpenAIChatAgent(
            args.agent_url, model=args.agent_model, api_key=os.environ.get("OPENAI_API_KEY"), every=args.agent_every)
        agent = AgentRunner(server.base_url, server.token, policy, every=args.agent_every).start()
    try:
        while trainer.alive:
            if args.exit_when_done and trainer.status == "finished":
                trainer.request_stop()
            time.sleep(0.2)
    except KeyboardInterrupt as why:
        print(f"stopping ({why or 'SIGINT'})", flush=True)
        trainer.request_stop()
    trainer.join(30)
    end = trainer.finish()
    if agent is not None:
        agent.stop()
    server.stop()
    final = trainer.evaluate()
    scores = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in final.items()
                       if name not in ("step", "branch"))
    print(f"run ended at step {end['step']} on branch {end['branch']}: {scores}; log: {log_path}", flush=True)
    if agent is not None:
        changes = [d for d in agent.decisions if d[1] != "Same"]
        print(f"the agent acted {len(changes)} times: " + ", ".join(f"{a} at step {s}" for s, a, *_ in changes[:12])
              + (" ..." if len(changes) > 12 else ""), flush=True)
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
        import replay

        try:
            m = intervention_metagradients(args.log, k=args.k)
        except (replay.DivergenceError, replay.NonFiniteMetagradError) as err:
            raise UsageError("--metagrad: the metagradient through this run's history is not finite (the run "
                             f"blew up: {str(err).splitlines()[0]}); replay a log whose final state a checkpoint "
                             "load brought back from the blow-up, or drop --metagrad") from None
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


def main(argv=None, *, catch_errors: bool | None = None) -> int:
    """Like :func:`metagrad.cli.main`, for these two commands only."""
    from ..cli import CommandLineParser, _flag_names, run_command

    parser = CommandLineParser(prog="metagrad")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flag_names = {"interactive": _flag_names(add_interactive_parser(sub)),
                  "replay-log": _flag_names(add_replay_log_parser(sub))}
    args = parser.parse_args(argv)
    return run_command(args, flag_names[args.command],
                       catch_errors=argv is None if catch_errors is None else catch_errors)


if __name__ == "__main__":
    sys.exit(main())
