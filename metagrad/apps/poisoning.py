"""Indiscriminate data poisoning by MGD: a robustness audit of a training setup.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.2:
perturb a small chosen subset of training inputs (bounded in L-inf and kept in
the valid input range) to *maximize* the validation loss of the model trained
on the poisoned set, then measure the test accuracy of models retrained from
fresh seeds on it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data import Dataset
from ..meta import Poison
from ..mgd import mgd
from ..training import TrainingProblem
from ..progress import progress_bar
from .common import (describe_dataset, evaluate_at_seed, fresh_training_seeds, mean_and_std, mean_value_and_metagrad,
                     problem_on_data)


def apply_poison(dataset: Dataset, spec: Poison, delta) -> Dataset:
    """The dataset with ``delta`` added to the training inputs at ``spec.indices``."""
    x = np.array(dataset.x_train)
    x[list(spec.indices)] = x[list(spec.indices)] + np.asarray(delta, x.dtype)
    return dataset.with_train(x, dataset.y_train)


def project_poison(dataset: Dataset, spec: Poison, delta) -> np.ndarray:
    """``delta`` projected onto ``spec``'s budget on ``dataset`` (per-feature L-inf bound, per-feature valid range)."""
    clean = jnp.asarray(dataset.x_train[list(spec.indices)])
    return np.asarray(spec.project(jnp.asarray(delta, clean.dtype), clean, dataset.input_range,
                                   dataset.feature_scale))


def random_perturbation(dataset: Dataset, spec: Poison, seed: int = 0) -> np.ndarray:
    """A baseline with the same budget: random corners of the L-inf ball, projected to the valid range."""
    rng = np.random.default_rng(seed)
    corners = rng.choice([-1.0, 1.0], size=(len(spec.indices), *dataset.input_shape))
    return project_poison(dataset, spec, corners * np.asarray(spec.bound(dataset.feature_scale)))


def one_step_perturbation(dataset: Dataset, spec: Poison, metagrad) -> np.ndarray:
    """The one-step (first-order) attack: the corner of the L-inf ball that the metagradient at zero
    perturbation points to, projected to the valid range (the fast gradient sign method, Goodfellow et al.
    2015, applied to the metagradient). ``metagrad`` is that of the attack's value (minus the validation loss),
    one row per poisoned example; MGD's iterations are worth what they add over this."""
    step = -np.sign(np.asarray(metagrad)) * np.asarray(spec.bound(dataset.feature_scale))
    return project_poison(dataset, spec, step)


def flip_poisoned_labels(dataset: Dataset, spec: Poison, seed: int = 0) -> Dataset:
    """A baseline with the same budget: give the chosen examples a different random label."""
    rng = np.random.default_rng(seed)
    y = np.array(dataset.y_train)
    idx = np.asarray(spec.indices)
    y[idx] = (y[idx] + rng.integers(1, dataset.num_classes, len(idx))) % dataset.num_classes
    return dataset.with_train(dataset.x_train, y)


FRESH_SEED_START = 10_000


def first_order_metagrad(base: TrainingProblem, spec: Poison, seeds, *, k: int = 8) -> np.ndarray:
    """The metagradient of the attack's value (minus the validation loss) with respect to the perturbations
    of ``spec``'s examples at zero perturbation, averaged over training ``seeds`` (one row per example)."""
    attack = dataclasses.replace(base, poison=spec, data_weights=None, maximize=True)
    _, grad = mean_value_and_metagrad(attack, attack.init_meta(), list(seeds), k=k)
    return np.asarray(grad["poison"])


