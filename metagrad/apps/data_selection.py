"""Data selection by MGD over per-example data weights, against the usual baselines.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.1:
optimize one weight per training example to minimize the loss on a clean
validation set, keep the examples with the largest weights, and train a fresh
model on them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import replay

from ..data import Dataset
from ..meta import DataWeights
from ..mgd import mgd
from ..problem import train_and_evaluate
from ..progress import progress_bar
from ..store import RunStore
from ..training import TrainingProblem
from .common import (describe_dataset, evaluate_at_seed, fresh_training_seeds, mean_and_std, mean_value_and_metagrad,
                     problem_on_data)


def flip_labels(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """Give a random ``fraction`` of training examples a different random label; return the mask of flipped ones."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    n = dataset.num_train
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    y = np.array(dataset.y_train)
    shift = rng.integers(1, dataset.num_classes, n)
    y[flipped] = (y[flipped] + shift[flipped]) % dataset.num_classes
    return dataset.with_train(dataset.x_train, y), flipped


def subset(dataset: Dataset, indices) -> Dataset:
    indices = np.asarray(indices)
    return dataset.with_train(dataset.x_train[indices], dataset.y_train[indices])


def train_and_score(base: TrainingProblem, dataset: Dataset, seed: int) -> dict:
    """Train a fresh model (seed ``seed``) on ``dataset`` with ``base``'s model, optimizer and steps."""
    problem = dataclasses.replace(base, data=dataset, seed=seed, data_weights=None, poison=None)
    return train_and_evaluate(problem)


def optimize_data_weights(problem: TrainingProblem, *, meta_steps: int, meta_optimizer=None, k: int = 8,
                          extra_seeds=(), checkpoint_dir=None, progress: bool = True):
    """MGD over ``problem``'s data weights (validation loss as the metaobjective); returns the MGD result.

    ``extra_seeds`` adds training runs with other seeds whose metagradients are averaged in.
    """
    if problem.data_weights is None:
        raise ValueError("the problem has no data_weights metaparameter: give data_weights=DataWeights().")
    seeds = (problem.seed, *extra_seeds)
    return mgd(lambda meta: mean_value_and_metagrad(problem, meta, seeds, k=k), problem.init_meta(),
               optimizer=meta_optimizer or optax.adam(0.05), num_meta_steps=meta_steps,
               project=problem.project_meta, checkpoint_dir=checkpoint_dir, progress=progress)


def small_loss_indices(base: TrainingProblem, dataset: Dataset, keep: int, seed: int = 0) -> np.ndarray:
    """Keep the ``keep`` training examples with the lowest loss under a model trained on all of them."""
    problem = dataclasses.replace(base, data=dataset, seed=seed, data_weights=None, poison=None)
    params = problem.train(problem.init_meta())["params"]
    logits = problem.logits(params, jnp.asarray(dataset.x_train))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(dataset.y_train)))
    return np.argsort(losses)[:keep]


def top_weight_indices(weights, keep: int) -> np.ndarray:
    return np.argsort(-np.asarray(weights), kind="stable")[:keep]


def select_data(base: TrainingProblem, noisy: Dataset, flipped: np.ndarray, *, keep_fraction: float,
                meta_steps: int, seeds=(0, 1, 2), meta_optimizer=None, k: int = 8, checkpoint_dir=None,
                progress: bool = True) -> dict:
    """Compare MGD selection with full data, a random subset and small-loss filtering.

    Every method trains fresh models with ``seeds`` on its subset; ``flipped``
    (the label noise) is used only to report what each selection removed.
    ``checkpoint_dir`` makes the MGD run resumable (see :func:`~metagrad.mgd.mgd`).
    """
    keep = int(round(keep_fraction * noisy.num_train))
    weighted = dataclasses.replace(base, data=noisy, data_weights=DataWeights(), poison=None)
    result = optimize_data_weights(weighted, meta_steps=meta_steps, meta_optimizer=meta_optimizer, k=k,
                                   checkpoint_dir=checkpoint_dir, progress=progress)
    weights = np.asarray(result.best_meta["data_weights"])
    rng = np.random.default_rng(1234)
    selections = {
        "full data": np.arange(noisy.num_train),
        "random subset": np.sort(rng.choice(noisy.num_train, keep, replace=False)),
        "small-loss filter": np.sort(small_loss_indices(base, noisy, keep)),
        "MGD selection": np.sort(top_weight_indices(weights, keep)),
    }
    methods = {}
    for name, idx in selections.items():
        runs = [train_and_score(base, subset(noisy, idx), seed) for seed in seeds]
        removed = np.setdiff1d(np.arange(noisy.num_train), idx)
        methods[name] = {
            "test_accuracy": [r["test_accuracy"] for r in runs],
            "test_loss": [r["test_loss"] for r in runs],
            "kept": int(len(idx)),
            "flipped_removed_fraction": float(flipped[removed].sum() / max(flipped.sum(), 1)),
        }
    return {
        "methods": methods,
        "weights": weights.tolist(),
        "mean_weight_flipped": float(weights[flipped].mean()) if flipped.any() else None,
        "mean_weight_clean": float(weights[~flipped].mean()),
        "history": result.history,
    }


