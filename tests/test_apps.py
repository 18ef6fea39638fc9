"""The MGD applications in reduced size: each shows its direction of effect."""

import dataclasses
import functools
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg
from metagrad.apps import data_selection, lr_schedule, metasmoothness, poisoning


@functools.lru_cache(maxsize=None)
def small_mnist1d():
    """MNIST-1D cut to 600 training / 300 validation / 300 test examples (generated offline)."""
    d = mg.mnist1d()
    return mg.Dataset(d.x_train[:600], d.y_train[:600], d.x_val[:300], d.y_val[:300], d.x_test[:300], d.y_test[:300],
                      num_classes=10, name="mnist1d-small")


def test_schedule_families_and_grid():
    grid = lr_schedule.default_grid()
    assert len(grid) >= 24 and {g["family"] for g in grid} == {"constant", "linear", "cosine"}
    for family in ("constant", "linear", "cosine"):
        lrs = lr_schedule.schedule(family, 0.1, 0.2, 50)
        assert lrs.shape == (50,) and lrs.max() == pytest.approx(0.1) and lrs.min() >= 0
    cos = lr_schedule.schedule("cosine", 0.1, 0.2, 50)
    assert cos[9] == pytest.approx(0.1) and cos[-1] < 0.01 and np.all(np.diff(cos[10:]) <= 1e-12)
    with pytest.raises(ValueError, match="unknown schedule family"):
        lr_schedule.schedule("step", 0.1, 0.1, 10)


def test_lr_schedule_mgd_beats_its_flat_start_and_grid_is_scored_the_same_way():
    problem = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9),
                                 small_mnist1d(), num_steps=60, batch_size=64, lr_schedule=mg.LRSchedule(10, 0.002))
    result = lr_schedule.optimize_lr_schedule(problem, meta_steps=5, meta_optimizer=optax.adam(0.02), progress=False)
    assert result["final"]["val_loss"] < result["initial"]["val_loss"] - 0.05
    grid = lr_schedule.grid_search(problem, [{"family": "constant", "peak": p, "warmup_fraction": 0} for p in (0.002, 0.05)],
                                   progress=False)
    # the per-step grid problem scores a flat 0.002 schedule exactly like the knot problem does
    flat = [g for g in grid if g["peak"] == 0.002][0]
    assert flat["val_loss"] == pytest.approx(result["initial"]["val_loss"], rel=1e-5)
    assert grid[0]["val_loss"] <= grid[1]["val_loss"]


def test_data_selection_downweights_flipped_labels():
    noisy, flipped = data_selection.flip_labels(small_mnist1d(), 0.3, seed=0)
    assert flipped.mean() == pytest.approx(0.3, abs=0.01)
    assert np.all(noisy.y_train[flipped] != small_mnist1d().y_train[flipped])
    problem = mg.TrainingProblem(mg.MLP(hidden=(32,)), optax.sgd(0.05, momentum=0.9), noisy, num_steps=80,
                                 batch_size=64, lr_schedule=None, data_weights=mg.DataWeights())
    result = data_selection.optimize_data_weights(problem, meta_steps=4, meta_optimizer=optax.adam(0.1), progress=False)
    weights = np.asarray(result.best_meta["data_weights"])
    assert result.best_value < result.history[0]["objective"]
    assert weights[flipped].mean() < weights[~flipped].mean() - 0.05
    keep = data_selection.top_weight_indices(weights, 420)
    removed = np.setdiff1d(np.arange(600), keep)
    assert flipped[removed].mean() > 0.3  # removes flipped labels at a higher rate than at random


def test_poison_raises_validation_loss_more_than_random_noise():
    data = small_mnist1d()
    base = mg.TrainingProblem(mg.MLP(hidden=(32,)), optax.sgd(0.05, momentum=0.9), data, num_steps=80,
                              batch_size=64, lr_schedule=None)
    spec = mg.Poison.random_subset(data.num_train, 0.05, eps=2.0, seed=0)
    # fresh training seeds at every meta-step (10000 ..), none of them the evaluation's seed 0
    result = poisoning.optimize_poison(base, spec, meta_steps=4, refine_steps=2, seeds_per_step=2, progress=False)
    assert [h["meta_step"] for h in result.history] == list(range(6))
    delta = np.asarray(result.best_meta["poison"])
    assert np.all(np.abs(delta) <= 2.0 * data.feature_scale + 1e-6)  # eps in units of each feature's scale

    def val_loss(dataset):
        problem = mg.TrainingProblem(base.model, base.optimizer, dataset, num_steps=80, batch_size=64, lr_schedule=None)
        return problem.evaluate(problem.init_meta())["val_loss"]

    clean = val_loss(data)
    noise = val_loss(poisoning.apply_poison(data, spec, poisoning.random_perturbation(data, spec)))
    attacked = val_loss(poisoning.apply_poison(data, spec, delta))
    assert attacked - clean > 2 * abs(noise - clean) and attacked > clean + 0.05
    with pytest.raises(ValueError, match="fresh seeds"):
        poisoning.audit(base, attack_seeds=(0,), seeds_per_step=None, eval_seeds=(0,))
    with pytest.raises(ValueError, match="fresh seeds"):
        poisoning.audit(base, eval_seeds=(poisoning.DEFAULT_CHOICE_SEEDS[0],))
    with pytest.raises(ValueError, match="fresh seeds"):
        poisoning.audit(base, meta_steps=3, seeds_per_step=2, eval_seeds=(poisoning.FRESH_SEED_START + 5,))


