"""Datasets as in-memory arrays, and the deterministic batch schedule.

The batch for step ``t`` is a pure function of ``(seed, t)`` (a permutation per
epoch keyed by ``jax.random.fold_in``), so REPLAY can recompute any segment of a
run bit-for-bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset with train / validation / test splits held in memory.

    ``input_range`` is the valid range of input values, ``(lo, hi)`` as scalars or
    as per-feature arrays shaped like one input (used to keep poisoned inputs
    valid); it defaults to the range of each feature seen in the training inputs.
    ``feature_scale`` is each feature's unit (an array shaped like one input), in
    which perturbation budgets are expressed; it defaults to each feature's
    standard deviation over the training inputs.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = "arrays"
    input_range: tuple | None = None
    feature_scale: np.ndarray | None = None

    def __post_init__(self):
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if np.ndim(y) != 1:
                raise ValueError(f"y_{split} must be a 1-D array of integer labels, got shape {np.shape(y)}.")
            if np.shape(x)[0] != np.shape(y)[0]:
                raise ValueError(
                    f"x_{split} has {np.shape(x)[0]} examples but y_{split} has {np.shape(y)[0]}: "
                    "give one label per input."
                )
            if np.shape(x)[0] == 0:
                raise ValueError(f"the {split} split is empty.")
            if not np.issubdtype(np.asarray(y).dtype, np.integer):
                raise ValueError(f"y_{split} must hold integer class labels, got dtype {np.asarray(y).dtype}.")
            if np.min(y) < 0 or np.max(y) >= self.num_classes:
                raise ValueError(
                    f"y_{split} holds labels in [{np.min(y)}, {np.max(y)}] but num_classes={self.num_classes}."
                )
            if not np.all(np.isfinite(x)):
                raise ValueError(f"x_{split} holds NaN or inf values: clean or impute them first.")
        if np.shape(self.x_train)[1:] != np.shape(self.x_val)[1:] or np.shape(self.x_train)[1:] != np.shape(self.x_test)[1:]:
            raise ValueError(
                f"input shapes differ between splits: train {np.shape(self.x_train)[1:]}, "
                f"val {np.shape(self.x_val)[1:]}, test {np.shape(self.x_test)[1:]}."
            )
        if self.input_range is None:
            object.__setattr__(self, "input_range", (np.min(self.x_train, axis=0), np.max(self.x_train, axis=0)))
        if len(self.input_range) != 2:
            raise ValueError(f"input_range must be (lo, hi), got {self.input_range!r}.")
        object.__setattr__(self, "input_range", tuple(self.per_feature(b, "an input_range bound")
                                                      if np.ndim(b) else b for b in self.input_range))
        if self.feature_scale is None:
            object.__setattr__(self, "feature_scale",
                               np.asarray(np.std(np.asarray(self.x_train, np.float64), axis=0), np.float32))
        object.__setattr__(self, "feature_scale", self.per_feature(self.feature_scale, "feature_scale"))
        if np.any(self.feature_scale < 0):
            raise ValueError("feature_scale must be non-negative.")

    def per_feature(self, values, what: str) -> np.ndarray:
        """``values`` shaped like one input (an array of as many values, e.g. after the inputs were reshaped
        with ``dataclasses.replace``, is reshaped)."""
        values = np.asarray(values)
        if values.shape != self.input_shape:
            if values.size != int(np.prod(self.input_shape)):
                raise ValueError(f"{what} has shape {values.shape}: give a number or an array shaped like one "
                                 f"input {self.input_shape}.")
            values = values.reshape(self.input_shape)
        return values

    @property
    def num_train(self) -> int:
        return int(np.shape(self.x_train)[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.x_train)[1:])

    def split(self, name: str):
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use 'train', 'val' or 'test'.")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def astype(self, dtype) -> "Dataset":
        """The same dataset with inputs cast to ``dtype`` (labels stay integer)."""
        if all(np.asarray(x).dtype == np.dtype(dtype) for x in (self.x_train, self.x_val, self.x_test)):
            return self
        cast = lambda x: np.asarray(x, dtype=dtype)  # noqa: E731
        return dataclasses.replace(self, x_train=cast(self.x_train), x_val=cast(self.x_val), x_test=cast(self.x_test))

    def with_train(self, x_train, y_train) -> "Dataset":
        return dataclasses.replace(self, x_train=np.asarray(x_train), y_train=np.asarray(y_train))


def from_arrays(x, y, *, num_classes=None, val_fraction=0.15, test_fraction=0.15, seed=0, name="arrays") -> Dataset:
    """Split in-memory arrays ``x`` (examples first) and integer labels ``y`` at random into three splits."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}.")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1.")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    n_val, n_test = int(round(val_fraction * len(order))), int(round(test_fraction * len(order)))
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    num_classes = int(num_classes if num_classes is not None else y.max() + 1)
    return Dataset(x[train], y[train], x[val], y[val], x[test], y[test], num_classes=num_classes, name=name)


