"""Learning transfer (Chijiwa, ICLR 2024) on MNIST-1D: move a training trajectory onto a new initialization.

    python experiments/learning_transfer.py [--quick | --smoke | --config momentum] [--grad-batch N] [--fresh]
        [--out experiments/results/learning_transfer]

Every finished target seed / base is saved at once under ``--out``
(``finished_seeds.json``, removed when the run completes), so a killed run
started again with the same settings and the same metagrad/replay source
resumes there (``--fresh`` starts over);
the reported ``seconds`` are those of the last run.

The default setting trains experiment 1 with plain SGD at LR 0.05 (T = 40
trajectory points); ``--config momentum`` is the earlier momentum-SGD LR 0.1
setting, kept for comparison (its output goes to ``--out``).

1. Same task, new initialization: an MLP trained from init A (the source
   trajectory) is transferred to inits B (several seeds) by GMT and FGMT (on the
   paper's straight line, and on the recorded source points), with
   no training. Compared with naive transfer (no permutation), the oracle
   (permutations matched on the real trajectory of B) and the untrained init;
   then each starting point is trained and the steps to reach the source's
   final test accuracy are counted.
2. A base model update: base A and bases B (several seeds) are pretrained on MNIST-1D (different
   seeds); A is fine-tuned on a second task (MNIST-1D generated with other
   settings and relabeled classes): that fine-tuning trajectory is transferred
   onto B and compared with fine-tuning B itself.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax

import metagrad as mg
import replay
from metagrad import transfer as tr
from metagrad.progress import progress_bar
from metagrad.report import FinishedParts, format_table, mean_std, pyplot, write_json
from metagrad.trajectory import record_trajectory

# Experiment 1 trains with plain SGD at LR 0.05 so that the learned displacement does not swamp the
# initialization (naive transfer then stays near chance); chosen on validation accuracy, see BUILD_NOTES.md.
# Gradients for the matching are full-batch (grad_batch None: the whole 4,000-example training set at every point).
FULL = {"hidden": (128, 128), "optimizer": "sgd", "lr": 0.05, "steps": 1000, "points": 40, "grad_batch": None,
        "seeds": (1, 2, 3, 4, 5), "base_seeds": (1, 2, 3, 4, 5), "pretrain_optimizer": "sgdm", "pretrain_lr": 0.1,
        "pretrain_steps": 1000,
        "finetune_optimizer": "sgdm", "finetune_lr": 0.01, "finetune_steps": 500, "finetune_points": 20,
        "eval_every": 25, "budget": 2}
CONFIG = {
    "full": FULL,
    # The earlier setting (momentum SGD at LR 0.1): the displacement dominates the initialization, so naive
    # transfer is far above chance; kept for comparison (--config momentum).
    "momentum": {**FULL, "optimizer": "sgdm", "lr": 0.1, "points": 20, "grad_batch": 2048, "seeds": (1, 2, 3),
                 "base_seeds": (1, 2, 3)},
    "quick": {**FULL, "hidden": (64, 64), "steps": 300, "points": 8, "grad_batch": 1024, "seeds": (1,), "base_seeds": (1,),
              "pretrain_steps": 300, "finetune_steps": 200, "finetune_points": 8},
    # every stage at the smallest sizes: a pipeline check for tests (--smoke); the goals mean nothing there
    "smoke": {**FULL, "hidden": (16, 16), "steps": 40, "points": 4, "grad_batch": 256, "seeds": (1,),
              "base_seeds": (1,), "pretrain_steps": 40, "finetune_steps": 20, "finetune_points": 4, "eval_every": 10,
              "num_samples": 1000, "num_val": 200},
}

# FGMT is the paper's (the straight line between the source's end points); FGMT_recorded matches its cached
# gradients at the recorded source points instead (tr.fgmt(..., path="recorded")), at the same 2T gradients.
METHODS = ("FGMT", "FGMT_recorded", "GMT")
START_POINTS = ("init", "naive", *METHODS, "oracle", "oracle_grad")
START_POINTS2 = ("init", "naive", *METHODS)  # experiment 2 (no target run, so no oracle)
LABELS1 = {"init": "init B (untrained)", "naive": "naive (no permutation)", "FGMT": "FGMT (straight line)",
           "FGMT_recorded": "FGMT on the recorded points", "GMT": "GMT",
           "oracle": "oracle: displacements of the real target run", "oracle_grad": "oracle: gradients on the real target run"}
OPTIMIZERS = {"sgdm": lambda lr: optax.sgd(lr, momentum=0.9), "sgd": optax.sgd, "adam": optax.adam}


def make_problem(cfg, data, seed, num_steps, lr, optimizer=None):
    return mg.TrainingProblem(mg.MLP(hidden=cfg["hidden"]), OPTIMIZERS[optimizer or cfg["optimizer"]](lr), data,
                              num_steps=num_steps, batch_size=128, seed=seed, lr_schedule=None)


def accuracy_fn(problem):
    fn = jax.jit(lambda p: problem.loss_and_accuracy(p, "test")[1])
    return lambda p: float(fn(p))


def training_curve(problem, params, num_steps, every, accuracy):
    """Test accuracy every ``every`` steps of training ``problem`` from ``params`` (fresh optimizer state)."""
    state = {"params": params, "opt_state": problem.optimizer.init(params)}
    steps, accs = [0], [accuracy(params)]
    for t0 in range(0, num_steps, every):
        state = replay.advance(problem.step, state, {}, t0, t0 + every)
        steps.append(t0 + every)
        accs.append(accuracy(state["params"]))
    return {"steps": steps, "accuracy": accs}


def steps_to(curve, target):
    for step, acc in zip(curve["steps"], curve["accuracy"]):
        if acc >= target:
            return step
    return None


def evaluate_starts(problem, starts, names, budget, every, accuracy, target):
    """Per start: accuracy with zero steps, the training curve from it, and the steps to reach ``target``."""
    curves = {name: training_curve(problem, starts[name], budget, every, accuracy) for name in names}
    return {"zero_step_accuracy": {name: curves[name]["accuracy"][0] for name in names},
            "steps_to_target": {name: steps_to(curves[name], target) for name in names}, "curves": curves}


def transfer_all(spec, source, target_start, grad_fn, target_traj=None):
    """Zero-step parameters of every starting point, and the seconds/gradient evaluations of each method."""
    out, cost = {"init": target_start, "naive": tr.naive_transfer(source, target_start)}, {}
    for name, run in (("FGMT", lambda: tr.fgmt(spec, source, target_start, grad_fn)),
                      ("FGMT_recorded", lambda: tr.fgmt(spec, source, target_start, grad_fn, path="recorded")),
                      ("GMT", lambda: tr.gmt(spec, source, target_start, grad_fn))):
        tic = time.perf_counter()
        result = run()
        cost[name] = {"seconds": time.perf_counter() - tic, "grad_evals": result.grad_evals}
        out[name] = result.params
    if target_traj is not None:
        out["oracle"] = tr.oracle(spec, source, target_traj, match="displacements").params
        out["oracle_grad"] = tr.oracle(spec, source, target_traj, grad_fn, match="gradients").params
    return out, cost


def experiment_same_task(cfg, data, progress, finished):
    points = [int(s) for s in np.linspace(0, cfg["steps"], cfg["points"] + 1)]
    source_problem = make_problem(cfg, data, 0, cfg["steps"], cfg["lr"])
    accuracy = accuracy_fn(source_problem)
    source = record_trajectory(source_problem, {}, points)
    source_acc = accuracy(source.final)
    spec = tr.permutation_spec(source.initial, apply_fn=source_problem.logits, x=data.x_val[:64])
    grad_fn = tr.problem_gradient(source_problem, batch_size=cfg["grad_batch"])
    budget = cfg["budget"] * cfg["steps"]
    per_seed = []
    for seed in progress_bar(cfg["seeds"], desc="exp 1: target inits", disable=not progress):
        key = f"experiment_1/seed_{seed}"
        if finished.get(key) is None:  # not finished by an earlier run with these settings
            target_problem = make_problem(cfg, data, seed, cfg["steps"], cfg["lr"])
            target_traj = record_trajectory(target_problem, {}, points)
            starts, cost = transfer_all(spec, source, target_traj.initial, grad_fn, target_traj)
            finished.put(key, {"seed": seed, "cost": cost, **evaluate_starts(
                target_problem, starts, START_POINTS, budget, cfg["eval_every"], accuracy, source_acc)})
        per_seed.append(finished.get(key))
    return {"source_accuracy": source_acc, "target_accuracy": source_acc, "budget_steps": budget,
            "trajectory_steps": points, "per_seed": per_seed}


def data_sizes(cfg):
    """``mg.mnist1d``'s size arguments: the config's ``num_samples``/``num_val`` where it sets them (smoke)."""
    return {k: cfg[k] for k in ("num_samples", "num_val") if k in cfg}


def second_task(seed=1, **sizes):
    """MNIST-1D generated with other settings (more shear and noise) and a fixed relabeling of the classes."""
    data = mg.mnist1d(seed=seed, shear_scale=1.2, iid_noise_scale=0.05, **sizes)
    relabel = np.random.default_rng(123).permutation(10).astype(np.int32)
    return mg.Dataset(data.x_train, relabel[data.y_train], data.x_val, relabel[data.y_val], data.x_test,
                      relabel[data.y_test], num_classes=10, name="mnist1d-shifted-relabeled")


def experiment_base_update(cfg, data, progress, finished):
    """Base A (seed 0) fine-tuned on task 2 is the source; each base B (``cfg["base_seeds"]``) receives its trajectory."""
    task2 = second_task(**data_sizes(cfg))

    def pretrain(seed):
        pre = make_problem(cfg, data, seed, cfg["pretrain_steps"], cfg["pretrain_lr"], cfg["pretrain_optimizer"])
        return pre.train({})["params"]

    accuracy_task1 = accuracy_fn(make_problem(cfg, data, 0, 1, cfg["pretrain_lr"], cfg["pretrain_optimizer"]))
    base_a = pretrain(0)
    ft = cfg["finetune_steps"]
    points = [int(s) for s in np.linspace(0, ft, cfg["finetune_points"] + 1)]
    problem = make_problem(cfg, task2, 0, ft, cfg["finetune_lr"], cfg["finetune_optimizer"])
    accuracy = accuracy_fn(problem)
    source = record_trajectory(problem, {}, points, state={"params": base_a, "opt_state": problem.optimizer.init(base_a)})
    source_acc = accuracy(source.final)
    spec = tr.permutation_spec(source.initial, apply_fn=problem.logits, x=task2.x_val[:64])
    grad_fn = tr.problem_gradient(problem, batch_size=cfg["grad_batch"])
    per_seed = []
    for seed in progress_bar(cfg["base_seeds"], desc="exp 2: bases B", disable=not progress):
        key = f"experiment_2/base_{seed}"
        if finished.get(key) is None:
            base_b = pretrain(seed)
            starts, cost = transfer_all(spec, source, base_b, grad_fn)
            finished.put(key, {"seed": seed, "base_accuracy_task1": accuracy_task1(base_b), "cost": cost,
                               **evaluate_starts(problem, starts, START_POINTS2, cfg["budget"] * ft,
                                                 cfg["eval_every"], accuracy, source_acc)})
        per_seed.append(finished.get(key))
    return {"base_A_accuracy_task1": accuracy_task1(base_a), "source_accuracy": source_acc,
            "budget_steps": cfg["budget"] * ft, "per_seed": per_seed}


def summarize(per_seed, names):
    """Zero-step accuracy (mean, std over seeds) and the per-seed steps to target of each start."""
    return {name: {"zero_step_accuracy": mean_std([r["zero_step_accuracy"][name] for r in per_seed]),
                   "steps_to_target": [r["steps_to_target"][name] for r in per_seed]} for name in names}


def step_goal(summary, name, reference):
    """Steps to target at most half the reference's, on every seed (a run that never gets there fails)."""
    ref = [s if s is not None else np.inf for s in summary[reference]["steps_to_target"]]
    return all(s is not None and s <= 0.5 * r for s, r in zip(summary[name]["steps_to_target"], ref))