def test_the_poison_budget_is_in_units_of_each_feature_and_keeps_each_feature_valid():
    rng = np.random.default_rng(0)
    # pixels valid in [0, 1] with very different spreads: one nearly always dark, one spread over the range
    x = np.stack([rng.uniform(0, 0.05, 400), rng.uniform(0, 1, 400), rng.uniform(0.4, 0.6, 400)], 1).astype(np.float32)
    raw = mg.Dataset(x[:300], (x[:300, 1] > 0.5).astype(np.int32), x[300:350], (x[300:350, 1] > 0.5).astype(np.int32),
                     x[350:], (x[350:, 1] > 0.5).astype(np.int32), num_classes=2, input_range=(0.0, 1.0))
    np.testing.assert_allclose(raw.feature_scale, x[:300].std(axis=0), rtol=1e-5)
    spec = mg.Poison(tuple(range(20)), eps=1.0)
    corners = np.sign(rng.normal(size=(20, 3))) * 100.0
    delta = poisoning.project_poison(raw, spec, corners)
    np.testing.assert_allclose(np.abs(delta).max(axis=0), raw.feature_scale, rtol=1e-5)  # one scale per feature
    data = mg.standardized(raw)
    std = x[:300].std(axis=0)
    lo, hi = data.input_range  # [0, 1] carried to every feature's own standardized units
    np.testing.assert_allclose(lo, (0 - x[:300].mean(0)) / std, rtol=1e-4)
    np.testing.assert_allclose(hi, (1 - x[:300].mean(0)) / std, rtol=1e-4)
    wide = mg.Poison(tuple(range(20)), eps=50.0)
    poisoned = data.x_train[:20] + poisoning.project_poison(data, wide, corners)
    back = poisoned * std + x[:300].mean(0)  # in pixel units, every perturbed input is still a valid image
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5 and back.max() > 0.99 and back.min() < 0.01
    # the one-step attack moves every feature to the edge of its budget against the metagradient's sign
    grad = rng.normal(size=(20, 3)).astype(np.float32)
    step = poisoning.one_step_perturbation(data, spec, grad)
    inside = (np.abs(step) < data.feature_scale - 1e-4)
    assert np.all(np.sign(step[~inside]) == -np.sign(grad[~inside]))
    edge = data.x_train[:20] + step  # a feature short of its budget stopped at the valid range
    assert np.all(np.isclose(edge[inside], np.broadcast_to(lo, edge.shape)[inside], atol=1e-4)
                  | np.isclose(edge[inside], np.broadcast_to(hi, edge.shape)[inside], atol=1e-4))


def test_attack_step_schedule_anneals_after_the_main_phase():
    assert poisoning.attack_step_schedule(0.25, 60) == 0.25
    schedule = poisoning.attack_step_schedule(0.25, 3, refine_steps=3)
    np.testing.assert_allclose([float(schedule(i)) for i in range(6)], [0.25, 0.25, 0.25, 0.125, 0.06875, 0.0125])
    decaying = poisoning.attack_step_schedule(0.2, 3, final_step_fraction=0.5, refine_steps=2)
    np.testing.assert_allclose([float(decaying(i)) for i in range(5)], [0.2, 0.15, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="refine_steps"):
        poisoning.attack_step_schedule(0.25, 3, refine_steps=-1)


def test_poison_seed_in_meta_matches_a_fixed_seed_run():
    data = small_mnist1d()
    base = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.sgd(0.05, momentum=0.9), data, num_steps=20,
                              batch_size=64, lr_schedule=None)
    spec = mg.Poison.random_subset(data.num_train, 0.05, eps=2.0, seed=0)
    attack = mg.TrainingProblem(base.model, base.optimizer, data, num_steps=20, batch_size=64, lr_schedule=None,
                                poison=spec, maximize=True, seed=3)
    meta = attack.init_meta()
    meta = {"poison": meta["poison"] + 0.5 * jnp.sin(jnp.arange(meta["poison"].size)).reshape(meta["poison"].shape)}
    value, grad = attack.value_and_metagrad(meta, k=4)
    # built from a seed-0 problem: the seed must come from meta["seed"], not the problem's own seed
    seeded = poisoning.expected_value_and_metagrad(dataclasses.replace(attack, seed=0), attack_seeds=(3,), k=4)
    value2, grad2 = seeded(meta, 0)
    assert float(value2) == float(value)
    np.testing.assert_array_equal(np.asarray(grad2["poison"]), np.asarray(grad["poison"]))
    assert poisoning.fresh_attack_seeds(2, 3) == [poisoning.FRESH_SEED_START + 6 + j for j in range(3)]