# ------------------------------------------------------------------ the application, with defaults chosen once
def gradient_similarity_indices(base: TrainingProblem, dataset: Dataset, keep: int, *, seed: int = 0,
                                checkpoints: int = 4, chunk: int = 1024) -> np.ndarray:
    """Keep the ``keep`` training examples whose loss gradient points most along the validation gradient.

    As LESS does (Xia et al., "LESS: Selecting Influential Data for Targeted
    Instruction Tuning", ICML 2024), but with exact per-example gradients of
    every parameter instead of random projections of LoRA gradients: a model is
    trained on all the data; at ``checkpoints`` evenly spaced points of its run
    each example's score is the cosine between its gradient and the mean
    validation gradient; scores are averaged over the checkpoints.
    """
    problem = dataclasses.replace(base, data=dataset, seed=seed, data_weights=None, poison=None)
    meta = problem.init_meta()
    x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_val, y_val = jnp.asarray(dataset.x_val), jnp.asarray(dataset.y_val)

    def loss(params, model_state, xb, yb):
        logits = problem.logits(params, xb, model_state=model_state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    flat = lambda tree: jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(tree)], axis=1)  # noqa: E731

    @jax.jit
    def cosines(params, model_state, val_dir, xb, yb):
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))(params, model_state, xb[:, None],
                                                                          yb[:, None])
        g = flat(per_example)
        return (g @ val_dir) / (jnp.linalg.norm(g, axis=1) + 1e-12)

    scores = np.zeros(dataset.num_train)
    steps = [max(1, round(problem.num_steps * (i + 1) / checkpoints)) for i in range(checkpoints)]
    for t in steps:
        state = problem.train(meta, t)
        params, model_state = state["params"], state.get("model_state", {})
        val_grad = jax.grad(loss)(params, model_state, x_val, y_val)
        val_dir = jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(val_grad)])
        val_dir = val_dir / (jnp.linalg.norm(val_dir) + 1e-12)
        for start in range(0, dataset.num_train, chunk):
            scores[start:start + chunk] += np.asarray(cosines(params, model_state, val_dir, x[start:start + chunk],
                                                              y[start:start + chunk]))
    return np.argsort(-scores, kind="stable")[:keep]