def influential_subset(base: TrainingProblem, fraction: float, eps: float, *, seeds=(20_000, 20_001, 20_002, 20_003),
                       k: int = 8, return_metagrad: bool = False):
    """Poison the ``fraction`` of training inputs the validation loss is most sensitive to.

    One metagradient with respect to a perturbation of *every* training input,
    at zero perturbation and averaged over the training ``seeds``
    (:func:`first_order_metagrad`), scores each example by the first-order gain
    of an L-inf step on it, ``sum_j |g_j| * eps * s_j`` with ``s`` the data's
    feature scale. The top ``fraction`` are chosen. This is the greedy
    first-order rule for choosing which points to poison (the choice the attack
    of Engstrom et al. 2025, Sec. 5.2, leaves open); it costs ``len(seeds)``
    metagradients. Returns the :class:`Poison` and every example's score (and,
    with ``return_metagrad``, the chosen examples' rows of the metagradient, from
    which :func:`one_step_perturbation` makes the one-step attack).
    """
    n = base.data.num_train
    everyone = Poison(tuple(range(n)), eps)
    grad = first_order_metagrad(base, everyone, seeds, k=k)
    gain = np.abs(grad) * np.asarray(everyone.bound(base.data.feature_scale))
    scores = gain.reshape(n, -1).sum(axis=1)
    count = max(1, int(round(fraction * n)))
    chosen = np.sort(np.argsort(-scores, kind="stable")[:count])
    spec = Poison(tuple(chosen.tolist()), eps)
    return (spec, scores, grad[chosen]) if return_metagrad else (spec, scores)


def fresh_attack_seeds(meta_step: int, seeds_per_step: int, start: int = FRESH_SEED_START) -> list[int]:
    """The training seeds of meta-step ``meta_step`` when every meta-step draws new ones (a function of the index)."""
    return fresh_training_seeds(meta_step, seeds_per_step, start)


def expected_value_and_metagrad(problem: TrainingProblem, *, attack_seeds=(0, 1), seeds_per_step=None,
                                seed_start: int = FRESH_SEED_START, **kwargs):
    """``(meta, meta_step) -> (value, metagradient)`` averaged over training seeds.

    With ``seeds_per_step=None`` the average is over the fixed ``attack_seeds``;
    with ``seeds_per_step=n`` each meta-step trains from ``n`` new seeds
    (:func:`fresh_attack_seeds`), a stochastic estimate of the expectation over
    the training run's randomness (init and batch order), like expectation over
    transformation in adversarial attacks.
    """
    def value_and_grad(meta, meta_step):
        seeds = (list(attack_seeds) if seeds_per_step is None
                 else fresh_attack_seeds(meta_step, seeds_per_step, seed_start))
        return mean_value_and_metagrad(problem, meta, seeds, **kwargs)

    return value_and_grad


def attack_seeds_used(meta_steps: int, attack_seeds=(0, 1), seeds_per_step=None,
                      seed_start: int = FRESH_SEED_START) -> set[int]:
    """Every training seed the attack trains from."""
    if seeds_per_step is None:
        return set(attack_seeds)
    return set(range(seed_start, seed_start + meta_steps * seeds_per_step))


def attack_step_schedule(step: float, meta_steps: int, *, final_step_fraction: float = 1.0, refine_steps: int = 0):
    """The signed attack's step per meta-step: ``step`` (or decaying linearly to ``final_step_fraction`` of it)
    for ``meta_steps`` meta-steps, then ``refine_steps`` more whose step anneals linearly from ``step / 2`` to
    ``step / 20`` (settling the iterate, which a constant signed step leaves jittering around the optimum, as
    PGD attacks anneal their step). A plain float when the step is constant."""
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}.")
    main = step
    if final_step_fraction != 1.0:
        main = optax.linear_schedule(step, step * final_step_fraction, max(meta_steps - 1, 1))
    if refine_steps == 0:
        return main
    refine = optax.linear_schedule(step / 2, step / 20, max(refine_steps - 1, 1))
    main = main if callable(main) else optax.constant_schedule(step)
    return optax.join_schedules([main, refine], [meta_steps])


def schedule_depends_on_meta_steps(final_step_fraction: float = 1.0, refine_steps: int = 0) -> bool:
    """Whether :func:`attack_step_schedule` changes with ``meta_steps`` (then more meta-steps cannot extend a run)."""
    return final_step_fraction != 1.0 or refine_steps > 0