def test_influential_subset_picks_the_inputs_with_the_largest_first_order_gain():
    data = small_mnist1d()
    base = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.sgd(0.05, momentum=0.9), data, num_steps=20,
                              batch_size=64, lr_schedule=None)
    eps, seed = 0.002, 3
    chosen, scores = poisoning.influential_subset(base, 0.05, eps, seeds=(seed,), k=4)
    assert scores.shape == (600,) and len(chosen.indices) == 30
    assert set(chosen.indices) == set(np.argsort(-scores)[:30].tolist())

    def val_loss_gain(spec):
        """Validation-loss increase of one signed step of radius eps on ``spec``'s inputs, and its first-order value."""
        attack = dataclasses.replace(base, poison=spec, maximize=True)
        zero = attack.init_meta()
        value0, grad = attack.value_and_metagrad_at_seed(zero, seed, k=4)
        bound = eps * data.feature_scale  # the budget is in units of each feature's scale
        step = {"poison": -bound * jnp.sign(grad["poison"])}  # the value is minus the validation loss
        value1, _ = attack.value_and_metagrad_at_seed(attack.project_meta(step), seed, k=4)
        return float(value0 - value1), float((bound * jnp.abs(grad["poison"])).sum())

    gain, predicted = val_loss_gain(chosen)
    random_gain, _ = val_loss_gain(mg.Poison.random_subset(data.num_train, 0.05, eps, seed=0))
    # the scores are each example's first-order gain of a corner step: they predict the chosen step's gain
    assert predicted == pytest.approx(scores[list(chosen.indices)].sum(), rel=1e-4)
    assert gain == pytest.approx(predicted, rel=0.2)
    assert gain > 2 * random_gain > 0


def test_sign_agreement_and_metasmoothness_diagnostic():
    a = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    assert metasmoothness.sign_agreement(a, a) == 1.0
    assert metasmoothness.sign_agreement(a, {"w": -a["w"]}) == -1.0
    assert -1 < metasmoothness.sign_agreement(a, {"w": jnp.asarray([1.0, 2.0, 3.0])}) < 1
    problem = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.sgd(0.05, momentum=0.9), small_mnist1d(), num_steps=40,
                                 batch_size=64, lr_schedule=None, data_weights=mg.DataWeights(upper=2.0))
    meta = problem.init_meta()
    diag = metasmoothness.metasmoothness(problem, meta, metasmoothness.random_direction(meta), 1.0)
    assert -1 <= diag["metasmoothness"] <= 1 and diag["curvature"] >= 0 and len(diag["objective"]) == 3
    # the metagradient predicts small changes of the objective to first order
    small = metasmoothness.gradient_prediction(problem, meta, [0.05])[0]
    assert small["actual"] < 0 and small["ratio"] == pytest.approx(1.0, abs=0.2)