def mnist1d(*, num_val: int = 1000, seed: int = 0, **generator_args) -> Dataset:
    """MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024), generated offline.

    Uses ``mnist1d.data.make_dataset`` (no download): 4,000 training sequences of
    length 40 and 1,000 test ones by default; the last ``num_val`` training
    sequences become the validation split. ``generator_args`` override fields of
    ``mnist1d.data.get_dataset_args()`` (e.g. ``iid_noise_scale``, ``shear_scale``).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in generator_args.items():
        if not hasattr(args, key):
            raise ValueError(f"mnist1d has no generator setting {key!r}; known: {sorted(vars(args))}.")
        setattr(args, key, value)
    args.seed = seed if "seed" not in generator_args else generator_args["seed"]
    raw = make_dataset(args)
    x, y = np.asarray(raw["x"], np.float32), np.asarray(raw["y"], np.int32)
    if not 0 < num_val < len(y):
        raise ValueError(f"num_val must be in (0, {len(y)}), got {num_val}.")
    return Dataset(
        x[:-num_val], y[:-num_val], x[-num_val:], y[-num_val:],
        np.asarray(raw["x_test"], np.float32), np.asarray(raw["y_test"], np.int32),
        num_classes=10, name="mnist1d",
    )


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                       "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def read_idx(path: str) -> np.ndarray:
    """An array from an IDX file (the MNIST family's format), gzipped or not.

    The header is two zero bytes, a type code (``0x08``: unsigned bytes), the
    number of dimensions, then one big-endian 32-bit size per dimension.
    """
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {raw[:4]!r}).")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code {raw[2]:#x}.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values but its header says {shape}: the file is truncated.")
    return data.reshape(shape)


def fashion_mnist(*, num_val: int = 10000, directory: str | None = None, max_train: int | None = None,
                  seed: int = 0) -> Dataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747): 60,000 training and 10,000 test images, 28x28.

    Read from the IDX files of Debian's package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``; no network). Pixels are scaled to
    ``[0, 1]`` (``input_range`` is ``(0, 1)``); inputs are ``(28, 28)`` arrays.
    ``num_val`` training images, drawn at random by ``seed``, become the
    validation split; ``max_train`` keeps only that many of the rest (a slice, e.g. for tests).
    """
    import os

    directory = directory or FASHION_MNIST_DIR
    arrays = {}
    for name, stem in FASHION_MNIST_FILES.items():
        candidates = [os.path.join(directory, stem + ext) for ext in (".gz", "")]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST's {stem}(.gz) is not in {directory}: install Debian's package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass directory= a folder "
                "holding the four IDX files.")
        arrays[name] = read_idx(path)
    x, y = arrays["x_train"], arrays["y_train"].astype(np.int32)
    if not 0 < num_val < len(y):
        raise ValueError(f"num_val must be in (0, {len(y)}), got {num_val}.")
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = order[:num_val], order[num_val:]
    if max_train is not None:
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {max_train}.")
        train = train[:max_train]
    scale = lambda a: (a.astype(np.float32) / 255.0)  # noqa: E731
    return Dataset(scale(x[train]), y[train], scale(x[val]), y[val], scale(arrays["x_test"]),
                   arrays["y_test"].astype(np.int32), num_classes=10, name="fashion_mnist", input_range=(0.0, 1.0))