def split_validation(dataset: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The dataset twice: with the first and with the second half of its validation split (at random by ``seed``)."""
    order = np.random.default_rng(seed).permutation(len(dataset.y_val))
    half = len(order) // 2
    a, b = np.sort(order[:half]), np.sort(order[half:])
    if len(a) == 0:
        raise ValueError("the validation split needs at least 2 examples to be halved.")
    return (dataclasses.replace(dataset, x_val=dataset.x_val[a], y_val=dataset.y_val[a]),
            dataclasses.replace(dataset, x_val=dataset.x_val[b], y_val=dataset.y_val[b]))


STRATEGIES = ("eliminate", "weights")


@dataclasses.dataclass(frozen=True)
class SubsetSearch:
    """How :func:`search_subset` selects data: defaults chosen once and used unchanged on every data set.

    Nothing is in units of the data: the metagradients are standardized before
    they rank examples, and data weights live in ``[0, 1]``.

    Attributes:
      keep_fraction: the fraction of the training set every selection keeps.
      strategy: how metagradients become a subset. ``"eliminate"`` (the default,
        :func:`eliminate_by_metagradient`): start from the whole training set and
        at every meta-step remove an equal share of the examples to be dropped,
        those whose metagradient (at the subset actually kept, weights 0 or 1)
        says removing them lowers the validation loss most, scores smoothed over
        meta-steps by ``score_ema``; ``"weights"``: MGD (Adam, ``meta_lr``) on
        continuous per-example weights in ``constraint``, keeping the largest.
      meta_steps: metagradients taken (validation loss of half of the validation split).
      meta_lr: Adam's step on the weights (``"weights"`` only).
      constraint: the weights' feasible set (:class:`~metagrad.meta.DataWeights`, ``"weights"`` only):
        ``"box"``, each in ``[0, 1]`` from 1; ``"simplex"``, non-negative with mean one.
      score_ema: the elimination's smoothing of each example's standardized metagradient over meta-steps
        (each meta-step trains from fresh seeds, so one metagradient is a noisy estimate).
      seeds_per_step: fresh training seeds per meta-step, so the selection holds for the training run's
        randomness, not for one batch order.
      candidates_every: (``"weights"``) MGD's weights every this many meta-steps, its last and its
        best-seen weights are the candidates (early stopping against fitting the validation half it optimizes).
      selection_seeds: seeds on which the candidates are compared, by the validation loss of the *other*
        half of the validation split after retraining on each one's subset.
      eval_seeds: fresh seeds every method's subset is retrained and scored on.
      k: REPLAY's branching factor.
    """

    keep_fraction: float = 0.7
    strategy: str = "eliminate"
    meta_steps: int = 40
    meta_lr: float = 0.05
    constraint: str = "box"
    score_ema: float = 0.8
    seeds_per_step: int = 1
    candidates_every: int = 10
    selection_seeds: tuple = (500, 501)
    eval_seeds: tuple = (1000, 1001, 1002, 1003, 1004)
    k: int = 8
    seed_start: int = 10_000

    def __post_init__(self):
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        if not 0 <= self.score_ema < 1:
            raise ValueError(f"score_ema must be in [0, 1), got {self.score_ema}.")
        if self.meta_steps < 1 or self.seeds_per_step < 1 or self.candidates_every < 1:
            raise ValueError("meta_steps, seeds_per_step and candidates_every must be >= 1.")
        used = set(range(self.seed_start, self.seed_start + self.meta_steps * self.seeds_per_step))
        if used & (set(self.eval_seeds) | set(self.selection_seeds)) or set(self.eval_seeds) & set(self.selection_seeds):
            raise ValueError("eval_seeds, selection_seeds and the seeds MGD trains from must be disjoint.")


def elimination_sizes(num_examples: int, keep: int, meta_steps: int) -> list[int]:
    """The subset's size after each meta-step of :func:`eliminate_by_metagradient`: from ``num_examples``
    down to ``keep`` in equal shares."""
    return [num_examples - int(round((num_examples - keep) * (t + 1) / meta_steps)) for t in range(meta_steps)]


def eliminate_by_metagradient(learner: TrainingProblem, keep: int, search: "SubsetSearch", *,
                              store: RunStore | None = None, progress: bool = True) -> dict:
    """Backward elimination guided by metagradients of the subset actually kept.

    As the data selection of Engstrom et al. (arXiv 2503.13751, Sec. 5.1) steps
    through *subsets* rather than a relaxation far from any subset: at
    meta-step ``t`` the data weights are the current 0/1 mask, the
    metagradient ``g_i = d val_loss / d w_i`` (averaged over
    ``search.seeds_per_step`` fresh training seeds) is standardized, smoothed
    across meta-steps (``search.score_ema``), and the kept examples with the
    largest smoothed ``g`` (whose removal lowers the validation loss most, to
    first order) are removed, an equal share each meta-step
    (:func:`elimination_sizes`), until ``keep`` remain. Every step's metagradient
    is thus taken at the training run of the subset it modifies. With ``store``
    the mask and scores are saved after every meta-step and a rerun resumes.
    Returns ``{"mask", "scores", "history", "resumed_from"}`` (the meta-step a rerun resumed at, or ``None``).
    """
    n = learner.data.num_train
    sizes = elimination_sizes(n, keep, search.meta_steps)
    state = {"mask": np.ones(n, np.float32), "scores": np.zeros(n, np.float32)}
    history, start = [], 0
    if store is not None:
        saved = store.restore_tree("elimination", state)
        if saved is not None:
            start, restored, metadata = saved
            state = {name: np.asarray(value) for name, value in restored.items()}
            history = list(metadata["history"])
    bar = progress_bar(range(start, search.meta_steps), total=search.meta_steps, initial=start, desc="eliminate",
                       disable=not progress)
    for t in bar:
        tic = time.perf_counter()
        seeds = fresh_training_seeds(t, search.seeds_per_step, search.seed_start)
        value, grad = mean_value_and_metagrad(learner, {"data_weights": jnp.asarray(state["mask"])}, seeds,
                                              k=search.k)
        g = np.asarray(grad["data_weights"], np.float64)
        if not np.all(np.isfinite(g)):
            raise replay.NonFiniteMetagradError(f"the data-weight metagradient of meta-step {t} is not finite.")
        g = g / (g.std() + 1e-30)
        scores = g if t == 0 else search.score_ema * state["scores"] + (1 - search.score_ema) * g
        mask = state["mask"].copy()
        kept = np.flatnonzero(mask > 0)
        mask[kept[np.argsort(-scores[kept], kind="stable")[:len(kept) - sizes[t]]]] = 0.0
        state = {"mask": mask, "scores": scores.astype(np.float32)}
        history.append({"meta_step": t, "objective": float(value), "kept": int(mask.sum()),
                        "seconds": time.perf_counter() - tic})
        bar.set_postfix(objective=f"{float(value):.4f}", kept=int(mask.sum()))
        if store is not None:
            store.save_tree("elimination", t + 1, state, {"history": history})
    return {**state, "history": history, "resumed_from": start or None}


METHODS = ("mgd", "full", "random", "small_loss", "gradient_similarity")


def optimize_weights_with_candidates(learner: TrainingProblem, search: "SubsetSearch", store: RunStore | None,
                                     progress: bool):
    """The ``"weights"`` strategy: MGD (Adam) on continuous data weights, with its weights every
    ``search.candidates_every`` meta-steps, its last and its best-seen weights as candidates.
    Returns ``(candidates, history, resumed_from, seconds)``."""
    def value_and_metagrad(meta, meta_step):
        seeds = fresh_training_seeds(meta_step, search.seeds_per_step, search.seed_start)
        return mean_value_and_metagrad(learner, meta, seeds, k=search.k)

    snapshots = {}  # meta-step -> weights, every candidates_every meta-steps (kept in the store when there is one)

    def keep_snapshot(meta_step, meta, record):
        if (meta_step + 1) % search.candidates_every == 0 and meta_step + 1 < search.meta_steps:
            snapshots[meta_step + 1] = np.asarray(meta["data_weights"])
            if store is not None:
                store.save_tree("candidates", meta_step + 1, meta, max_to_keep=None)

    tic = time.perf_counter()
    result = mgd(value_and_metagrad, learner.init_meta(), optimizer=optax.adam(search.meta_lr),
                 num_meta_steps=search.meta_steps, project=learner.project_meta, store=store,
                 pass_meta_step=True, progress=progress, callback=keep_snapshot)
    if store is not None:
        for step in store.tree_steps("candidates"):
            if step not in snapshots:
                snapshots[step] = np.asarray(store.restore_tree("candidates", learner.init_meta(), step)[1]["data_weights"])
    seconds = float(sum(h["seconds"] for h in result.history)) if result.resumed_from else time.perf_counter() - tic
    candidates = {f"meta_step_{step}": w for step, w in sorted(snapshots.items())}
    candidates.update({"last": np.asarray(result.meta["data_weights"]),
                       "best_seen": np.asarray(result.best_meta["data_weights"])})
    return candidates, result.history, result.resumed_from, seconds


def search_subset(base: TrainingProblem, noisy: Dataset, flipped: np.ndarray | None = None,
                  search: SubsetSearch = SubsetSearch(), *, store: RunStore | None = None,
                  progress: bool = True) -> dict:
    """MGD data selection against full data, a random subset, small-loss filtering and gradient similarity.

    Engstrom et al. (arXiv 2503.13751, Sec. 5.1) select data by metagradients
    of per-example weights. Here the metaobjective is the validation loss on
    half of the validation split, averaged over fresh training seeds; MGD's
    subset comes from ``search.strategy`` (by default the metagradient-guided
    elimination, :func:`eliminate_by_metagradient`; with ``"weights"``, the
    other half decides which of MGD's weights to keep: early stopping), and the
    other half's loss after retraining on it is recorded as
    ``"selection_val_loss"``. Every method's subset (the same size) is retrained on ``eval_seeds``, and
    ``"methods"`` maps each of :data:`METHODS` to mean and standard deviation of
    ``val_loss`` (the whole validation split), ``test_loss`` and ``test_accuracy``.
    ``flipped`` (the label noise, when known) only reports what each selection removed.
    With ``store`` every stage is saved and a rerun resumes.
    """
    store_get = (lambda key: None) if store is None else store.get
    store_put = (lambda key, value: None) if store is None else store.put
    n = noisy.num_train
    keep = max(1, int(round(search.keep_fraction * n)))
    meta_half, select_half = split_validation(noisy)
    learner = dataclasses.replace(base, data=meta_half, data_weights=DataWeights(constraint=search.constraint),
                                  poison=None, lr_schedule=None)
    if search.strategy == "eliminate":
        eliminated = eliminate_by_metagradient(learner, keep, search, store=store, progress=progress)
        history, resumed_from = eliminated["history"], eliminated["resumed_from"]
        candidates = {"eliminated": eliminated["mask"]}
        mgd_seconds = float(sum(h["seconds"] for h in history))
    else:
        candidates, history, resumed_from, mgd_seconds = optimize_weights_with_candidates(learner, search, store,
                                                                                         progress)
    plain = dataclasses.replace(base, data_weights=None, poison=None, lr_schedule=None)

    def scores(name, dataset, indices, seeds):
        key = f"scores_{name}"
        rows = store_get(key)
        if rows is None:
            problem = dataclasses.replace(plain, data=subset(dataset, indices))
            rows = [evaluate_at_seed(problem, problem.init_meta(), s) for s in seeds]
            store_put(key, rows)
        return rows

    selection = {name: float(np.mean([r["val_loss"] for r in scores(f"select_{name}", select_half,
                                                                       np.sort(top_weight_indices(w, keep)),
                                                                       search.selection_seeds)]))
                 for name, w in candidates.items()}
    chosen = min(selection, key=selection.get)
    weights = candidates[chosen]

    def cached_indices(name, compute):
        saved = store_get(f"indices_{name}")
        if saved is None:
            tic = time.perf_counter()
            saved = {"indices": np.sort(compute()).tolist(), "seconds": time.perf_counter() - tic}
            store_put(f"indices_{name}", saved)
        return np.asarray(saved["indices"], np.int64), saved["seconds"]

    rng = np.random.default_rng(1234)
    selections, seconds = {}, {"mgd": mgd_seconds}
    selections["mgd"] = np.sort(top_weight_indices(weights, keep))
    selections["full"] = np.arange(n)
    selections["random"] = np.sort(rng.choice(n, keep, replace=False))
    selections["small_loss"], seconds["small_loss"] = cached_indices(
        "small_loss", lambda: small_loss_indices(plain, noisy, keep))
    selections["gradient_similarity"], seconds["gradient_similarity"] = cached_indices(
        "gradient_similarity", lambda: gradient_similarity_indices(plain, noisy, keep))
    per_seed = {name: scores(name, noisy, idx, search.eval_seeds) for name, idx in selections.items()}
    methods = {name: mean_and_std(rows) for name, rows in per_seed.items()}
    if flipped is not None and flipped.any():
        for name, idx in selections.items():
            removed = np.setdiff1d(np.arange(n), idx)
            methods[name]["flipped_removed_fraction"] = float(flipped[removed].sum() / flipped.sum())
    return {
        "methods": methods, "per_seed": per_seed, "kept": keep,
        "weights": weights.tolist(), "mgd_answer": chosen, "selection_val_loss": selection,
        **({"elimination_scores": eliminated["scores"].tolist()} if search.strategy == "eliminate" else {}),
        "mean_weight_flipped": float(weights[flipped].mean()) if flipped is not None and flipped.any() else None,
        "mean_weight_clean": float(weights[~flipped].mean()) if flipped is not None else None,
        "history": history, "resumed_from_meta_step": resumed_from, "seconds": seconds,
        "search": dataclasses.asdict(search),
    }


def goals(report: dict) -> dict:
    """The application's goal: MGD's subset above every baseline on mean test accuracy."""
    mgd_ = report["methods"]["mgd"]["test_accuracy"]
    return {"test_accuracy_above_every_baseline": all(
        mgd_ > m["test_accuracy"] for name, m in report["methods"].items() if name != "mgd")}


SMOKE_SEARCH = SubsetSearch(meta_steps=2, selection_seeds=(500,), eval_seeds=(1000, 1001))
LABELS = {"mgd": "MGD", "full": "full data", "random": "random subset", "small_loss": "small-loss filter",
          "gradient_similarity": "gradient similarity"}


def report_table(report: dict) -> str:
    """Each method's mean (± std over the evaluation seeds) and the share of flipped labels it removed."""
    from ..report import format_table

    rows = []
    for name, m in report["methods"].items():
        rows.append((LABELS.get(name, name), f"{m['val_loss']:.4f}", f"{m['test_loss']:.4f}",
                     f"{m['test_accuracy']:.4f} ± {m['test_accuracy_std']:.4f}",
                     f"{m['flipped_removed_fraction']:.3f}" if "flipped_removed_fraction" in m else "-"))
    return format_table(("subset", "val loss", "test loss", "test acc", "flipped removed"), rows)


def write_report(report: dict, out_dir: str) -> None:
    """``result.json`` and ``data_selection.png`` (MGD's weights of clean and flipped examples; each method's
    test accuracy) in ``out_dir``."""
    import os

    from ..report import pyplot, write_json

    write_json(os.path.join(out_dir, "result.json"), report)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    flipped = report.get("flipped")
    if "elimination_scores" in report:  # the elimination ranks by smoothed metagradients; its weights are 0/1
        values = np.asarray(report["elimination_scores"])
        bins, xlabel, title = 40, "smoothed metagradient (highest removed)", "MGD elimination scores"
    else:
        values = np.asarray(report["weights"])
        bins, xlabel, title = np.linspace(0, 1, 31), "learned data weight", "MGD data weights"
    if flipped is not None:
        flipped = np.asarray(flipped, bool)
        ax1.hist(values[~flipped], bins=bins, alpha=0.7, label="clean labels")
        ax1.hist(values[flipped], bins=bins, alpha=0.7, label="flipped labels")
        ax1.legend()
    else:
        ax1.hist(values, bins=bins)
    ax1.set(xlabel=xlabel, ylabel="examples", title=title)
    names = list(report["methods"])
    means = [report["methods"][n]["test_accuracy"] for n in names]
    errs = [report["methods"][n]["test_accuracy_std"] for n in names]
    ax2.bar(range(len(names)), means, yerr=errs, capsize=4)
    ax2.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=15)
    ax2.set(ylabel="test accuracy", title=f"{len(report['search']['eval_seeds'])} fresh training seeds",
            ylim=(min(means) - 0.05, max(means) + 0.03))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "data_selection.png"), dpi=120)
    plt.close(fig)


