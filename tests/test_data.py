"""Datasets and the deterministic batch schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg
from metagrad.data import batch_indices, permuted_index


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch():
    key = jax.random.key(7)
    n, b = 50, 8
    steps_per_epoch = n // b
    epoch0 = np.concatenate([np.asarray(batch_indices(key, t, n, b)) for t in range(steps_per_epoch)])
    assert len(set(epoch0.tolist())) == steps_per_epoch * b  # no repeats within an epoch
    again = np.asarray(jax.jit(batch_indices, static_argnums=(2, 3))(key, 3, n, b))
    np.testing.assert_array_equal(again, np.asarray(batch_indices(key, 3, n, b)))
    epoch1 = np.concatenate([np.asarray(batch_indices(key, t, n, b)) for t in range(steps_per_epoch, 2 * steps_per_epoch)])
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch


@pytest.mark.parametrize("n", [1, 2, 3, 31, 64, 1000, 4097])
def test_permuted_index_is_a_bijection(n):
    perm = np.asarray(permuted_index(jax.random.key(n), jnp.arange(n), n))
    assert sorted(perm.tolist()) == list(range(n))


def test_mnist1d_is_generated_offline():
    data = mg.mnist1d(num_val=500)
    assert data.x_train.shape == (3500, 40) and data.x_val.shape == (500, 40) and data.x_test.shape == (1000, 40)
    assert data.num_classes == 10 and set(np.unique(data.y_train)) == set(range(10))
    noisy = mg.mnist1d(num_val=500, iid_noise_scale=0.5)
    assert not np.allclose(noisy.x_train, data.x_train)
    with pytest.raises(ValueError, match="no generator setting"):
        mg.mnist1d(not_a_setting=1)


def test_from_arrays_splits_in_memory_data():
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    data = mg.from_arrays(x, y, val_fraction=0.1, test_fraction=0.2)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (140, 20, 40)
    assert data.num_classes == 2
    all_x = np.concatenate([data.x_train, data.x_val, data.x_test])
    assert sorted(map(tuple, all_x.tolist())) == sorted(map(tuple, x.tolist()))


def test_named_datasets_through_tfds_data_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        data = mg.from_tfds("mnist", num_val=8)
    assert data.x_train.shape == (32, 28, 28, 1) and data.x_test.shape == (40, 28, 28, 1)
    assert data.num_classes == 10 and data.input_range == (0.0, 1.0)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_read_idx_round_trips_and_rejects_a_truncated_file(tmp_path):
    import gzip

    import pytest

    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in values.shape)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(header + values.tobytes())
    np.testing.assert_array_equal(mg.read_idx(str(tmp_path / "a.gz")), values)
    (tmp_path / "b").write_bytes(header + values.tobytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        mg.read_idx(str(tmp_path / "b"))


def test_fashion_mnist_from_the_debian_package():
    import pytest

    data = mg.fashion_mnist(max_train=300)
    assert data.num_train == 300 and data.input_shape == (28, 28) and data.x_test.shape == (10000, 28, 28)
    assert len(data.y_val) == 10000 and data.input_range == (0.0, 1.0)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0 and data.x_train.max() > 0.9
    assert set(np.unique(data.y_test)) == set(range(10))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        mg.fashion_mnist(directory="/nonexistent")
