"""HyperFlow vs fine-tuning on few-shot MNIST-1D tasks (5-way 5-shot).

    python experiments/hyperflow.py [--quick | --smoke] [--fresh] [--bias-backbone {mlp,conv}]
                                    [--conv-meta {reduced,full}] [--out FOLDER]

Kim, Kim & Hong, arXiv 2504.15323. An MLP backbone is pretrained on MNIST-1D
classes 0-4; the drift network is meta-trained on 5-way tasks over held-out
examples of classes 0-4 under per-task transformations (time reversal, sign
flip, both) and random relabelings; methods are compared on tasks over the
disjoint classes 5-9, from two sources: (A) the standard MNIST-1D generator and
(B) a differently generated MNIST-1D (other seed, 2.5x the i.i.d. noise, 1.4x the
correlated noise, more shear).
All methods start from the prototype head of the support set; "no
adaptation" is that prototype classifier. Fine-tuning's steps and learning
rate, and HyperFlow's number of Euler steps and which interpolations its drift
regresses on (straight paths only, or straight + piecewise-linear + cubic; both
variants are reported), are picked on 100 tuning episodes of source A drawn
apart from the reported ones.

Bias mode (second table, :mod:`metagrad.hyperflow.bias`): the paper's
parameter-efficient subset -- every bias of a wider backbone (MLP 40-512-64)
plus the head -- is adapted, on the same episodes. Baselines: GD fine-tuning of
that subset (backprop through the backbone each step; steps, head LR and bias LR
tuned), full fine-tuning (tuned), no adaptation (pretrained biases, prototype
head). Two HyperFlow drifts are meta-trained on simulated GD trajectories of
the subset, each refined end to end on its own 5-step Euler rollouts (matching
GD's model on the meta-tasks' query inputs) and integrated with a tuned number
of Euler steps (forward passes only): the *live* drift runs a backbone forward
pass under the current biases at every Euler step; the *encoded* drift, as in
the paper, sees the support set only through statistics computed once at the
start, so integrating it runs no pass of the target model. Throughout, a tie
on the tuning episodes goes to the setting with fewer steps.

``--bias-backbone conv`` runs the bias mode on a 1-D CNN (3 SAME convolutions
of 32 channels, kernel 5, averaged over positions; :class:`hb.ConvBackbone`)
instead of the MLP, with a wider GD learning-rate grid, up to 16 Euler steps,
and meta-training at a reduced size (512 tasks, 800 regression and 1,000
refinement iterations), and writes to ``experiments/results/hyperflow_conv``;
with ``--conv-meta full``, at the MLP's size (1,024 tasks, 3,000 and 2,000), to
``experiments/results/hyperflow_conv_full``. On a CNN every method's adaptation
cost is measured with both implementations of the convolution
(``hb.conv_same``'s shifted products, fast on a CPU, and XLA's convolution,
leaner in memory) and each figure is the method's best of the two.

Each meta-trained bias-mode drift (minutes each) is saved at once under
``--out`` (``finished_drifts.json``, removed when the run completes), so a
killed run started again with the same settings and the same metagrad/replay
source resumes after it (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.ticker
import numpy as np

import metagrad as mg
from metagrad import hyperflow as hf
from metagrad.hyperflow import bias as hb
from metagrad.progress import progress_bar
from metagrad.report import FinishedParts, LoopProgress, format_table, pyplot, write_json

WAYS, SHOTS, QUERIES = 5, 5, 15
# bias mode: GD fine-tuning (steps, head LR, bias LR) grid, tuned on the tuning episodes
BIAS_SETTINGS = tuple((s, lh, lb) for s in (30, 100) for lh in (3.0, 10.0) for lb in (1.0, 3.0, 10.0))
BIAS_META_ITERS = 3000
# bias mode on a 1-D CNN backbone (--bias-backbone conv): head LRs 1 and 3 (in a dev check, head LR 10 fell far
# below 3 on this backbone)
CONV_BIAS_SETTINGS = tuple((s, lh, lb) for s in (30, 100) for lh in (1.0, 3.0) for lb in (1.0, 3.0, 10.0))
BASE, NOVEL = tuple(range(5)), tuple(range(5, 10))


def chunk_of(cfg):
    """Meta-training iterations per compiled chunk (one loss-history entry each): 100 unless the config sets it."""
    return cfg.get("meta_chunk", 100)


def best_setting(scores, candidates, steps_of):
    """The candidate with the highest score; a tie goes to the one with fewer steps (``steps_of(candidate)``)."""
    return max(candidates, key=lambda k: (scores[k], -steps_of(k)))


def ci95(values):
    values = np.asarray(values, float)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


_VMAPPED = {}


def vmapped_adaptation(fn, *bound):
    """``jax.jit(jax.vmap(functools.partial(fn, *bound)))``, built once per method and bound arguments, so scoring one
    method on several sets of episodes of one shape (the test sources) compiles it once."""
    key = (fn, tuple(id(b) for b in bound))
    if key not in _VMAPPED:  # ``bound`` is kept with it, so its ids stay those of live objects
        _VMAPPED[key] = (jax.jit(jax.vmap(functools.partial(fn, *bound))), bound)
    return _VMAPPED[key][0]


def episode_accuracy(backbone, hidden, vmapped_fn, tasks):
    """Query accuracy per episode of ``vmapped_fn(sx, sy) -> head`` or ``-> {"backbone", "head"}`` (an adaptation
    vmapped over the episodes, e.g. by :func:`vmapped_adaptation`)."""
    out = vmapped_fn(tasks["support_x"], tasks["support_y"])
    if isinstance(out, dict) and "backbone" in out:
        feats = jax.vmap(lambda b, x: hf.features(b, x, hidden))(out["backbone"], tasks["query_x"])
        out = out["head"]
    else:
        feats = jax.vmap(lambda x: hf.features(backbone, x, hidden))(tasks["query_x"])
    return np.asarray(jax.vmap(hf.accuracy)(out, feats, tasks["query_y"]))


def compare_methods(methods, acc, backbone, test, num_timed, *, desc, progress, convolutions=None):
    """Time every method on single episodes and score it on every test source.

    ``methods``: name -> ``(adapt_fn, extra_args)`` in the order no adaptation,
    subset fine-tuning, full fine-tuning, HyperFlow (then any others);
    ``acc(fn, tasks, *extra)`` gives per-episode accuracies. Returns
    ``(accs, costs, rows)``: accuracies per source and method, the cost per
    episode of each method and the table's rows (:func:`cost_ratios` compares
    the costs). ``convolutions``: see :func:`metagrad.hyperflow.best_cost` (each adaptation function then takes
    a ``convolution`` keyword).
    """
    names = list(methods)
    costs = {name: hf.best_cost(fn, (*extra, backbone), test[next(iter(test))], num_timed, convolutions)
             for name, (fn, extra) in progress_bar(methods.items(), desc=desc, disable=not progress)}
    accs, rows = {}, []
    for source, tasks in test.items():
        accs[source] = {name: acc(fn, tasks, *extra) for name, (fn, extra) in methods.items()}
        for name in names:
            m, h = ci95(accs[source][name])
            c = costs[name]
            rows.append((source[:1], name, f"{m:.4f} +- {h:.4f}", f"{1e3 * c['seconds_median']:.3f}",
                         f"{c['alloc_bytes'] / 1024:.1f}", f"{c['peak_bytes'] / 1024:.1f}"))
    return accs, costs, rows


def cost_ratios(costs, others, hf_name):
    """Time and memory of each of ``others`` over those of ``hf_name`` (> 1: HyperFlow is cheaper)."""
    return {other: {"time": costs[other]["seconds_median"] / costs[hf_name]["seconds_median"],
                    "alloc_memory": costs[other]["alloc_bytes"] / costs[hf_name]["alloc_bytes"],
                    "peak_memory": costs[other]["peak_bytes"] / costs[hf_name]["peak_bytes"]}
            for other in others}


def gains(accs, names, finetune_key):
    """Accuracies with 95% intervals and gains over no adaptation (``names`` ordered as in :func:`compare_methods`)."""
    base, ft, hfa = accs[names[0]], accs[names[1]], accs[names[3]]
    gain_ft, gain_hf = float(ft.mean() - base.mean()), float(hfa.mean() - base.mean())
    return {
        "accuracy": {n: dict(zip(("mean", "ci95"), ci95(a)), values=a.tolist()) for n, a in accs.items()},
        finetune_key: gain_ft, "gain_full_finetune": float(accs[names[2]].mean() - base.mean()),
        "gain_hyperflow": gain_hf, "recovered_fraction": gain_hf / gain_ft if gain_ft > 0 else float("nan"),
        "hyperflow_minus_proto_ci95": ci95(hfa - base)[1],
    }


def drift_tree_name(key):
    """The name of the store's tree that holds the parameters of the drift saved under ``key``."""
    return key.replace("/", "-")


