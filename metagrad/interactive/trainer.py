"""A training run under control: between steps it applies queued commands, and it streams metrics.

Tree of branches: the run starts on branch 0; loading a checkpoint forks a new
branch whose first step is the checkpoint's step (the batch of step ``t`` is the
same on every branch, a pure function of ``(seed, t)``). Every command that
succeeds is written to the :class:`~metagrad.interactive.log.InterventionLog`
with the step before which it took effect and the branch, so
:func:`metagrad.interactive.replay_log.replay_log` reproduces the run exactly.

Divergence guard: a step whose loss or parameters are non-finite, or whose loss
blew up while staying finite (:data:`BLOWUP_FACTOR` times the median of the
recent losses, or more), is not committed; the run pauses (``status:
diverged``) at the last good state, so a command (lower LR, load a checkpoint)
can rescue it.

Locking: only the trainer's own thread changes the run (steps and commands run
there), so a step or a long command (``suggest_lr``, ``evaluate``) computes
from a snapshot without holding the lock, and takes it only to commit. Readers
(the server's requests, the WebSocket) never wait on a computation.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import ValidationError

from . import steps as steps_lib
from .hyperparams import injected_hyperparams, with_hyperparams
from .commands import NON_MUTATING, CommandError, describe_validation_error, new_record, parse_command
from ..problem import check_problem, stream_key
from ..training import TrainingProblem
from ..store import RunStore
from .log import InterventionLog, fingerprint
from .problems import interactive_problem

MAX_EVENTS = 20000
MAX_COMMAND_RECORDS = 2000
MAX_QUEUED = 256
#: Checkpoints a run without a checkpoint folder may hold in memory.
MAX_MEMORY_CHECKPOINTS = 16
#: A finite loss at least this many times the median of the last :data:`BLOWUP_WINDOW` losses is a divergence.
BLOWUP_FACTOR = 1e3
BLOWUP_WINDOW = 50
#: Commands that need a TrainingProblem's model, training set or loss.
NEEDS_SUPERVISED = frozenset({"reset_layer", "freeze_layer", "append_data", "set_mixture", "suggest_lr"})
#: Commands that only read the run: computed outside the lock, from a snapshot.
READ_ONLY = frozenset({"evaluate", "suggest_lr"})


def _copy_state(state):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


class Trainer:
    """Runs a training problem step by step in a background thread, under commands.

    Args:
      problem: a :class:`~metagrad.TrainingProblem` whose optimizer comes from ``optax.inject_hyperparams``
        (its LR schedule is dropped: the LR lives in the optimizer state and commands set it); every
        command applies. Or any other :class:`metagrad.Problem` (DGA's ``MixingProblem``, a
        ``FunctionProblem`` of your own ``step``/``objective``): it runs at its initial metaparameters,
        ``problem.evaluate(state)`` gives the evaluations, and the commands that need no model, data or
        loss apply (pause, resume, stop, evaluate, checkpoints and branches, and ``set_hyperparams`` when
        the state holds an ``opt_state`` from ``optax.inject_hyperparams``).
      spec: the JSON run spec the problem was built from (written to the log header so that
        ``metagrad replay-log`` can rebuild it); ``None`` for a problem built in Python.
      log_path: where the intervention log is written as the run goes (``None``: in memory only).
      checkpoint_dir: where orbax checkpoints go (``None``: kept in memory only).
      eval_every: steps between validation evaluations (0: only on request).
      min_step_seconds: throttle, so a person or an agent can follow a tiny fast run.
      max_memory_checkpoints: how many checkpoints a run without ``checkpoint_dir`` may hold in memory
        (``None``: no limit, as a replay of a logged run needs).
      metrics_path: a new JSON-lines file receiving every step's metrics and every evaluation (memory keeps
        only the last :data:`MAX_EVENTS` of each); ``None``: memory only.
    """

    def __init__(self, problem, *, spec: dict | None = None, log_path: str | None = None,
                 checkpoint_dir: str | None = None, eval_every: int = 50, min_step_seconds: float = 0.0,
                 start_paused: bool = False, max_memory_checkpoints: int | None = MAX_MEMORY_CHECKPOINTS,
                 metrics_path: str | None = None):
        self.supervised = isinstance(problem, TrainingProblem)
        if not self.supervised:
            check_problem(problem)
        self.problem = interactive_problem(problem) if self.supervised else problem
        self.meta = None if self.supervised else problem.init_meta()
        self.num_steps = self.problem.num_steps
        self.spec = spec
        self.eval_every = int(eval_every)
        self.min_step_seconds = float(min_step_seconds)
        self.checkpoint_dir = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
        self.store = RunStore(self.checkpoint_dir) if checkpoint_dir else None
        self.max_memory_checkpoints = max_memory_checkpoints
        self.log = InterventionLog(log_path, max_records=MAX_EVENTS)
        self.metrics_log = InterventionLog(metrics_path, keep_in_memory=False)  # append-only, never overwritten
        self._lock = threading.RLock()
        self._events_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()
        self._ids = itertools.count(1)
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self._event_seq = 0
        self.commands: collections.OrderedDict = collections.OrderedDict()
        self.metrics: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.evals: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self._thread: threading.Thread | None = None
        self.error: str | None = None

        self.state = self.problem.init_state() if self.supervised else self.problem.init_state(self.meta)
        self.t = 0
        self.branch = 0
        self.branches = [{"id": 0, "parent": None, "fork_step": 0, "checkpoint": None, "name": "main"}]
        self.checkpoints: collections.OrderedDict = collections.OrderedDict()
        self._ckpt_states: dict = {}
        self._seq = 0
        self.layers = list(self.state["params"].keys()) if self.supervised else []
        self.frozen = {layer: False for layer in self.layers}
        self.sources = [("base", self.problem.data.num_train)] if self.supervised else []
        self.mixture: dict | None = None
        self.data_weights = (np.ones((self.problem.data.num_train,), np.dtype(self.problem.param_dtype))
                             if self.supervised else None)
        self.paused = bool(start_paused)
        self.stopped = False
        self.status = "paused" if start_paused else "running"
        self.last_eval = None
        self.lr_source = 0          # seq of the intervention whose LR is in effect (0: the initial LR)
        self.data_version = 0       # bumped when the data or the mixture changes
        self.trace: list | None = None  # per-step record of what each step ran with (replay fills it)
        self._dirty = False         # the state was edited (layer reset) since the last step
        self.message: str | None = None  # why the run paused by itself (a divergence), for the dashboard
        self.log.write({"kind": "header", "spec": spec, "num_steps": self.num_steps,
                        "initial_hyperparams": self.hyperparams(), "layers": self.layers,
                        "fingerprint0": fingerprint(self.state)})

    # ------------------------------------------------------------------ info
    def hyperparams(self) -> dict:
        """The scalar hyperparameters of the state's ``optax.inject_hyperparams`` optimizer state ({} if none)."""
        opt_state = self.state.get("opt_state") if isinstance(self.state, dict) else None
        hp = injected_hyperparams(opt_state) or {}
        return {name: float(np.asarray(v)) for name, v in hp.items() if np.ndim(v) == 0}

    def info(self) -> dict:
        with self._lock:
            return {"step": self.t, "num_steps": self.num_steps, "branch": self.branch, "status": self.status,
                    "paused": self.paused, "stopped": self.stopped, "hyperparams": self.hyperparams(),
                    "last_eval": self.last_eval, "error": self.error, "message": self.message,
                    "log_path": self.log.path,
                    "num_branches": len(self.branches), "num_checkpoints": len(self.checkpoints),
                    "event_seq": self._event_seq}

    def optimizer_info(self) -> dict:
        with self._lock:
            hp = self.hyperparams()
            return {"hyperparams": hp, "settable": sorted(hp)}

    def model_info(self) -> dict:
        with self._lock:
            layers = []
            for layer in self.layers:
                leaves = jax.tree_util.tree_flatten_with_path(self.state["params"][layer])[0]
                layers.append({"name": layer, "frozen": self.frozen[layer],
                               "params": {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in leaves},
                               "size": int(sum(np.size(x) for _, x in leaves))})
            model = getattr(self.problem, "model", None)
            return {"model": type(model if model is not None else self.problem).__name__, "layers": layers}

    def dataset_info(self) -> dict:
        with self._lock:
            if not self.supervised:
                return {"name": type(self.problem).__name__, "num_train": None, "num_val": None, "input_shape": [],
                        "num_classes": None, "sources": [], "mixture": None, "batch_size": None}
            data = self.problem.data
            return {"name": data.name, "num_train": data.num_train, "num_val": int(np.shape(data.y_val)[0]),
                    "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                    "sources": [{"name": n, "count": c} for n, c in self.sources],
                    "mixture": self.mixture, "batch_size": self.problem.batch_size}

    def checkpoint_list(self) -> list:
        with self._lock:
            return list(self.checkpoints.values())

    def branch_list(self) -> list:
        with self._lock:
            return [dict(b) for b in self.branches]

    def command_record(self, command_id: str) -> dict | None:
        with self._lock:
            rec = self.commands.get(command_id)
            return dict(rec) if rec is not None else None

    # ---------------------------------------------------------------- events
    def _emit(self, event: dict) -> None:
        with self._events_lock:
            self._event_seq += 1
            event = {"seq": self._event_seq, "time": time.time(), **event}
            self._events.append(event)

    def events_since(self, seq: int, limit: int = 1000) -> list:
        with self._events_lock:
            if self._events and self._events[0]["seq"] > seq + 1:
                seq = self._events[0]["seq"] - 1
            out = [e for e in self._events if e["seq"] > seq]
            return out[:limit]

    @property
    def event_seq(self) -> int:
        return self._event_seq

    # -------------------------------------------------------------- commands
    def submit(self, payload) -> dict:
        """Validate a command and queue it for the next step boundary. Raises ``CommandError`` with the reason."""
        try:
            command = parse_command(payload)
        except ValidationError as err:
            raise CommandError(f"invalid command: {describe_validation_error(err)}") from None
        with self._lock:
            if self.stopped:
                raise CommandError("the run is stopped; start a new run to send commands.")
            if len(self._queue) >= MAX_QUEUED:
                raise CommandError(f"{MAX_QUEUED} commands are already queued; wait for them to be applied.")
            self._precheck(command)
            record = new_record(f"c{next(self._ids)}", command)
            self.commands[record["id"]] = record
            while len(self.commands) > MAX_COMMAND_RECORDS:
                self.commands.popitem(last=False)
            self._queue.append((record["id"], command))
            self._emit({"type": "command", "record": dict(record)})
            self._wake.notify_all()
            return dict(record)

    def _precheck(self, command) -> None:
        """Reject at once what cannot apply to this run, with what to change."""
        name = command.command
        if not self.supervised and name in NEEDS_SUPERVISED:
            raise CommandError(f"{name} needs a metagrad.TrainingProblem (a model, a training set and a loss); this "
                               f"run is a {type(self.problem).__name__}.")
        if name == "set_hyperparams":
            settable = set(self.hyperparams())
            if not settable:
                raise CommandError("this run's state holds no optimizer state from optax.inject_hyperparams (under "
                                   "'opt_state'), so it has no hyperparameters to set.")
            unknown = sorted(set(command.values) - settable)
            if unknown:
                raise CommandError(f"unknown hyperparameter(s) {unknown}: this optimizer exposes {sorted(settable)}.")
        elif name in ("reset_layer", "freeze_layer") and command.layer not in self.layers:
            raise CommandError(f"unknown layer {command.layer!r}: the model's top-level layers are {self.layers}.")
        elif name == "append_data":
            self._check_examples(command)
        elif name == "set_mixture":
            names = [n for n, _ in self.sources]
            unknown = sorted(set(command.weights) - set(names))
            if unknown:
                raise CommandError(f"unknown data source(s) {unknown}: the sources are {names}.")
            if sum(command.weights.values()) <= 0:
                raise CommandError("mixture weights must not all be zero: give at least one positive weight.")

    def _check_examples(self, command):
        data = self.problem.data
        width = int(np.prod(data.input_shape))
        if len(command.x) != len(command.y):
            raise CommandError(f"x has {len(command.x)} examples but y has {len(command.y)}: give one label per input.")
        bad = [i for i, row in enumerate(command.x) if len(row) != width]
        if bad:
            raise CommandError(f"example {bad[0]} has {len(command.x[bad[0]])} values; each input must have "
                               f"{width} values (shape {list(data.input_shape)}, flattened).")
        labels = [v for v in command.y if not 0 <= v < data.num_classes]
        if labels:
            raise CommandError(f"label {labels[0]} is out of range: labels must be in [0, {data.num_classes}).")

    def _set_status(self, record, status, **fields):
        with self._lock:
            record.update(status=status, **fields)
            self._emit({"type": "command", "record": dict(record)})

    def apply_pending_commands(self) -> None:
        """Apply every queued command now, in order (the run loop does this between steps)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                command_id, command = self._queue.popleft()
                record = self.commands.get(command_id) or new_record(command_id, command)
            self._run_command(record, command)

    def _run_command(self, record, command):
        self._set_status(record, "running", step=self.t, branch=self.branch)
        try:
            if command.command in READ_ONLY:  # long: computed from a snapshot, without holding the lock
                result = self.apply(command)
            else:
                with self._lock:
                    result = self.apply(command)
        except Exception as err:  # a failed command leaves the run as it was
            self._set_status(record, "failed", reason=f"{type(err).__name__}: {err}" if not isinstance(
                err, CommandError) else str(err))
            return
        self._set_status(record, "succeeded", result=result)

    def apply(self, command, *, record_step=None, record_branch=None, seq: int | None = None) -> dict | None:
        """Apply one validated command now (at the boundary before step ``self.t``) and log it.

        ``seq``: the intervention's number (default: the next one); a replay passes the logged number, which
        the LR sources refer to."""
        self._precheck(command)
        step, branch = self.t, self.branch
        handler = getattr(self, f"_cmd_{command.command}")
        previous = self._seq
        self._seq = self._seq + 1 if seq is None else int(seq)
        try:
            result = handler(command)
        except Exception:
            self._seq = previous
            raise
        entry = {"kind": "intervention", "seq": self._seq, "command": command.command,
                 "args": command.model_dump(exclude={"command"}), "step": step, "branch": branch,
                 "mutating": command.command not in NON_MUTATING}
        if command.command == "save_checkpoint":
            entry["checkpoint"] = result["checkpoint"]["id"]
        self.log.write(entry)  # the log has its own lock
        return result

    # -- handlers (run under the lock, in the trainer thread)
    def _cmd_set_hyperparams(self, cmd):
        opt_state = self.state["opt_state"]
        hp = dict(injected_hyperparams(opt_state))
        for name, value in cmd.values.items():
            hp[name] = jnp.asarray(value, dtype=jnp.result_type(hp[name]))
        self.state = {**self.state, "opt_state": with_hyperparams(opt_state, hp)}
        if "learning_rate" in cmd.values:
            self.lr_source = self._seq
        return {"hyperparams": self.hyperparams()}

    def _cmd_pause(self, cmd):
        self.paused, self.status = True, "paused"
        self._emit({"type": "status", "status": self.status, "step": self.t})

    def _cmd_resume(self, cmd):
        self.paused = False
        self.status = "finished" if self.t >= self.num_steps else "running"
        self._emit({"type": "status", "status": self.status, "step": self.t})

    def _cmd_stop(self, cmd):
        self.stopped, self.status = True, "stopped"
        self._emit({"type": "status", "status": self.status, "step": self.t})

    def _cmd_evaluate(self, cmd):
        return self.evaluate()

    def _cmd_save_checkpoint(self, cmd):
        ckpt_id = cmd.name or f"ckpt-{len(self.checkpoints) + 1}"
        if ckpt_id in self.checkpoints:
            raise CommandError(f"checkpoint {ckpt_id!r} exists already: choose another name.")
        limit = self.max_memory_checkpoints
        if self.store is None and limit is not None and len(self.checkpoints) >= limit:
            raise CommandError(f"this run keeps checkpoints in memory and holds {limit} already: "
                               "give the Trainer a checkpoint_dir (metagrad interactive always does) to keep more.")
        snapshot = _copy_state(self.state)
        path = None
        if self.store is not None:  # on disk, in the run's store; only the state's shapes stay in memory
            self.store.save_tree(ckpt_id, self.t, snapshot, {"step": self.t, "branch": self.branch}, max_to_keep=1)
            path = os.path.join(self.store.directory, RunStore.TREES, ckpt_id)
            snapshot = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), snapshot)
        self._ckpt_states[ckpt_id] = snapshot
        entry = {"id": ckpt_id, "step": self.t, "branch": self.branch, "path": path,
                 "frozen": dict(self.frozen), "lr_source": self.lr_source, "time": time.time()}
        self.checkpoints[ckpt_id] = entry
        self._emit({"type": "checkpoint", "checkpoint": entry})
        return {"checkpoint": entry}

    def _cmd_load_checkpoint(self, cmd):
        entry = self.checkpoints.get(cmd.checkpoint)
        if entry is None:
            raise CommandError(f"no checkpoint {cmd.checkpoint!r}: the checkpoints are {list(self.checkpoints)}.")
        if entry["path"] is not None:
            _, restored, _ = self.store.restore_tree(cmd.checkpoint, self._ckpt_states[cmd.checkpoint])
            # orbax gives containers back as dicts: the leaves in the state's own structure
            state = jax.tree.unflatten(jax.tree.structure(self.state), jax.tree.leaves(restored))
        else:
            state = _copy_state(self._ckpt_states[cmd.checkpoint])
        self.state = state
        self.frozen = dict(entry["frozen"])
        self.lr_source = entry["lr_source"]
        self._dirty = False
        new_branch = {"id": len(self.branches), "parent": entry["branch"], "fork_step": entry["step"],
                      "checkpoint": entry["id"], "name": cmd.branch_name}
        self.branches.append(new_branch)
        self.branch, self.t = new_branch["id"], entry["step"]
        if self.status in ("finished", "diverged"):
            self.status = "paused" if self.paused else "running"
        self._emit({"type": "branch", "branch": new_branch, "step": self.t})
        return {"branch": new_branch}

    def _cmd_reset_layer(self, cmd):
        problem = self.problem
        key = jax.random.fold_in(stream_key(problem.seed, "interactive"), cmd.seed)
        fresh = problem.model.init(key, jnp.asarray(problem.data.x_train[:1]))["params"]
        fresh = jax.tree.map(lambda a, like: a.astype(like.dtype), fresh, self.state["params"])
        params = dict(self.state["params"])
        params[cmd.layer] = fresh[cmd.layer]
        fresh_opt = problem.optimizer.init(params)

        def pick(path, cur, new):
            return new if any(getattr(k, "key", None) == cmd.layer for k in path) else cur

        opt_state = jax.tree_util.tree_map_with_path(pick, self.state["opt_state"], fresh_opt)
        self.state = {**self.state, "params": params, "opt_state": opt_state}
        self._dirty = True
        return {"layer": cmd.layer}

    def _cmd_freeze_layer(self, cmd):
        self.frozen[cmd.layer] = bool(cmd.frozen)
        return {"frozen": dict(self.frozen)}

    def _cmd_append_data(self, cmd):
        self._check_examples(cmd)
        data = self.problem.data
        dtype = np.dtype(self.problem.param_dtype)
        x_new = np.asarray(cmd.x, dtype).reshape((len(cmd.x), *data.input_shape))
        y_new = np.asarray(cmd.y, np.int32)
        old_index = self._source_of_examples()
        new_data = data.with_train(np.concatenate([data.x_train, x_new]), np.concatenate([data.y_train, y_new]))
        self.problem = dataclasses.replace(self.problem, data=new_data)
        counts = dict(self.sources)
        counts[cmd.source] = counts.get(cmd.source, 0) + len(y_new)
        # keep each example's source: examples are appended at the end, so sources become runs of indices
        self._source_index = np.concatenate([old_index, np.full(len(y_new), -1)])
        self.sources = list(counts.items())
        names = [n for n, _ in self.sources]
        self._source_index[self._source_index == -1] = names.index(cmd.source)
        self._recompute_weights()
        self.data_version += 1
        return {"num_train": new_data.num_train, "sources": dict(self.sources)}

    def _source_of_examples(self):
        idx = getattr(self, "_source_index", None)
        if idx is None:
            idx = np.zeros((self.problem.data.num_train,), np.int64)
        return idx

    def _cmd_set_mixture(self, cmd):
        self.mixture = dict(cmd.weights)
        self._recompute_weights()
        self.data_version += 1
        return {"mixture": self.mixture}

    def _recompute_weights(self):
        """Per-example loss weights so that source ``s`` carries ``mixture[s]`` of the loss (mean weight one)."""
        n = self.problem.data.num_train
        dtype = np.dtype(self.problem.param_dtype)
        if self.mixture is None:
            self.data_weights = np.ones((n,), dtype)
            return
        idx = self._source_of_examples()
        total = sum(self.mixture.values())
        weights = np.zeros((n,), np.float64)
        for s, (name, count) in enumerate(self.sources):
            share = self.mixture.get(name, 0.0) / total
            weights[idx == s] = share * n / max(count, 1)
        self.data_weights = weights.astype(dtype)

    def _cmd_suggest_lr(self, cmd):
        with self._lock:
            problem, state, frozen, weights, t = self.problem, self.state, dict(self.frozen), self.data_weights, self.t
        return suggest_lr(problem, state, frozen, weights, t, cmd.window)

    # ------------------------------------------------------------------ steps
    def evaluate(self) -> dict:
        """Validation loss and accuracy of the current state (also recorded as the latest evaluation)."""
        with self._lock:
            problem, state, step, branch = self.problem, self.state, self.t, self.branch
        if self.supervised:
            loss, acc = steps_lib.evaluate(problem, state)
            report = {"val_loss": float(loss), "val_accuracy": float(acc)}
        else:
            report = {name: float(value) for name, value in problem.evaluate(state).items()}
        result = {"step": step, "branch": branch, **report}
        with self._lock:
            self.last_eval = result
            self.evals.append(result)
            self.metrics_log.write({"kind": "eval", **result})
        self._emit({"type": "eval", **result})
        return result

    def _blew_up(self, loss: float) -> bool:
        """A finite loss :data:`BLOWUP_FACTOR` times the median of the recent committed losses, or more."""
        recent = [m["train_loss"] for m in itertools.islice(reversed(self.metrics), BLOWUP_WINDOW)
                  if m["branch"] == self.branch]
        if len(recent) < 5:
            return False
        median = float(np.median(recent))
        return median > 0 and loss >= BLOWUP_FACTOR * median

    def step_once(self) -> bool:
        """One training step, computed outside the lock and committed under it; ``False`` when it diverged
        (non-finite, or a finite blow-up): then the state is not committed and the run pauses."""
        tic = time.perf_counter()
        with self._lock:
            frozen = {layer: np.bool_(f) for layer, f in self.frozen.items()}
            problem, state, weights, t = self.problem, self.state, self.data_weights, self.t
        if self.supervised:
            new, m = steps_lib.train_step(problem, state, frozen, weights, np.int32(t))
            loss, grad_norm = float(m["train_loss"]), float(m["grad_norm"])
        else:  # a Problem with no loss of its own: finiteness of the state is the guard
            new, m = steps_lib.problem_step(problem, state, self.meta, np.int32(t))
            loss = grad_norm = None
        finite = bool(m["finite"])
        with self._lock:
            record = {"step": self.t, "branch": self.branch, "train_loss": loss, "grad_norm": grad_norm,
                      "lr": self.hyperparams().get("learning_rate"), "step_time": time.perf_counter() - tic}
            blew_up = finite and loss is not None and self._blew_up(loss)
            if not finite or blew_up:
                self.paused, self.status = True, "diverged"
                what = (f"a loss of {loss:.3g}, over {BLOWUP_FACTOR:g} times its recent median" if blew_up
                        else "a non-finite loss or parameters")
                self.message = (f"step {self.t} gave {what}; the run is paused at the last good state: lower the LR "
                                "or load a checkpoint, then resume.")
                self._emit({"type": "status", "status": "diverged", "step": self.t, "message": self.message})
                return False
            self.message = None
            if self.trace is not None:
                self.trace.append({"branch": self.branch, "t": self.t, "hyperparams": self.hyperparams(),
                                   "frozen": dict(self.frozen), "lr_source": self.lr_source,
                                   "data_version": self.data_version, "dirty": self._dirty})
            self._dirty = False
            self.state = new
            self.t += 1
            self.metrics.append(record)
            self.metrics_log.write({"kind": "metrics", **record})
            self._emit({"type": "metrics", **record})
            due = bool(self.eval_every and self.t % self.eval_every == 0)
        if due:
            self.evaluate()
        with self._lock:
            if self.t >= self.num_steps:
                self.status = "finished"
                self._emit({"type": "status", "status": "finished", "step": self.t})
        return True

    def _loop(self) -> None:
        try:
            while True:
                self.apply_pending_commands()
                with self._lock:
                    if self.stopped:
                        break
                    idle = self.paused or self.t >= self.num_steps or self.status == "diverged"
                    if idle:
                        if not self._queue:
                            self._wake.wait(timeout=0.2)
                        continue
                tic = time.perf_counter()
                self.step_once()
                left = self.min_step_seconds - (time.perf_counter() - tic)
                if left > 0:
                    time.sleep(left)
        except Exception as err:  # keep the error visible in /api/run instead of a silent dead thread
            self.error = f"{type(err).__name__}: {err}"
            self.status = "error"
            self._emit({"type": "status", "status": "error", "message": self.error})
        finally:
            self.finish()

    def start(self) -> "Trainer":
        self._thread = threading.Thread(target=self._loop, name="metagrad-trainer", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        try:
            self.submit({"command": "stop"})
        except CommandError:
            pass

    def join(self, timeout=None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finish(self) -> dict:
        """Write the log's end record (once) and close it."""
        with self._lock:
            if getattr(self, "_end", None) is None:
                self._end = {"kind": "end", "step": self.t, "branch": self.branch,
                             "fingerprint": fingerprint(self.state), "num_branches": len(self.branches)}
                self.log.write(self._end)
                self.log.close()
                self.metrics_log.close()
            return self._end


