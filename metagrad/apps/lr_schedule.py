"""Learning-rate schedule optimization by MGD, against a grid of the usual schedule families.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.3:
MGD over the knots of a piecewise-linear schedule, minimizing the validation loss
of the final model, compared with a grid search over standard schedules.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import optax

from ..meta import LogLRSchedule, LRSchedule
from ..mgd import mgd
from ..problem import train_and_evaluate
from ..progress import progress_bar
from ..store import RunStore
from ..training import TrainingProblem
from .common import (describe_dataset, evaluate_at_seed, fresh_training_seeds, mean_and_std,
                     mean_value_and_metagrad, problem_on_data, seconds_per_training_run)


def schedule(family: str, peak: float, warmup_fraction: float, num_steps: int) -> np.ndarray:
    """Per-step learning rates of a standard family: ``constant``, ``linear`` or ``cosine``
    (linear warmup over ``warmup_fraction`` of the run, then a decay to zero)."""
    t = np.arange(num_steps, dtype=np.float64)
    if family == "constant":
        return np.full(num_steps, peak)
    warmup = max(int(round(warmup_fraction * num_steps)), 1)
    ramp = peak * np.minimum((t + 1) / warmup, 1.0)
    progress = np.clip((t - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
    if family == "linear":
        decay = 1.0 - progress
    elif family == "cosine":
        decay = 0.5 * (1.0 + np.cos(np.pi * progress))
    else:
        raise ValueError(f"unknown schedule family {family!r}; use 'constant', 'linear' or 'cosine'.")
    return np.where(t < warmup, ramp, peak * decay)


def default_grid(peaks=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), warmups=(0.05, 0.25)) -> list[dict]:
    """Constant schedules at each peak, and warmup + linear / cosine decay at each peak and warmup."""
    grid = [{"family": "constant", "peak": p, "warmup_fraction": 0.0} for p in peaks]
    for family in ("linear", "cosine"):
        grid += [{"family": family, "peak": p, "warmup_fraction": w} for p in peaks for w in warmups]
    return grid


#: the metrics of ``problem.evaluate`` a report gives per method, those the problem reports (accuracy for a
#: classifier, bits per byte for a language model)
METRICS = ("val_loss", "test_loss", "test_accuracy", "val_bpb", "test_bpb")
METRIC_LABELS = {"val_loss": "val loss", "test_loss": "test loss", "test_accuracy": "test acc", "val_bpb": "val bpb",
                 "test_bpb": "test bpb"}


def with_schedule_only(problem, spec):
    """``problem`` with the schedule ``spec`` as its one metaparameter: each other metaparameter field it declares
    (``data_weights``, ``poison``, ``mixture_weights``, ...) set to ``None``; any Problem dataclass with an
    ``lr_schedule`` field (:class:`~metagrad.training.TrainingProblem`, :class:`~metagrad.lm.LMProblem`)."""
    fields = {f.name for f in dataclasses.fields(problem)}
    others = {name: None for name in problem.meta_specs() if name != "lr_schedule" and name in fields}
    return dataclasses.replace(problem, lr_schedule=spec, **others)


def per_step_problem(problem: TrainingProblem) -> TrainingProblem:
    """The same problem with a per-step LR schedule (any schedule can then be given exactly)."""
    return dataclasses.replace(problem, lr_schedule=LRSchedule(problem.num_steps, 0.0))


def grid_search(problem: TrainingProblem, grid=None, *, progress: bool = True) -> list[dict]:
    """Train and score every schedule of ``grid`` the same way (sorted by validation loss)."""
    grid = default_grid() if grid is None else grid
    exact = per_step_problem(problem)
    rows = []
    for spec in progress_bar(grid, desc="grid", disable=not progress):
        lrs = schedule(spec["family"], spec["peak"], spec["warmup_fraction"], problem.num_steps)
        metrics = train_and_evaluate(exact, {"lr_schedule": jnp.asarray(lrs, problem.param_dtype)})
        rows.append({**spec, **metrics})
    return sorted(rows, key=lambda r: r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf)


def optimize_lr_schedule(problem: TrainingProblem, *, meta_steps: int = 50, meta_optimizer=None, initial_lr=None,
                         k: int = 8, checkpoint_dir=None, progress: bool = True) -> dict:
    """MGD on the problem's piecewise-linear schedule from a flat start; returns metrics and the MGD log.

    The schedule returned is the best by validation loss among those visited;
    its test metrics are those of a fresh training run under it.
    """
    if problem.lr_schedule is None:
        raise ValueError("the problem has no lr_schedule metaparameter: give lr_schedule=LRSchedule(num_knots, init).")
    meta0 = problem.init_meta()
    if initial_lr is not None:
        meta0["lr_schedule"] = jnp.full_like(meta0["lr_schedule"], initial_lr)
    tic = time.perf_counter()
    result = mgd(lambda m: problem.value_and_metagrad(m, k=k), meta0,
                 optimizer=meta_optimizer or optax.adam(0.01), num_meta_steps=meta_steps,
                 project=problem.project_meta, checkpoint_dir=checkpoint_dir, progress=progress)
    mgd_seconds = time.perf_counter() - tic
    if result.resumed_from:  # the wall clock saw only this run's part; the log has every meta-step's time
        mgd_seconds = float(sum(h["seconds"] for h in result.history))
    return {
        "initial": train_and_evaluate(problem, meta0),
        "final": train_and_evaluate(problem, result.best_meta),
        "initial_knots": np.asarray(meta0["lr_schedule"]).tolist(),
        "learned_knots": np.asarray(result.best_meta["lr_schedule"]).tolist(),
        "history": result.history,
        "mgd_seconds": mgd_seconds,
        "resumed_from_meta_step": result.resumed_from,
        "seconds_per_training_run": seconds_per_training_run(problem, meta0),
    }


# ------------------------------------------------------------------ the application, with defaults chosen once
@dataclasses.dataclass(frozen=True)
class ScheduleSearch:
    """How :func:`search_schedule` learns a schedule: defaults chosen once and used unchanged on every data set.

    Nothing here is in units of the data: the schedule is an absolute learning
    rate of the problem's optimizer, and every step MGD takes is a *relative*
    change of it (knots in log space, :class:`~metagrad.meta.LogLRSchedule`).

    Attributes:
      num_knots: knots of the piecewise-linear (in log LR) schedule.
      initial_lr: the flat schedule MGD starts from.
      meta_steps: MGD steps (Adam on the log knots).
      meta_lr: Adam's step on the log knots (0.1: about 10% change of a knot per meta-step).
      seeds_per_step: fresh training seeds per meta-step (the metaobjective is the expectation over the
        training run's randomness, so the schedule cannot fit one seed's batch order).
      selection_seeds: training seeds on which the last and the best-seen iterates are compared (on
        validation loss) to pick MGD's answer.
      eval_seeds: fresh training seeds every method's final schedule is scored on.
      peaks, warmups: the grid of standard schedules (constant at each peak; warmup + linear / cosine
        decay at each peak and warmup fraction).
      grid_finalists: the grid's best few (one run each) that are compared on ``selection_seeds``, as MGD's
        two candidates are, to pick the grid's answer.
      k: REPLAY's branching factor.
    """

    num_knots: int = 12
    initial_lr: float = 0.01
    meta_steps: int = 50
    meta_lr: float = 0.1
    seeds_per_step: int = 1
    selection_seeds: tuple = (500, 501)
    eval_seeds: tuple = (1000, 1001, 1002, 1003, 1004)
    peaks: tuple = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    warmups: tuple = (0.05, 0.25)
    grid_finalists: int = 3
    k: int = 8
    seed_start: int = 10_000

    def __post_init__(self):
        if not self.initial_lr > 0:
            raise ValueError(f"initial_lr must be > 0, got {self.initial_lr}.")
        if self.meta_steps < 1 or self.seeds_per_step < 1 or self.num_knots < 1:
            raise ValueError("meta_steps, seeds_per_step and num_knots must be >= 1.")
        if not self.eval_seeds or not self.selection_seeds:
            raise ValueError("give at least one eval seed and one selection seed.")
        used = set(range(self.seed_start, self.seed_start + self.meta_steps * self.seeds_per_step))
        if used & (set(self.eval_seeds) | set(self.selection_seeds)) or set(self.eval_seeds) & set(self.selection_seeds):
            raise ValueError("eval_seeds, selection_seeds and the seeds MGD trains from must be disjoint.")

    def grid(self) -> list[dict]:
        return default_grid(self.peaks, self.warmups)


def search_schedule(problem: TrainingProblem, search: ScheduleSearch = ScheduleSearch(), *,
                    store: RunStore | None = None, progress: bool = True) -> dict:
    """MGD on a learning-rate schedule against a grid of standard schedules, each scored on fresh seeds.

    Engstrom et al. (arXiv 2503.13751, Sec. 5.3) learn a piecewise-linear
    schedule by MGD and compare it with a grid search. Here:

    1. the grid: every schedule of ``search.grid()`` trained once (seed 0); of the ``grid_finalists`` best by
       validation loss, the one with the lowest mean validation loss on ``selection_seeds`` wins;
    2. MGD from a flat ``initial_lr`` on log-space knots, each meta-step's metagradient averaged over
       ``seeds_per_step`` fresh training seeds; its answer is the last or the best-seen iterate, whichever
       has the lower mean validation loss on ``selection_seeds``;
    3. both answers (and MGD's start) retrained on ``eval_seeds``: ``"methods"`` maps ``"mgd"``,
       ``"best_grid"`` and ``"initial"`` to mean and standard deviation of ``val_loss``, ``test_loss`` and
       those of ``test_accuracy``, ``val_bpb``, ``test_bpb`` the problem's ``evaluate`` reports
       (:data:`METRICS`). Test metrics choose nothing.

    ``problem``: a :class:`~metagrad.training.TrainingProblem` or a :class:`~metagrad.lm.LMProblem` (a Problem
    dataclass with an ``lr_schedule`` field, ``value_and_metagrad_at_seed`` and ``initial_state_for_seed``).
    Its optimizer should take its learning rate from the schedule
    (``optax.inject_hyperparams``); otherwise the schedule's values multiply the
    optimizer's own step. With ``store``, every finished grid run, the MGD
    state after each meta-step and every evaluation are saved there, and a
    rerun on the same store resumes.
    """
    store_get = (lambda key: None) if store is None else store.get
    store_put = (lambda key, value: None) if store is None else store.put
    T = problem.num_steps

    exact = with_schedule_only(problem, LRSchedule(T, 0.0))
    grid = search.grid()
    rows = []
    tic = time.perf_counter()
    for i, spec in enumerate(progress_bar(grid, desc="grid", disable=not progress)):
        row = store_get(f"grid_{i}")
        if row is None:
            lrs = schedule(spec["family"], spec["peak"], spec["warmup_fraction"], T)
            row = {**spec, **train_and_evaluate(exact, {"lr_schedule": jnp.asarray(lrs, problem.param_dtype)}),
                   "seconds": time.perf_counter() - tic}
            store_put(f"grid_{i}", row)
        rows.append(row)
        tic = time.perf_counter()
    grid_seconds = float(sum(r["seconds"] for r in rows))
    ranked = sorted(range(len(rows)), key=lambda i: rows[i]["val_loss"] if np.isfinite(rows[i]["val_loss"]) else np.inf)

    spec = LogLRSchedule(search.num_knots, search.initial_lr)
    learner = with_schedule_only(problem, spec)

    def value_and_metagrad(meta, meta_step):
        seeds = fresh_training_seeds(meta_step, search.seeds_per_step, search.seed_start)
        return mean_value_and_metagrad(learner, meta, seeds, k=search.k)

    tic = time.perf_counter()
    result = mgd(value_and_metagrad, learner.init_meta(), optimizer=optax.adam(search.meta_lr),
                 num_meta_steps=search.meta_steps, project=learner.project_meta, store=store,
                 pass_meta_step=True, progress=progress)
    mgd_seconds = time.perf_counter() - tic
    if result.resumed_from:
        mgd_seconds = float(sum(h["seconds"] for h in result.history))

    def scored(name, problem_, meta, seeds):
        key = f"scores_{name}"
        rows_ = store_get(key)
        if rows_ is None:
            rows_ = [evaluate_at_seed(problem_, meta, s) for s in seeds]
            store_put(key, rows_)
        return rows_

    candidates = {"last": result.meta, "best_seen": result.best_meta}
    selection = {name: float(np.mean([r["val_loss"] for r in scored(f"select_{name}", learner, meta,
                                                                         search.selection_seeds)]))
                 for name, meta in candidates.items()}
    chosen = min(selection, key=selection.get)
    learned = candidates[chosen]

    def grid_meta(row):
        lrs = schedule(row["family"], row["peak"], row["warmup_fraction"], T)
        return {"lr_schedule": jnp.asarray(lrs, problem.param_dtype)}

    # the grid's answer is chosen as MGD's is: its top few (by one run each) compared on the selection seeds
    finalists = ranked[:search.grid_finalists]
    grid_selection = {i: float(np.mean([r["val_loss"] for r in scored(f"select_grid_{i}", exact, grid_meta(rows[i]),
                                                                          search.selection_seeds)]))
                      for i in finalists}
    best = rows[min(grid_selection, key=grid_selection.get)]
    best_lrs = grid_meta(best)["lr_schedule"]
    per_seed = {"mgd": scored("mgd", learner, learned, search.eval_seeds),
                "best_grid": scored("best_grid", exact, {"lr_schedule": best_lrs}, search.eval_seeds),
                "initial": scored("initial", learner, learner.init_meta(), search.eval_seeds)}
    unit = seconds_per_training_run(learner, learner.init_meta())
    metrics = tuple(key for key in METRICS if key in per_seed["mgd"][0])
    return {
        "methods": {name: mean_and_std(rows_, metrics) for name, rows_ in per_seed.items()},
        "per_seed": per_seed,
        "grid": [rows[i] for i in ranked],
        "best_grid": best,
        "learned_knots": np.asarray(spec.rates(learned["lr_schedule"])).tolist(),
        "learned_schedule": np.asarray(spec.values(learned["lr_schedule"], T)).tolist(),
        "mgd_answer": chosen, "selection_val_loss": selection,
        "grid_selection_val_loss": {f"{rows[i]['family']} peak {rows[i]['peak']} warmup {rows[i]['warmup_fraction']}": v
                                    for i, v in grid_selection.items()},
        "history": result.history, "resumed_from_meta_step": result.resumed_from,
        "seconds": {"grid": grid_seconds, "mgd": mgd_seconds, "training_run": unit},
        "cost_in_training_runs": {"grid": grid_seconds / unit, "mgd": mgd_seconds / unit},
        "search": dataclasses.asdict(search),
    }


def goals(report: dict) -> dict:
    """The application's goals: MGD's schedule below the best grid schedule on validation and on test loss."""
    mgd_, grid = report["methods"]["mgd"], report["methods"]["best_grid"]
    return {"val_loss_below_best_grid": mgd_["val_loss"] < grid["val_loss"],
            "test_loss_below_best_grid": mgd_["test_loss"] < grid["test_loss"]}


def report_table(report: dict) -> str:
    """The short table a person reads: each method's mean (± std over the evaluation seeds)."""
    from ..report import format_table

    def cell(m, key):
        return f"{m[key]:.4f} ± {m[key + '_std']:.4f}"

    keys = [key for key in METRICS if key in next(iter(report["methods"].values()))]
    rows = [(name, *(cell(m, key) for key in keys)) for name, m in report["methods"].items()]
    return format_table(("schedule", *(METRIC_LABELS[key] for key in keys)), rows)


def write_report(report: dict, out_dir: str) -> None:
    """``result.json`` and ``lr_schedule.png`` (the schedules, and MGD's objective per meta-step) in ``out_dir``."""
    import os

    from ..report import plot_line, pyplot, write_json

    write_json(os.path.join(out_dir, "result.json"), report)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    best = report["best_grid"]
    T = len(report["learned_schedule"])
    steps = np.arange(T)
    ax1.plot(steps, schedule(best["family"], best["peak"], best["warmup_fraction"], T),
             label=f"best grid ({best['family']}, peak {best['peak']}, warmup {best['warmup_fraction']})")
    ax1.plot(steps, report["learned_schedule"], label="MGD")
    ax1.axhline(report["search"]["initial_lr"], ls=":", color="gray", label="MGD start")
    ax1.set(xlabel="training step", ylabel="learning rate", yscale="log", title="Schedules")
    ax1.legend(fontsize=8)
    plot_line(ax2, [h["meta_step"] for h in report["history"]], [h["objective"] for h in report["history"]],
              label="MGD (val loss, one fresh seed per meta-step)")
    ax2.axhline(report["methods"]["best_grid"]["val_loss"], color="k", ls="--",
                label="best grid (val loss, mean of eval seeds)")
    ax2.axhline(report["methods"]["mgd"]["val_loss"], color="C1", ls="--", label="MGD's answer (same)")
    ax2.set(xlabel="meta-step", ylabel="validation loss", title="MGD vs grid")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lr_schedule.png"), dpi=120)
    plt.close(fig)


SMOKE_SEARCH = ScheduleSearch(num_knots=4, meta_steps=2, peaks=(0.05,), warmups=(0.25,), selection_seeds=(500,),
                              eval_seeds=(1000, 1001), grid_finalists=2)


def run_on_data(data: str, out_dir: str, *, model: str = "mlp", num_steps: int = 500, batch_size: int = 128,
                search: ScheduleSearch = ScheduleSearch(), smoke: bool = False, fresh: bool = False,
                progress: bool = True) -> dict:
    """:func:`search_schedule` on the dataset ``data`` (see :func:`metagrad.data.load_dataset`), standardized,
    with the default ``model`` of :func:`metagrad.models.model_named` and momentum SGD (0.9) whose learning
    rate the schedule sets; ``out_dir`` is the run's store (a rerun resumes; other settings are refused)
    and gets ``result.json`` and ``lr_schedule.png``. ``smoke``: every stage at the smallest size."""
    if smoke:
        search = SMOKE_SEARCH
    settings = {"data": data, "model": model, "num_steps": num_steps, "batch_size": batch_size, "smoke": smoke,
                "search": dataclasses.asdict(search)}
    store = RunStore(out_dir, settings, fresh=fresh)
    dataset, problem = problem_on_data(data, model=model, num_steps=num_steps, batch_size=batch_size, smoke=smoke,
                                       optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9))
    report = search_schedule(problem, search, store=store, progress=progress)
    report.update({"data": data, "model": model, "num_steps": problem.num_steps, "batch_size": problem.batch_size,
                   "smoke": smoke, "dataset": describe_dataset(dataset),
                   "optimizer": "SGD momentum 0.9, learning rate from the schedule"})
    report["goals"] = goals(report)
    write_report(report, out_dir)
    return report
