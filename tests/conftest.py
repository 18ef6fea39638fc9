"""Shared tiny problems (kept small: the suite runs on 2 CPU cores)."""

from __future__ import annotations

import functools
import gc
import os

# The problems are tiny: on a GPU, keep each pytest worker (`pytest -n 2`) from preallocating most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad as mg


#: Memory mappings after which a test's end releases JAX's compiled programs (Linux allows 65,530 by default;
#: the longest tests add under 10,000).
MAX_MAPPINGS = 40000


def memory_mappings() -> int:
    """How many memory mappings this process holds (0 where ``/proc`` does not say)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def release_compiled_programs() -> None:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs_after_each_file():
    """After each test file, drop JAX's compiled programs (the file's own tests reuse them; later files do not).

    XLA's CPU backend maps every compiled program's code into the process. A test worker that kept every
    program of every file it ran (``pytest -n 2 --dist loadfile``) passed Linux's default limit of 65,530
    memory mappings (``vm.max_map_count``) after about a dozen minutes, and the next compilation then
    crashed the worker with a segmentation fault. ``jax.clear_caches`` releases them.
    """
    yield
    release_compiled_programs()


@pytest.fixture(autouse=True)
def bound_memory_mappings():
    """Within a file too: one file's programs alone (test_exactness) came near the limit."""
    yield
    if memory_mappings() > MAX_MAPPINGS:
        release_compiled_programs()


def tiny_dataset(dtype=np.float32, n_train=32, features=6, classes=3, seed=0) -> mg.Dataset:
    rng = np.random.default_rng(seed)
    n = n_train + 32
    x = rng.normal(size=(n, features)).astype(dtype)
    y = rng.integers(0, classes, n).astype(np.int32)
    return mg.Dataset(x[:n_train], y[:n_train], x[n_train:n_train + 16], y[n_train:n_train + 16],
                      x[n_train + 16:], y[n_train + 16:], num_classes=classes, name="tiny")


OPTIMIZERS = {
    "momentum_sgd": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    "adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.02, weight_decay=1e-2),
}


@functools.lru_cache(maxsize=None)
def tiny_problem(optimizer: str, dtype: str, num_steps: int, dropout: float = 0.0, knots: int = 5) -> mg.TrainingProblem:
    """A problem with all three metaparameter kinds at once. Build float64 ones under ``jax.enable_x64``."""
    np_dtype = {"float64": np.float64, "float32": np.float32}[dtype]
    return mg.TrainingProblem(
        mg.MLP(hidden=(8,), num_classes=3, dropout_rate=dropout),
        OPTIMIZERS[optimizer](),
        tiny_dataset(np_dtype),
        num_steps=num_steps,
        batch_size=8,
        lr_schedule=mg.LRSchedule(knots, 0.05),
        data_weights=mg.DataWeights(),
        poison=mg.Poison((1, 3, 5), eps=0.3),
        param_dtype=jnp.dtype(dtype),
    )


def perturbed_meta(problem: mg.TrainingProblem, seed: int = 0):
    """Metaparameters away from their initial values so that every part's gradient is generic."""
    rng = np.random.default_rng(seed)
    meta = problem.init_meta()
    dtype = meta["poison"].dtype
    meta["poison"] = meta["poison"] + jnp.asarray(0.05 * rng.normal(size=meta["poison"].shape), dtype)
    meta["data_weights"] = meta["data_weights"] * jnp.asarray(rng.uniform(0.5, 1.0, meta["data_weights"].shape), dtype)
    meta["lr_schedule"] = meta["lr_schedule"] * jnp.asarray(rng.uniform(0.5, 1.5, meta["lr_schedule"].shape), dtype)
    return meta


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def max_relative_error(a, b) -> float:
    """Largest ``|a - b| / max|a|`` over the leaves of two pytrees."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(np.max(np.abs(x)), 1e-30)
        errs.append(np.max(np.abs(x - y)) / scale)
    return max(errs)


def wait_command(client, command_id, timeout=60.0):
    """Poll a control server (an ``httpx.Client``) until command ``command_id`` succeeded or failed; its record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/api/commands/{command_id}").json()
        if record.get("status") in ("succeeded", "failed"):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.02)


@pytest.fixture
def serve():
    """``serve(trainer) -> (server, client)``: a real control server on 127.0.0.1 and an ``httpx.Client`` holding
    its token; every trainer and server started is stopped at the end."""
    import httpx

    from metagrad.interactive.server import ControlServer

    started = []

    def start(trainer):
        server = ControlServer(trainer).start()
        client = httpx.Client(base_url=server.base_url, headers={"X-Token": server.token}, timeout=30)
        started.append((trainer, server, client))
        return server, client

    yield start
    for trainer, server, client in started:
        client.close()
        trainer.request_stop()
        trainer.join(10)
        server.stop()
