"""How training choices change metasmoothness (the diagnostic of arXiv 2503.13751, Sec. 4).

    python experiments/metasmoothness.py [--quick | --smoke] [--out experiments/results/metasmoothness]
    python experiments/metasmoothness.py --images     # the residual BatchNorm CNN's options on Fashion-MNIST

MNIST-1D: MLP and 1-D CNN setups. ``--images``: the metasmoothness options of
``metagrad.models.ResidualCNN`` (where BatchNorm sits, the pooling, the logit scale,
the width) on a 2,000-image slice of Fashion-MNIST (2,000 validation images), standardized (100 steps, batch 32),
written to ``<out>/images/``.

Metaparameters: one weight per training example (all 1). For each training
setup: the curvature and empirical metasmoothness along 3 random unit directions
(step h), how well the metagradient predicts the objective's change along itself,
and the test accuracy of the setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import optax

import metagrad as mg
import replay
from metagrad.apps import metasmoothness as app
from metagrad.report import format_table, pyplot, write_json


# --smoke: one SGD and one Adam setup
SMOKE_SETUPS = ("default (MLP, SGD 0.03, batch 128)", "Adam 1e-3, eps_root 0")


def setups(hidden, quick):
    sgd = lambda lr: optax.sgd(lr, momentum=0.9)  # noqa: E731
    mlp = mg.MLP(hidden=hidden)
    out = {
        "default (MLP, SGD 0.03, batch 128)": dict(model=mlp, optimizer=sgd(0.03)),
        "LayerNorm before activation": dict(model=dataclasses.replace(mlp, normalize=True), optimizer=sgd(0.03)),
        "logits scaled by 0.25": dict(model=dataclasses.replace(mlp, logit_scale=0.25), optimizer=sgd(0.03)),
        "width x4": dict(model=mg.MLP(hidden=tuple(4 * w for w in hidden)), optimizer=sgd(0.03)),
        "batch 32": dict(model=mlp, optimizer=sgd(0.03), batch_size=32),
        "batch 512": dict(model=mlp, optimizer=sgd(0.03), batch_size=512),
        "LR 0.01": dict(model=mlp, optimizer=sgd(0.01)),
        "LR 0.1": dict(model=mlp, optimizer=sgd(0.1)),
        "Adam 1e-3, eps_root 0": dict(model=mlp, optimizer=optax.adam(1e-3, eps_root=0.0)),
        "Adam 1e-3, eps_root 1e-8": dict(model=mlp, optimizer=optax.adam(1e-3, eps_root=1e-8)),
    }
    if not quick:
        cnn = mg.CNN1D(channels=(8, 8))
        out["CNN, average pooling"] = dict(model=cnn, optimizer=sgd(0.03))
        out["CNN, max pooling"] = dict(model=dataclasses.replace(cnn, pooling="max"), optimizer=sgd(0.03))
    return out


def image_setups():
    """The ResidualCNN's metasmoothness options (Engstrom et al. 2025, Sec. 4), each changed alone."""
    sgd = optax.sgd(0.03, momentum=0.9)
    cnn = mg.ResidualCNN(channels=(8, 16, 32))
    return {
        "ResidualCNN 8-16-32 (BN before ReLU, max pool, logits x0.125)": dict(model=cnn, optimizer=sgd),
        "BatchNorm after ReLU": dict(model=dataclasses.replace(cnn, norm="after"), optimizer=sgd),
        "no BatchNorm": dict(model=dataclasses.replace(cnn, norm="none"), optimizer=sgd),
        "average pooling": dict(model=dataclasses.replace(cnn, pooling="avg"), optimizer=sgd),
        "logits x1": dict(model=dataclasses.replace(cnn, logit_scale=1.0), optimizer=sgd),
        "width x2 (16-32-64)": dict(model=dataclasses.replace(cnn, channels=(16, 32, 64)), optimizer=sgd),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes that run every stage, setups {', '.join(SMOKE_SETUPS)} only "
                             "(a pipeline check for tests)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "metasmoothness"))
    parser.add_argument("--h", type=float, default=1.0)
    parser.add_argument("--images", action="store_true",
                        help="the residual BatchNorm CNN's options on a Fashion-MNIST slice (into <out>/images)")
    args = parser.parse_args()
    if args.images:
        args.out = os.path.join(args.out, "images")
        num_steps, directions, batch_size = 100, 1, 32
        chosen = image_setups()
        data = mg.standardized(mg.fashion_mnist(num_val=2000, max_train=2000))
    elif args.smoke:
        num_steps, hidden, directions = 20, (8,), 1
    elif args.quick:
        num_steps, hidden, directions = 60, (16,), 1
    else:
        num_steps, hidden, directions = 300, (64, 64), 3
    if not args.images:
        batch_size = 128
        chosen = setups(hidden, args.quick or args.smoke)
        if args.smoke:
            chosen = {name: chosen[name] for name in SMOKE_SETUPS}
        data = mg.mnist1d(num_samples=1000, num_val=200) if args.smoke else mg.mnist1d()
    rows, results = [], {}
    for name, kwargs in chosen.items():
        kwargs = {"batch_size": batch_size, **kwargs}
        problem = mg.TrainingProblem(data=data, num_steps=num_steps, lr_schedule=None,
                                     data_weights=mg.DataWeights(upper=2.0), **kwargs)
        meta = problem.init_meta()
        diag = [app.metasmoothness(problem, meta, app.random_direction(meta, seed), args.h) for seed in range(directions)]
        try:
            pred = app.gradient_prediction(problem, meta, [0.5, 2.0])
            ratio = pred[0]["ratio"]
        except replay.NonFiniteMetagradError as err:
            pred, ratio = str(err), float("nan")
        acc = mg.train_and_evaluate(problem, meta)["test_accuracy"]
        results[name] = {"diagnostics": diag, "gradient_prediction": pred, "test_accuracy": acc}
        smooth = float(np.mean([d["metasmoothness"] for d in diag]))
        curv = float(np.mean([d["curvature"] for d in diag]))
        rows.append((name, f"{smooth:.3f}", f"{curv:.2e}", "non-finite" if np.isnan(ratio) else f"{ratio:.2f}", f"{acc:.3f}"))
        print(f"  {name}: metasmoothness {smooth:.3f}, accuracy {acc:.3f}", flush=True)
    table = format_table(("training setup", "metasmoothness", "curvature", "actual/predicted", "test acc"), rows)
    print(table)
    write_json(os.path.join(args.out, "result.json"), {"num_steps": num_steps, "h": args.h, "directions": directions,
                                                        "data": data.name, "num_train": data.num_train,
                                                        "setups": results, "table": table, "smoke": args.smoke})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, smooth, _, _, acc) in rows:
        ax.scatter(float(smooth), float(acc))
        ax.annotate(name, (float(smooth), float(acc)), fontsize=7)
    ax.set(xlabel="empirical metasmoothness (higher is smoother)", ylabel="test accuracy",
           title="Metasmoothness vs accuracy of training setups")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "metasmoothness.png"), dpi=120)
    print(f"wrote {args.out}/result.json and metasmoothness.png")


if __name__ == "__main__":
    main()
