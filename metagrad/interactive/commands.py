"""The commands that steer an interactive run, as validated request schemas, and their status records.

Every command takes effect between two steps (at the next step boundary the
trainer reaches) and goes through the statuses ``requested -> running ->
succeeded | failed``; a failed command carries the reason. The schemas are
pydantic models, so the control server validates a request (types, ranges,
sizes) before anything reaches the trainer, and the OpenAPI spec lists them.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

#: Largest number of examples one ``append_data`` request may carry.
MAX_APPEND_EXAMPLES = 1024
#: Largest finite magnitude accepted for a hyperparameter value.
MAX_HYPERPARAM = 1e6
#: Declared ranges ``(low, high, low_inclusive, high_inclusive)`` of the hyperparameters optax's optimizers take;
#: a value outside is refused (a negative or huge LR ruins a run while its loss stays finite).
HYPERPARAM_RANGES = {
    "learning_rate": (0.0, 10.0, False, True),
    "momentum": (0.0, 1.0, True, False),
    "b1": (0.0, 1.0, True, False),
    "b2": (0.0, 1.0, True, False),
    "decay": (0.0, 1.0, True, False),
    "weight_decay": (0.0, 10.0, True, True),
    "eps": (0.0, 1.0, False, True),
    "eps_root": (0.0, 1.0, True, True),
}


def check_hyperparam(name: str, value) -> float:
    """``value`` as a float when it is a number in ``name``'s declared range; else ``ValueError`` naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"hyperparameter {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_HYPERPARAM:
        raise ValueError(f"hyperparameter {name!r} must be finite with |value| <= {MAX_HYPERPARAM:g}, got {value}")
    if name in HYPERPARAM_RANGES:
        low, high, low_in, high_in = HYPERPARAM_RANGES[name]
        ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not ok:
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ValueError(f"hyperparameter {name!r} must be in {interval}, got {value:g}")
    return value


def checkpoint_name(name: str) -> str:
    """A checkpoint name: letters, digits, ``_ . -``, not only dots (``.`` and ``..`` name folders)."""
    if not name.strip("."):
        raise ValueError(f"checkpoint name {name!r} is only dots: use letters or digits too")
    return name

STATUSES = ("requested", "running", "succeeded", "failed")


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SetHyperparams(_Command):
    """Set optimizer hyperparameters injected by ``optax.inject_hyperparams`` (e.g. ``learning_rate``, ``momentum``)."""

    command: Literal["set_hyperparams"]
    values: dict[Annotated[str, Field(min_length=1, max_length=64)], float] = Field(min_length=1, max_length=16)

    @field_validator("values", mode="before")
    @classmethod
    def _in_range(cls, values):
        if not isinstance(values, dict):
            return values  # the type check below names the problem
        out = {}
        for name, value in values.items():
            if isinstance(value, str):
                raise ValueError(f"hyperparameter {name!r} must be a valid number, got {value!r}")
            out[name] = check_hyperparam(name, value)
        return out


class Pause(_Command):
    command: Literal["pause"]


class Resume(_Command):
    command: Literal["resume"]


class Stop(_Command):
    command: Literal["stop"]


class Evaluate(_Command):
    """Evaluate loss and accuracy on the validation split now."""

    command: Literal["evaluate"]


class SaveCheckpoint(_Command):
    """Save parameters and optimizer state (orbax) under a new checkpoint id."""

    command: Literal["save_checkpoint"]
    name: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("name")
    @classmethod
    def _not_only_dots(cls, name):
        return None if name is None else checkpoint_name(name)


class LoadCheckpoint(_Command):
    """Restore a checkpoint; the run continues on a new branch forked at the checkpoint's step."""

    command: Literal["load_checkpoint"]
    checkpoint: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    branch_name: str | None = Field(default=None, min_length=1, max_length=64,
                                    pattern=r"^[A-Za-z0-9_. -]+$", description="a name for the new branch")

    @field_validator("checkpoint")
    @classmethod
    def _not_only_dots(cls, name):
        return checkpoint_name(name)


class ResetLayer(_Command):
    """Re-initialize one top-level layer (its parameters and its optimizer state)."""

    command: Literal["reset_layer"]
    layer: Annotated[str, Field(min_length=1, max_length=128)]
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class FreezeLayer(_Command):
    """Freeze (or unfreeze) one top-level layer: its parameters stop changing."""

    command: Literal["freeze_layer"]
    layer: Annotated[str, Field(min_length=1, max_length=128)]
    frozen: bool = True


class AppendData(_Command):
    """Append training examples (inputs shaped like the dataset's, integer labels) to a data source."""

    command: Literal["append_data"]
    x: list[list[float]] = Field(min_length=1, max_length=MAX_APPEND_EXAMPLES)
    y: list[int] = Field(min_length=1, max_length=MAX_APPEND_EXAMPLES)
    source: str = Field(default="pushed", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("x")
    @classmethod
    def _finite_inputs(cls, x):
        for row in x:
            if len(row) > 65536:
                raise ValueError("each example may hold at most 65536 values")
            if not all(math.isfinite(v) for v in row):
                raise ValueError("inputs must be finite numbers (no NaN or inf)")
        return x


class SetMixture(_Command):
    """Set the mixture weights of the data sources (non-negative, normalized to sum to one)."""

    command: Literal["set_mixture"]
    weights: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(ge=0.0, le=1e6)]] = Field(
        min_length=1, max_length=64)


class SuggestLR(_Command):
    """Metagradient of the validation loss after the next ``window`` steps w.r.t. the LR (REPLAY); changes nothing."""

    command: Literal["suggest_lr"]
    window: int = Field(default=50, ge=1, le=2000)


Command = Annotated[
    Union[SetHyperparams, Pause, Resume, Stop, Evaluate, SaveCheckpoint, LoadCheckpoint, ResetLayer, FreezeLayer,
          AppendData, SetMixture, SuggestLR],
    Field(discriminator="command"),
]

COMMAND_ADAPTER = TypeAdapter(Command)

#: Commands that change nothing the replay has to reproduce.
NON_MUTATING = frozenset({"evaluate", "suggest_lr", "pause", "resume"})


def parse_command(payload) -> _Command:
    """Validate a JSON-like payload into a command model (raises ``pydantic.ValidationError``)."""
    return COMMAND_ADAPTER.validate_python(payload)


def describe_validation_error(err) -> str:
    """One line per problem, naming the field and what to change."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts)


class CommandError(ValueError):
    """A command that is well formed but cannot apply to this run (the message says what to change)."""


def new_record(command_id: str, command: _Command) -> dict:
    """The status record of a freshly requested command."""
    return {"id": command_id, "command": command.command, "args": command.model_dump(exclude={"command"}),
            "status": "requested", "requested_at": time.time(), "step": None, "branch": None,
            "reason": None, "result": None}
