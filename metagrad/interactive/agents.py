"""Agents in the loop: they read the run's event stream and send commands through the same API as a person.

An agent is a *policy* (``decide(view) -> "Double" | "Half" | "Same"``, the action
space of Interactive Training, arXiv 2510.02297) driven by an
:class:`AgentRunner`, which follows the WebSocket of the control server, keeps
the recent LR / train loss / validation loss histories, asks the policy every
``every`` steps, and posts the resulting ``set_hyperparams`` (or ``resume``
after a divergence) to ``POST /api/commands``.

Policies shipped:

- :class:`RuleAgent`: halve the LR on a loss spike or divergence, restart from the start at half the LR
  when the run has learned nothing, double it on a plateau.
- :class:`OpenAIChatAgent`: sends the paper-style prompt (recent LR, train and validation
  loss histories) to any OpenAI-compatible ``/chat/completions`` endpoint and parses a
  JSON action.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time

ACTIONS = ("Double", "Half", "Same")
#: The rule agent may also roll back to its best checkpoint (and halve the LR) when the loss blows up,
ROLLBACK = "Rollback"
#: or go back to the start of the run (and halve the LR) when the run has learned nothing.
RESTART = "Restart"


@dataclasses.dataclass
class AgentView:
    """What a policy sees: recent histories (oldest first), steps since the last LR change, the run's status."""

    step: int = 0
    lr: list = dataclasses.field(default_factory=list)
    train_loss: list = dataclasses.field(default_factory=list)
    val_loss: list = dataclasses.field(default_factory=list)
    steps_since_change: int = 0
    status: str = "running"
    diverged: bool = False
    has_checkpoint: bool = False
    lr_ceiling: float = float("inf")  # the lowest LR the agent has had to halve: it never doubles back to it
    initial_loss: float | None = None  # the mean train loss of the run's first window (what "learned nothing" means)
    can_restart: bool = False  # the runner holds a checkpoint of the run's start


def _mean(xs):
    return sum(xs) / len(xs)


@dataclasses.dataclass
class RuleAgent:
    """Halve the LR on a loss spike or divergence, restart when nothing is learned, double it on a plateau.

    Spike: the mean train loss of the last ``window`` steps is above ``spike_ratio`` times the window
    before, or non-finite. Blow-up: the run diverged, or the window mean is above ``blowup_ratio`` times
    the best window mean of the history; then, when the runner holds a checkpoint taken at that best
    point, the action is ``"Rollback"`` (load it and halve the LR), else ``"Half"``. Learned nothing:
    ``stall_steps`` steps at this LR and the window mean is still within ``stall_tol`` of the run's first
    window (a too-high LR that keeps the loss at chance without diverging); then ``"Restart"`` (back to
    the start of the run at half the LR) when the runner holds the start, else ``"Half"``. Plateau: the
    relative change between the two windows is below ``plateau_tol``. Each change is judged on ``window``
    fresh steps before the next; the LR stays within ``[min_lr, max_lr]``.
    """

    window: int = 10
    spike_ratio: float = 1.3
    blowup_ratio: float = 2.0
    plateau_tol: float = 0.002
    stall_steps: int = 100
    stall_tol: float = 0.05
    min_lr: float = 1e-5
    max_lr: float = 1.0

    def decide(self, view: AgentView) -> str:
        lr = view.lr[-1] if view.lr else None
        can_halve = lr is None or lr / 2 >= self.min_lr
        if view.diverged:
            return ROLLBACK if view.has_checkpoint else ("Half" if can_halve else "Same")
        w, losses = self.window, view.train_loss
        if len(losses) < 2 * w or view.steps_since_change < w:
            return "Same"
        recent, before = losses[-w:], losses[-2 * w:-w]
        if not all(math.isfinite(x) for x in recent):
            return "Half" if can_halve else "Same"
        r, b = _mean(recent), _mean(before)
        best = min(_mean(losses[i:i + w]) for i in range(0, len(losses) - w + 1, w))
        if r > self.blowup_ratio * best and view.has_checkpoint:
            return ROLLBACK
        if (r > self.spike_ratio * b or r > self.blowup_ratio * best) and can_halve:
            return "Half"
        if (view.initial_loss is not None and view.steps_since_change >= self.stall_steps and can_halve
                and r >= (1 - self.stall_tol) * view.initial_loss):
            return RESTART if view.can_restart else "Half"
        if (abs(r - b) <= self.plateau_tol * abs(b) and lr is not None and lr * 2 <= self.max_lr
                and lr * 2 < view.lr_ceiling):
            return "Double"
        return "Same"