def fmt_steps(x, budget):
    return f">{budget}" if x is None else str(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes; same as --config quick")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage (tests); same as --config smoke")
    parser.add_argument("--config", choices=sorted(CONFIG), default="full",
                        help="full (default), momentum (momentum SGD at LR 0.1, for comparison), quick or smoke")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "learning_transfer"))
    parser.add_argument("--grad-batch", type=int, default=None,
                        help="examples per matching gradient (default: the config's; full uses the whole training set)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the seeds an earlier, unfinished run in --out left (it resumes by default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.quick and args.smoke:
        parser.error("give --quick or --smoke, not both")
    if args.quick or args.smoke:
        args.config = "quick" if args.quick else "smoke"
    cfg = CONFIG[args.config]
    if args.grad_batch is not None:
        if args.grad_batch < 1:
            parser.error(f"--grad-batch must be a positive number of examples, got {args.grad_batch}")
        cfg = {**cfg, "grad_batch": args.grad_batch}
    progress = not args.no_progress
    # Each finished seed is saved under --out at once, so a killed run resumes where it stopped.
    try:
        finished = FinishedParts(os.path.join(args.out, "finished_seeds.json"),
                                 {**cfg, "config_name": args.config, "starts": list(START_POINTS)}, fresh=args.fresh)
    except ValueError as err:  # a record left by another run: say what to pass, without a traceback
        parser.error(str(err))
    if finished.keys():
        print(f"resuming: {len(finished.keys())} seeds finished earlier are read from {finished.path}")
    tic = time.perf_counter()
    data = mg.mnist1d(**data_sizes(cfg))
    exp1 = experiment_same_task(cfg, data, progress, finished)
    exp2 = experiment_base_update(cfg, data, progress, finished)
    seconds = time.perf_counter() - tic

    # ------------------------------------------------------------------ summary
    src1, src2 = exp1["source_accuracy"], exp2["source_accuracy"]
    summary1, summary2 = summarize(exp1["per_seed"], START_POINTS), summarize(exp2["per_seed"], START_POINTS2)
    goals = {}
    for name in METHODS:
        goals[f"exp1 {name}: zero-step accuracy >= 60% of source"] = (
            summary1[name]["zero_step_accuracy"]["mean"] >= 0.6 * src1)
        goals[f"exp1 {name}: steps to target <= half of init's (every seed)"] = step_goal(summary1, name, "init")
    goals["exp1 naive near chance (< 0.15; chance is 0.10)"] = summary1["naive"]["zero_step_accuracy"]["mean"] < 0.15
    for name in METHODS:
        goals[f"exp2 {name}: zero-step accuracy >= 60% of fine-tuned A"] = (
            summary2[name]["zero_step_accuracy"]["mean"] >= 0.6 * src2)
        goals[f"exp2 {name}: steps to target <= half of fine-tuning B (every seed)"] = step_goal(summary2, name, "init")

    report = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "quick": args.config == "quick", "smoke": args.config == "smoke", "config_name": args.config,
              "seconds": seconds, "experiment_1": exp1, "experiment_1_summary": summary1,
              "experiment_2": exp2, "experiment_2_summary": summary2, "goals": goals}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "result.json"), report)

    rows = []
    labels2 = {"init": "base B (fine-tune B itself)", "naive": "naive", **{n: LABELS1[n] for n in METHODS}}
    for exp, summary, src, labels, prefix in ((exp1, summary1, src1, LABELS1, "1"),
                                              (exp2, summary2, src2, labels2, "2")):
        for name, z in ((n, summary[n]["zero_step_accuracy"]) for n in labels):
            rows.append((f"{prefix}: {labels[name]}", f"{z['mean']:.3f} ± {z['std']:.3f}", f"{z['mean'] / src:.2f}",
                         ", ".join(fmt_steps(s, exp["budget_steps"]) for s in summary[name]["steps_to_target"])))
    print(f"experiment 1: source (init A) test accuracy {src1:.3f} after {cfg['steps']} steps; "
          f"targets: inits B with seeds {list(cfg['seeds'])}")
    print(f"experiment 2: fine-tuned A test accuracy on task 2 {src2:.3f} after {cfg['finetune_steps']} steps; "
          f"bases B with seeds {list(cfg['base_seeds'])}")
    print(format_table(("start", "acc at 0 steps", "/ source", "steps to source acc (per seed)"), rows))
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    if args.config == "smoke":
        print("(smoke run: sizes too small for the goals to mean anything)")
    print(f"{seconds:.0f} s; wrote {args.out}/result.json and learning_transfer.png")

    # -------------------------------------------------------------------- plot
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    means = [summary1[n]["zero_step_accuracy"]["mean"] for n in START_POINTS]
    stds = [summary1[n]["zero_step_accuracy"]["std"] for n in START_POINTS]
    colors = dict(zip(START_POINTS, ("grey", "tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:purple", "tab:pink")))
    axes[0].bar(START_POINTS, means, yerr=stds, color=[colors[n] for n in START_POINTS])
    plt.setp(axes[0].get_xticklabels(), rotation=30, ha="right")
    axes[0].axhline(src1, color="k", ls="--", label="source (trained A)")
    axes[0].axhline(0.6 * src1, color="k", ls=":", label="60% of source")
    axes[0].set(ylabel="test accuracy, 0 training steps", title="1: same task, new init (mean over seeds)")
    axes[0].legend()
    first = exp1["per_seed"][0]
    for name in START_POINTS:
        c = first["curves"][name]
        axes[1].plot(c["steps"], c["accuracy"], label=name, color=colors[name])
    axes[1].axhline(src1, color="k", ls="--", label="target")
    axes[1].set(xlabel="training steps", ylabel="test accuracy", title=f"1: training from each start (seed {first['seed']})")
    axes[1].legend()
    first2 = exp2["per_seed"][0]
    for name in START_POINTS2:
        c = first2["curves"][name]
        axes[2].plot(c["steps"], c["accuracy"], label=labels2[name], color=colors[name])
    axes[2].axhline(src2, color="k", ls="--", label="target (fine-tuned A)")
    axes[2].set(xlabel="fine-tuning steps", ylabel="test accuracy (task 2)",
                title=f"2: base model update (base B seed {first2['seed']})")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "learning_transfer.png"), dpi=100)
    finished.clear()  # only now: a run that fails while plotting resumes with every finished part


if __name__ == "__main__":
    main()
