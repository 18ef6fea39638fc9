"""HyperFlow (metagrad.hyperflow): Euler integration, interpolation, gradient-free adaptation, a reduced experiment."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import metagrad as mg
from metagrad import hyperflow as hf

HIDDEN = (32, 16)


def test_euler_linear_drift_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4)) * 0.5 - np.eye(4)
    y0 = {"y": jnp.asarray(rng.normal(size=4))}
    with jax.enable_x64(True):
        a64, y64 = jnp.asarray(a), jnp.asarray(y0["y"], jnp.float64)
        for n in (1, 3, 16):
            h = 1.0 / n
            out = hf.euler(lambda y, t: {"y": a64 @ y["y"]}, {"y": y64}, n, h)["y"]
            closed = np.linalg.matrix_power(np.eye(4) + h * a, n) @ np.asarray(y64)  # Euler's closed form
            np.testing.assert_allclose(np.asarray(out), closed, rtol=1e-12, atol=1e-12)
        # first-order convergence to the flow's closed form exp(A) y0
        exact = scipy.linalg.expm(a) @ np.asarray(y64)
        errs = [np.linalg.norm(np.asarray(hf.euler(lambda y, t: a64 @ y, y64, n, 1.0 / n)) - exact)
                for n in (64, 128, 256)]
        assert errs[0] > errs[1] > errs[2]
        assert 1.8 < errs[0] / errs[1] < 2.2 and 1.8 < errs[1] / errs[2] < 2.2
        # a time-dependent linear drift dy/dt = t y: Euler gives prod_n (1 + h t_n) with t_n = t0 + n h
        t0, n, h = 0.25, 8, 0.1
        out = hf.euler(lambda y, t: t * y, jnp.float64(2.0), n, h, t0=t0)
        np.testing.assert_allclose(float(out), 2.0 * np.prod([1 + h * (t0 + k * h) for k in range(n)]), rtol=1e-12)


@pytest.mark.parametrize("kind", hf.INTERPOLATIONS)
def test_interpolation_passes_through_knots_and_velocity_is_its_derivative(kind):
    rng = np.random.default_rng(1)
    knots = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    m = 4
    for i in ([0, m] if kind == "linear" else range(m + 1)):
        point, _ = hf.interpolate(knots, jnp.float32(i / m), kind)
        np.testing.assert_allclose(point["w"], knots["w"][i], atol=1e-5)
    for s in (0.13, 0.37, 0.62, 0.9):  # away from the knots, where piecewise velocities jump
        eps = 1e-3
        (p1, _), (p0, _) = hf.interpolate(knots, s + eps, kind), hf.interpolate(knots, s - eps, kind)
        _, v = hf.interpolate(knots, s, kind)
        np.testing.assert_allclose(v["w"], (p1["w"] - p0["w"]) / (2 * eps), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="unknown interpolation"):
        hf.interpolate(knots, 0.5, "quadratic")


def _tiny_model(seed=0):
    backbone = hf.feature_model(HIDDEN).init(jax.random.key(seed), jnp.zeros((1, 40)))["params"]
    config = hf.DriftConfig(ways=3, hidden=8, velocity_scale=2.0)
    phi = hf.init_drift(jax.random.key(seed + 1), config)
    return hf.HyperFlow(phi, config, HIDDEN), backbone


def _count_autodiff_calls(monkeypatch):
    calls = []
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacrev", "jacfwd", "hessian"):
        original = getattr(jax, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(jax, name, counted)
    return calls


def test_adapt_calls_no_gradient(monkeypatch):
    model, backbone = _tiny_model()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 40)).astype(np.float32)
    y = np.repeat(np.arange(3), 3).astype(np.int32)
    jax.clear_caches()  # adaptation is traced afresh under the counters
    calls = _count_autodiff_calls(monkeypatch)
    out = model.adapt({"backbone": backbone}, (x, y), num_steps=3)
    assert calls == []
    feats = hf.features(backbone, jnp.asarray(x), HIDDEN)
    proto = hf.prototype_head(feats, jax.nn.one_hot(y, 3), model.config.scale)
    assert float(jnp.max(jnp.abs(out["head"]["kernel"] - proto["kernel"]))) > 0  # it did move the head
    # control: the same counters do see gradient-based fine-tuning
    jax.jit(lambda b, xx: hf.finetune_head(b, xx, y, lr=0.1, num_steps=2, hidden=HIDDEN, ways=3, scale=10.0))(
        backbone, x)
    assert "grad" in calls


def test_adapt_explicit_head_and_errors():
    model, backbone = _tiny_model()
    x = np.zeros((6, 40), np.float32)
    y = np.array([0, 0, 1, 1, 2, 2], np.int32)
    head0 = {"kernel": jnp.zeros((HIDDEN[-1], 3)), "bias": jnp.zeros(3)}
    zero = model.adapt({"backbone": backbone, "head": head0}, (x, y), num_steps=0)
    np.testing.assert_array_equal(zero["head"]["kernel"], head0["kernel"])
    with pytest.raises(ValueError, match="backbone"):
        model.adapt({"head": head0}, (x, y))
    with pytest.raises(ValueError, match="one integer label per input"):
        model.adapt({"backbone": backbone}, (x, y[:3]))
    with pytest.raises(ValueError, match="x must be \\(N, 40\\)"):
        model.adapt({"backbone": backbone}, (x[:, :30], y))
    with pytest.raises(ValueError, match="3-way drift needs labels in 0..2"):
        model.adapt({"backbone": backbone}, (x, y + 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.adapt({"backbone": backbone}, (np.full_like(x, np.inf), y))
    with pytest.raises(ValueError, match="cannot make 5-way"):
        hf.sample_tasks(x, y, [0, 1, 2], 1, ways=5)


def test_drift_in_chunks_of_support_examples_is_the_same_function_in_less_memory():
    """The pair MLP evaluated a few support examples at a time (``examples_per_chunk``) gives the drift of all of
    them at once, and the adaptation's scratch memory no longer holds the (N, K, hidden) pair activations."""
    from metagrad.hyperflow import bias as hb

    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        config = hf.DriftConfig(ways=3, hidden=16, velocity_scale=2.0)
        phi = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), hf.init_drift(jax.random.key(5), config))
        phi["pair"][-1]["w"] = phi["pair"][-1]["w"] * 10.0  # the pair MLP's output matters to the velocity
        feats = jnp.asarray(rng.normal(size=(7, 6)))
        y1h = jax.nn.one_hot(np.arange(7) % 3, 3, dtype=jnp.float64)
        head = {"kernel": jnp.asarray(rng.normal(size=(6, 3))), "bias": jnp.asarray(rng.normal(size=3))}
        whole = hf.drift(phi, head, 0.3, feats, y1h, config)
        for chunk in (1, 3, 7, 50):  # 3 leaves a remainder of 1 example
            chunked = hf.drift(phi, head, 0.3, feats, y1h, hf.with_examples_per_chunk(config, chunk))
            for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="examples_per_chunk must be a positive int"):
        hf.DriftConfig(examples_per_chunk=0)

    # Memory: 25 support examples, 5 ways, pair MLP width 64 -> each (N, K, hidden) activation is 32,000 B.
    n, k, width = 25, 5, 64
    config = hf.DriftConfig(ways=k, hidden=width)
    phi = hf.init_drift(jax.random.key(6), config)
    model = hf.HyperFlow(phi, config, (32, 16))
    backbone = hf.feature_model((32, 16)).init(jax.random.key(7), jnp.zeros((1, 40)))["params"]
    x = jnp.asarray(np.random.default_rng(8).normal(size=(n, 40)), jnp.float32)
    y = jnp.arange(n) % k

    def temp_bytes(chunk):
        fn = jax.jit(lambda p, b, xx, yy: hf.adapt_head(p, b, None, xx, yy, jnp.float32(0.25), hidden=(32, 16),
                                                    config=hf.with_examples_per_chunk(config, chunk), num_steps=4))
        return fn.lower(phi, backbone, x, y).compile().memory_analysis().temp_size_in_bytes

    for chunk in (1, hf.ADAPT_EXAMPLES_PER_CHUNK):  # 5, the adaptation entry points' default
        assert temp_bytes(chunk) < temp_bytes(None) - n * k * width * 4, (chunk, temp_bytes(chunk), temp_bytes(None))
    # The adaptation entry points chunk by default and give what the whole-set drift gives.
    lean = model.adapt({"backbone": backbone}, (x, y), num_steps=4)["head"]
    whole = model.adapt({"backbone": backbone}, (x, y), num_steps=4, examples_per_chunk=None)["head"]
    for a, b in zip(jax.tree.leaves(lean), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    bias_config = hb.BiasDriftConfig(head=config, hidden=8, bias_scales=(0.5, 0.5))
    bias_phi = hb.init_drift(jax.random.key(9), bias_config, 2)
    lean = hb.adapt(bias_phi, backbone, x, y, config=bias_config, num_steps=3)
    whole = hb.adapt(bias_phi, backbone, x, y, config=bias_config, num_steps=3, examples_per_chunk=None)
    for a, b in zip(jax.tree.leaves(lean), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reduced_setup():
    """A backbone pretrained on classes 0-4, meta-training tasks on held-out 0-4 examples, test tasks on 5-9."""
    data = mg.mnist1d(num_samples=4000, num_val=800)
    base, novel = range(5), range(5, 10)
    backbone, _ = hf.pretrain_backbone(data, base, hidden=HIDDEN, num_steps=500, learning_rate=3e-3)
    pool = hf.class_subset(np.concatenate([data.x_val, data.x_test]), np.concatenate([data.y_val, data.y_test]), base)
    meta_tasks = hf.sample_tasks(*pool, base, 96, seed=1, transforms=tuple(hf.TRANSFORMS))
    test = hf.sample_tasks(*hf.class_subset(data.x_train, data.y_train, novel), novel, 100, seed=2)
    return backbone, meta_tasks, test


def test_reduced_experiment_hyperflow_beats_no_adaptation(reduced_setup):
    """Pretrain on classes 0-4, meta-train h_phi on held-out 0-4 tasks, evaluate on 5-9 (reduced sizes)."""
    backbone, meta_tasks, test = reduced_setup
    lr, steps, scale = 3.0, 50, 10.0
    traj = hf.simulate_trajectories(backbone, meta_tasks["support_x"], meta_tasks["support_y"], jax.random.key(0),
                                    lr, num_steps=steps, num_knots=10, num_starts=2, hidden=HIDDEN, ways=5,
                                    scale=scale)
    phi, config, history = hf.meta_train(traj, hf.DriftConfig(hidden=32, scale=scale), num_iters=300,
                                         batch_tasks=32, learning_rate=1e-2, progress=False)
    assert history[-1] < 0.5 * history[0]
    model = hf.HyperFlow(phi, config, HIDDEN)

    def accuracy(adapt):
        heads = jax.vmap(adapt)(test["support_x"], test["support_y"])
        feats = jax.vmap(lambda x: hf.features(backbone, x, HIDDEN))(test["query_x"])
        return np.asarray(jax.vmap(hf.accuracy)(heads, feats, test["query_y"]))

    proto = accuracy(lambda x, y: hf.prototype_head(hf.features(backbone, x, HIDDEN), jax.nn.one_hot(y, 5), scale))
    flow = accuracy(lambda x, y: model.adapt({"backbone": backbone}, (x, y), num_steps=4)["head"])
    diff = flow - proto
    assert diff.mean() > 0, (proto.mean(), flow.mean())


# ----------------------------------------------------------------------------- bias mode (biases + head)


def _tiny_bias_model(seed=0, support="live"):
    from metagrad.hyperflow import bias as hb

    backbone = hf.feature_model(HIDDEN).init(jax.random.key(seed), jnp.zeros((1, 40)))["params"]
    config = hb.BiasDriftConfig(head=hf.DriftConfig(ways=3, hidden=8, velocity_scale=2.0), hidden=4,
                                bias_scales=(0.5,) * len(HIDDEN), support=support)
    return hb.init_drift(jax.random.key(seed + 1), config, len(HIDDEN)), config, backbone


def test_bias_mode_forward_matches_features_and_finetune_moves_biases():
    from metagrad.hyperflow import bias as hb

    _, _, backbone = _tiny_bias_model()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 40)), jnp.float32)
    y = jnp.asarray([0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(hb.features(backbone, hb.get_biases(backbone), x), hf.features(backbone, x, HIDDEN),
                               atol=1e-6)
    theta = hb.finetune(backbone, x, y, lr_bias=0.5, lr_head=1.0, num_steps=3, ways=3, scale=10.0)
    start = hb.init_theta(backbone, x, jax.nn.one_hot(y, 3), 10.0)
    assert float(hb.loss(theta, backbone, x, jax.nn.one_hot(y, 3))) < float(hb.loss(start, backbone, x,
                                                                                    jax.nn.one_hot(y, 3)))
    for name in theta["biases"]:
        assert float(jnp.max(jnp.abs(theta["biases"][name] - start["biases"][name]))) > 0


def test_bias_mode_adapt_rejects_bad_support_sets_and_a_drift_of_another_depth():
    from metagrad.hyperflow import bias as hb

    phi, config, backbone = _tiny_bias_model()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 40)), jnp.float32)
    y = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
    cases = [((x[:, :30], y), "x must be \\(N, 40\\)"),
             ((x, y[:4]), "one integer label per input \\(6\\)"),
             ((x, y.at[0].set(3)), "3-way drift needs labels in 0..2"),
             ((x.at[1, 2].set(jnp.nan), y), "NaN or inf")]
    for (xx, yy), message in cases:
        with pytest.raises(ValueError, match=message):
            hb.adapt(phi, backbone, xx, yy, config=config, num_steps=2)
    with pytest.raises(ValueError, match=f"built for {len(HIDDEN) + 1} hidden layers"):
        hb.adapt(hb.init_drift(jax.random.key(0), config, len(HIDDEN) + 1), backbone, x, y, config=config,
                 num_steps=2)
    # Under vmap (traced inputs) the shape checks still run; the adaptation itself is unchanged.
    batched = jax.vmap(lambda xx, yy: hb.adapt(phi, backbone, xx, yy, config=config, num_steps=2))(x[None], y[None])
    single = hb.adapt(phi, backbone, x, y, config=config, num_steps=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), batched, single)
    with pytest.raises(ValueError, match="x must be"):
        jax.vmap(lambda xx, yy: hb.adapt(phi, backbone, xx, yy, config=config, num_steps=2))(x[None, :, :30], y[None])


