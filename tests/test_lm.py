"""Language models: the byte corpus, the transformer and the LM Problem, whose metagradient REPLAY computes exactly.

The corpus is built from a small folder of files made here (not the machine's
packages); the problem trains the ``tiny`` transformer on synthetic domains for
a few steps; exactness is checked in float64 against ``jax.grad`` of the fully
unrolled run and against central differences.
"""

import dataclasses
import gzip
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg
import replay
from conftest import max_relative_error
from metagrad import lm
from metagrad.cli import main

WORDS = ("alpha", "branch", "cedar", "delta", "ember", "fjord", "gamut", "harbor", "indigo", "juniper")


# ------------------------------------------------------------------ the corpus
def make_source_tree(root):
    """Three small domains of text files (one gzipped), plus files the build must leave out."""
    rng = np.random.default_rng(0)
    for i in range(40):
        text = f"marker-notes-{i:03d} " + " ".join(rng.choice(WORDS, 60)) + ".\n"
        path = root / "docs" / f"pkg{i % 7}" / (f"README-{i}.txt.gz" if i % 5 == 0 else f"notes-{i}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode(), mtime=0) if path.name.endswith(".gz") else text.encode())
    for i in range(40):
        body = "\n".join(f"    x{j} = {int(v)} * {WORDS[j % 10]!r}" for j, v in enumerate(rng.integers(0, 99, 8)))
        (root / "src" / f"mod{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / "src" / f"mod{i % 3}" / f"m{i}.py").write_text(f"# marker-code-{i:03d}\ndef f{i}():\n{body}\n")
    for i in range(40):
        (root / "legal" / f"p{i}").mkdir(parents=True, exist_ok=True)
        (root / "legal" / f"p{i}" / "copyright").write_text(
            f"marker-legal-{i:03d}\nPermission is hereby granted, {' '.join(rng.choice(WORDS, 30))}\n")
    # left out: a duplicate (kept once), a binary file, a file that is not UTF-8, a symbolic link, a non-match
    (root / "docs" / "pkg0" / "copy-of-notes-1.txt").write_bytes((root / "docs" / "pkg1" / "notes-1.txt").read_bytes())
    (root / "docs" / "pkg0" / "binary.txt").write_bytes(b"marker-binary \x00\x01\x02")
    (root / "docs" / "pkg0" / "latin1.txt").write_bytes("marker-latin1 caf\xe9".encode("latin-1"))
    os.symlink(root / "docs" / "pkg2" / "notes-2.txt", root / "docs" / "pkg0" / "link.txt")
    (root / "docs" / "pkg0" / "image.png").write_bytes(b"marker-png")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    make_source_tree(root)
    return (lm.DomainSource("notes", "prose", (str(root / "docs"),), ("*.txt", "*.txt.gz")),
            lm.DomainSource("code", "python", (str(root / "src"),), ("*.py",)),
            lm.DomainSource("legal", "licences", (str(root / "legal"),), ("*/copyright",)))


def build(out, sources, **kwargs):
    return lm.build_corpus(str(out), sources, val_fraction=0.2, test_fraction=0.2, progress=False, **kwargs)


def test_corpus_build_is_deterministic_and_a_file_never_straddles_splits(tmp_path, sources):
    first, second = build(tmp_path / "a", sources), build(tmp_path / "b", sources)
    assert first["sha256"] == second["sha256"]
    assert [d["sha256"] for d in first["domains"].values()] == [d["sha256"] for d in second["domains"].values()]
    corpus = lm.load_corpus(str(tmp_path / "a"))
    assert corpus.domains == ("notes", "code", "legal")
    for name, prefix in (("notes", b"marker-notes-"), ("code", b"marker-code-"), ("legal", b"marker-legal-")):
        splits = {split: bytes(np.asarray(corpus.tokens[name][split])) for split in lm.corpus.SPLITS}
        assert all(splits.values()), f"{name}: an empty split"
        for i in range(40):
            marker = prefix + b"%03d" % i
            # every file is in exactly one split, once (the duplicate of notes-1 is kept once)
            assert sum(s.count(marker + (b" " if name == "notes" else b"\n")) for s in splits.values()) == 1, marker
        assert sum(s.count(bytes([lm.corpus.SEPARATOR])) for s in splits.values()) == 40
        entry = first["domains"][name]
        assert sum(entry["files"].values()) == 40
        for split, data in splits.items():
            assert hashlib.sha256(data).hexdigest() == entry["sha256"][split]
    everything = b"".join(bytes(np.asarray(a)) for splits in corpus.tokens.values() for a in splits.values())
    for left_out in (b"marker-binary", b"marker-latin1", b"marker-png"):
        assert left_out not in everything
    assert first["domains"]["notes"]["skipped"] == {"not_text": 2, "too_large": 0, "duplicate": 1, "over_max_bytes": 0}
    rows = (tmp_path / "a" / "code" / "files.tsv").read_text().splitlines()[1:]
    assert len({row.split("\t")[3] for row in rows}) == len(rows) == 40
    with open(tmp_path / "a" / lm.corpus.MANIFEST) as f:
        assert json.load(f)["sha256"] == first["sha256"]
    # the checksum is of the contents: capping a domain changes it, and the cap holds
    capped = build(tmp_path / "c", sources, max_bytes=10000)
    assert capped["sha256"] != first["sha256"]
    assert all(sum(d["bytes"].values()) <= 10000 for d in capped["domains"].values())


def test_a_missing_or_damaged_corpus_says_how_to_build_it(tmp_path, sources):
    with pytest.raises(FileNotFoundError, match=r"metagrad corpus build --out .*nowhere") as err:
        lm.load_corpus(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    build(tmp_path / "c", sources[:1])
    np.save(tmp_path / "c" / "notes" / "val.npy", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="checksum.*--fresh"):
        lm.load_corpus(str(tmp_path / "c"))


def test_the_build_never_overwrites_silently(tmp_path, sources, capsys):
    out = tmp_path / "corpus"
    build(out, sources[:1])
    with pytest.raises(FileExistsError, match="fresh=True"):
        build(out, sources[:1])
    assert build(out, sources[1:2], fresh=True)["domains"].keys() == {"code"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no corpus"):
        build(tmp_path / "other", sources[:1], fresh=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # the command line refuses in one line, before it reads any package
    assert main(["corpus", "build", "--out", str(out), "--no-progress"], catch_errors=True) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("metagrad corpus:") and "--fresh" in message and "\n" not in message


# ------------------------------------------------------------------ the transformer
def test_the_transformer_is_causal():
    model = lm.Transformer(lm.config_named("tiny"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits = apply(params, tokens)
    assert logits.shape == (2, 12, 256)
    changed = apply(params, tokens.at[:, 7].set((tokens[:, 7] + 1) % 256))
    np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(changed[:, :7]))
    assert float(jnp.min(jnp.max(jnp.abs(logits[:, 7:] - changed[:, 7:]), axis=-1))) > 0
    with pytest.raises(ValueError, match="context"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_the_named_configs_have_their_stated_sizes():
    for name, config in lm.CONFIGS.items():
        low, high = lm.PARAMETER_RANGES[name]
        assert low <= lm.count_parameters(config) <= high, name
    tiny = lm.Transformer(lm.CONFIGS["tiny"]).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert sum(p.size for p in jax.tree.leaves(tiny)) == lm.count_parameters(lm.CONFIGS["tiny"])
    assert lm.bits_per_byte(math.log(256)) == pytest.approx(8.0)


# ------------------------------------------------------------------ the LM Problem
def synthetic_corpus(train_bytes=256, seed=0):
    """Three domains with different byte statistics: letters, digits, and a noisy repeating pattern."""
    rng = np.random.default_rng(seed)

    def domain(draw):
        return {split: draw(n).astype(np.uint8) for split, n in (("train", train_bytes), ("val", 64), ("test", 64))}

    return lm.Corpus.from_arrays({
        "letters": domain(lambda n: rng.integers(97, 123, n)),
        "digits": domain(lambda n: rng.integers(48, 58, n)),
        "pattern": domain(lambda n: (np.arange(n) * 7 % 13 + 65 + rng.integers(0, 2, n))),
    })


def lm_problem(num_steps=6, dtype=jnp.float32, corpus=None, **kwargs):
    settings = dict(batch_size=6, seq_len=8, doc_size=32, eval_windows=4, lr_schedule=mg.LRSchedule(3),
                    data_weights=mg.DataWeights(), mixture_weights=lm.MixtureWeights())
    settings.update(kwargs)
    return lm.LMProblem(lm.Transformer(lm.config_named("tiny")),
                        lm.baseline_optimizer(3e-2, num_steps, warmup_steps=1), corpus or synthetic_corpus(),
                        num_steps=num_steps, param_dtype=dtype, **settings)


def perturbed(problem, seed=0):
    rng = np.random.default_rng(seed)
    meta = problem.init_meta()
    dtype = meta["lr_schedule"].dtype
    return problem.project_meta({
        "lr_schedule": meta["lr_schedule"] * jnp.asarray(rng.uniform(0.6, 1.4, meta["lr_schedule"].shape), dtype),
        "data_weights": meta["data_weights"] * jnp.asarray(rng.uniform(0.5, 1.0, meta["data_weights"].shape), dtype),
        "mixture_weights": jnp.asarray([0.5, 0.3, 0.2], dtype),
    })


def test_replay_metagradient_is_exact_in_float64(x64):
    """LR schedule, per-document weights and mixture weights: REPLAY = jax.grad of the unrolled run = central FD."""
    problem = lm_problem(dtype=jnp.float64)
    meta = perturbed(problem)
    value_ref, grad_ref = problem.value_and_metagrad(meta, strategy=replay.FullUnroll())
    value, grad = problem.value_and_metagrad(meta, k=2)
    assert float(value) == pytest.approx(float(value_ref), rel=1e-12)
    assert set(grad) == {"lr_schedule", "data_weights", "mixture_weights"}
    for name in meta:
        assert bool(jnp.any(grad_ref[name] != 0)), f"{name}: the reference metagradient is zero, no real check"
        assert max_relative_error(grad_ref[name], grad[name]) < 1e-8, name
    # central differences along a random direction in each metaparameter alone
    objective = jax.jit(lambda f, state, m: f(state, m))

    def value_at(m):  # the run's forward program is the one REPLAY compiled
        return float(objective(problem.objective, problem.train(m), m))

    rng = np.random.default_rng(7)
    h = 1e-5
    for name in meta:
        direction = jnp.asarray(rng.normal(size=meta[name].shape))
        plus, minus = ({**meta, name: meta[name] + s * h * direction} for s in (1, -1))
        fd = (value_at(plus) - value_at(minus)) / (2 * h)
        assert fd == pytest.approx(float(jnp.vdot(grad[name], direction)), rel=1e-6, abs=1e-10), name


def test_the_batches_are_a_pure_function_of_seed_and_step():
    problem = lm_problem()
    meta = problem.init_meta()
    batch = problem.training_batch(meta, 3)
    again = lm_problem().training_batch(meta, 3)  # a problem built anew draws the same windows
    for key in ("x", "y", "document", "domain", "weights"):
        np.testing.assert_array_equal(np.asarray(batch[key]), np.asarray(again[key]))
    other_step = problem.training_batch(meta, 4)
    other_seed = lm_problem(seed=1).training_batch(meta, 3)
    assert not np.array_equal(np.asarray(batch["x"]), np.asarray(other_step["x"]))
    assert not np.array_equal(np.asarray(batch["x"]), np.asarray(other_seed["x"]))
    # each window is seq_len + 1 consecutive bytes inside its document, of domain (slot mod k)
    documents = np.asarray(problem.device_data("train")["documents"])
    windows = np.concatenate([np.asarray(batch["x"]), np.asarray(batch["y"])[:, -1:]], axis=1)
    for slot, (window, doc) in enumerate(zip(windows, np.asarray(batch["document"]))):
        start, stop = problem.document_range(problem.domains[slot % 3])
        assert start <= doc < stop
        row = documents[doc]
        assert any(np.array_equal(row[o:o + 9], window) for o in range(32 - 8)), slot
    np.testing.assert_array_equal(np.asarray(batch["y"])[:, :-1], np.asarray(batch["x"])[:, 1:])


def test_check_problem_accepts_the_lm_problem_and_its_metaparameters_enter_as_plugins():
    problem = lm_problem()
    mg.check_problem(problem)
    assert isinstance(problem, mg.Problem)
    meta = problem.init_meta()
    state0 = problem.init_state(meta)
    replay.check_step(problem.step, state0, meta)
    replay.check_objective(problem.objective, state0, meta)
    assert meta["data_weights"].shape == (3 * 256 // 32,)  # one weight per document
    np.testing.assert_allclose(np.asarray(meta["mixture_weights"]), np.full(3, 1 / 3), rtol=1e-6)
    report = problem.evaluate(problem.train(meta))
    assert all(isinstance(v, float) and math.isfinite(v) for v in report.values())
    assert report["val_bpb"] == pytest.approx(report["val_loss"] / math.log(2))
    assert set(report) >= {"val_loss", "test_loss", "val_loss/digits", "test_bpb"}
    # each domain's windows carry its mixture weight's share of the loss: sum over its windows / B = w_d
    w = jnp.asarray([0.6, 0.3, 0.1])
    batch = problem.training_batch({**meta, "mixture_weights": w}, 0)
    shares = [float(jnp.sum(jnp.where(batch["domain"] == d, batch["weights"], 0.0))) / 6 for d in range(3)]
    np.testing.assert_allclose(shares, np.asarray(w), rtol=1e-6)
    projected = problem.project_meta({**meta, "mixture_weights": jnp.asarray([2.0, -1.0, 0.5]),
                                      "data_weights": meta["data_weights"].at[0].set(3.0)})
    assert float(jnp.sum(projected["mixture_weights"])) == pytest.approx(1.0)
    assert float(jnp.min(projected["mixture_weights"])) >= 0.0 and float(projected["data_weights"][0]) == 1.0
    with pytest.raises(ValueError, match="mixture_weights.*one weight per domain"):
        problem.check_meta({**meta, "mixture_weights": jnp.ones(2) / 2})
    with pytest.raises(ValueError, match="integer bytes"):
        lm_problem(metaparameters=(mg.Poison((1, 2)),))
    with pytest.raises(ValueError, match="batch_size=2 gives some of the 3 domains no window"):
        lm_problem(batch_size=2)


def test_the_compiled_step_does_not_embed_the_training_tokens():
    texts = {}
    for train_bytes in (256, 16384):
        problem = lm_problem(corpus=synthetic_corpus(train_bytes), data_weights=None)
        meta, state0 = problem.init_meta(), problem.init_state()
        text = jax.jit(replay.advance).lower(problem.step, state0, meta, 0, 3).as_text()
        # the documents are an argument of the program: (train_bytes * 3 / doc_size) rows of doc_size bytes
        assert f"tensor<{3 * train_bytes // 32}x32xui8>" in text
        texts[train_bytes] = text
    # 48 kB of tokens would be far more than any difference in the programs' text
    assert abs(len(texts[16384]) - len(texts[256])) < 200, {n: len(t) for n, t in texts.items()}


# ------------------------------------------------------------------ MGD on the learning-rate schedule
def test_the_traced_seed_gives_the_metagradient_and_evaluation_of_a_problem_built_with_that_seed():
    from metagrad.apps.common import evaluate_at_seed

    # with dropout, so that both random streams (windows, dropout) follow the traced seed
    problem = dataclasses.replace(lm_problem(), model=lm.Transformer(lm.config_named("tiny", dropout=0.1)))
    meta = perturbed(problem)
    value, grad = problem.value_and_metagrad_at_seed(meta, 3, k=2)
    other = dataclasses.replace(problem, seed=3)
    value_ref, grad_ref = other.value_and_metagrad(meta, k=2)
    assert float(value) == pytest.approx(float(value_ref), rel=1e-6)
    assert set(grad) == set(grad_ref) == set(meta)
    for name in meta:
        np.testing.assert_allclose(np.asarray(grad[name]), np.asarray(grad_ref[name]), rtol=1e-6, atol=1e-9)
    # a check that can fail: seed 0's run (the same compiled programs) is another run
    value_0, grad_0 = problem.value_and_metagrad_at_seed(meta, 0, k=2)
    assert float(value_0) != pytest.approx(float(value), rel=1e-4)
    assert not np.allclose(np.asarray(grad_0["lr_schedule"]), np.asarray(grad["lr_schedule"]), rtol=1e-3)
    scores, scores_ref = evaluate_at_seed(problem, meta, 3), other.evaluate(other.train(meta))
    assert scores.keys() == scores_ref.keys()
    for key in scores:
        assert scores[key] == pytest.approx(scores_ref[key], rel=1e-6), key


def test_the_schedule_sets_the_injected_adamw_rate():
    """clip + AdamW with an injected rate under a per-step schedule c_t is clip + AdamW at the rate c_t."""
    rates = np.asarray([0.02, 0.005, 0.01, 0.001])
    scheduled = lm_problem(num_steps=4, data_weights=None, mixture_weights=None, lr_schedule=mg.LRSchedule(4))
    scheduled = dataclasses.replace(scheduled, optimizer=lm.scheduled_adamw())
    assert scheduled.info().learning_rate == 0.0  # the schedule, not the optimizer, gives the rate
    state = scheduled.train({"lr_schedule": jnp.asarray(rates, jnp.float32)})
    schedule = lambda count: jnp.asarray(rates, jnp.float32)[count]  # noqa: E731
    fixed = dataclasses.replace(scheduled, optimizer=lm.adamw_chain(schedule), lr_schedule=None)
    reference = fixed.train({})
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state["params"]),
                                                             jax.tree.leaves(scheduled.init_state()["params"]))]
    assert max(moved) > 1e-3


def test_the_schedule_search_runs_on_the_lm_problem_and_resumes(tmp_path):
    """search_schedule end to end on an LMProblem (tiny transformer, a few steps, two meta-steps); a rerun
    resumes without redoing a meta-step; other settings are refused."""
    from metagrad.store import SettingsMismatchError

    out = tmp_path / "run"
    report = lm.run_lm_schedule(None, str(out), smoke=True, progress=False)
    assert set(report["methods"]) == {"mgd", "best_grid", "initial"}
    for metrics in report["methods"].values():
        assert set(metrics) == {f"{k}{s}" for k in ("val_loss", "test_loss", "val_bpb", "test_bpb")
                                for s in ("", "_std")}
        assert np.isfinite(list(metrics.values())).all()
        assert metrics["test_bpb"] == pytest.approx(metrics["test_loss"] / math.log(2))
    assert len(report["grid"]) == 3 and report["grid"][0]["val_loss"] <= report["grid"][-1]["val_loss"]
    assert [h["meta_step"] for h in report["history"]] == [0, 1] and report["resumed_from_meta_step"] == 0
    # MGD moved the schedule away from its flat start
    assert len(set(np.round(report["learned_knots"], 8))) > 1
    assert all(k > 0 for k in report["learned_knots"])
    saved = json.loads((out / "result.json").read_text())
    assert saved["smoke"] is True and saved["methods"] == report["methods"]
    assert (out / "lr_schedule.png").read_bytes()[:4] == b"\x89PNG"
    again = lm.run_lm_schedule(None, str(out), smoke=True, progress=False)
    assert again["resumed_from_meta_step"] == 2 and again["methods"] == report["methods"]
    with pytest.raises(SettingsMismatchError, match="target_domain"):
        lm.run_lm_schedule(None, str(out), smoke=True, target_domain="digits", progress=False)


def test_a_target_domain_is_what_the_schedule_search_scores():
    problem = lm.schedule.lm_schedule_problem(synthetic_corpus(), config="tiny", num_steps=3, batch_size=6,
                                              seq_len=8, doc_size=32, eval_windows=4, target_domain="digits")
    scores = problem.evaluate(problem.init_state())
    assert scores["val_loss"] == scores["val_loss/digits"] == scores["target_val_loss"]
    assert scores["all_val_loss"] == pytest.approx(np.mean([scores[f"val_loss/{d}"] for d in problem.domains]))
    assert scores["test_bpb"] == pytest.approx(scores["test_loss/digits"] / math.log(2))
    with pytest.raises(ValueError, match="context"):
        lm.schedule.lm_schedule_problem(synthetic_corpus(), config="tiny", num_steps=3, batch_size=6, seq_len=32)
