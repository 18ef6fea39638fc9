"""Interactive training: steer a run while it trains, and replay or differentiate it afterwards.

After "Interactive Training: Feedback-Driven Neural Network Optimization"
(arXiv 2510.02297): a :class:`Trainer` runs metagrad's functional training loop
under commands (hyperparameters, pause/resume/stop, evaluation, orbax
checkpoints with a tree of branches, layer reset/freeze, data pushes and
mixture weights); a FastAPI :class:`ControlServer` exposes it over REST and a
WebSocket with a browser dashboard; agents (:class:`RuleAgent`,
:class:`OpenAIChatAgent`) read the event stream and send commands. Every
intervention is logged with its step and branch, so :func:`replay_log` re-runs
a session bitwise and :func:`intervention_metagradients` differentiates the
validation loss with respect to each LR intervention with REPLAY.
"""

from .agents import AgentRunner, AgentView, OpenAIChatAgent, RuleAgent, parse_action
from .commands import CommandError, parse_command
from .log import InterventionLog, fingerprint, read_log
from .problems import BUILTIN_SPEC, ProblemReferenceError, build_problem, load_problem
from .replay_log import ReplayMismatch, intervention_metagradients, replay_log
from .trainer import Trainer, suggest_lr

__all__ = [
    "AgentRunner", "AgentView", "BUILTIN_SPEC", "CommandError", "InterventionLog", "OpenAIChatAgent",
    "ProblemReferenceError", "ReplayMismatch", "RuleAgent", "Trainer", "build_problem", "fingerprint",
    "intervention_metagradients", "load_problem", "parse_action", "parse_command", "read_log", "replay_log",
    "suggest_lr",
]


def __getattr__(name):  # the server needs fastapi/uvicorn: import it only when asked for
    if name in ("ControlServer", "create_app"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