def save_drift(finished, key, phi, dcfg, record, meta_training) -> None:
    """Save a meta-trained bias-mode drift in the run's store: its parameters as a tree
    (:meth:`metagrad.store.RunStore.save_tree`, exact), and under ``key`` the fields :func:`hb.meta_train` set on
    the config with its meta-training record (``record`` from :func:`meta_train_bias_drift`, merged into
    ``meta_training``, with the total seconds)."""
    meta_training = {"seconds": meta_training["simulation_seconds"] + record["fit_seconds"], **meta_training,
                     **{k: v for k, v in record.items() if k != "fit_seconds"}}
    finished.save_tree(drift_tree_name(key), 0, phi)
    finished.put(key, {"velocity_scale": dcfg.head.velocity_scale, "bias_scales": list(dcfg.bias_scales),
                       "head_scales": [list(kv) for kv in dcfg.head_scales], "meta_training": meta_training})


def load_drift(finished, key, dcfg0, layers):
    """The inverse of :func:`save_drift` for a drift built from ``dcfg0`` for a ``layers``-layer backbone."""
    saved = finished.get(key)
    restored = finished.restore_tree(drift_tree_name(key), hb.init_drift(jax.random.key(0), dcfg0, layers))
    if restored is None:
        raise SystemExit(f"the drift saved under {key!r} in {finished.path} has lost its parameters: rerun with "
                         "--fresh")
    phi = restored[1]
    dcfg = dataclasses.replace(dcfg0, head=dataclasses.replace(dcfg0.head, velocity_scale=saved["velocity_scale"]),
                               bias_scales=tuple(saved["bias_scales"]),
                               head_scales=tuple((k, v) for k, v in saved["head_scales"]))
    return phi, dcfg, saved["meta_training"]


def drift_progress_keys(key):
    """Where the two meta-training loops of the drift saved under ``key`` keep their progress until it is saved
    (tree names of the store, which cannot hold a '/')."""
    return {stage: drift_tree_name(f"{key}/{stage}_progress") for stage in ("regression", "refinement")}