def test_audit_poison_command(tmp_path):
    from metagrad.cli import main

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32) * np.array([1, 1, 1, 1, 1, 50], np.float32)
    np.savez(tmp_path / "toy.npz", x=x, y=(x[:, 0] > 0).astype(np.int32))
    out = tmp_path / "audit"
    args = ["audit-poison", "--data", str(tmp_path / "toy.npz"), "--eval-seeds", "2", "--num-steps", "20",
            "--batch-size", "32", "--seeds-per-step", "1", "--no-progress"]
    assert main(args + ["--out", str(out), "--meta-steps", "1", "--refine-steps", "1"]) == 0
    report = json.loads((out / "result.json").read_text())
    assert set(report["methods"]) == {"clean", "mgd", "noise", "label_flip", "one_step"}
    for method in report["methods"].values():
        assert set(method) == {f"{k}{s}" for k in ("val_loss", "test_loss", "test_accuracy") for s in ("", "_std")}
    assert set(report["drop_points"]) == {"mgd", "noise", "label_flip", "one_step"}
    assert report["best_baseline"] in ("noise", "label_flip", "one_step")
    assert report["setting"]["num_poisoned"] == round(0.025 * 168)
    assert report["setting"]["attack_seed_range"] == [10000, 10001]
    assert [h["meta_step"] for h in report["history"]] == [0, 1]
    assert (out / "poisoning.png").exists() and set(report["goals"]) == {"drop_at_least_5_points",
                                                                        "drop_at_least_3x_best_baseline"}
    # the budget is in units of each feature's scale (the data are standardized, so about 1 per feature)
    delta = np.load(out / "poison_delta.npy")
    assert delta.shape == (len(report["poison_indices"]), 6)
    assert 0 < report["poison_linf_in_feature_scales"] <= 2.0 + 1e-5
    np.testing.assert_array_equal(np.load(out / "poison_indices.npy"), report["poison_indices"])
    # a rerun resumes: nothing is recomputed, the same figures come back
    assert main(args + ["--out", str(out), "--meta-steps", "1", "--refine-steps", "1"]) == 0
    assert json.loads((out / "result.json").read_text())["methods"] == report["methods"]
    with pytest.raises(ValueError, match="meta_steps"):
        main(args + ["--out", str(out), "--meta-steps", "2", "--refine-steps", "1"])
    # a saved poison is re-scored without the attack, on the examples saved beside it (not chosen again by the
    # random rule asked for here): same examples, same retrained figures
    rescored = tmp_path / "rescored"
    assert main(args + ["--out", str(rescored), "--choose", "random", "--poison", str(out / "poison_delta.npy")]) == 0
    again = json.loads((rescored / "result.json").read_text())
    assert again["history"] == [] and again["attack_seconds"] is None and again["setting"]["choose"] == "saved"
    assert again["methods"]["mgd"] == report["methods"]["mgd"] and again["poison_indices"] == report["poison_indices"]
    np.save(tmp_path / "short.npy", delta[:-1])
    with pytest.raises(ValueError, match="saved poison has shape"):
        main(args + ["--out", str(tmp_path / "short"), "--poison", str(tmp_path / "short.npy")])
    np.save(tmp_path / "big.npy", 3 * delta + 5.0)
    with pytest.raises(ValueError, match="leaves the L-inf ball"):
        main(args + ["--out", str(tmp_path / "big"), "--poison", str(tmp_path / "big.npy")])
    with pytest.raises(ValueError, match="it needs 'x' and 'y'"):
        np.savez(tmp_path / "bad.npz", inputs=x)
        main(["audit-poison", "--data", str(tmp_path / "bad.npz"), "--out", str(out)])


def test_lr_schedule_command_on_an_npz_writes_every_method_and_resumes(tmp_path):
    """``metagrad lr-schedule`` on a user's npz (x_train/y_train/x_test/y_test): every method scored on fresh
    seeds with its spread; a rerun resumes the finished run (no meta-step is redone); other settings are refused."""
    from metagrad.cli import main

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2, 3)).astype(np.float32) * np.array([1.0, 100.0, 0.01], np.float32)
    y = (x[:, 0, 0] + x[:, 1, 1] / 100 > 0).astype(np.int32)
    np.savez(tmp_path / "toy.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    out = tmp_path / "run"
    argv = ["lr-schedule", "--data", str(tmp_path / "toy.npz"), "--out", str(out), "--smoke", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "result.json").read_text())
    assert set(report["methods"]) == {"mgd", "best_grid", "initial"}
    for metrics in report["methods"].values():
        assert set(metrics) == {f"{k}{s}" for k in ("val_loss", "test_loss", "test_accuracy") for s in ("", "_std")}
        assert np.isfinite(list(metrics.values())).all()
    assert report["dataset"] == {"name": "toy", "train": 255, "val": 45, "test": 100, "input_shape": [2, 3],
                                 "num_classes": 2}
    assert len(report["per_seed"]["mgd"]) == len(report["search"]["eval_seeds"]) == 2
    assert [h["meta_step"] for h in report["history"]] == [0, 1] and report["resumed_from_meta_step"] == 0
    assert all(k > 0 for k in report["learned_knots"])
    assert (out / "lr_schedule.png").exists()
    assert main(argv) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["resumed_from_meta_step"] == 2 and again["methods"] == report["methods"]
    with pytest.raises(ValueError, match="model"):
        main(argv + ["--model", "cnn"])


