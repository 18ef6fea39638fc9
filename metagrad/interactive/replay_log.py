"""Re-run an intervention log exactly, and differentiate it with REPLAY.

:func:`replay_log` rebuilds the problem (from the log's spec, or the one you
pass), then applies every logged intervention at the step and on the branch
where it took effect, running the trainer's own compiled step in between, and
checks the SHA-256 fingerprint of the final parameters and optimizer state
against the log's end record (bitwise on CPU).

:func:`intervention_metagradients` turns the learning rates of the final
branch's history into a per-step ``lr_schedule`` metaparameter and returns the
metagradient of the validation loss with respect to the LR set by each
intervention (``replay.value_and_metagrad``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import steps as steps_lib
from .commands import parse_command
from .log import fingerprint, read_log
from .problems import build_problem
from .trainer import Trainer


class ReplayMismatch(RuntimeError):
    """The replay did not follow the logged run (a different problem, code or platform)."""


@dataclasses.dataclass
class ReplayResult:
    trainer: Trainer
    header: dict
    interventions: list
    end: dict | None
    fingerprint: str
    matches: bool | None  # None when the log has no end record


def _advance(trainer: Trainer, step: int, branch: int, what: str) -> None:
    if trainer.branch != branch:
        raise ReplayMismatch(f"{what} was logged on branch {branch} but the replay is on branch {trainer.branch}.")
    if step < trainer.t:
        raise ReplayMismatch(f"{what} was logged at step {step} but the replay is already at step {trainer.t}.")
    while trainer.t < step:
        if not trainer.step_once():
            raise ReplayMismatch(f"the replay diverged at step {trainer.t} before reaching {what} (step {step}).")


def replay_log(path: str, problem=None, *, trace: bool = False, overrides: dict | None = None) -> ReplayResult:
    """Re-run the log at ``path``; ``overrides`` maps an intervention ``seq`` to replacement args (what-if runs)."""
    header, interventions, end = read_log(path)
    if problem is None:
        if header.get("spec") is None:
            raise ValueError(f"{path} was written for a problem built in Python (no spec in its header): "
                             "pass that problem as replay_log(path, problem).")
        problem = build_problem(header["spec"])
    trainer = Trainer(problem, spec=header.get("spec"), log_path=None, eval_every=0, max_memory_checkpoints=None)
    if header.get("fingerprint0") and fingerprint(trainer.state) != header["fingerprint0"]:
        raise ReplayMismatch("the initial state differs from the logged run's: the problem (model, data, seed) "
                             "is not the one the log was written for.")
    if trace:
        trainer.trace = []
    overrides = overrides or {}
    for record in interventions:
        if not record.get("mutating", True):
            continue
        what = f"intervention {record['seq']} ({record['command']})"
        _advance(trainer, record["step"], record["branch"], what)
        args = overrides.get(record["seq"], record["args"])
        command = parse_command({"command": record["command"], **args})
        trainer.apply(command, seq=record["seq"])  # keep the logged numbering (LR sources refer to it)
        if record["command"] == "stop":
            break
    if end is not None:
        _advance(trainer, end["step"], end["branch"], "the end of the run")
    final = fingerprint(trainer.state)
    matches = None if end is None else final == end["fingerprint"]
    return ReplayResult(trainer, header, interventions, end, final, matches)


def lineage(trace: list, branches: list, final_branch: int, final_step: int) -> list:
    """The per-step records of the history of the final state: the final branch back through its forks."""
    by_branch: dict = {}
    for rec in trace:
        by_branch.setdefault(rec["branch"], {})[rec["t"]] = rec
    parent = {b["id"]: b for b in branches}
    out, b, stop = [], final_branch, final_step
    while b is not None:
        start = parent[b]["fork_step"] if parent[b]["parent"] is not None else 0
        for t in range(stop - 1, start - 1, -1):
            out.append(by_branch[b][t])
        stop, b = start, parent[b]["parent"]
    out.reverse()
    return out


def intervention_metagradients(path: str, problem=None, *, k: int = 4) -> dict:
    """d(validation loss of the final state)/d(LR set by each intervention), by REPLAY over the final history.

    The history of the final state (the final branch, back through the checkpoints it was forked from) is
    one pure run from step 0 whose per-step LR is the ``lr_schedule`` metaparameter; the LR an intervention
    set holds until the next LR change on that history, so its metagradient is the sum over those steps.
    Histories with a layer reset, appended data or a changed mixture are not one pure run: a ``ValueError``
    names the intervention.
    """
    result = replay_log(path, problem, trace=True)
    trainer = result.trainer
    steps = lineage(trainer.trace, trainer.branches, trainer.branch, trainer.t)
    if not steps:
        raise ValueError("the run took no steps: there is nothing to differentiate.")
    for rec in steps:
        if rec["dirty"] or rec["data_version"] != 0:
            raise ValueError(
                f"the history of the final state has a layer reset or a data change before step {rec['t']}: "
                "metagradients are computed for histories of LR/hyperparameter changes, freezes and checkpoint "
                "loads only; differentiate a run without those interventions.")
    num = len(steps)
    problem0 = build_problem(result.header["spec"]) if problem is None else problem
    fresh = Trainer(problem0, spec=None, log_path=None, eval_every=0)
    names = [n for n in steps[0]["hyperparams"] if n != "learning_rate"]
    dtype = np.dtype(fresh.problem.param_dtype)
    meta = {
        "lr_schedule": np.asarray([r["hyperparams"]["learning_rate"] for r in steps], dtype),
        "hyperparams": {n: np.asarray([r["hyperparams"][n] for r in steps], dtype) for n in names},
        "frozen": {layer: np.asarray([r["frozen"][layer] for r in steps]) for layer in fresh.layers},
        "data_weights": fresh.data_weights,
        "t0": np.int32(0),
    }
    run = steps_lib.steered_run(fresh.problem)
    value, grad = run.value_and_metagrad(fresh.state, meta, num, k=k)
    per_step = np.asarray(grad["lr_schedule"], np.float64)
    sources = np.asarray([r["lr_source"] for r in steps])
    by_seq = {r["seq"]: r for r in result.interventions}
    out = []
    for seq in sorted(set(sources.tolist())):
        mask = sources == seq
        rec = by_seq.get(seq)
        out.append({"seq": int(seq), "command": rec["command"] if rec else "initial",
                    "step": rec["step"] if rec else 0, "branch": rec["branch"] if rec else 0,
                    "lr": float(meta["lr_schedule"][mask][0]), "num_steps": int(mask.sum()),
                    "dval_dlr": float(per_step[mask].sum())})
    return {"val_loss": float(value), "num_steps": num, "interventions": out, "per_step": per_step}