def _adapt_counting_autodiff(monkeypatch, phi, backbone, config, x, y):
    """Bias-mode adaptation traced afresh under the autodiff counters: no call, and every bias layer moves.
    Returns ``(theta, start, calls)``; ``calls`` keeps counting."""
    from metagrad.hyperflow import bias as hb

    jax.clear_caches()
    calls = _count_autodiff_calls(monkeypatch)
    theta = hb.adapt(phi, backbone, x, y, config=config, num_steps=3)
    assert calls == []
    start = hb.init_theta(backbone, x, jax.nn.one_hot(y, 3), config.head.scale)
    for name in theta["biases"]:
        assert float(jnp.max(jnp.abs(theta["biases"][name] - start["biases"][name]))) > 0
    return theta, start, calls


@pytest.mark.parametrize("support", ["live", "encoded"])
def test_bias_mode_adapt_calls_no_gradient(monkeypatch, support):
    from metagrad.hyperflow import bias as hb

    phi, config, backbone = _tiny_bias_model(support=support)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(9, 40)), jnp.float32)
    y = jnp.asarray(np.repeat(np.arange(3), 3), jnp.int32)
    theta, start, calls = _adapt_counting_autodiff(monkeypatch, phi, backbone, config, x, y)
    assert float(jnp.max(jnp.abs(theta["head"]["kernel"] - start["head"]["kernel"]))) > 0
    jax.jit(lambda b, xx: hb.finetune(b, xx, y, lr_bias=0.1, lr_head=0.1, num_steps=2, ways=3, scale=10.0))(
        backbone, x)
    assert "grad" in calls  # control