def from_tfds(name: str, *, data_dir=None, train_split="train", test_split="test", num_val=None,
              image_key="image", label_key="label", max_examples=None, seed=0) -> Dataset:
    """A named dataset through ``tfds.data_source`` (random access, no TensorFlow needed).

    Inputs are scaled to ``[0, 1]`` when stored as uint8. The validation split is
    the last ``num_val`` training examples (default 10%).
    """
    import tensorflow_datasets as tfds

    def load(split):
        source = tfds.data_source(name, split=split, data_dir=data_dir)
        n = len(source) if max_examples is None else min(len(source), max_examples)
        records = [source[i] for i in range(n)]
        xs = np.stack([np.asarray(r[image_key]) for r in records])
        ys = np.asarray([int(r[label_key]) for r in records], np.int32)
        if xs.dtype == np.uint8:
            xs = xs.astype(np.float32) / 255.0
        return xs.astype(np.float32), ys

    builder = tfds.builder(name, data_dir=data_dir)
    num_classes = builder.info.features[label_key].num_classes
    x, y = load(train_split)
    x_test, y_test = load(test_split)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    num_val = num_val if num_val is not None else max(1, len(y) // 10)
    range_ = (0.0, 1.0) if x.max() <= 1.0 and x.min() >= 0.0 else None
    return Dataset(x[:-num_val], y[:-num_val], x[-num_val:], y[-num_val:], x_test, y_test,
                   num_classes=num_classes, name=name, input_range=range_)


def standardized(dataset: Dataset, *, min_scale_fraction: float = 0.1) -> Dataset:
    """Every feature shifted and scaled by the training split's mean and standard deviation (all splits alike).

    A feature's scale is floored at ``min_scale_fraction`` times the median
    feature scale, so a nearly constant feature (a border pixel that is almost
    always 0) is not blown up to values of 30 or more by a tiny deviation.
    ``input_range`` is carried through the same map, so it becomes per-feature
    (e.g. pixels valid in ``[0, 1]`` stay valid exactly there), and
    ``feature_scale`` becomes each standardized feature's standard deviation
    (1, or less where the floor applied).
    For features in unrelated units whose scales differ by more than 10x
    (tabular data), pass ``min_scale_fraction=0``.
    """
    x = np.asarray(dataset.x_train, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.maximum(std, min_scale_fraction * float(np.median(std)))
    std = np.where(std > 0, std, 1.0)
    scale = lambda a: ((np.asarray(a, np.float64) - mean) / std).astype(np.float32)  # noqa: E731
    lo, hi = (np.broadcast_to(np.asarray(bound, np.float64), mean.shape) for bound in dataset.input_range)
    return dataclasses.replace(dataset, x_train=scale(dataset.x_train), x_val=scale(dataset.x_val),
                               x_test=scale(dataset.x_test), input_range=(scale(lo), scale(hi)), feature_scale=None)


DATASET_SPECS = "'mnist1d', 'fashion_mnist', a .npz file (arrays x, y or x_train, y_train, x_test, y_test) or 'tfds:NAME'"


def load_dataset(spec: str, *, standardize: bool = True, seed: int = 0) -> Dataset:
    """The dataset named by ``spec`` (one of :data:`DATASET_SPECS`), split and standardized the same way for every source.

    ``mnist1d`` and ``fashion_mnist`` are built in (offline); an ``.npz`` with
    ``x``, ``y`` is split at random 70/15/15, one with ``x_train``, ``y_train``,
    ``x_test``, ``y_test`` keeps its test split and carves 15% of train for
    validation; ``tfds:NAME`` reads a prepared tfds dataset. With ``standardize``
    every feature is scaled by :func:`standardized`.
    """
    import os

    if spec == "mnist1d":
        dataset = mnist1d(seed=seed)
    elif spec == "fashion_mnist":
        dataset = fashion_mnist(seed=seed)
    elif spec.startswith("tfds:") and len(spec) > len("tfds:"):
        dataset = from_tfds(spec[len("tfds:"):], seed=seed)
    elif spec.endswith(".npz"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no such file {spec!r}: give {DATASET_SPECS}.")
        arrays = np.load(spec)
        name = os.path.splitext(os.path.basename(spec))[0]
        if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays.files):
            x, y = np.asarray(arrays["x_train"], np.float32), np.asarray(arrays["y_train"]).astype(np.int32)
            x_test, y_test = np.asarray(arrays["x_test"], np.float32), np.asarray(arrays["y_test"]).astype(np.int32)
            order = np.random.default_rng(seed).permutation(len(y))
            num_val = max(1, int(round(0.15 * len(y))))
            val, train = order[:num_val], order[num_val:]
            num_classes = int(max(y.max(), y_test.max()) + 1)
            dataset = Dataset(x[train], y[train], x[val], y[val], x_test, y_test, num_classes=num_classes, name=name)
        elif {"x", "y"} <= set(arrays.files):
            dataset = from_arrays(np.asarray(arrays["x"], np.float32), np.asarray(arrays["y"]).astype(np.int32),
                                  seed=seed, name=name)
        else:
            raise ValueError(f"{spec} holds arrays {sorted(arrays.files)}: it needs 'x' and 'y', or 'x_train', "
                             "'y_train', 'x_test' and 'y_test' (integer labels).")
    else:
        raise ValueError(f"unknown dataset {spec!r}: give {DATASET_SPECS}.")
    return standardized(dataset) if standardize else dataset


_FEISTEL_ROUNDS = 4


def _mix(x, k):
    """A 32-bit integer hash (murmur3-style finalizer) of ``x`` under round key ``k``."""
    x = (x ^ k) * jnp.uint32(0x9E3779B1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x85EBCA77)
    return x ^ (x >> 13)


def permuted_index(key, i, n: int):
    """``perm(i)`` for a pseudo-random permutation ``perm`` of ``range(n)`` chosen by ``key``.

    A balanced Feistel network on the smallest even number of bits covering ``n``,
    with cycle walking back into ``[0, n)`` (as in grain's index shuffle): O(1)
    work per index, so a batch costs O(batch) instead of a sort of the whole epoch.
    """
    bits = max(2, int(np.ceil(np.log2(max(n, 2)))))
    bits += bits % 2
    half = bits // 2
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

    def permute(x):
        left, right = x >> half, x & mask
        for r in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (_mix(right, round_keys[r]) & mask)
        return (left << half) | right

    x = permute(jnp.asarray(i, jnp.uint32))
    x = lax.while_loop(lambda x: jnp.any(x >= n), lambda x: jnp.where(x >= n, permute(x), x), x)
    return x.astype(jnp.int32)


def batch_indices(key, t, num_examples: int, batch_size: int):
    """Indices of the batch for step ``t``, a pure function of ``(key, t)``.

    Epoch ``e = t // (n // b)`` visits the examples in the order of a fresh
    permutation keyed by ``fold_in(key, e)``; step ``t`` takes the next ``b`` of
    them (the last ``n mod b`` of each epoch are skipped, as with ``drop_last``).
    """
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples.")
    steps_per_epoch = num_examples // batch_size
    epoch, position = t // steps_per_epoch, t % steps_per_epoch
    slots = position * batch_size + jnp.arange(batch_size)
    return permuted_index(jax.random.fold_in(key, epoch), slots, num_examples)
