"""The 1-D CNN backbone's convolution: shifted matrix products against XLA's convolution, side by side.

    python experiments/benchmarks/conv1d_impl.py [--channels 32 32 32] [--tasks 32] [--repeats 5] [--smoke]

:func:`metagrad.hyperflow.bias.conv_same` computes the ``SAME`` convolution of
the bias-mode CNN backbone as a sum of shifted matrix products;
:func:`~metagrad.hyperflow.bias.conv_same_xla` is ``lax.conv_general_dilated``.
Both are the same function (tested to 1e-12 in float64). For each, in one
process, this compiles and times what the HyperFlow experiment spends its time
on (``hb.ConvBackbone`` with random weights, 5-way 5-shot support sets of
length 40, drifts of the experiment's size with random parameters):

* one iteration of drift meta-training -- the gradient of the velocity
  regression loss and of the rollout-refinement loss (5 Euler steps, 15 query
  examples), both vmapped over ``--tasks`` tasks, live drift;
* one episode's adaptation: GD on (biases, head) for 100 steps, the live drift's
  8 Euler steps, full fine-tuning for 100 steps.

Times are medians of ``--repeats`` calls (adaptations: ``--episode-repeats``, 50); memory is XLA's
``memory_analysis`` (temp + output, "alloc"). The table gives XLA / shifted
ratios (> 1: the shifted products are cheaper).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 32, 32])
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-training iteration")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-training iterations per implementation")
    parser.add_argument("--episode-repeats", type=int, default=50, help="timed calls per episode adaptation")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every case (tests): --channels 4 --tasks 2, 2 repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv1d_impl.json"))
    args = parser.parse_args()
    if args.smoke:
        args.channels, args.tasks, args.repeats, args.episode_repeats = [4], 2, 2, 2

    import jax
    import jax.numpy as jnp
    import numpy as np

    from metagrad import hyperflow as hf
    from metagrad.hyperflow import bias as hb
    from metagrad.report import format_table, write_json


    ways, shots, queries, layers = 5, 5, 15, len(args.channels)
    model = hb.ConvBackbone(channels=tuple(args.channels), kernel_size=5, num_classes=ways)
    params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    backbone = {k: v for k, v in params.items() if k.startswith("Conv_")}
    config = hb.BiasDriftConfig(head=hf.DriftConfig(ways=ways, hidden=64, velocity_scale=1.0), hidden=16,
                                bias_scales=(0.1,) * layers, head_scales=(("bias", 0.1), ("kernel", 0.1)))
    phi = hb.init_drift(jax.random.key(1), config, layers)
    rng = np.random.default_rng(0)
    sx = jnp.asarray(rng.normal(size=(args.tasks, ways * shots, 40)), jnp.float32)
    qx = jnp.asarray(rng.normal(size=(args.tasks, ways * queries, 40)), jnp.float32)
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (args.tasks, 1))

    def regression_loss(phi, convolution):
        c = dataclasses.replace(config, convolution=convolution)

        def one(x, y):
            y1h = jax.nn.one_hot(y, ways)
            theta0 = hb.init_theta(backbone, x, y1h, 10.0, convolution)
            v = hb.velocity_field(phi, theta0, backbone, x, y1h, c)(theta0, 0.5)
            return sum(jnp.sum(a * a) for a in jax.tree.leaves(v))
        return jnp.mean(jax.vmap(one)(sx, sy))

    def rollout_loss(phi, convolution):
        c = dataclasses.replace(config, convolution=convolution)

        def one(x, y, q):
            y1h = jax.nn.one_hot(y, ways)
            theta0 = hb.init_theta(backbone, x, y1h, 10.0, convolution)
            theta = hf.euler(hb.velocity_field(phi, theta0, backbone, x, y1h, c), theta0, 5, 0.2)
            return -jnp.mean(hb.log_probs(theta, backbone, q, convolution))
        return jnp.mean(jax.vmap(one)(sx, sy, qx))

    # every case is a function of the convolution's name (hb.CONVOLUTIONS), the rest of its arguments traced
    episode = {
        "GD biases+head, 100 steps": lambda conv: lambda b, x, y: hb.finetune(
            b, x, y, lr_bias=1.0, lr_head=1.0, num_steps=100, ways=ways, scale=10.0, convolution=conv),
        "HyperFlow live, 8 Euler steps": lambda conv: lambda b, x, y: hb.adapt(
            phi, b, x, y, config=dataclasses.replace(config, convolution=conv), num_steps=8),
        "full fine-tuning, 100 steps": lambda conv: lambda b, x, y: hf.finetune_full(
            b, x, y, lr=0.1, num_steps=100, ways=ways, scale=10.0,
            features_fn=functools.partial(hb.backbone_features, convolution=conv)),
    }

    def measure(fn, call_args, repeats):
        c = hf.compiled_cost(fn, [call_args] * repeats)
        return {"ms": 1e3 * c["seconds_median"], "first_call_s": c["first_call_seconds"],
                "alloc_kib": c["alloc_bytes"] / 1024}

    cases = {f"meta-training: regression gradient, {args.tasks} tasks": (
                 lambda conv: jax.grad(functools.partial(regression_loss, convolution=conv)), (phi,), args.repeats),
             f"meta-training: 5-step rollout gradient, {args.tasks} tasks": (
                 lambda conv: jax.grad(functools.partial(rollout_loss, convolution=conv)), (phi,), args.repeats)}
    cases.update({f"episode: {name}": (fn, (backbone, sx[0], sy[0]), args.episode_repeats)
                  for name, fn in episode.items()})
    results = {}
    for case, (make_fn, call_args, repeats) in cases.items():
        for impl_name in hb.CONVOLUTIONS:
            results.setdefault(case, {})[impl_name] = measure(make_fn(impl_name), call_args, repeats)
        print(f"{case}: done", flush=True)

    rows = []
    for case, r in results.items():
        ours, xla = r["shifted products"], r["XLA convolution"]
        r["xla_over_shifted_time"] = xla["ms"] / ours["ms"]
        r["xla_over_shifted_alloc"] = xla["alloc_kib"] / ours["alloc_kib"]
        rows.append((case, f"{ours['ms']:.2f}", f"{xla['ms']:.2f}", f"{r['xla_over_shifted_time']:.2f}",
                     f"{ours['alloc_kib']:.0f}", f"{xla['alloc_kib']:.0f}", f"{r['xla_over_shifted_alloc']:.2f}"))
    print(format_table(("case", "shifted ms", "XLA ms", "XLA/shifted time", "shifted alloc KiB", "XLA alloc KiB",
                        "XLA/shifted alloc"), rows))
    write_json(args.out, {"device": str(jax.devices()[0]), "machine": platform.platform(),
                          "channels": args.channels, "tasks": args.tasks, "repeats": args.repeats,
                          "episode_repeats": args.episode_repeats, "smoke": args.smoke, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