def optimize_poison(base: TrainingProblem, spec: Poison, *, meta_steps: int, step_size=None,
                    final_step_fraction: float = 1.0, refine_steps: int = 0, attack_seeds=(0, 1),
                    seeds_per_step=None, seed_start: int = FRESH_SEED_START, k: int = 8, checkpoint_dir=None,
                    store=None, progress: bool = True):
    """MGD (signed gradient steps, as in projected-gradient attacks) maximizing validation loss.

    The metagradient is averaged over training runs with ``attack_seeds``, or,
    with ``seeds_per_step=n``, over ``n`` fresh training seeds at every meta-step
    (see :func:`expected_value_and_metagrad`), so the poison holds across the
    training run's randomness. The step is ``step_size`` (default ``eps / 8``)
    in units of each feature's scale (``base.data.feature_scale``: feature ``j``
    moves by ``step * s_j``), decayed linearly to ``final_step_fraction`` of it over the meta-steps, then
    annealed over ``refine_steps`` more meta-steps (:func:`attack_step_schedule`).
    With fresh seeds the per-step objective is a noisy estimate, so the
    returned ``best_meta`` is the last iterate rather than the best-scoring one.
    """
    attack = dataclasses.replace(base, poison=spec, data_weights=None, maximize=True)
    step = attack_step_schedule(step_size if step_size is not None else spec.eps / 8, meta_steps,
                                final_step_fraction=final_step_fraction, refine_steps=refine_steps)
    unit = jnp.asarray(base.data.feature_scale, base.param_dtype)
    per_feature = optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: u * unit, updates))
    result = mgd(expected_value_and_metagrad(attack, attack_seeds=attack_seeds, seeds_per_step=seeds_per_step,
                                             seed_start=seed_start, k=k),
                 attack.init_meta(), optimizer=optax.chain(optax.sign_sgd(step), per_feature),
                 num_meta_steps=meta_steps + refine_steps, project=attack.project_meta,
                 checkpoint_dir=checkpoint_dir, store=store, progress=progress, pass_meta_step=True)
    if seeds_per_step is not None:
        result.best_meta = result.meta
    return result


def check_saved_poison(delta, spec: Poison, dataset: Dataset) -> np.ndarray:
    """``delta`` as an array, after checking it fits ``spec`` (shape, L-inf budget, valid input range)."""
    delta = np.asarray(delta)
    expected = (len(spec.indices), *dataset.input_shape)
    if delta.shape != expected:
        raise ValueError(f"the saved poison has shape {delta.shape}, but {len(spec.indices)} poisoned examples of "
                         f"shape {dataset.input_shape} need {expected}: pass the fraction and selection seed that "
                         "made it.")
    if not np.all(np.isfinite(delta)):
        raise ValueError("the saved poison holds NaN or inf; recompute it.")
    projected = project_poison(dataset, spec, delta)
    if np.abs(projected - delta).max() > 1e-5 * max(spec.eps, 1.0):
        raise ValueError(f"the saved poison leaves the L-inf ball of radius {spec.eps} (in units of each feature's "
                         f"scale) or the data's valid range (max |delta| {np.abs(delta).max():.4g}): pass the eps "
                         "that made it.")
    return delta


def retrain_metrics(base: TrainingProblem, dataset: Dataset, seeds) -> list[dict]:
    """``evaluate()`` of fresh models (one per seed) trained on ``dataset`` (loss and accuracy per split);
    the seed enters as a traced value, so all seeds share one compilation."""
    problem = dataclasses.replace(base, data=dataset, poison=None, data_weights=None, maximize=False)
    return [evaluate_at_seed(problem, problem.init_meta(), seed) for seed in seeds]