def _dot_operand_shapes(jaxpr, in_loop=False):
    """(operand shapes, inside a loop?) of every dot_general in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((tuple(tuple(v.aval.shape) for v in eqn.invars), in_loop))
        loop = in_loop or eqn.primitive.name in ("scan", "while")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_operand_shapes(inner, loop)
    return found


def test_encoded_support_integrates_without_the_backbone_and_streams_its_layers():
    """The encoded drift (the paper's: no target-model pass while integrating) sees the same statistics as the
    live drift at the start, runs no backbone product inside the Euler loop, and encodes layer by layer."""
    from metagrad.hyperflow import bias as hb

    phi, config, backbone = _tiny_bias_model(support="encoded")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(9, 40)), jnp.float32)
    y = jnp.asarray(np.repeat(np.arange(3), 3), jnp.int32)
    y1h = jax.nn.one_hot(y, 3)
    theta0 = hb.init_theta(backbone, x, y1h, config.head.scale)
    encoding = hb.encode_support(backbone, theta0, x, y1h)
    zs, hs, f = hb.forward(backbone, theta0["biases"], x)
    logits = hf.head_logits(theta0["head"], f)
    p, counts, own = hb.confidence(logits, y1h)
    np.testing.assert_allclose(encoding["feats"], f, atol=1e-6)
    for i, (z, h) in enumerate(zip(zs, hs)):
        live = hb.unit_statistics(z, h, logits, p, y1h, counts, own, classwise=i == len(zs) - 1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), encoding["units"][i], live)

    kernels = {tuple(layer["kernel"].shape) for layer in backbone.values()}
    for support, expect_in_loop in (("encoded", False), ("live", True)):
        cfg = dataclasses.replace(config, support=support)
        phi_s = hb.init_drift(jax.random.key(1), cfg, len(HIDDEN))
        jaxpr = jax.make_jaxpr(lambda p_, b, xx, yy: hb.adapt(p_, b, xx, yy, config=cfg, num_steps=3))(
            phi_s, backbone, x, y)
        dots = _dot_operand_shapes(jaxpr.jaxpr)
        backbone_dots = [loop for shapes, loop in dots if kernels & set(shapes)]
        assert backbone_dots and not all(backbone_dots)  # the starting point's forward pass, outside the loop
        assert any(backbone_dots) == expect_in_loop, (support, dots)

    # Memory against depth (XLA's scratch bytes, 25 support examples, width 64): the encoding does not grow by a
    # layer's activations per layer (what backprop keeps), and the whole encoded adaptation grows by less per
    # layer than GD on the same subset.
    def temp_bytes(fn, depth, width=64, n=25):
        sizes = (40,) + (width,) * depth
        bb = {f"Dense_{i}": {"kernel": jnp.ones((m, k)) / m, "bias": jnp.zeros(k)}
              for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:]))}
        return jax.jit(fn).lower(bb, jnp.ones((n, 40)), jnp.arange(n) % 3).compile().memory_analysis() \
            .temp_size_in_bytes

    def encode(b, xx, yy):
        y1h_ = jax.nn.one_hot(yy, 3)
        return hb.encode_support(b, hb.init_theta(b, xx, y1h_, 10.0), xx, y1h_)

    def adapt_encoded(b, xx, yy):
        depth = len(b)
        cfg = dataclasses.replace(config, bias_scales=(0.5,) * depth)
        return hb.adapt(hb.init_drift(jax.random.key(2), cfg, depth), b, xx, yy, config=cfg, num_steps=3)

    def gd(b, xx, yy):
        return hb.finetune(b, xx, yy, lr_bias=1.0, lr_head=1.0, num_steps=3, ways=3, scale=10.0)

    growth = {name: (temp_bytes(fn, 10) - temp_bytes(fn, 2)) / 8
              for name, fn in (("encode", encode), ("adapt", adapt_encoded), ("gd", gd))}
    assert growth["encode"] < 0.5 * 25 * 64 * 4, growth
    assert growth["adapt"] < 0.75 * growth["gd"], growth


@pytest.mark.parametrize("support", ["live", "encoded"])
def test_reduced_bias_mode_hyperflow_beats_no_adaptation(reduced_setup, monkeypatch, support):
    """Bias mode, reduced: meta-train on (biases, head) GD trajectories (velocity regression, then rollout
    refinement); adapt with no gradient; beat prototypes. For both drifts: the live one and the encoded one."""
    from metagrad.hyperflow import bias as hb

    backbone, meta_tasks, test = reduced_setup
    traj = hb.simulate_trajectories(backbone, jnp.asarray(meta_tasks["support_x"]),
                                    jnp.asarray(meta_tasks["support_y"]), jax.random.key(0), 1.0, 3.0,
                                    num_steps=50, num_knots=10, num_starts=1, ways=5, scale=10.0)
    config = hb.BiasDriftConfig(head=hf.DriftConfig(hidden=16, scale=10.0), hidden=8, support=support)
    phi, config, history = hb.meta_train(traj, backbone, config, num_iters=200, batch_tasks=16,
                                         learning_rate=1e-2, chunk=50, progress=False)
    assert history[-1] < 0.8 * history[0]

    def accuracy(adapt):
        theta = jax.jit(jax.vmap(adapt))(test["support_x"], test["support_y"])
        return np.asarray(jax.vmap(lambda t, x, y: hb.accuracy(t, backbone, x, y))(theta, test["query_x"],
                                                                                   test["query_y"]))

    # Refinement on 5-step rollouts brings the emulated model closer to GD's (in KL, on the held-out tasks).
    def kl_to_gd(phi):
        adapted = jax.jit(jax.vmap(lambda x, y: hb.adapt(phi, backbone, x, y, config=config, num_steps=5)))(
            test["support_x"], test["support_y"])
        log_p = jax.vmap(hb.log_probs, (0, None, 0))(adapted, backbone, test["query_x"])
        return float(jnp.mean(jnp.sum(jnp.exp(log_p_gd) * (log_p_gd - log_p), -1)))

    gd = jax.jit(jax.vmap(lambda x, y: hb.finetune(backbone, x, y, lr_bias=1.0, lr_head=3.0, num_steps=50, ways=5,
                                                    scale=10.0)))(test["support_x"], test["support_y"])
    log_p_gd = jax.vmap(hb.log_probs, (0, None, 0))(gd, backbone, test["query_x"])
    with pytest.raises(ValueError, match="num_euler=3 must divide"):
        hb.refine_on_rollouts(phi, config, traj, backbone, jnp.asarray(meta_tasks["query_x"]), num_euler=3)
    regressed = kl_to_gd(phi)
    phi, rollout_history = hb.refine_on_rollouts(phi, config, traj, backbone, jnp.asarray(meta_tasks["query_x"]),
                                                 num_euler=5, num_iters=150, batch_tasks=16, learning_rate=3e-3,
                                                 chunk=50, progress=False)
    refined = kl_to_gd(phi)
    print(f"bias mode reduced ({support}), KL to GD on held-out tasks: regressed", regressed, "refined", refined)
    assert rollout_history[-1] < rollout_history[0] and refined < 0.9 * regressed, (rollout_history, regressed,
                                                                                     refined)

    proto = accuracy(lambda x, y: hb.init_theta(backbone, x, jax.nn.one_hot(y, 5), 10.0))
    jax.clear_caches()
    calls = _count_autodiff_calls(monkeypatch)
    flow = accuracy(lambda x, y: hb.adapt(phi, backbone, x, y, config=config, num_steps=5))
    assert calls == []
    print(f"bias mode reduced ({support}):", proto.mean(), flow.mean())
    assert (flow - proto).mean() > 0, (proto.mean(), flow.mean())


# ----------------------------------------------------------------------------- bias mode on a 1-D CNN backbone


def _tiny_conv_model(support="live", channels=(8, 8)):
    from metagrad.hyperflow import bias as hb

    model = hb.ConvBackbone(channels=channels, kernel_size=3, num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
    config = hb.BiasDriftConfig(head=hf.DriftConfig(ways=3, hidden=8, velocity_scale=2.0), hidden=4,
                                bias_scales=(0.5,) * len(channels), support=support)
    return model, params, hb.init_drift(jax.random.key(1), config, len(channels)), config


def test_conv_backbone_forward_matches_flax_and_its_pooled_pass():
    from metagrad.hyperflow import bias as hb

    model, params, _, _ = _tiny_conv_model()
    backbone = {k: v for k, v in params.items() if k.startswith("Conv_")}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)), jnp.float32)
    zs, hs, f = hb.forward(backbone, hb.get_biases(backbone), x)
    assert hs[0].shape == (6, 40, 8) and hb.layer_names(backbone) == ["Conv_0", "Conv_1"]
    logits = jnp.mean(hs[-1], 1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    np.testing.assert_allclose(logits, model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)  # flax's Conv
    layers, pooled = hb.pooled_forward(backbone, hb.get_biases(backbone), x)  # one example at a time
    np.testing.assert_allclose(pooled, f, atol=1e-6)
    for (z, h, firing), z_full, h_full in zip(layers, zs, hs):
        np.testing.assert_allclose(z, z_full.mean(1), atol=1e-5)
        np.testing.assert_allclose(h, h_full.mean(1), atol=1e-5)
        np.testing.assert_allclose(firing, (z_full > 0).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="Dense_i or a 1-D CNN's Conv_i"):
        hb.layer_names({"Conv_0": backbone["Conv_0"], "Conv_2": backbone["Conv_1"]})


@pytest.mark.parametrize("width", [1, 4, 5])
def test_conv_by_shifted_products_equals_xlas_convolution_and_its_gradients(width):
    """``conv_same`` (the backbone's convolution: a sum of shifted matrix products) is ``lax``'s ``SAME``
    convolution, odd and even kernel widths, values and both input and kernel gradients (float64)."""
    from metagrad.hyperflow import bias as hb

    with jax.enable_x64(True):
        rng = np.random.default_rng(width)
        h = jnp.asarray(rng.normal(size=(3, 11, 4)))
        kernel = jnp.asarray(rng.normal(size=(width, 4, 6)))
        weights = jnp.asarray(rng.normal(size=(3, 11, 6)))
        np.testing.assert_allclose(hb.conv_same(h, kernel), hb.conv_same_xla(h, kernel), rtol=1e-12, atol=1e-12)
        grads = [jax.grad(lambda a, b: jnp.sum(weights * jnp.tanh(conv(a, b))), (0, 1))(h, kernel)
                 for conv in (hb.conv_same, hb.conv_same_xla)]
        for ours, reference in zip(*grads):
            np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_full_finetuning_of_a_conv_backbone_lowers_the_loss_and_moves_every_kernel():
    """The full fine-tuning baseline of the CNN bias mode: ``hf.finetune_full`` with the CNN's features."""
    from metagrad.hyperflow import bias as hb

    _, params, _, _ = _tiny_conv_model()
    backbone = {k: v for k, v in params.items() if k.startswith("Conv_")}
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 40)), jnp.float32)
    y1h = jax.nn.one_hot(jnp.asarray([0, 0, 1, 1, 2, 2]), 3)

    tuned = hf.finetune_full(backbone, x, jnp.argmax(y1h, -1), lr=0.1, num_steps=3, ways=3, scale=10.0,
                             features_fn=hb.backbone_features)
    start = hf.prototype_head(hb.backbone_features(backbone, x), y1h, 10.0)
    assert float(hf.head_loss(tuned["head"], hb.backbone_features(tuned["backbone"], x), y1h)) < float(
        hf.head_loss(start, hb.backbone_features(backbone, x), y1h))
    for name in backbone:
        assert float(jnp.max(jnp.abs(tuned["backbone"][name]["kernel"] - backbone[name]["kernel"]))) > 0
    with pytest.raises(ValueError, match="features_fn="):  # neither the MLP's widths nor a features function
        hf.finetune_full(backbone, x, jnp.argmax(y1h, -1), lr=0.1, num_steps=3, ways=3, scale=10.0)