PROMPT = """You are an expert in training neural networks, supervising a training run as it goes.
Every {every} steps you choose how to change the learning rate.

Recent learning rates (oldest first): {lr}
Recent training losses (oldest first): {train_loss}
Recent validation losses (oldest first): {val_loss}
Current step: {step}

Rules of thumb: if the loss spikes, oscillates or diverges, halve the learning rate; if it plateaus while
still high, double it; otherwise keep it.
Answer with a JSON object only, for example {{"action": "Half", "reason": "loss is rising"}}, where action is
one of "Double", "Half" or "Same"."""


def parse_action(text: str) -> str:
    """The ``action`` of the first JSON object in ``text`` ("Double", "Half" or "Same"); raises ``ValueError``."""
    for match in re.finditer(r"\{[^{}]*\}", text or ""):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        action = str(obj.get("action", "")).strip().capitalize()
        if action in ACTIONS:
            return action
    raise ValueError(f"no JSON action among {ACTIONS} in the model's reply: {text[:200]!r}")


def _fmt(values, n=20):
    return "[" + ", ".join(f"{v:.4g}" for v in values[-n:]) + "]"


@dataclasses.dataclass
class OpenAIChatAgent:
    """A policy backed by an OpenAI-compatible chat endpoint (``{base_url}/chat/completions``).

    ``base_url`` is e.g. ``http://127.0.0.1:8000/v1``; ``api_key`` goes in the ``Authorization`` header.
    A reply without a valid action, or a failed request, yields ``"Same"`` and is kept in ``errors``.
    """

    base_url: str
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    every: int = 10
    history: int = 20
    timeout: float = 30.0
    temperature: float = 0.0
    errors: list = dataclasses.field(default_factory=list)
    replies: list = dataclasses.field(default_factory=list)

    def prompt(self, view: AgentView) -> str:
        return PROMPT.format(every=self.every, lr=_fmt(view.lr, self.history),
                             train_loss=_fmt(view.train_loss, self.history),
                             val_loss=_fmt(view.val_loss, self.history), step=view.step)

    def decide(self, view: AgentView) -> str:
        import httpx

        body = {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "system", "content": "You control the learning rate of a training run."},
                             {"role": "user", "content": self.prompt(view)}]}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            res = httpx.post(self.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                             timeout=self.timeout)
            res.raise_for_status()
            text = res.json()["choices"][0]["message"]["content"]
            self.replies.append(text)
            return parse_action(text)
        except Exception as err:  # a bad reply must not stop the agent or the run
            self.errors.append(f"{type(err).__name__}: {err}")
            return "Same"