def retrain_accuracy(base: TrainingProblem, dataset: Dataset, seeds) -> list[float]:
    """Test accuracy of fresh models (one per seed) trained on ``dataset``."""
    return [m["test_accuracy"] for m in retrain_metrics(base, dataset, seeds)]


METHODS = {"clean": "clean", "mgd": "MGD poison", "noise": "random noise (ball corners)",
           "label_flip": "label flip", "one_step": "one-step attack (first order)"}
"""The training sets an audit compares, by their key in the report, with the label a table shows."""

BASELINES = ("noise", "label_flip", "one_step")
"""The same-budget baselines the MGD poison is measured against."""

DEFAULT_CHOICE_SEEDS = (20_000, 20_001, 20_002, 20_003)


def audit(base: TrainingProblem, *, fraction: float = 0.025, eps: float = 2.0, meta_steps: int = 60,
          attack_seeds=(0, 1), seeds_per_step=4, seed_start: int = FRESH_SEED_START, step_size=None,
          final_step_fraction: float = 1.0, refine_steps: int = 40, eval_seeds=tuple(range(100, 110)),
          selection_seed: int = 0, k: int = 8, checkpoint_dir=None, store=None, progress: bool = True,
          poison_delta=None, poison_indices=None, choose: str = "influence",
          choice_seeds=DEFAULT_CHOICE_SEEDS) -> dict:
    """Poison ``fraction`` of ``base``'s training set by MGD and compare with same-budget baselines.

    Engstrom et al. (arXiv 2503.13751, Sec. 5.2). ``eps`` is the L-inf radius in
    units of each feature's scale (``base.data.feature_scale``), and perturbed
    inputs stay in the data's per-feature valid range, so the budget means the
    same on any data set. The attack (:func:`optimize_poison`) averages over
    ``attack_seeds`` or, with ``seeds_per_step=n``, over ``n`` fresh training
    seeds per meta-step (seeds ``seed_start ...``).

    ``choose`` picks the poisoned examples: ``"influence"`` (:func:`influential_subset`,
    trained from ``choice_seeds``) or ``"random"`` (seeded by ``selection_seed``).
    The baselines use the same examples: random corners of the ball
    (``"noise"``), flipped labels (``"label_flip"``), and the one-step attack
    (``"one_step"``, :func:`one_step_perturbation` of the metagradient at zero
    averaged over ``choice_seeds``, which the influence choice has already computed).

    Every training set is retrained from ``eval_seeds`` (disjoint from every seed
    the attack or the choice trained from) and scored on the untouched splits:
    ``"methods"`` maps each key of :data:`METHODS` to the mean and standard
    deviation of ``val_loss``, ``test_loss`` and ``test_accuracy``;
    ``"drop_points"`` is each poisoned set's mean paired per-seed test-accuracy
    drop in points (``"drop_points_sem"``: its standard error); ``ratio_to_best_baseline``
    is MGD's drop over the largest baseline drop. ``poison_delta`` (an array;
    :func:`write_audit_report` saves it) is the perturbation. Passing
    ``poison_delta`` (with ``poison_indices``, see :func:`load_poison`) skips the
    attack and scores that perturbation. With ``store`` (a
    :class:`~metagrad.store.RunStore`) the attack's state after every meta-step
    and every retraining are saved there, and a rerun resumes.
    """
    if choose not in ("random", "influence"):
        raise ValueError(f"choose must be 'random' or 'influence', got {choose!r}.")
    if poison_indices is not None and poison_delta is None:
        raise ValueError("poison_indices are the examples of a saved poison: pass its poison_delta too.")
    store_get = (lambda key: None) if store is None else store.get
    store_put = (lambda key, value: None) if store is None else store.put
    total_meta_steps = meta_steps + refine_steps
    used = attack_seeds_used(total_meta_steps, attack_seeds, seeds_per_step, seed_start) | set(choice_seeds)
    if used & set(eval_seeds):
        raise ValueError("eval_seeds must differ from the seeds the attack trains from: the audit retrains from "
                         "fresh seeds.")
    data = base.data

    def stored(name, count, compute):
        """``compute() -> (indices, metagrad rows)``, or what an earlier run saved under ``name``."""
        like = np.zeros((count, *data.input_shape), np.float32)
        saved = None if store is None else store.restore_tree(name, like)
        if saved is not None:
            return tuple(saved[2]["indices"]), np.asarray(saved[1])
        indices, rows = compute()
        if store is not None:
            store.save_tree(name, 0, np.asarray(rows, np.float32), {"indices": list(indices)})
        return tuple(indices), np.asarray(rows)

    if poison_delta is not None and poison_indices is not None:
        spec, choose = Poison(tuple(int(i) for i in poison_indices), eps), "saved"
    elif choose == "influence":
        def choice():
            chosen, _, rows = influential_subset(base, fraction, eps, seeds=choice_seeds, k=k, return_metagrad=True)
            return chosen.indices, rows

        indices, first_order = stored("influence", max(1, int(round(fraction * data.num_train))), choice)
        spec = Poison(indices, eps)
    else:
        spec = Poison.random_subset(data.num_train, fraction, eps, seed=selection_seed)
    if choose != "influence":
        _, first_order = stored("first_order", len(spec.indices),
                                lambda: (spec.indices, first_order_metagrad(base, spec, choice_seeds, k=k)))
    if poison_delta is None:
        result = optimize_poison(base, spec, meta_steps=meta_steps, step_size=step_size,
                                 final_step_fraction=final_step_fraction, refine_steps=refine_steps,
                                 attack_seeds=attack_seeds, seeds_per_step=seeds_per_step, seed_start=seed_start,
                                 k=k, checkpoint_dir=checkpoint_dir, store=store, progress=progress)
        delta, history = np.asarray(result.best_meta["poison"]), result.history
    else:
        delta, history = check_saved_poison(poison_delta, spec, data), []
    sets = {
        "clean": data,
        "mgd": apply_poison(data, spec, delta),
        "noise": apply_poison(data, spec, random_perturbation(data, spec, seed=selection_seed)),
        "label_flip": flip_poisoned_labels(data, spec, seed=selection_seed),
        "one_step": apply_poison(data, spec, one_step_perturbation(data, spec, first_order)),
    }
    metrics = {}
    for name, dataset in progress_bar(list(sets.items()), desc="retraining", disable=not progress):
        key = f"retrain_{name}" if name != "mgd" or poison_delta is None else None
        rows = store_get(key) if key else None
        if rows is None:
            rows = retrain_metrics(base, dataset, eval_seeds)
            if key:
                store_put(key, rows)
        metrics[name] = rows
    accuracy = {name: np.asarray([m["test_accuracy"] for m in ms]) for name, ms in metrics.items()}
    paired = {name: 100.0 * (accuracy["clean"] - a) for name, a in accuracy.items() if name != "clean"}
    drops = {name: float(d.mean()) for name, d in paired.items()}
    drops_sem = {name: float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0 for name, d in paired.items()}
    best_baseline = max(drops[name] for name in BASELINES)
    if seeds_per_step is None:
        seeds_desc = {"attack_seeds": list(attack_seeds)}
    else:
        seeds_desc = {"seeds_per_step": seeds_per_step,
                      "attack_seed_range": [seed_start, seed_start + total_meta_steps * seeds_per_step - 1]}
    scale = np.asarray(data.feature_scale, np.float64)
    return {
        "setting": {"fraction": fraction, "num_poisoned": len(spec.indices), "choose": choose,
                    "choice_seeds": list(choice_seeds), "eps_in_feature_scales": eps, "meta_steps": meta_steps,
                    "step_size_in_feature_scales": step_size if step_size is not None else eps / 8,
                    "final_step_fraction": final_step_fraction, "refine_steps": refine_steps, **seeds_desc,
                    "eval_seeds": list(eval_seeds),
                    "feature_scale": {"min": float(scale.min()), "median": float(np.median(scale)),
                                      "max": float(scale.max())}},
        "methods": {name: mean_and_std(ms) for name, ms in metrics.items()},
        "per_seed": metrics,
        "drop_points": drops,
        "drop_points_sem": drops_sem,
        "best_baseline": max(BASELINES, key=drops.get),
        "ratio_to_best_baseline": drops["mgd"] / best_baseline if best_baseline > 0 else float("inf"),
        "poison_indices": list(spec.indices),
        "poison_linf_in_feature_scales": float(np.max(np.abs(delta) / np.where(scale > 0, scale, np.inf))),
        "attack_seconds": float(sum(h["seconds"] for h in history)) if history else None,
        "history": history,
        "poison_delta": delta,
    }