@pytest.mark.parametrize("support", ["live", "encoded"])
def test_conv_backbone_adapts_without_gradient_in_memory_that_does_not_hold_the_support_activations(
        monkeypatch, support):
    """On a 1-D CNN, GD on the biases keeps every layer's (N, L, C) activations; HyperFlow's passes go one support
    example at a time, so its memory grows with the sequence length about N times slower than GD's."""
    from metagrad.hyperflow import bias as hb

    _, params, phi, config = _tiny_conv_model(support)
    backbone = {k: v for k, v in params.items() if k.startswith("Conv_")}
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(12, 40)), jnp.float32)
    y = jnp.asarray(np.repeat(np.arange(3), 4), jnp.int32)
    _, start, calls = _adapt_counting_autodiff(monkeypatch, phi, backbone, config, x, y)
    gd = hb.finetune(backbone, x, y, lr_bias=0.5, lr_head=1.0, num_steps=3, ways=3, scale=10.0)
    assert "grad" in calls  # control
    y1h = jax.nn.one_hot(y, 3)
    assert float(hb.loss(gd, backbone, x, y1h)) < float(hb.loss(start, backbone, x, y1h))
    with pytest.raises(ValueError, match=r"x must be \(N, length\)"):
        hb.adapt(phi, backbone, x[..., None], y, config=config, num_steps=3)

    def alloc_bytes(fn, length):
        compiled = jax.jit(fn).lower(backbone, jnp.ones((12, length)), y).compile().memory_analysis()
        return compiled.temp_size_in_bytes + compiled.output_size_in_bytes

    def flow(b, xx, yy):
        return hb.adapt(phi, b, xx, yy, config=config, num_steps=3)

    def descent(b, xx, yy):
        return hb.finetune(b, xx, yy, lr_bias=0.5, lr_head=1.0, num_steps=3, ways=3, scale=10.0)

    growth = {name: alloc_bytes(fn, 640) - alloc_bytes(fn, 40) for name, fn in (("flow", flow), ("gd", descent))}
    assert growth["gd"] > 12 * 600 * 8 * 4, growth  # at least one layer's activations of all 12 examples
    assert growth["flow"] < growth["gd"] / 4, growth