class AgentRunner:
    """Drives a policy against a control server: WebSocket in, ``POST /api/commands`` out, in a thread.

    ``every``: steps between decisions; ``max_history``: how much history it keeps. Every decision is kept
    in ``decisions`` as ``(step, action, lr_before, command_id)``.
    """

    def __init__(self, base_url: str, token: str, policy, *, every: int = 10, max_history: int = 200,
                 resume_after_divergence: bool = True, checkpoints: bool = True):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.policy = policy
        self.every = int(every)
        self.max_history = max_history
        self.resume_after_divergence = resume_after_divergence
        self.view = AgentView()
        self.decisions: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_decision_step = -1
        self._branch = None
        self.checkpoints = checkpoints
        self.best_checkpoint: str | None = None
        self.start_checkpoint: str | None = None
        self._best_window = float("inf")
        self._first_losses: list = []

    # -- the API
    def _post(self, command: dict) -> dict | None:
        import httpx

        try:
            res = httpx.post(f"{self.base_url}/api/commands", json=command, headers={"X-Token": self.token},
                             timeout=10)
        except httpx.HTTPError as err:
            self.errors.append(f"{type(err).__name__}: {err}")
            return None
        if res.status_code != 202:
            self.errors.append(f"{res.status_code}: {res.text[:200]}")
            return None
        return res.json()

    # -- events
    def _trim(self, values):
        del values[:-self.max_history]

    def on_event(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "metrics" and (ev.get("train_loss") is None or ev.get("lr") is None):
            return  # a problem without a training loss or an LR (any metagrad.Problem): nothing to steer by
        if kind == "metrics":
            if self._branch is not None and ev["branch"] != self._branch:
                self.view.steps_since_change = 0  # a new branch: judge it on fresh steps
                self._last_decision_step = ev["step"]  # (its steps may count from before the last decision)
            self._branch = ev["branch"]
            self.view.step = ev["step"] + 1
            if self.view.lr and ev["lr"] != self.view.lr[-1]:
                self.view.steps_since_change = 0
            self.view.steps_since_change += 1
            self.view.lr.append(ev["lr"])
            self.view.train_loss.append(ev["train_loss"])
            if self.view.initial_loss is None:  # the run's first window, kept once
                self._first_losses.append(ev["train_loss"])
                if len(self._first_losses) >= getattr(self.policy, "window", self.every):
                    self.view.initial_loss = _mean(self._first_losses)
            if self.checkpoints and self.best_checkpoint is None and math.isfinite(ev["train_loss"]):
                # the first rollback target: (about) the start, with its loss as the bar later ones must beat
                name = f"agent-start-{ev['step'] + 1}"
                if self._post({"command": "save_checkpoint", "name": name}) is not None:
                    self.best_checkpoint, self._best_window = name, ev["train_loss"]
                    self.start_checkpoint = name
                    self.view.has_checkpoint = self.view.can_restart = True
            self._trim(self.view.lr)
            self._trim(self.view.train_loss)
            if self.view.step - self._last_decision_step >= self.every:
                self._act()
        elif kind == "eval" and ev.get("val_loss") is not None:
            self.view.val_loss.append(ev["val_loss"])
            self._trim(self.view.val_loss)
        elif kind == "status":
            self.view.status = ev["status"]
            if ev["status"] == "diverged":
                self.view.diverged = True
                self._act()
                self.view.diverged = False

    def _maybe_checkpoint(self) -> None:
        """Save a checkpoint when the last window's mean loss is the best so far (the rollback target)."""
        w = getattr(self.policy, "window", self.every)
        losses = self.view.train_loss[-w:]
        if not self.checkpoints or len(losses) < w or not all(math.isfinite(x) for x in losses):
            return
        mean = _mean(losses)
        if mean < self._best_window:
            name = f"agent-{len(self.decisions)}-{self.view.step}"
            if self._post({"command": "save_checkpoint", "name": name}) is not None:
                self._best_window, self.best_checkpoint = mean, name
                self.view.has_checkpoint = True

    def _act(self) -> None:
        self._last_decision_step = self.view.step
        action = self.policy.decide(self.view)
        lr = self.view.lr[-1] if self.view.lr else None
        command_id = None
        if action in (ROLLBACK, RESTART, "Half") and lr is not None:
            self.view.lr_ceiling = min(self.view.lr_ceiling, lr)
        target = {ROLLBACK: self.best_checkpoint, RESTART: self.start_checkpoint}.get(action)
        if target is not None and lr is not None:
            self._post({"command": "load_checkpoint", "checkpoint": target})
            rec = self._post({"command": "set_hyperparams", "values": {"learning_rate": lr / 2}})
            command_id = rec["id"] if rec else None
            self.view.steps_since_change = 0
        elif action in ("Double", "Half") and lr is not None:
            new_lr = lr * 2 if action == "Double" else lr / 2
            rec = self._post({"command": "set_hyperparams", "values": {"learning_rate": new_lr}})
            command_id = rec["id"] if rec else None
            self.view.steps_since_change = 0  # judge the new LR on fresh steps
        elif action == "Same" and not self.view.diverged:
            self._maybe_checkpoint()
        if self.view.status == "diverged" and self.resume_after_divergence:
            self._post({"command": "resume"})
            self.view.status = "running"
        self.decisions.append((self.view.step, action, lr, command_id))

    def _run(self) -> None:
        from websockets.sync.client import connect

        url = self.base_url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?token={self.token}&since=0"
        try:
            with connect(url, open_timeout=10, max_size=2**24) as ws:
                while not self._stop.is_set():
                    try:
                        message = json.loads(ws.recv(timeout=0.2))
                    except TimeoutError:
                        continue
                    if message.get("type") == "events":
                        for ev in message["events"]:
                            self.on_event(ev)
                            if ev.get("type") == "status" and ev.get("status") in ("stopped", "finished", "error"):
                                if ev["status"] != "finished":
                                    return
        except Exception as err:  # keep the reason; the run itself is unaffected
            if not self._stop.is_set():
                self.errors.append(f"{type(err).__name__}: {err}")

    def start(self) -> "AgentRunner":
        self._thread = threading.Thread(target=self._run, name="metagrad-agent", daemon=True)
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        """Whether the agent's thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, predicate, timeout: float) -> bool:
        return wait_until(predicate, timeout)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` every ``interval`` seconds until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
