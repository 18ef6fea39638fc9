"""Data-parallel (and parameter-sharded) training over a device mesh gives the single-device metagradient.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts), simulating 4 devices on the CPU.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    import dataclasses, replay
    from conftest import tiny_problem, perturbed_meta, max_relative_error
    assert len(jax.devices()) == 4, jax.devices()
    single = tiny_problem("momentum_sgd", "float64", 40)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = dataclasses.replace(single, mesh=mesh)
    meta = perturbed_meta(single)
    v1, g1 = single.value_and_metagrad(meta, k=3)
    v2, g2 = sharded.value_and_metagrad(meta, k=3)
    v3, g3 = sharded.value_and_metagrad(meta, strategy=replay.Replay(k=3, storage=replay.Storage(device_bytes=1)))
    err = max(max_relative_error(g1, g2), max_relative_error(g1, g3))
    # the stored states keep their sharding: the state after a segment is replicated over the mesh
    out = replay.advance(sharded.step, sharded.init_state(), meta, 0, 5)
    spec = jax.tree.leaves(out)[0].sharding
    with pytest_raises(ValueError):
        dataclasses.replace(single, mesh=mesh, batch_size=6)
    # parameters and optimizer moments sharded over a "model" axis, batches over "data"
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    both = dataclasses.replace(single, mesh=mesh2, model_axis="model")
    v4, g4 = both.value_and_metagrad(meta, strategy=replay.Replay(k=3, storage=replay.Storage(device_bytes=1)))
    err = max(err, max_relative_error(g1, g4))
    out = replay.advance(both.step, both.init_state(), meta, 0, 5)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(out)
               if "kernel" in jax.tree_util.keystr(path) and leaf.shape[-1] % 2 == 0]
    assert kernels and all(k.sharding.spec[-1] == "model" for k in kernels), [k.sharding for k in kernels]
    assert all(k.addressable_shards[0].data.shape[-1] == k.shape[-1] // 2 for k in kernels)
    with pytest_raises(ValueError):
        dataclasses.replace(single, mesh=mesh, model_axis="model")
    print("RESULT", float(v1), float(v2), err, len(spec.device_set), float(v4))
''')

PREAMBLE = '''
import contextlib
@contextlib.contextmanager
def pytest_raises(kind):
    try:
        yield
    except kind:
        return
    raise AssertionError("expected " + kind.__name__)
'''


def test_sharded_metagradients_equal_single_device():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PREAMBLE + SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    v1, v2, err, ndev, v4 = line.split()[1:]
    assert abs(float(v1) - float(v2)) <= 1e-12 * abs(float(v1))
    assert abs(float(v1) - float(v4)) <= 1e-12 * abs(float(v1))
    assert float(err) < 1e-10
    assert int(ndev) == 4