def suggest_lr(problem, state, frozen, data_weights, t0: int, window: int, k: int = 4) -> dict:
    """Metagradient (REPLAY) of the validation loss after ``window`` more steps w.r.t. the LR, and a suggested LR.

    The LR is held constant over the window; ``dval/dlr`` is the sum of the per-step metagradients.
    The suggestion is a step on ``log(lr)``: ``lr * exp(-clip(dval/dlog(lr) / |val|, -log 2, log 2))``,
    i.e. at most a doubling or a halving. The validation loss after the window at both LRs is reported.
    """
    run = steps_lib.steered_run(problem)
    lr = float(np.asarray(injected_hyperparams(state["opt_state"])["learning_rate"]))
    meta = steps_lib.window_meta(state, frozen, data_weights, t0, window)
    value, grad = run.value_and_metagrad(state, meta, window, k=k)
    per_step = np.asarray(grad["lr_schedule"], np.float64)
    dval_dlr = float(per_step.sum())
    value = float(value)
    dlog = dval_dlr * lr
    scale = max(abs(value), 1e-8)
    factor = math.exp(-float(np.clip(dlog / scale * 10.0, -math.log(2), math.log(2))))
    suggested = lr * factor
    meta_s = steps_lib.window_meta(state, frozen, data_weights, t0, window, lr=suggested)
    import replay

    after = replay.advance(run.step, state, meta_s, 0, window)
    val_suggested = float(run.objective(after, meta_s))
    return {"lr": lr, "window": window, "val_loss": value, "dval_dlr": dval_dlr, "dval_dloglr": dlog,
            "direction": "decrease" if dval_dlr > 0 else ("increase" if dval_dlr < 0 else "keep"),
            "suggested_lr": suggested, "factor": factor, "val_loss_at_suggested": val_suggested,
            "per_step_metagrad_head": per_step[:5].tolist()}