def test_drift_regression_killed_mid_way_resumes_from_its_saved_progress_to_the_same_drift(tmp_path):
    """``regress_drift(checkpoint=LoopProgress(...))``: a run killed after 2 of 5 chunks, restarted from the record a
    fresh ``FinishedParts`` reads back, ends bit for bit where an uninterrupted run does, without redoing a chunk."""
    from metagrad.report import FinishedParts, LoopProgress

    target = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)

    def sample_loss(phi, task, r, s, kind):
        return jnp.sum((jnp.tanh(phi["w"]) * phi["b"] - 0.1 * target * (task + 1) * s) ** 2)

    phi0 = {"w": jnp.full((2, 3), 0.3, jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    settings = dict(num_tasks=4, num_starts=1, num_kinds=1, batch_tasks=2, learning_rate=0.05, num_iters=50, seed=0,
                    chunk=10, progress=False, desc="test")

    whole, whole_history = hf.regress_drift(sample_loss, phi0, **settings)

    class Killed(Exception):
        pass

    class KilledAfterTwoChunks(LoopProgress):
        def save(self, done, state, history, *, last=False):
            super().save(done, state, history, last=last)
            if done == 2:
                raise Killed

    path, record = str(tmp_path / "finished.json"), {"run": "test"}
    with pytest.raises(Killed):
        hf.regress_drift(sample_loss, phi0, checkpoint=KilledAfterTwoChunks(FinishedParts(path, record), "drift",
                                                                            every_seconds=0.0), **settings)
    class CountedSaves(LoopProgress):
        def save(self, done, state, history, *, last=False):
            saved.append(done)
            super().save(done, state, history, last=last)

    saved = []
    progress = CountedSaves(FinishedParts(path, record), "drift", every_seconds=0.0)
    resumed, resumed_history = hf.regress_drift(sample_loss, phi0, checkpoint=progress, **settings)
    assert progress.resumed_from == 2 and saved == [3, 4, 5]  # the 2 finished chunks are not run again
    assert resumed_history == whole_history
    for name in whole:
        np.testing.assert_array_equal(np.asarray(resumed[name]), np.asarray(whole[name]))
    # a record of another loop's shape is refused with a message that says what to do
    with pytest.raises(ValueError, match="fresh=True"):
        LoopProgress(FinishedParts(path, record), "drift").load({"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)})
    parts = FinishedParts(path, record)  # once the loop's result is saved, its progress can be dropped
    parts.drop("drift")
    assert FinishedParts(path, record).get("drift") is None