def meta_train_bias_drift(cfg, traj, backbone, dcfg0, query_x, progress, finished, key):
    """Velocity regression, then rollout refinement, of one bias-mode drift; returns ``(phi, config, record)``.

    Both loops keep their progress in ``finished`` (under ``key``), so a run killed mid-way resumes there."""
    tic = time.perf_counter()
    stages = {stage: LoopProgress(finished, progress_key) for stage, progress_key in drift_progress_keys(key).items()}
    phi, dcfg, history = hb.meta_train(traj, backbone, dcfg0, num_iters=cfg["bias_meta_iters"], batch_tasks=32,
                                       learning_rate=3e-3, chunk=chunk_of(cfg), progress=progress,
                                       checkpoint=stages["regression"])
    regressed_fit = hb.per_leaf_fit(phi, dcfg, traj, backbone)
    phi, rollout_history = hb.refine_on_rollouts(phi, dcfg, traj, backbone, jnp.asarray(query_x),
                                                 num_euler=cfg["bias_rollout_euler"],
                                                 num_iters=cfg["bias_rollout_iters"], chunk=chunk_of(cfg),
                                                 progress=progress, checkpoint=stages["refinement"])
    jax.block_until_ready(phi)
    seconds = time.perf_counter() - tic + sum(st.earlier_seconds for st in stages.values())
    return phi, dcfg, {
        "fit_seconds": seconds, "drift_parameters": int(sum(a.size for a in jax.tree.leaves(phi))),
        "resumed_at_chunk": {stage: st.resumed_from for stage, st in stages.items()},
        "loss_history": history, "per_leaf_relative_error_after_regression": regressed_fit,
        "per_leaf_relative_error": hb.per_leaf_fit(phi, dcfg, traj, backbone),
        "rollout_refinement": {"euler_steps": cfg["bias_rollout_euler"], "iterations": cfg["bias_rollout_iters"],
                               "loss_history": rollout_history}}


