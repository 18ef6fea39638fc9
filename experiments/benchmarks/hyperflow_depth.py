"""Adaptation cost against backbone depth: bias-mode HyperFlow vs GD on the same subset (biases + head).

    python experiments/benchmarks/hyperflow_depth.py [--depths 2 4 8 16] [--width 512] [--shots 5] [--smoke]
    python experiments/benchmarks/hyperflow_depth.py --conv --depths 2 4 8 --width 64 \
        --out experiments/benchmarks/results/hyperflow_depth_conv.json

Does a deeper backbone give HyperFlow (Kim, Kim & Hong, arXiv 2504.15323) the
memory and time advantage its paper reports? GD on the biases backprops through
every layer and keeps every layer's activations; :mod:`metagrad.hyperflow.bias`'s
*live* drift runs a forward pass at each Euler step and builds per-unit tokens
for every layer; its *encoded* drift (the paper's design) encodes the support
set once, layer by layer, and integrates without a pass of the backbone. For
ReLU MLP backbones 40-W-...-W-64 (random weights: costs do not depend on
training) and one 5-way support set, in one process, this compiles and times:
no adaptation (prototype head: one forward pass), GD on (biases, head) for 100
steps, and both HyperFlow drifts with 8 and 2 Euler steps (drifts of the
experiment's size, random parameters). Memory is XLA's ``memory_analysis`` of
each program: "alloc" = temp + output bytes, "peak" = alloc + argument bytes
(the weights, the drift's parameters and the support set). The table gives GD /
HyperFlow ratios (> 1: HyperFlow cheaper).

``--conv`` does the same for 1-D CNN backbones (``hyperflow.bias.ConvBackbone``:
``depth`` SAME convolutions of ``width`` channels, kernel 5, on the length-40
input, then the average over positions): there GD keeps every layer's
(N, 40, width) activations, while HyperFlow's passes go one support example at a
time and keep per-channel statistics, as the paper's vision transformers keep
tokens x channels activations against a few hundred biases. Each method's time
and memory there are its best under the two implementations of the convolution
(``hyperflow.bias.conv_same``'s shifted products, fast on a CPU, and XLA's
convolution, leaner in memory; ``experiments/benchmarks/conv1d_impl.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16], help="hidden layers of width W")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--gd-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--conv", action="store_true", help="1-D CNN backbones: --width channels per layer")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every method (tests): --depths 1 --width 8, 5 GD steps, "
                             "2 repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hyperflow_depth.json"))
    args = parser.parse_args()
    if args.smoke:
        args.depths, args.width, args.gd_steps, args.repeats = [1], 8, 5, 2

    import jax
    import jax.numpy as jnp
    import numpy as np

    from metagrad import hyperflow as hf
    from metagrad.hyperflow import bias as hb
    from metagrad.report import format_table, write_json


    n = args.ways * args.shots
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 40)), jnp.float32)
    y = jnp.repeat(jnp.arange(args.ways), args.shots)

    def cost(fn, params):
        """:func:`metagrad.hyperflow.best_cost` of ``fn(params, x, y)``, in ms and KiB; weights are arguments. On a
        CNN, the best time and the least memory of the two convolutions (``hb.CONVOLUTIONS``)."""
        c = hf.best_cost(fn, (params,), {"support_x": x[None], "support_y": y[None]}, args.repeats,
                         tuple(hb.CONVOLUTIONS) if args.conv else None)
        out = {"ms": 1e3 * c["seconds_median"], "alloc_kib": c["alloc_bytes"] / 1024,
               "argument_kib": c["argument_bytes"] / 1024, "peak_kib": c["peak_bytes"] / 1024}
        if "by_convolution" in c:
            out["by_convolution"] = {name: {"ms": 1e3 * v["seconds_median"], "alloc_kib": v["alloc_bytes"] / 1024}
                                     for name, v in c["by_convolution"].items()}
        return out

    rows, results = [], []
    for depth in args.depths:
        if args.conv:
            hidden = (args.width,) * depth
            params = hb.ConvBackbone(channels=hidden, kernel_size=5).init(jax.random.key(depth), x[:1])["params"]
            backbone = {k: v for k, v in params.items() if k.startswith("Conv_")}
        else:
            hidden = (args.width,) * depth + (64,)
            backbone = hf.feature_model(hidden).init(jax.random.key(depth), jnp.zeros((1, 40)))["params"]
        layers = hb.num_layers(backbone)
        configs = {support: hb.BiasDriftConfig(head=hf.DriftConfig(ways=args.ways, hidden=64, velocity_scale=1.0),
                                               hidden=16, bias_scales=(0.1,) * layers,
                                               head_scales=(("bias", 0.1), ("kernel", 0.1)), support=support)
                   for support in hb.SUPPORT_MODES}
        phis = {support: hb.init_drift(jax.random.key(depth + 100), c, layers) for support, c in configs.items()}
        methods = {
            "no adaptation": lambda p, sx, sy, convolution=hb.DEFAULT_CONVOLUTION: hb.init_theta(
                p["backbone"], sx, jax.nn.one_hot(sy, args.ways), 10.0, convolution),
            f"GD {args.gd_steps} steps": lambda p, sx, sy, convolution=hb.DEFAULT_CONVOLUTION: hb.finetune(
                p["backbone"], sx, sy, lr_bias=1.0, lr_head=1.0, num_steps=args.gd_steps, ways=args.ways,
                scale=10.0, convolution=convolution),
        }
        for support, euler_steps in [(s_, k) for s_ in hb.SUPPORT_MODES for k in (8, 2)]:
            methods[f"HyperFlow {support} {euler_steps} steps"] = (
                lambda p, sx, sy, c=configs[support], k=euler_steps, convolution=hb.DEFAULT_CONVOLUTION: hb.adapt(
                    p["phi"], p["backbone"], sx, sy, config=dataclasses.replace(c, convolution=convolution),
                    num_steps=k))
        # the same drift with its pair tokens evaluated for the whole support set at once (hb.adapt's default
        # evaluates 5 examples at a time: the same function in less scratch memory)
        methods["HyperFlow live 8 steps, pair tokens at once"] = (
            lambda p, sx, sy, c=configs["live"], convolution=hb.DEFAULT_CONVOLUTION: hb.adapt(
                p["phi"], p["backbone"], sx, sy, config=dataclasses.replace(c, convolution=convolution), num_steps=8,
                examples_per_chunk=None))
        costs = {name: cost(fn, {"backbone": backbone, "phi": phis[name.split()[1]]} if "HyperFlow" in name
                            else {"backbone": backbone})
                 for name, fn in methods.items()}
        gd = costs[f"GD {args.gd_steps} steps"]
        for name, c in costs.items():
            ratio_t = gd["ms"] / c["ms"]
            ratio_m = gd["alloc_kib"] / c["alloc_kib"]
            ratio_p = gd["peak_kib"] / c["peak_kib"]
            rows.append((depth, name, f"{c['ms']:.3f}", f"{c['alloc_kib']:.1f}", f"{c['argument_kib']:.0f}",
                         f"{ratio_t:.2f}", f"{ratio_m:.2f}", f"{ratio_p:.2f}"))
            results.append({"depth": depth, "hidden": hidden, "method": name, **c, "gd_over_method_time": ratio_t,
                            "gd_over_method_alloc": ratio_m, "gd_over_method_peak": ratio_p})
        print(f"depth {depth} done", flush=True)

    print(format_table(("depth", "method", "time ms", "alloc KiB", "args KiB", "GD/this time", "GD/this alloc",
                        "GD/this peak"), rows))
    write_json(args.out, {"device": str(jax.devices()[0]), "machine": platform.platform(), "support_examples": n,
                          "backbone": "conv1d" if args.conv else "mlp", "width": args.width, "gd_steps": args.gd_steps,
                          "repeats": args.repeats, "smoke": args.smoke, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