def goals(report: dict, min_drop_points: float) -> dict:
    """The audit's goals: MGD's poison drops test accuracy by at least ``min_drop_points`` and by at least 3x
    the best same-budget baseline."""
    return {f"drop_at_least_{min_drop_points:g}_points": report["drop_points"]["mgd"] >= min_drop_points,
            "drop_at_least_3x_best_baseline": report["ratio_to_best_baseline"] >= 3}


def audit_table(report: dict) -> str:
    """The short table a person reads: every training set's retrained test accuracy and its drop."""
    from ..report import format_table

    rows = []
    for name, m in report["methods"].items():
        drop = "-" if name == "clean" else (f"{report['drop_points'][name]:.1f} ± "
                                            f"{report['drop_points_sem'][name]:.1f}")
        rows.append((METHODS.get(name, name), f"{m['test_accuracy']:.4f} ± {m['test_accuracy_std']:.4f}",
                     f"{m['test_loss']:.4f}", drop))
    return format_table(("training set", "test acc (mean ± sd)", "test loss", "drop (points, ± paired s.e.)"), rows)


def load_poison(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A saved ``poison_delta.npy`` and, when ``poison_indices.npy`` lies beside it, the examples it perturbs."""
    import os

    indices_path = os.path.join(os.path.dirname(os.path.abspath(path)), "poison_indices.npy")
    return np.load(path), (np.load(indices_path) if os.path.exists(indices_path) else None)


def write_audit_report(report: dict, out_dir: str) -> None:
    """``result.json``, ``poisoning.png`` (test accuracy per training set, attack objective per meta-step) and
    ``poison_delta.npy`` plus ``poison_indices.npy`` (the perturbations and the examples they perturb, if the report
    has them; :func:`load_poison` reads them back)."""
    import os

    from ..report import pyplot, write_json

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "result.json"), {k: v for k, v in report.items() if k != "poison_delta"})
    if "poison_delta" in report:
        np.save(os.path.join(out_dir, "poison_delta.npy"), np.asarray(report["poison_delta"], np.float32))
        np.save(os.path.join(out_dir, "poison_indices.npy"), np.asarray(report["poison_indices"], np.int64))
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(report["methods"])
    means = [report["methods"][n]["test_accuracy"] for n in names]
    spreads = [report["methods"][n]["test_accuracy_std"] for n in names]
    ax1.bar(range(len(names)), means, yerr=spreads, capsize=4)
    ax1.set_xticks(range(len(names)), names)
    ax1.set(ylabel="test accuracy (fresh seeds)", title=f"{report['setting']['num_poisoned']} poisoned examples, "
            f"eps {report['setting']['eps_in_feature_scales']} feature scales")
    if report["history"]:
        ax2.plot([-h["objective"] for h in report["history"]])
        if report["setting"].get("refine_steps"):
            ax2.axvline(report["setting"]["meta_steps"], color="gray", linestyle=":", label="step anneals")
            ax2.legend(loc="lower right")
        ax2.set(xlabel="meta-step", ylabel="validation loss (attack seeds)", title="MGD attack objective")
    else:
        ax2.text(0.5, 0.5, f"saved poison re-scored\n({report.get('poison_source', 'given array')})",
                 ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "poisoning.png"), dpi=120)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class PoisonAttack:
    """The audit's settings, chosen once and used unchanged on every data set (see :func:`audit`).

    ``eps`` and the step are in units of each feature's scale and perturbed inputs
    stay in each feature's valid range, so on standardized data of any source the
    budget means the same. Defaults: a 2.5% budget, the influence choice, 60
    signed meta-steps at ``eps / 8`` and 40 whose step anneals to ``eps / 160``,
    4 fresh training seeds per meta-step, retraining on 10 fresh seeds.
    """

    fraction: float = 0.025
    eps: float = 2.0
    meta_steps: int = 60
    refine_steps: int = 40
    seeds_per_step: int = 4
    choose: str = "influence"
    choice_seeds: tuple = DEFAULT_CHOICE_SEEDS
    eval_seeds: tuple = tuple(range(100, 110))
    k: int = 8


SMOKE_ATTACK = PoisonAttack(meta_steps=1, refine_steps=1, seeds_per_step=1, choice_seeds=(20_000,),
                            eval_seeds=(100, 101))

LARGE_DATA_SETS = ("fashion_mnist",)
"""Data sets whose goal is a drop of at least 10 points (5 on the small ones)."""


def run_on_data(data: str, out_dir: str, *, model: str = "mlp", num_steps: int = 500, batch_size: int = 128,
                learning_rate: float = 0.03, attack: PoisonAttack = PoisonAttack(), smoke: bool = False,
                fresh: bool = False, progress: bool = True, poison_delta=None, poison_indices=None) -> dict:
    """:func:`audit` on the dataset ``data`` (:func:`metagrad.data.load_dataset`, standardized: the budget is in
    units of each feature's scale) with the default ``model`` of :func:`metagrad.models.model_named` trained by
    momentum SGD (0.9) at ``learning_rate``; ``out_dir`` is the run's store (a rerun resumes; other settings are
    refused) and gets ``result.json``, ``poisoning.png`` and the poison. ``smoke``: every stage at the smallest
    size. ``poison_delta`` (and ``poison_indices``) re-score a saved poison instead of attacking."""
    from ..store import RunStore

    if smoke:
        attack = SMOKE_ATTACK
    settings = {"data": data, "model": model, "num_steps": num_steps, "batch_size": batch_size,
                "learning_rate": learning_rate, "smoke": smoke, "attack": dataclasses.asdict(attack),
                "rescored_poison": poison_delta is not None}
    if poison_delta is not None:
        settings["rescored_poison_checksum"] = float(np.abs(np.asarray(poison_delta, np.float64)).sum())
    dataset, base = problem_on_data(data, model=model, num_steps=num_steps, batch_size=batch_size, smoke=smoke,
                                    optimizer=optax.sgd(learning_rate, momentum=0.9), lr_schedule=None)
    store = RunStore(out_dir, settings, fresh=fresh)  # (after the data loaded: a data mistake is named first)
    report = audit(base, fraction=attack.fraction, eps=attack.eps, meta_steps=attack.meta_steps,
                   refine_steps=attack.refine_steps, seeds_per_step=attack.seeds_per_step, choose=attack.choose,
                   choice_seeds=attack.choice_seeds, eval_seeds=attack.eval_seeds, k=attack.k, store=store,
                   progress=progress, poison_delta=poison_delta, poison_indices=poison_indices)
    report.update({"data": data, "model": model, "num_steps": base.num_steps, "batch_size": base.batch_size,
                   "optimizer": f"SGD momentum 0.9, learning rate {learning_rate}", "smoke": smoke,
                   "dataset": describe_dataset(dataset), "attack": dataclasses.asdict(attack)})
    report["goals"] = goals(report, 10.0 if dataset.name in LARGE_DATA_SETS else 5.0)
    write_audit_report(report, out_dir)
    return report
