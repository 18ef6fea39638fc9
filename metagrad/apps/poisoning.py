"""Indiscriminate data poisoning by MGD: a robustness audit of a training setup.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.2:
perturb a small chosen subset of training inputs (bounded in L-inf and kept in
the valid input range) to *maximize* the validation loss of the model trained
on the poisoned set, then measure the test accuracy of models retrained from
fresh seeds on it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from ..data import Dataset
from ..meta import Poison
from ..mgd import mgd
from ..problem import train_and_evaluate
from ..training import TrainingProblem
from .common import fresh_training_seeds, mean_value_and_metagrad


def apply_poison(dataset: Dataset, spec: Poison, delta) -> Dataset:
    """The dataset with ``delta`` added to the training inputs at ``spec.indices``."""
    x = np.array(dataset.x_train)
    x[list(spec.indices)] = x[list(spec.indices)] + np.asarray(delta, x.dtype)
    return dataset.with_train(x, dataset.y_train)


def random_perturbation(dataset: Dataset, spec: Poison, seed: int = 0) -> np.ndarray:
    """A baseline with the same budget: random corners of the L-inf ball, projected to the valid range."""
    rng = np.random.default_rng(seed)
    delta = spec.eps * rng.choice([-1.0, 1.0], size=(len(spec.indices), *dataset.input_shape))
    clean = jnp.asarray(dataset.x_train[list(spec.indices)])
    return np.asarray(spec.project(jnp.asarray(delta, clean.dtype), clean, dataset.input_range))


def flip_poisoned_labels(dataset: Dataset, spec: Poison, seed: int = 0) -> Dataset:
    """A baseline with the same budget: give the chosen examples a different random label."""
    rng = np.random.default_rng(seed)
    y = np.array(dataset.y_train)
    idx = np.asarray(spec.indices)
    y[idx] = (y[idx] + rng.integers(1, dataset.num_classes, len(idx))) % dataset.num_classes
    return dataset.with_train(dataset.x_train, y)


FRESH_SEED_START = 10_000


def influential_subset(base: TrainingProblem, fraction: float, eps: float, *, seeds=(20_000, 20_001, 20_002, 20_003),
                       k: int = 8) -> tuple[Poison, np.ndarray]:
    """Poison the ``fraction`` of training inputs the validation loss is most sensitive to.

    One metagradient with respect to a perturbation of *every* training input,
    at zero perturbation and averaged over the training ``seeds``, scores each
    example by the L1 norm of its row: the first-order gain of an L-inf step of
    radius ``eps`` on it. The top ``fraction`` are chosen. This is the greedy
    first-order rule for choosing which points to poison (the choice the attack
    of Engstrom et al. 2025, Sec. 5.2, leaves open); it costs ``len(seeds)``
    metagradients. Returns the :class:`Poison` and every example's score.
    """
    n = base.data.num_train
    everyone = Poison(tuple(range(n)), eps)
    attack = dataclasses.replace(base, poison=everyone, data_weights=None, maximize=True)
    _, grad = mean_value_and_metagrad(attack, attack.init_meta(), list(seeds), k=k)
    scores = np.abs(np.asarray(grad["poison"])).reshape(n, -1).sum(axis=1)
    count = max(1, int(round(fraction * n)))
    chosen = np.sort(np.argsort(-scores, kind="stable")[:count])
    return Poison(tuple(chosen.tolist()), eps), scores


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
                    progress: bool = True):
    """MGD (signed gradient steps, as in projected-gradient attacks) maximizing validation loss.

    The metagradient is averaged over training runs with ``attack_seeds``, or,
    with ``seeds_per_step=n``, over ``n`` fresh training seeds at every meta-step
    (see :func:`expected_value_and_metagrad`), so the poison holds across the
    training run's randomness. The step is ``step_size`` (default ``eps / 8``),
    decayed linearly to ``final_step_fraction`` of it over the meta-steps, then
    annealed over ``refine_steps`` more meta-steps (:func:`attack_step_schedule`).
    With fresh seeds the per-step objective is a noisy estimate, so the
    returned ``best_meta`` is the last iterate rather than the best-scoring one.
    """
    attack = dataclasses.replace(base, poison=spec, data_weights=None, maximize=True)
    step = attack_step_schedule(step_size if step_size is not None else spec.eps / 8, meta_steps,
                                final_step_fraction=final_step_fraction, refine_steps=refine_steps)
    result = mgd(expected_value_and_metagrad(attack, attack_seeds=attack_seeds, seeds_per_step=seeds_per_step,
                                             seed_start=seed_start, k=k),
                 attack.init_meta(), optimizer=optax.sign_sgd(step), num_meta_steps=meta_steps + refine_steps,
                 project=attack.project_meta, checkpoint_dir=checkpoint_dir, progress=progress, pass_meta_step=True)
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
    projected = np.asarray(spec.project(jnp.asarray(delta), jnp.asarray(dataset.x_train[list(spec.indices)]),
                                        dataset.input_range))
    if np.abs(projected - delta).max() > 1e-5 * max(spec.eps, 1.0):
        raise ValueError(f"the saved poison leaves the L-inf ball of radius {spec.eps} or the input range "
                         f"{dataset.input_range} (max |delta| {np.abs(delta).max():.4g}): pass the eps that made it.")
    return delta


def retrain_metrics(base: TrainingProblem, dataset: Dataset, seeds) -> list[dict]:
    """``evaluate()`` of fresh models (one per seed) trained on ``dataset`` (loss and accuracy per split)."""
    out = []
    for seed in seeds:
        problem = dataclasses.replace(base, data=dataset, seed=seed, poison=None, data_weights=None, maximize=False)
        out.append(train_and_evaluate(problem))
    return out


def retrain_accuracy(base: TrainingProblem, dataset: Dataset, seeds) -> list[float]:
    """Test accuracy of fresh models (one per seed) trained on ``dataset``."""
    return [m["test_accuracy"] for m in retrain_metrics(base, dataset, seeds)]


def audit(base: TrainingProblem, *, fraction: float = 0.025, eps: float = 1.0, meta_steps: int = 30,
          attack_seeds=(0, 1), seeds_per_step=None, seed_start: int = FRESH_SEED_START, step_size=None,
          final_step_fraction: float = 1.0, refine_steps: int = 0, eval_seeds=(100, 101, 102),
          selection_seed: int = 0, k: int = 8,
          checkpoint_dir=None, progress: bool = True, poison_delta=None, poison_indices=None, choose: str = "random",
          choice_seeds=(20_000, 20_001, 20_002, 20_003)) -> dict:
    """Poison ``fraction`` of ``base``'s training set by MGD and compare with random noise and label flips.

    The attack averages over ``attack_seeds`` or, with ``seeds_per_step=n``, over
    ``n`` fresh training seeds per meta-step (seeds ``seed_start ...``); see
    :func:`optimize_poison`. Returns test accuracies on the clean and each
    poisoned set (retrained from ``eval_seeds``, disjoint from every seed the
    attack trained from) and the drops in points, each the mean over
    ``eval_seeds`` of the paired per-seed drop (``drop_points_sem``: its
    standard error); ``poison_delta`` is the perturbation (an array;
    :func:`write_audit_report` saves it as ``.npy``). Passing ``poison_delta``
    (e.g. a saved ``poison_delta.npy``, with the ``fraction``, ``eps`` and
    ``selection_seed`` that made it) skips the attack and scores that
    perturbation, e.g. on more retraining seeds; with ``poison_indices`` (the
    examples it perturbs, see :func:`load_poison`) the inputs are not chosen
    again, so the poison lands where it was made for (the report's
    ``setting["choose"]`` then reads ``"saved"``).

    ``choose`` picks the poisoned examples: ``"random"`` (seeded by
    ``selection_seed``) or ``"influence"`` (:func:`influential_subset`, trained
    from ``choice_seeds``); the baselines perturb or relabel the same examples.
    """
    if choose not in ("random", "influence"):
        raise ValueError(f"choose must be 'random' or 'influence', got {choose!r}.")
    if poison_indices is not None and poison_delta is None:
        raise ValueError("poison_indices are the examples of a saved poison: pass its poison_delta too.")
    total_meta_steps = meta_steps + refine_steps
    used = attack_seeds_used(total_meta_steps, attack_seeds, seeds_per_step, seed_start)
    if choose == "influence":
        used = used | set(choice_seeds)
    if used & set(eval_seeds):
        raise ValueError("eval_seeds must differ from the seeds the attack trains from: the audit retrains from "
                         "fresh seeds.")
    data = base.data
    if poison_delta is not None and poison_indices is not None:
        spec, choose = Poison(tuple(int(i) for i in poison_indices), eps), "saved"
    elif choose == "influence":
        spec, _ = influential_subset(base, fraction, eps, seeds=choice_seeds, k=k)
    else:
        spec = Poison.random_subset(data.num_train, fraction, eps, seed=selection_seed)
    if poison_delta is None:
        result = optimize_poison(base, spec, meta_steps=meta_steps, step_size=step_size,
                                 final_step_fraction=final_step_fraction, refine_steps=refine_steps,
                                 attack_seeds=attack_seeds,
                                 seeds_per_step=seeds_per_step, seed_start=seed_start, k=k,
                                 checkpoint_dir=checkpoint_dir, progress=progress)
        delta, history = np.asarray(result.best_meta["poison"]), result.history
    else:
        delta, history = check_saved_poison(poison_delta, spec, data), []
    sets = {
        "clean": data,
        "random noise": apply_poison(data, spec, random_perturbation(data, spec, seed=selection_seed)),
        "label flip": flip_poisoned_labels(data, spec, seed=selection_seed),
        "MGD poison": apply_poison(data, spec, delta),
    }
    metrics = {name: retrain_metrics(base, ds, eval_seeds) for name, ds in sets.items()}
    accuracy = {name: [m["test_accuracy"] for m in ms] for name, ms in metrics.items()}
    clean = np.asarray(accuracy["clean"])
    paired = {name: 100.0 * (clean - np.asarray(a)) for name, a in accuracy.items() if name != "clean"}
    drops = {name: float(d.mean()) for name, d in paired.items()}
    drops_sem = {name: float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0 for name, d in paired.items()}
    best_baseline = max(drops["random noise"], drops["label flip"])
    if seeds_per_step is None:
        seeds_desc = {"attack_seeds": list(attack_seeds)}
    else:
        seeds_desc = {"seeds_per_step": seeds_per_step,
                      "attack_seed_range": [seed_start, seed_start + total_meta_steps * seeds_per_step - 1]}
    return {
        "setting": {"fraction": fraction, "num_poisoned": len(spec.indices), "choose": choose,
                    **({"choice_seeds": list(choice_seeds)} if choose == "influence" else {}),
                    "eps": eps, "meta_steps": meta_steps,
                    "step_size": step_size if step_size is not None else eps / 8,
                    "final_step_fraction": final_step_fraction, "refine_steps": refine_steps, **seeds_desc,
                    "eval_seeds": list(eval_seeds),
                    "input_range": list(data.input_range)},
        "test_accuracy": accuracy,
        "val_accuracy": {name: [m["val_accuracy"] for m in ms] for name, ms in metrics.items()},
        "val_loss": {name: [m["val_loss"] for m in ms] for name, ms in metrics.items()},
        "drop_points": drops,
        "drop_points_sem": drops_sem,
        "ratio_to_best_baseline": drops["MGD poison"] / best_baseline if best_baseline > 0 else float("inf"),
        "poison_indices": list(spec.indices),
        "poison_linf": float(np.abs(delta).max()),
        "attack_seconds": float(sum(h["seconds"] for h in history)) if history else None,
        "history": history,
        "poison_delta": delta,
    }


def audit_table(report: dict) -> str:
    from ..report import format_table

    rows = []
    for name, accs in report["test_accuracy"].items():
        accs = np.asarray(accs)
        spread = accs.std(ddof=1) if len(accs) > 1 else 0.0
        if name == "clean":
            drop = "-"
        else:
            sem = report.get("drop_points_sem", {}).get(name)
            drop = f"{report['drop_points'][name]:.1f}" + ("" if sem is None else f" ± {sem:.1f}")
        rows.append((name, f"{accs.mean():.4f} ± {spread:.4f}", drop))
    return format_table(("training set", "test acc (mean ± sd)", "drop (points, ± paired s.e.)"), rows)


def load_poison(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A saved ``poison_delta.npy`` and, when ``poison_indices.npy`` lies beside it, the examples it perturbs."""
    import os

    indices_path = os.path.join(os.path.dirname(os.path.abspath(path)), "poison_indices.npy")
    return np.load(path), (np.load(indices_path) if os.path.exists(indices_path) else None)


def write_audit_report(report: dict, out_dir: str) -> None:
    """``report.json``, ``poisoning.png`` (accuracy per training set, attack objective per meta-step) and
    ``poison_delta.npy`` plus ``poison_indices.npy`` (the perturbations and the examples they perturb, if the report
    has them; :func:`load_poison` reads them back)."""
    import os

    from ..report import pyplot, write_json

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "report.json"), {k: v for k, v in report.items() if k != "poison_delta"})
    if "poison_delta" in report:
        np.save(os.path.join(out_dir, "poison_delta.npy"), np.asarray(report["poison_delta"], np.float32))
        np.save(os.path.join(out_dir, "poison_indices.npy"), np.asarray(report["poison_indices"], np.int64))
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["test_accuracy"])
    accs = [np.asarray(report["test_accuracy"][n]) for n in names]
    ax1.bar(range(len(names)), [a.mean() for a in accs], yerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in accs],
            capsize=4)
    ax1.set_xticks(range(len(names)), names)
    ax1.set(ylabel="test accuracy (fresh seeds)", title=f"{report['setting']['num_poisoned']} poisoned examples, "
            f"eps {report['setting']['eps']}")
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