def bias_mode(cfg, data_a, test, tuning, meta_tasks, progress, finished):
    """The paper's PEFT subset: all biases of a backbone plus the head (:mod:`metagrad.hyperflow.bias`).

    The backbone is a wider MLP (``cfg["bias_backbone"] == "mlp"``, widths
    ``bias_hidden``) or a 1-D CNN (``"conv"``, :class:`hb.ConvBackbone` with
    ``bias_channels``), pretrained on the base classes.

    Every method starts from the pretrained biases and the prototype head. Baselines: GD fine-tuning of the
    same subset (backprop through the backbone at every step; steps and the two learning rates tuned on the
    tuning episodes) and full fine-tuning (every parameter). HyperFlow's Euler steps are tuned likewise.
    """
    hidden, scale, conv = tuple(cfg["bias_hidden"]), 10.0, cfg["bias_backbone"] == "conv"
    if conv:
        channels = tuple(cfg["bias_channels"])
        model = hb.ConvBackbone(channels=channels, kernel_size=5, num_classes=len(BASE))
        out = {"backbone": f"1-D CNN, {len(channels)} conv layers of {'/'.join(map(str, channels))} channels"}
    else:
        model, out = None, {"backbone": f"MLP 40-{'-'.join(map(str, hidden))}", "hidden": hidden}
    backbone, pre = hf.pretrain_backbone(data_a, BASE, hidden=hidden, num_steps=cfg["bias_pretrain_steps"],
                                         model=model)
    out["pretraining"] = pre
    print(f"[bias mode] backbone {out['backbone']} pretrained: test accuracy {pre['test_accuracy']:.3f} "
          f"({pre['seconds']:.1f} s)")

    # features of a backbone with all its parameters (full fine-tuning's output)
    backbone_features = hb.backbone_features if conv else functools.partial(hf.features, hidden=hidden)

    def acc(fn, tasks, *extra):
        th = vmapped_adaptation(fn, *extra, backbone)(tasks["support_x"], tasks["support_y"])
        if "biases" not in th:  # full fine-tuning returns {"backbone", "head"}
            return np.asarray(jax.vmap(lambda b, h, x, y: hf.accuracy(h, backbone_features(b, x), y))(
                th["backbone"], th["head"], tasks["query_x"], tasks["query_y"]))
        return np.asarray(jax.vmap(lambda t, x, y: hb.accuracy(t, backbone, x, y))(
            th, tasks["query_x"], tasks["query_y"]))

    # Each adaptation takes the CNN's convolution by name (hb.CONVOLUTIONS: the same function, timed both ways).
    def proto_fn(bb, sx, sy, convolution=hb.DEFAULT_CONVOLUTION):
        return hb.init_theta(bb, sx, jax.nn.one_hot(sy, WAYS), scale, convolution)

    def ft_fn(steps, lr_head, lr_bias):
        return lambda bb, sx, sy, convolution=hb.DEFAULT_CONVOLUTION: hb.finetune(
            bb, sx, sy, lr_bias=lr_bias, lr_head=lr_head, num_steps=steps, ways=WAYS, scale=scale,
            convolution=convolution)

    def full_fn(lr, steps):
        def features_fn(convolution):
            return functools.partial(hb.backbone_features, convolution=convolution) if conv else backbone_features

        return lambda bb, sx, sy, convolution=hb.DEFAULT_CONVOLUTION: hf.finetune_full(
            bb, sx, sy, lr=lr, num_steps=steps, ways=WAYS, scale=scale, features_fn=features_fn(convolution))

    grid = {}
    for setting in progress_bar(cfg["bias_settings"], desc="[bias mode] tuning fine-tuning", disable=not progress):
        grid[("bias",) + tuple(setting)] = float(acc(ft_fn(*setting), tuning).mean())
    for lr in cfg["full_lrs"]:
        for steps in cfg["full_steps"]:
            grid[("full", lr, steps)] = float(acc(full_fn(lr, steps), tuning).mean())
    best_bias = best_setting(grid, [k for k in grid if k[0] == "bias"], lambda k: k[1])[1:]
    best_full = best_setting(grid, [k for k in grid if k[0] == "full"], lambda k: k[2])[1:]
    out["tuning"] = [{"method": k[0], "setting": k[1:], "accuracy": v} for k, v in grid.items()]
    out["tuning_proto_accuracy"] = float(acc(proto_fn, tuning).mean())
    steps, lr_head, lr_bias = best_bias
    print(f"[bias mode] tuned: biases+head GD {steps} steps, head lr {lr_head}, bias lr {lr_bias}; full FT lr "
          f"{best_full[0]} x {best_full[1]} steps")

    # ---- meta-train the two drifts on simulated (biases, head) fine-tuning trajectories
    mt = {k: v[:cfg["bias_meta_tasks"]] for k, v in meta_tasks.items()}
    simulated = {}  # the trajectories, simulated only when a drift is not in the resume record

    def trajectories():
        if not simulated:
            tic = time.perf_counter()
            simulated["traj"] = jax.block_until_ready(hb.simulate_trajectories(
                backbone, jnp.asarray(mt["support_x"]), jnp.asarray(mt["support_y"]), jax.random.key(0), lr_bias,
                lr_head, num_steps=steps, num_knots=10, num_starts=cfg["bias_starts"], ways=WAYS, scale=scale))
            simulated["seconds"] = time.perf_counter() - tic
        return simulated["traj"], simulated["seconds"]

    drifts, out["meta_training"], out["tuning_hyperflow"], picks = {}, {}, {}, {}
    for support in hb.SUPPORT_MODES:
        dcfg0 = hb.BiasDriftConfig(head=hf.DriftConfig(ways=WAYS, hidden=64, scale=scale),
                                   hidden=cfg["bias_drift_hidden"], support=support)
        key = f"bias_mode/drift_{support}"
        if finished.get(key) is None:
            phi, dcfg, record = meta_train_bias_drift(cfg, trajectories()[0], backbone, dcfg0, mt["query_x"],
                                                      progress, finished, key)
            save_drift(finished, key, phi, dcfg, record, {
                "simulation_seconds": trajectories()[1], "tasks": len(mt["support_x"]), "starts": cfg["bias_starts"],
                "knots": 10, "iterations": cfg["bias_meta_iters"], "interpolations": ("linear",),
                "emulated_run": {"steps": steps, "lr_head": lr_head, "lr_bias": lr_bias}})
            for progress_key in drift_progress_keys(key).values():  # the drift is saved: no need for its progress
                finished.drop(progress_key)
        else:
            print(f"[bias mode] {support}-support drift read from {finished.path} (meta-trained by an earlier run)")
        # From here on the drift is the saved one (restored exactly), in a fresh run too.
        phi, dcfg, out["meta_training"][support] = load_drift(finished, key, dcfg0, hb.num_layers(backbone))
        drifts[support] = (phi, dcfg)

        def hf_fn(n, dcfg=dcfg):
            return lambda p, bb, sx, sy, convolution=hb.DEFAULT_CONVOLUTION: hb.adapt(
                p, bb, sx, sy, config=dataclasses.replace(dcfg, convolution=convolution), num_steps=n)

        hf_grid = {n: float(acc(hf_fn(n), tuning, phi).mean())
                   for n in sorted(set(cfg["bias_euler_steps"]) | {cfg["bias_rollout_euler"]})}
        out["tuning_hyperflow"][support] = [{"euler_steps": n, "accuracy": v} for n, v in hf_grid.items()]
        picks[support] = (best_setting(hf_grid, hf_grid, lambda n: n), hf_fn)
        print(f"[bias mode] {support} drift: meta-training {out['meta_training'][support]['seconds']:.1f} s "
              f"(simulation {out['meta_training'][support]['simulation_seconds']:.1f} s); Euler steps picked: "
              f"{picks[support][0]} (tuning {hf_grid})")
    simulated.clear()  # free the trajectories before the evaluation

    methods = {
        "no adaptation (pretrained biases, prototypes)": (proto_fn, ()),
        f"fine-tune biases+head (GD, {steps} steps, lr head {lr_head}, biases {lr_bias})": (ft_fn(*best_bias), ()),
        f"full fine-tune (GD, lr {best_full[0]}, {best_full[1]} steps)": (full_fn(*best_full), ()),
    }
    for support, (n_euler, hf_fn) in picks.items():  # the live drift is names[3], the encoded one names[4]
        methods[f"HyperFlow[biases+head, {support} support] ({n_euler} Euler steps)"] = (hf_fn(n_euler),
                                                                                         (drifts[support][0],))
    names = list(methods)
    accs_all, costs, rows = compare_methods(methods, acc, backbone, test, cfg["timed"],
                                            desc="[bias mode] timing", progress=progress,
                                            convolutions=tuple(hb.CONVOLUTIONS) if conv else None)
    ratios = {support: cost_ratios(costs, names[1:3], name) for support, name in zip(picks, names[3:])}
    results = {}
    for source, accs in accs_all.items():
        results[source] = {}
        for support, name in zip(picks, names[3:]):
            order = names[:3] + [name]
            results[source][support] = {**gains({n: accs[n] for n in order}, order, "gain_finetune_subset"),
                                        "finetune_minus_proto_ci95": ci95(accs[names[1]] - accs[names[0]])[1],
                                        "hyperflow_minus_finetune_ci95": ci95(accs[name] - accs[names[1]])[1]}
    goals = {support: {
        "recovers_90pct_of_subset_finetuning_gain": {s: r[support]["recovered_fraction"] >= 0.9
                                                     for s, r in results.items()},
        "10x_faster_than_subset_finetuning": ratios[support][names[1]]["time"] >= 10,
        "10x_less_alloc_memory_than_subset_finetuning": ratios[support][names[1]]["alloc_memory"] >= 10,
        "10x_less_peak_memory_than_subset_finetuning": ratios[support][names[1]]["peak_memory"] >= 10,
        "10x_faster_than_full_finetuning": ratios[support][names[2]]["time"] >= 10,
        "10x_less_alloc_memory_than_full_finetuning": ratios[support][names[2]]["alloc_memory"] >= 10,
    } for support in picks}
    out.update(names=names, results=results, costs=costs, ratios_vs_hyperflow=ratios, goals=goals, rows=rows,
               euler_steps={support: n for support, (n, _) in picks.items()})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced size (2-3 min)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage: a pipeline check for tests (no goal is judged)")
    parser.add_argument("--bias-backbone", choices=("mlp", "conv"), default="mlp",
                        help="the bias mode's backbone: an MLP 40-512-64 (default) or a 1-D CNN of 3 x 32 channels "
                             "(meta-training at a reduced size by default, see --conv-meta)")
    parser.add_argument("--conv-meta", choices=("reduced", "full"), default="reduced",
                        help="with --bias-backbone conv: meta-train the drifts at a reduced size (512 tasks, 800 "
                             "regression and 1,000 refinement iterations; default) or at the MLP's full size "
                             "(1,024 tasks, 3,000 and 2,000; writes to hyperflow_conv_full)")
    parser.add_argument("--conv-channels", type=int, default=32,
                        help="with --bias-backbone conv: channels of each of the 3 conv layers (default 32; another "
                             "width adds _c<width> to the default output folder)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: experiments/results/hyperflow, or hyperflow_conv for "
                             "--bias-backbone conv, hyperflow_conv_full with --conv-meta full)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the drifts an earlier, unfinished run in --out left (it resumes by default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    quick, smoke, progress = args.quick, args.smoke, not args.no_progress
    conv = args.bias_backbone == "conv"
    folder = ("hyperflow_conv_full" if args.conv_meta == "full" else "hyperflow_conv") if conv else "hyperflow"
    if conv and args.conv_channels != 32:
        folder += f"_c{args.conv_channels}"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", folder)
    cfg = dict(num_samples=20000, pretrain_steps=4000, meta_tasks=1024, meta_iters=3000, episodes=300,
               tuning_episodes=100, timed=100, head_lrs=(0.3, 1.0, 3.0, 10.0), head_steps=(10, 30, 100, 300),
               full_lrs=(0.03, 0.1, 0.3), full_steps=(10, 30, 100), euler_steps=(1, 2, 4, 8),
               bias_backbone="mlp", bias_hidden=(512, 64), bias_pretrain_steps=4000, bias_settings=BIAS_SETTINGS,
               bias_meta_tasks=1024, bias_starts=1, bias_meta_iters=BIAS_META_ITERS, bias_drift_hidden=16,
               bias_rollout_euler=5, bias_rollout_iters=2000, bias_euler_steps=(1, 2, 4, 8))
    if conv:
        cfg.update(bias_backbone="conv", bias_channels=(args.conv_channels,) * 3, bias_pretrain_steps=2000,
                   bias_settings=CONV_BIAS_SETTINGS, bias_euler_steps=(1, 2, 4, 8, 16))
        if args.conv_meta == "reduced":
            cfg.update(bias_meta_tasks=512, bias_meta_iters=800, bias_rollout_iters=1000)
    if quick:
        cfg.update(num_samples=6000, pretrain_steps=1000, meta_tasks=256, meta_iters=600, episodes=60,
                   tuning_episodes=40, timed=20, head_lrs=(1.0, 3.0), head_steps=(30, 100), full_lrs=(0.1,),
                   full_steps=(10, 30), euler_steps=(2, 4), bias_euler_steps=(2, 4),
                   bias_settings=((100, 10.0, 3.0), (30, 10.0, 3.0)),
                   bias_meta_tasks=256, bias_meta_iters=300, bias_rollout_iters=200, bias_pretrain_steps=1000)
        if conv:
            cfg.update(bias_channels=(8, 8), bias_pretrain_steps=300, bias_settings=((30, 3.0, 1.0), (100, 3.0, 1.0)),
                       bias_meta_tasks=64, bias_meta_iters=100, bias_rollout_iters=50)
    if smoke:  # one candidate per tuning grid, two compiled chunks of 5 iterations per meta-training loop, one-layer
        # backbones
        cfg.update(num_samples=2000, pretrain_steps=50, meta_tasks=8, meta_iters=10, meta_chunk=5, episodes=4,
                   tuning_episodes=4, timed=2, head_lrs=(1.0,), head_steps=(10,), full_lrs=(0.1,),
                   full_steps=(5,), euler_steps=(2,), bias_hidden=(16,), bias_pretrain_steps=50,
                   bias_settings=((10, 10.0, 3.0),), bias_meta_tasks=8, bias_meta_iters=10, bias_rollout_euler=2,
                   bias_rollout_iters=10, bias_euler_steps=(2,))
        if conv:
            cfg.update(bias_channels=(4, 4), bias_pretrain_steps=20)
    hidden, scale = ((16,) if smoke else (128, 64)), 10.0
    # Each meta-trained bias-mode drift (minutes each) is saved under --out at once, so a killed run resumes there.
    try:
        finished = FinishedParts(os.path.join(args.out, "finished_drifts.json"),
                                 {**cfg, "quick": quick, "smoke": smoke}, fresh=args.fresh)
    except ValueError as err:  # a record left by another run: say what to pass, without a traceback
        parser.error(str(err))
    report = {"config": {**cfg, "hidden": hidden, "scale": scale, "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                         "base_classes": BASE, "novel_classes": NOVEL}, "device": str(jax.devices()[0]),
              "smoke": smoke}
    t_start = time.perf_counter()

    # ---- data and tasks
    data_a = mg.mnist1d(num_samples=cfg["num_samples"], num_val=cfg["num_samples"] // 10)
    data_b = mg.mnist1d(num_samples=cfg["num_samples"] // 2, num_val=100, seed=7, iid_noise_scale=0.05,
                        corr_noise_scale=0.35, shear_scale=0.9)
    backbone, pre = hf.pretrain_backbone(data_a, BASE, hidden=hidden, num_steps=cfg["pretrain_steps"])
    report["pretraining"] = pre
    print(f"backbone pretrained on classes {BASE}: test accuracy {pre['test_accuracy']:.3f} ({pre['seconds']:.1f} s)")

    def all_splits(d):
        return (np.concatenate([d.x_train, d.x_val, d.x_test]), np.concatenate([d.y_train, d.y_val, d.y_test]))

    held_x = np.concatenate([data_a.x_val, data_a.x_test])
    held_y = np.concatenate([data_a.y_val, data_a.y_test])
    meta_pool = hf.class_subset(held_x, held_y, BASE)
    novel_a, novel_b = hf.class_subset(*all_splits(data_a), NOVEL), hf.class_subset(*all_splits(data_b), NOVEL)
    meta_tasks = hf.sample_tasks(*meta_pool, BASE, cfg["meta_tasks"], seed=1, transforms=tuple(hf.TRANSFORMS))
    tuning = hf.sample_tasks(*novel_a, NOVEL, cfg["tuning_episodes"], seed=2)
    test = {"A: MNIST-1D classes 5-9": hf.sample_tasks(*novel_a, NOVEL, cfg["episodes"], seed=3),
            "B: shifted generator, classes 5-9": hf.sample_tasks(*novel_b, NOVEL, cfg["episodes"], seed=4)}

    common = dict(hidden=hidden, ways=WAYS, scale=scale)

    def proto_fn(bb, sx, sy):
        return hf.prototype_head(hf.features(bb, sx, hidden), jax.nn.one_hot(sy, WAYS), scale)

    def head_fn(lr, steps):
        return lambda bb, sx, sy: hf.finetune_head(bb, sx, sy, lr=lr, num_steps=steps, **common)

    def full_fn(lr, steps):
        return lambda bb, sx, sy: hf.finetune_full(bb, sx, sy, lr=lr, num_steps=steps, **common)

    def acc_of(fn, tasks, *extra):
        return episode_accuracy(backbone, hidden, vmapped_adaptation(fn, *extra, backbone), tasks)

    # ---- tune the baselines on the tuning episodes
    grid = {}
    settings = [("head", lr, s) for lr in cfg["head_lrs"] for s in cfg["head_steps"]]
    settings += [("full", lr, s) for lr in cfg["full_lrs"] for s in cfg["full_steps"]]
    for kind, lr, steps in progress_bar(settings, desc="tuning fine-tuning", disable=not progress):
        fn = (head_fn if kind == "head" else full_fn)(lr, steps)
        grid[(kind, lr, steps)] = float(acc_of(fn, tuning).mean())
    best = {kind: best_setting(grid, [k for k in grid if k[0] == kind], lambda k: k[2]) for kind in ("head", "full")}
    report["tuning"] = [{"method": k[0], "lr": k[1], "steps": k[2], "accuracy": v} for k, v in grid.items()]
    report["tuning_proto_accuracy"] = float(acc_of(proto_fn, tuning).mean())
    (_, head_lr, head_steps), (_, full_lr, full_steps) = best["head"], best["full"]
    print(f"tuned: head fine-tuning lr {head_lr} x {head_steps} steps; full fine-tuning lr {full_lr} x {full_steps}")

    # ---- meta-train HyperFlow (one-off cost)
    tic = time.perf_counter()
    knots = 10
    traj = hf.simulate_trajectories(backbone, meta_tasks["support_x"], meta_tasks["support_y"], jax.random.key(0),
                                    head_lr, num_steps=head_steps, num_knots=knots, num_starts=4, **common)
    jax.block_until_ready(traj)
    sim_seconds = time.perf_counter() - tic
    variants = {"linear": ("linear",), "all": hf.INTERPOLATIONS}  # interpolations h_phi regresses on
    drifts, report["meta_training"] = {}, {}
    for label, kinds in variants.items():
        tic = time.perf_counter()
        phi, dcfg, history = hf.meta_train(traj, hf.DriftConfig(ways=WAYS, hidden=64, scale=scale),
                                           num_iters=cfg["meta_iters"], batch_tasks=64, interpolations=kinds,
                                           chunk=chunk_of(cfg), progress=progress)
        jax.block_until_ready(phi)
        seconds = sim_seconds + time.perf_counter() - tic
        drifts[label] = (phi, dcfg)
        report["meta_training"][label] = {
            "seconds": seconds, "simulation_seconds": sim_seconds, "tasks": cfg["meta_tasks"], "starts": 4,
            "knots": knots, "iterations": cfg["meta_iters"], "interpolations": kinds,
            "drift_parameters": int(sum(a.size for a in jax.tree.leaves(phi))), "loss_history": history,
            "emulated_run": {"lr": head_lr, "steps": head_steps}}

    def hf_fn(label, n):
        dcfg = drifts[label][1]
        return lambda p, bb, sx, sy: hf.adapt_head(p, bb, None, sx, sy, jnp.float32(1.0 / n), hidden=hidden,
                                               config=hf.with_examples_per_chunk(dcfg, hf.ADAPT_EXAMPLES_PER_CHUNK),
                                               num_steps=n)

    hf_grid = {(label, n): float(acc_of(hf_fn(label, n), tuning, drifts[label][0]).mean())
               for label in variants for n in cfg["euler_steps"]}
    report["tuning_hyperflow"] = [{"interpolations": k[0], "euler_steps": k[1], "accuracy": v}
                                  for k, v in hf_grid.items()]
    pick = {label: best_setting(hf_grid, [k for k in hf_grid if k[0] == label], lambda k: k[1])[1]
            for label in variants}
    primary = max(((label, pick[label]) for label in variants), key=hf_grid.get)[0]
    meta_seconds = report["meta_training"][primary]["seconds"]
    history = report["meta_training"][primary]["loss_history"]
    report["primary_hyperflow"] = {"interpolations": variants[primary], "euler_steps": pick[primary]}
    print(f"meta-training: {meta_seconds:.1f} s per drift; picked on tuning episodes: Euler steps {pick}, "
          f"primary variant '{primary}'")

    # ---- evaluate
    methods = {
        "no adaptation (prototypes)": (proto_fn, ()),
        f"fine-tune head (GD, lr {head_lr}, {head_steps} steps)": (head_fn(head_lr, head_steps), ()),
        f"full fine-tune (GD, lr {full_lr}, {full_steps} steps)": (full_fn(full_lr, full_steps), ()),
    }
    other = [label for label in variants if label != primary][0]
    for label in (primary, other):  # the primary HyperFlow (picked on tuning episodes) is names[3]
        methods[f"HyperFlow[{label}] ({pick[label]} Euler steps)"] = (hf_fn(label, pick[label]), (drifts[label][0],))
    names = list(methods)
    accs_all, costs, rows = compare_methods(methods, acc_of, backbone, test, cfg["timed"],
                                            desc="timing adaptation", progress=progress)
    ratios = cost_ratios(costs, names[1:3], names[3])
    results = {source: {**gains(accs, names, "gain_finetune_head"),
                        "gain_hyperflow_other_variant": float(accs[names[4]].mean() - accs[names[0]].mean())}
               for source, accs in accs_all.items()}
    goals = {
        "recovers_90pct_of_head_finetuning_gain": {s: r["recovered_fraction"] >= 0.9 for s, r in results.items()},
        "10x_faster_than_head_finetuning": ratios[names[1]]["time"] >= 10,
        "10x_less_alloc_memory_than_head_finetuning": ratios[names[1]]["alloc_memory"] >= 10,
        "10x_faster_than_full_finetuning": ratios[names[2]]["time"] >= 10,
        "10x_less_alloc_memory_than_full_finetuning": ratios[names[2]]["alloc_memory"] >= 10,
    }
    bias = bias_mode(cfg, data_a, test, tuning, meta_tasks, progress, finished)
    report["bias_mode"] = {k: v for k, v in bias.items() if k != "rows"}
    report.update(results=results, costs=costs, ratios_vs_hyperflow=ratios, goals=goals,
                  total_seconds=time.perf_counter() - t_start,
                  memory_method="XLA compiled memory_analysis() of the single-episode adaptation program: "
                                "alloc = temp + output bytes, peak = alloc + argument bytes")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "result.json"), report)

    # ---- plot
    plt = pyplot()
    fig, all_axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = all_axes[0]
    short = ["prototypes", "FT head", "full FT", f"HyperFlow[{primary}]", f"HyperFlow[{other}]"]
    for j, (source, r) in enumerate(results.items()):
        means = [r["accuracy"][n]["mean"] for n in names]
        errs = [r["accuracy"][n]["ci95"] for n in names]
        axes[0].bar(np.arange(len(names)) + 0.4 * j, means, 0.4, yerr=errs, capsize=3, label=source)
    axes[0].set_xticks(np.arange(len(names)) + 0.2, short, fontsize=7, rotation=15)
    lo = min(r["accuracy"][n]["mean"] for r in results.values() for n in names)
    axes[0].set(ylim=(lo - 0.05, None), ylabel="query accuracy (95% CI)", title=f"{WAYS}-way {SHOTS}-shot")
    axes[0].legend(fontsize=7)
    for name, s in zip(names, short):
        axes[1].scatter(1e3 * costs[name]["seconds_median"], costs[name]["alloc_bytes"] / 1024, label=s)
    axes[1].set(xscale="log", yscale="log", xlabel="adaptation time per episode (ms)",
                ylabel="allocated memory (KiB, XLA)", title="adaptation cost")
    axes[1].legend()
    for label in variants:
        h = report["meta_training"][label]["loss_history"]
        axes[2].plot(np.arange(1, len(h) + 1) * chunk_of(cfg), h, label=f"interpolations: {label}")
    axes[2].legend()
    axes[2].set(yscale="log", xlabel="meta-training iteration", ylabel="velocity regression loss",
                title=f"meta-training h_phi ({meta_seconds:.0f} s each)")
    axes = all_axes[1]
    bnames = bias["names"]
    bshort = ["prototypes", "FT biases+head", "full FT", "HyperFlow (live support)", "HyperFlow (encoded support)"]
    for j, (source, r) in enumerate(bias["results"].items()):
        acc_b = r["live"]["accuracy"] | r["encoded"]["accuracy"]
        axes[0].bar(np.arange(len(bnames)) + 0.4 * j, [acc_b[n]["mean"] for n in bnames], 0.4,
                    yerr=[acc_b[n]["ci95"] for n in bnames], capsize=3, label=source)
    axes[0].set_xticks(np.arange(len(bnames)) + 0.2, bshort, fontsize=7, rotation=15)
    lo = min(a["mean"] for r in bias["results"].values() for v in r.values() for a in v["accuracy"].values())
    axes[0].set(ylim=(lo - 0.05, None), ylabel="query accuracy (95% CI)")
    axes[0].set_title(f"bias mode: {bias['backbone']}, biases + head adapted", fontsize=9)
    axes[0].legend(fontsize=7)
    for name, sh in zip(bnames, bshort):
        c = bias["costs"][name]
        axes[1].scatter(1e3 * c["seconds_median"], c["alloc_bytes"] / 1024, label=sh)
    axes[1].set(xscale="log", yscale="log", xlabel="adaptation time per episode (ms)",
                ylabel="allocated memory (KiB, XLA)", title="bias mode: adaptation cost")
    axes[1].legend(fontsize=7)
    for support, m in bias["meta_training"].items():
        h, h2 = m["loss_history"], m["rollout_refinement"]["loss_history"]
        line, = axes[2].plot(np.arange(1, len(h) + 1) * chunk_of(cfg), h, label=f"{support}: velocity regression")
        axes[2].plot((len(h) + np.arange(1, len(h2) + 1)) * chunk_of(cfg), h2, ls="--", color=line.get_color(),
                     label=f"{support}: rollout refinement (KL + params)")
    seconds = ", ".join(f"{m['seconds']:.0f} s" for m in bias["meta_training"].values())
    axes[2].set(yscale="log", xlabel="meta-training iteration", ylabel="loss",
                title=f"bias mode: meta-training h_phi ({seconds})")
    axes[2].legend(fontsize=7)
    for axis in [a for ax in all_axes[:, 1] for a in (ax.xaxis, ax.yaxis)]:  # readable log ticks at 1, 2, 5 x 10^k
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "hyperflow.png"), dpi=110)
    finished.clear()  # only now: a run that fails while plotting resumes with every finished part

    print(format_table(("src", "method", "accuracy +- 95% CI", "time ms", "alloc KiB", "peak KiB"), rows))
    for source, r in results.items():
        print(f"{source}: HyperFlow[{primary}] recovers {100 * r['recovered_fraction']:.0f}% of head "
              f"fine-tuning's gain ({r['gain_hyperflow']:+.4f} vs {r['gain_finetune_head']:+.4f}; "
              f"full FT {r['gain_full_finetune']:+.4f}; "
              f"HyperFlow[{other}] {r['gain_hyperflow_other_variant']:+.4f})")
    for other in names[1:3]:
        q = ratios[other]
        print(f"vs {other}: {q['time']:.1f}x time, {q['alloc_memory']:.1f}x allocated memory, "
              f"{q['peak_memory']:.1f}x peak memory")
    print(f"one-off meta-training: {meta_seconds:.1f} s (trajectory simulation {sim_seconds:.1f} s); backbone "
          f"pretraining {pre['seconds']:.1f} s; total {report['total_seconds']:.0f} s")
    for goal, met in goals.items():
        print(f"goal {goal}: {met}")
    print(f"\nbias mode: backbone {bias['backbone']}, adapted subset = all biases + head")
    print(format_table(("src", "method", "accuracy +- 95% CI", "time ms", "alloc KiB", "peak KiB"), bias["rows"]))
    for support in bias["meta_training"]:
        for source, r in bias["results"].items():
            r = r[support]
            print(f"{source}: HyperFlow[{support} support] recovers {100 * r['recovered_fraction']:.0f}% of subset "
                  f"fine-tuning's gain ({r['gain_hyperflow']:+.4f} +- {r['hyperflow_minus_proto_ci95']:.4f} vs "
                  f"{r['gain_finetune_subset']:+.4f} +- {r['finetune_minus_proto_ci95']:.4f}; full FT "
                  f"{r['gain_full_finetune']:+.4f})")
        for other, q in bias["ratios_vs_hyperflow"][support].items():
            print(f"  {other} / HyperFlow[{support} support]: {q['time']:.1f}x time, {q['alloc_memory']:.1f}x "
                  f"allocated memory, {q['peak_memory']:.1f}x peak memory")
        bm = bias["meta_training"][support]
        print(f"  one-off meta-training: {bm['seconds']:.1f} s (simulation {bm['simulation_seconds']:.1f} s, "
              f"{bm['tasks']} tasks x {bm['starts']} starts); drift parameters {bm['drift_parameters']}; "
              f"per-leaf relative error {bm['per_leaf_relative_error']}")
        for goal, met in bias["goals"][support].items():
            print(f"  bias mode goal ({support} support) {goal}: {met}")
    if smoke:
        print("(smoke run: sizes too small for the goals to mean anything)")
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote {args.out}/result.json and hyperflow.png")


if __name__ == "__main__":
    main()