def test_standardized_data_is_in_units_of_each_feature():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) * np.array([0.5, 1.0, 1e3, 0.0]) + 7.0
    x[0, 3] += 1e-3  # a nearly constant feature is not blown up
    dataset = mg.standardized(mg.from_arrays(x.astype(np.float32), (x[:, 0] > 7).astype(np.int32)))
    # (scales below a tenth of the median feature's are floored there: 0.5 is not, 4e-5 is)
    np.testing.assert_allclose(dataset.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(dataset.x_train[:, :3].std(axis=0), 1.0, rtol=1e-3)
    assert np.abs(dataset.x_train[:, 3]).max() < 0.1
    # the valid range is per feature, carried through the same map (here the range the training inputs span)
    lo, hi = dataset.input_range
    np.testing.assert_allclose(lo, dataset.x_train.min(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, dataset.x_train.max(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dataset.feature_scale[:3], 1.0, rtol=1e-3)
    assert dataset.feature_scale[3] < 0.1
    with pytest.raises(ValueError, match="unknown dataset"):
        mg.load_dataset("cifar")


def test_select_data_command_scores_every_baseline_and_resumes(tmp_path):
    from metagrad.cli import main

    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    np.savez(tmp_path / "toy.npz", x=x, y=(x[:, 0] + x[:, 1] > 0).astype(np.int32))
    out = tmp_path / "run"
    argv = ["select-data", "--data", str(tmp_path / "toy.npz"), "--label-noise", "0.2", "--out", str(out), "--smoke",
            "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "result.json").read_text())
    assert set(report["methods"]) == set(data_selection.METHODS)
    for metrics in report["methods"].values():
        assert {"val_loss", "test_loss", "test_accuracy", "test_accuracy_std"} <= set(metrics)
    assert report["methods"]["full"]["flipped_removed_fraction"] == 0.0
    assert report["kept"] == round(0.7 * 280) and len(report["weights"]) == 280 and sum(report["flipped"]) == 56
    assert (out / "data_selection.png").exists()
    assert main(argv) == 0
    assert json.loads((out / "result.json").read_text())["resumed_from_meta_step"] == 2
    with pytest.raises(ValueError, match="label_noise"):
        main(argv[:4] + ["0.3"] + argv[5:])


def test_metagradient_elimination_removes_flipped_labels_and_resumes(tmp_path):
    from metagrad.store import RunStore

    data = mg.standardized(small_mnist1d())
    noisy, flipped = data_selection.flip_labels(data, 0.3, seed=0)
    learner = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.sgd(0.03, momentum=0.9), noisy, num_steps=60,
                                 batch_size=64, lr_schedule=None, data_weights=mg.DataWeights())
    search = data_selection.SubsetSearch(meta_steps=6, k=4)
    assert data_selection.elimination_sizes(600, 420, 6) == [570, 540, 510, 480, 450, 420]
    store = RunStore(str(tmp_path / "run"), {"test": 1})
    out = data_selection.eliminate_by_metagradient(learner, 420, search, store=store, progress=False)
    assert [h["kept"] for h in out["history"]] == [570, 540, 510, 480, 450, 420]
    removed = out["mask"] == 0
    assert removed.sum() == 180 and set(np.unique(out["mask"])) == {0.0, 1.0}
    # a random 180 would hold 30% flipped labels, give or take 3.4 points (one standard deviation)
    assert flipped[removed].mean() > 0.45
    again = data_selection.eliminate_by_metagradient(learner, 420, search, store=RunStore(str(tmp_path / "run"),
                                                                                         {"test": 1}), progress=False)
    assert again["resumed_from"] == 6 and np.array_equal(again["mask"], out["mask"])
    with pytest.raises(ValueError, match="strategy"):
        data_selection.SubsetSearch(strategy="greedy")


def test_gradient_similarity_prefers_examples_that_agree_with_validation():
    """Examples whose labels were flipped have gradients pointing away from the clean validation gradient."""
    data = mg.standardized(small_mnist1d())
    noisy, flipped = data_selection.flip_labels(data, 0.3, seed=0)
    base = mg.TrainingProblem(mg.MLP(hidden=(16,)), optax.sgd(0.03, momentum=0.9), noisy, num_steps=60,
                              batch_size=64, lr_schedule=None)
    keep = data_selection.gradient_similarity_indices(base, noisy, 420, checkpoints=2)
    assert len(set(keep.tolist())) == 420
    # a random 420 of the 600 would keep 30% flipped labels, give or take 1.2 points (one standard deviation)
    assert flipped[keep].mean() < flipped.mean() - 0.03