def run_on_data(data: str, out_dir: str, *, label_noise: float = 0.3, model: str = "mlp", num_steps: int = 500,
                batch_size: int = 128, learning_rate: float = 0.03, search: SubsetSearch = SubsetSearch(),
                smoke: bool = False, fresh: bool = False, progress: bool = True) -> dict:
    """:func:`search_subset` on the dataset ``data`` (:func:`metagrad.data.load_dataset`, standardized) with
    ``label_noise`` of its training labels flipped at random (seed 0), the default ``model`` of
    :func:`metagrad.models.model_named`, momentum SGD (0.9) at ``learning_rate``; ``out_dir`` is the run's store
    (a rerun resumes; other settings are refused) and gets ``result.json`` and ``data_selection.png``."""
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}.")
    if smoke:
        search = SMOKE_SEARCH
    settings = {"data": data, "label_noise": label_noise, "model": model, "num_steps": num_steps,
                "batch_size": batch_size, "learning_rate": learning_rate, "smoke": smoke,
                "search": dataclasses.asdict(search)}
    store = RunStore(out_dir, settings, fresh=fresh)
    dataset, base = problem_on_data(data, model=model, num_steps=num_steps, batch_size=batch_size, smoke=smoke,
                                    optimizer=optax.sgd(learning_rate, momentum=0.9), lr_schedule=None)
    noisy, flipped = flip_labels(dataset, label_noise, seed=0)
    base = dataclasses.replace(base, data=noisy)
    report = search_subset(base, noisy, flipped, search, store=store, progress=progress)
    report.update({"data": data, "label_noise": label_noise, "model": model, "num_steps": base.num_steps,
                   "batch_size": base.batch_size, "optimizer": f"SGD momentum 0.9, learning rate {learning_rate}",
                   "smoke": smoke, "dataset": describe_dataset(dataset), "flipped": flipped.tolist()})
    report["goals"] = goals(report)
    write_report(report, out_dir)
    return report
