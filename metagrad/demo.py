"""The main job: metagradient descent on a learning-rate schedule on MNIST-1D."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax.numpy as jnp
import numpy as np
import optax

from . import data as data_lib
from .meta import LRSchedule
from .mgd import mgd
from .models import MLP
from .report import format_table, plot_line, pyplot
from .store import RunStore
from .problem import train_and_evaluate
from .training import TrainingProblem

logger = logging.getLogger("metagrad")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    num_steps: int = 500
    num_knots: int = 10
    initial_lr: float = 0.003  # a deliberately poor flat schedule
    meta_steps: int = 50
    meta_lr: float = 0.01
    k: int = 8
    hidden: tuple[int, ...] = (64, 64)
    batch_size: int = 128
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A reduced size for CI (tens of seconds on 2 cores)."""
        return cls(num_steps=120, num_knots=10, meta_steps=8, meta_lr=0.02, hidden=(32,))


def run_demo(out_dir: str, config: DemoConfig = DemoConfig(), *, progress: bool = True, fresh: bool = False,
             resume: bool | None = None) -> dict:
    """Run MGD on the LR schedule, print a table, write ``result.json`` and ``demo.png`` to ``out_dir``.

    ``out_dir`` is the run's :class:`~metagrad.store.RunStore`: MGD saves every
    meta-step there, a rerun with the same ``config`` resumes it, and one with
    another ``config`` is refused (:class:`~metagrad.store.SettingsMismatchError`)
    rather than overwriting its results; ``fresh=True`` discards the earlier run.
    ``resume=False`` is the older spelling of ``fresh=True``.
    """
    if resume is not None:
        fresh = fresh or not resume
    store = RunStore(out_dir, dataclasses.asdict(config), fresh=fresh)
    tic = time.perf_counter()
    dataset = data_lib.mnist1d(seed=config.seed)
    problem = TrainingProblem(
        MLP(hidden=config.hidden),
        optax.inject_hyperparams(optax.sgd)(learning_rate=config.initial_lr, momentum=0.9),
        dataset,
        num_steps=config.num_steps,
        batch_size=config.batch_size,
        seed=config.seed,
        lr_schedule=LRSchedule(config.num_knots, config.initial_lr),
    )
    meta0 = problem.init_meta()
    result = mgd(
        lambda m: problem.value_and_metagrad(m, k=config.k),
        meta0,
        optimizer=optax.adam(config.meta_lr),
        num_meta_steps=config.meta_steps,
        project=problem.project_meta,
        store=store,
        progress=progress,
    )
    # The schedule reported is the best one by validation loss (the metaobjective), scored on test too.
    initial, final = train_and_evaluate(problem, meta0), train_and_evaluate(problem, result.best_meta)
    report = {
        "config": dataclasses.asdict(config),
        "dataset": {"name": dataset.name, "train": dataset.num_train, "val": len(dataset.y_val), "test": len(dataset.y_test)},
        "initial": initial,
        "final": final,
        "initial_schedule": np.asarray(meta0["lr_schedule"]).tolist(),
        "learned_schedule": np.asarray(result.best_meta["lr_schedule"]).tolist(),
        "history": result.history,
        "resumed_from_meta_step": result.resumed_from,
        "seconds": time.perf_counter() - tic,
    }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_demo(report, problem, os.path.join(out_dir, "demo.png"))
    print(format_demo_table(report))
    print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'demo.png')}")
    return report


def format_demo_table(report: dict) -> str:
    rows = [(f"{name} schedule", r["val_loss"], f"{r['val_accuracy']:.3f}", r["test_loss"], f"{r['test_accuracy']:.3f}")
            for name, r in ((n, report[n]) for n in ("initial", "final"))]
    return format_table(("", "val loss", "val acc", "test loss", "test acc"), rows)


def plot_demo(report: dict, problem: TrainingProblem, path: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = np.arange(problem.num_steps)
    for name, key in (("initial", "initial_schedule"), ("learned", "learned_schedule")):
        lrs = np.asarray(problem.lr_schedule.values(jnp.asarray(report[key]), problem.num_steps))
        plot_line(ax1, steps, lrs, label=name)
    ax1.set(xlabel="training step", ylabel="learning rate", title="LR schedule")
    ax1.legend()
    hist = report["history"]
    plot_line(ax2, [h["meta_step"] for h in hist], [h["objective"] for h in hist], short=None)
    ax2.set(xlabel="meta-step", ylabel="validation loss", title="Metaobjective during MGD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
