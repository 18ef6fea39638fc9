"""Learning transfer: move a recorded training trajectory onto a new initialization.

Chijiwa, "Transferring Learning Trajectories of Neural Networks", ICLR 2024.
Given a source trajectory ``theta1_{t_0}, ..., theta1_{t_T}`` and a new
initialization ``theta2_0``, the *learning transfer problem* asks for
``theta2_{t_s}`` without training. The paper's ansatz is

    theta2_{t_s} = theta2_0 + pi_s(theta1_{t_s} - theta1_0)

with ``pi_s`` a permutation of hidden units (the symmetry of the network
function). ``pi_s`` is chosen so that the target's gradients match the
permuted source gradients along the trajectory::

    pi_s = argmin_pi  sum_{i<s} || grad L(theta2_{t_i}) - pi grad L(theta1_{t_i}) ||^2

* :func:`gmt` (gradient matching along the trajectory) recomputes
  every target gradient ``grad L(theta2_{t_i})``, ``i < s``, with the latest
  ``pi_{s-1}`` at every ``s``: ``T (T + 1) / 2`` target gradients.
* :func:`fgmt` (fast GMT) runs on the linearly interpolated
  trajectory and caches each target gradient once it is computed: ``T`` target
  and ``T`` source gradients, linear in ``T``. ``fgmt(..., path="recorded")``
  keeps the caching but matches at the recorded points instead of the straight
  line, at the same cost.

Because ``||pi g||`` does not depend on ``pi``, the problem is
``max_pi sum_i <g2_i, pi g1_i>``; it is solved as in weight matching (Ainsworth
et al., "Git Re-Basin", ICLR 2023): one linear assignment per permutation
(:func:`scipy.optimize.linear_sum_assignment`), alternating over the
permutations until none improves.

A :class:`PermutationSpec` says which axes of which parameters each permutation
acts on. :func:`permutation_spec` derives it from a flax parameter dict of a
sequential network of ``Dense``/``Conv`` layers with optional ``LayerNorm`` /
``BatchNorm`` between them (``metagrad.MLP``, ``metagrad.CNN1D``); any other
model passes its own spec. :func:`check_spec` verifies numerically that a spec
leaves the network function unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from ..progress import progress_bar
from ..trajectory import Trajectory

Path = tuple  # a tuple of dict keys from the root of the parameter pytree to a leaf


class NonFiniteGradientError(ValueError, FloatingPointError):
    """A gradient (or, for the oracle, a displacement) used for matching holds a NaN or inf.

    ``.point`` is the trajectory point, ``.which`` the run (``"source"`` or ``"target"``).
    """

    def __init__(self, message: str, point: int, which: str):
        super().__init__(message)
        self.point = point
        self.which = which


class UnsupportedModelError(ValueError):
    """The permutation symmetry of a model could not be derived; pass a :class:`PermutationSpec`."""


# --------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """Which parameter axes each hidden-unit permutation acts on.

    Attributes:
      perms: a tuple of ``(name, size, axes)``; ``axes`` is a tuple of
        ``(path, axis)`` with ``path`` a tuple of dict keys to a parameter leaf.
        ``pi(theta)`` reorders every listed axis as ``theta[..., perm, ...]``.
        An axis whose length is a multiple ``m * size`` of the permutation size
        is read as a row-major flattening ``(m, size)`` (channels last, as after
        ``x.reshape(batch, -1)`` of a ``(length, channels)`` feature map), and the
        permutation acts on its ``size`` factor.

    Example, a 2-layer MLP ``{"Dense_0": ..., "Dense_1": ...}``::

        PermutationSpec((("P_0", 64, ((("Dense_0", "kernel"), 1), (("Dense_0", "bias"), 0),
                                       (("Dense_1", "kernel"), 0))),))
    """

    perms: tuple

    def __post_init__(self):
        perms = tuple((str(n), int(size), tuple((tuple(p), int(a)) for p, a in axes)) for n, size, axes in self.perms)
        object.__setattr__(self, "perms", perms)
        names = [n for n, _, _ in perms]
        if len(set(names)) != len(names):
            raise ValueError(f"permutation names must be unique, got {names}.")

    @property
    def names(self) -> tuple:
        return tuple(n for n, _, _ in self.perms)

    def size(self, name: str) -> int:
        return {n: s for n, s, _ in self.perms}[name]

    def axes(self, name: str) -> tuple:
        return {n: a for n, _, a in self.perms}[name]

    def validate(self, params) -> None:
        """Raise ``ValueError`` saying what to change when the spec does not fit ``params``."""
        for name, size, axes in self.perms:
            for path, axis in axes:
                leaf = _get(params, path)
                shape = np.shape(leaf)
                if not -len(shape) <= axis < len(shape):
                    raise ValueError(f"permutation {name!r}: axis {axis} out of range for {path} of shape {shape}.")
                if shape[axis] % size:
                    raise ValueError(
                        f"permutation {name!r} of size {size} acts on axis {axis} of {path} (length "
                        f"{shape[axis]}), which is not a multiple of {size}: fix the spec's size or axis.")


def _get(tree, path):
    node = tree
    for key in path:
        if not isinstance(node, dict) and not hasattr(node, "keys"):
            raise ValueError(f"path {path} does not lead to a parameter: {key!r} is below a leaf.")
        if key not in node:
            raise ValueError(f"path {path}: no key {key!r} (have {sorted(node)}); fix the PermutationSpec.")
        node = node[key]
    return node


_NORM_PREFIXES = ("LayerNorm", "BatchNorm", "RMSNorm")


def permutation_spec(params, *, apply_fn: Callable | None = None, x=None) -> PermutationSpec:
    """The hidden-unit permutations of a sequential flax network, from its parameter dict.

    Reads the top-level modules in their call order (flax keeps it): modules with
    a ``kernel`` (``Dense``, ``Conv``; outputs on the last axis, inputs on the one
    before) and normalization modules (``LayerNorm``, ``BatchNorm``, ``RMSNorm``:
    per-feature ``scale``/``bias``) between them. The outputs of every kernel
    layer but the last get one permutation, shared by the layer's bias, the
    following norm layers and the input axis of the next kernel (possibly a
    channels-last flattening of a feature map). Works for ``metagrad.MLP`` and
    ``metagrad.CNN1D``.

    With ``apply_fn(params, x)`` and inputs ``x`` the derived spec is checked by
    :func:`check_spec` (residual connections, attention, grouped norms etc.
    break it). Raises :class:`UnsupportedModelError` naming what is unsupported.
    """
    params = jax.tree.map(lambda a: a, params)  # plain nested dict view (FrozenDict too)
    layers = []  # (module name, kind)
    for name in params:
        sub = params[name]
        if not (isinstance(sub, dict) or hasattr(sub, "keys")):
            raise UnsupportedModelError(
                f"top-level parameter {name!r} is not a module: only sequential networks of Dense/Conv/norm "
                "modules are derived automatically; pass a PermutationSpec for this model.")
        leaves = set(sub)
        if any(isinstance(sub[k], dict) or hasattr(sub[k], "keys") for k in sub):
            raise UnsupportedModelError(
                f"module {name!r} has submodules {sorted(sub)}: nested modules are not derived automatically; "
                "pass a PermutationSpec for this model.")
        if "kernel" in leaves and leaves <= {"kernel", "bias"}:
            if np.ndim(sub["kernel"]) < 2:
                raise UnsupportedModelError(f"module {name!r} has a kernel of rank {np.ndim(sub['kernel'])}.")
            layers.append((name, "kernel"))
        elif name.startswith(_NORM_PREFIXES) and leaves <= {"scale", "bias"}:
            if not layers:
                raise UnsupportedModelError(f"normalization {name!r} comes before any Dense/Conv layer.")
            layers.append((name, "norm"))
        else:
            raise UnsupportedModelError(
                f"module {name!r} with parameters {sorted(leaves)} is not a Dense/Conv/LayerNorm/BatchNorm layer "
                "(GroupNorm, embeddings, attention and custom modules are not derived automatically); "
                "pass a PermutationSpec for this model.")
    kernels = [i for i, (_, kind) in enumerate(layers) if kind == "kernel"]
    if len(kernels) < 2:
        raise UnsupportedModelError("the network has fewer than 2 Dense/Conv layers, so no hidden units to permute.")
    perms = []
    for j, (i, nxt) in enumerate(zip(kernels, kernels[1:])):
        name = layers[i][0]
        kernel = params[name]["kernel"]
        size = int(np.shape(kernel)[-1])
        axes = [((name, "kernel"), np.ndim(kernel) - 1)]
        if "bias" in params[name]:
            axes.append(((name, "bias"), 0))
        for norm, _ in layers[i + 1:nxt]:
            for leaf in params[norm]:
                if np.shape(params[norm][leaf]) != (size,):
                    raise UnsupportedModelError(
                        f"{norm}/{leaf} has shape {np.shape(params[norm][leaf])}, not per-feature ({size},).")
                axes.append(((norm, leaf), 0))
        next_name = layers[nxt][0]
        next_kernel = params[next_name]["kernel"]
        in_axis = np.ndim(next_kernel) - 2
        if np.shape(next_kernel)[in_axis] % size:
            raise UnsupportedModelError(
                f"{next_name}/kernel takes {np.shape(next_kernel)[in_axis]} inputs, not a multiple of the "
                f"{size} outputs of {name}: the layers are not a plain chain; pass a PermutationSpec.")
        axes.append(((next_name, "kernel"), in_axis))
        perms.append((f"P_{j}", size, tuple(axes)))
    spec = PermutationSpec(tuple(perms))
    if apply_fn is not None and x is not None:
        check_spec(spec, apply_fn, params, x)
    return spec


def check_spec(spec: PermutationSpec, apply_fn: Callable, params, x, *, seed: int = 0, rtol: float = 1e-4) -> float:
    """Check that a random permutation under ``spec`` leaves ``apply_fn(params, x)`` unchanged.

    Returns the largest absolute output difference; raises
    :class:`UnsupportedModelError` when it exceeds ``rtol`` times the output scale
    (the model is not symmetric under this spec: write the spec by hand).
    """
    spec.validate(params)
    perms = random_permutation(spec, seed)
    out = np.asarray(apply_fn(params, x))
    out_p = np.asarray(apply_fn(apply_permutation(spec, perms, params), x))
    diff = float(np.max(np.abs(out - out_p)))
    scale = max(float(np.max(np.abs(out))), 1e-6)
    if diff > rtol * scale:
        raise UnsupportedModelError(
            f"permuting hidden units under the derived spec changed the outputs by {diff:.3g} "
            f"(output scale {scale:.3g}): the model has a structure the derivation does not know "
            "(residual connections, grouped norms, ...); pass a PermutationSpec written for it.")
    return diff


# ---------------------------------------------------------------- permutations
def identity_permutation(spec: PermutationSpec) -> dict:
    return {name: jnp.arange(size, dtype=jnp.int32) for name, size, _ in spec.perms}


def random_permutation(spec: PermutationSpec, seed: int = 0) -> dict:
    """Uniformly random permutations (host-side numpy, keyed by ``seed``)."""
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.permutation(size), jnp.int32) for name, size, _ in spec.perms}


def inverse_permutation(perms: dict) -> dict:
    return {name: jnp.argsort(p).astype(jnp.int32) for name, p in perms.items()}


def _permute_axis(x, perm, axis: int, offset: int = 0, xp=jnp):
    """``x`` reordered as ``x[..., perm, ...]`` along ``axis`` (+ ``offset`` leading batch axes)."""
    axis = axis % (x.ndim - offset) + offset
    n, m = perm.shape[0], x.shape[axis]
    if m == n:
        return xp.take(x, perm, axis=axis)
    shape = x.shape
    y = x.reshape(shape[:axis] + (m // n, n) + shape[axis + 1:])
    return xp.take(y, perm, axis=axis + 1).reshape(shape)


def _permute(spec: PermutationSpec, perms: dict, tree, offset: int = 0, skip: str | None = None, xp=jnp):
    tree = _to_mutable(tree)
    for name, _, axes in spec.perms:
        if name == skip:
            continue
        for path, axis in axes:
            parent = tree
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = _permute_axis(parent[path[-1]], perms[name], axis, offset, xp)
    return tree


def _to_mutable(tree):
    if isinstance(tree, dict) or hasattr(tree, "keys"):
        return {k: _to_mutable(tree[k]) for k in tree}
    return tree


@functools.partial(jax.jit, static_argnums=(0,))
def apply_permutation(spec: PermutationSpec, perms: dict, params):
    """``pi(params)``: every axis in ``spec`` reordered by its permutation (jit-compiled).

    ``perms[name][a] = b`` means hidden unit ``a`` of the result is unit ``b`` of
    ``params``. For a network whose symmetry ``spec`` describes, the function
    is unchanged.
    """
    return _permute(spec, perms, params)


def cost_matrix(spec: PermutationSpec, name: str, perms: dict, g1, g2, axes=None) -> np.ndarray:
    """``C[a, b] = sum_i <g2_i[unit a], (pi_{-name} g1_i)[unit b]>`` over every axis of ``name``.

    ``g1``/``g2`` are stacked gradients as numpy arrays (leading axis: trajectory
    points); ``pi_{-name}`` applies every permutation but ``name``. Host-side
    numpy: a few small matrix products, no compilation per stack length.
    ``axes`` restricts the sum to some of ``name``'s axes.
    """
    g1p = g1 if perms is None else _permute(spec, perms, g1, offset=1, skip=name, xp=np)
    n = spec.size(name)
    cost = np.zeros((n, n), np.float64)
    for path, axis in (spec.axes(name) if axes is None else axes):
        a, b = _get(g2, path), _get(g1p, path)
        ax = axis % (a.ndim - 1) + 1
        m = a.shape[ax]

        def units_first(x):
            x = np.moveaxis(x, ax, 0)
            x = x.reshape((m // n, n) + x.shape[1:])
            return np.moveaxis(x, 1, 0).reshape((n, -1))

        cost += np.asarray(_unit_products(units_first(a), units_first(b)), np.float64)
    return cost


@jax.jit
def _unit_products(a, b):
    """``a @ b.T`` by XLA: numpy's OpenBLAS ran these small products 27x slower (0.165 s against 0.006 s
    single-threaded) when its threads competed with other processes on a loaded 2-core machine."""
    return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _unary_start(spec: PermutationSpec, g1, g2, assignment=linear_sum_assignment) -> dict:
    """Each permutation matched on the parameters no other permutation touches (biases, the first layer's
    kernel, the output layer's kernel): a start for the coordinate ascent that does not depend on the others."""
    touched = {}
    for name, _, axes in spec.perms:
        for path, _ in axes:
            touched.setdefault(path, set()).add(name)
    perms = {}
    for name, size, axes in spec.perms:
        own = tuple((path, axis) for path, axis in axes if touched[path] == {name})
        if own:
            _, cols = assignment(cost_matrix(spec, name, None, g1, g2, own), maximize=True)
            perms[name] = cols.astype(np.int32)
        else:
            perms[name] = np.arange(size, dtype=np.int32)
    return perms


def _objective(spec, perms, g1, g2) -> float:
    g1p = _permute(spec, perms, g1, offset=1, xp=np)
    # elementwise, not np.vdot: BLAS threads stall on a loaded machine (see _unit_products)
    return float(sum(np.sum(np.multiply(a, b, dtype=np.float64))
                     for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1p))))


def coordinate_ascent(spec, perms, g1, g2, rng, max_iter, order=None, assignment=linear_sum_assignment):
    """Alternating linear assignments from ``perms`` until a pass changes nothing (modifies a copy).

    ``assignment(cost, maximize=True) -> (rows, cols)`` solves one linear assignment
    (default: scipy's ``linear_sum_assignment``; pass a wrapper to count or time them).

    A permutation already solved against the current values of all the others
    is skipped: its cost matrix is the same, so the assignment would keep it
    (the result is identical to solving again, at no cost).
    """
    perms = dict(perms)
    names = list(spec.names)
    changes = dict.fromkeys(names, 0)  # how often each permutation has changed
    solved_against = {}  # name -> the others' change counts when it was last solved

    def others(name):
        return tuple(changes[other] for other in names if other != name)

    for it in range(max_iter):
        improved = False
        visit = order if (order is not None and it == 0) else rng.permutation(len(names))
        for idx in visit:
            name = names[idx]
            if solved_against.get(name) == others(name):
                continue
            cost = cost_matrix(spec, name, perms, g1, g2)
            rows, cols = assignment(cost, maximize=True)
            old = cost[np.arange(len(cols)), perms[name]].sum()
            new = cost[rows, cols].sum()
            if new > old + 1e-9 * max(abs(old), 1e-30):
                perms[name] = cols.astype(np.int32)
                changes[name] += 1
                improved = True
            solved_against[name] = others(name)
        if not improved:
            break
    return perms


def _unit_norm_per_point(tree):
    def unit(x):
        norms = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=tuple(range(1, x.ndim)), keepdims=True))
        return (x / np.where(norms > 1e-30, norms, 1.0)).astype(x.dtype)

    return jax.tree.map(unit, tree)


def match_gradients(spec: PermutationSpec, g1, g2, *, init: dict | None = None, max_iter: int = 100,
                    seed: int = 0, restarts: int = 2, normalize: bool = False,
                    assignment: Callable = linear_sum_assignment) -> tuple[dict, float]:
    """``argmax_pi sum_i <g2_i, pi g1_i>`` by alternating linear assignments over the permutations.

    ``g1``, ``g2``: gradient pytrees stacked over trajectory points (leading axis).
    Each pass visits the permutations in a random order and solves a linear
    assignment for one of them with the others fixed; stops when a pass changes
    nothing (or after ``max_iter`` passes). This coordinate ascent stops at
    local optima that depend on the visiting order (with 2 hidden layers, a
    first assignment of ``P_1`` made against the identity ``P_0`` can lock
    both in a wrong matching), so it is run from several starts and the best
    objective is kept: from ``init`` (the warm start, if given), from each
    permutation matched on its own parameters alone (:func:`_unary_start`)
    and from the identity, first in layer order and then with
    ``restarts - 1`` random orders each. With ``normalize`` every parameter
    tensor of every point is scaled to unit norm first, so each (point,
    tensor) pair weighs the same (the ``normalized_matching`` option of the
    paper's released code; permutations do not change the norms).
    ``assignment``: the linear-assignment solver (:func:`coordinate_ascent`). Returns
    ``(perms, objective)``. This is the inner problem of GMT/FGMT (Chijiwa,
    ICLR 2024).
    """
    g1, g2 = _to_mutable(jax.tree.map(np.asarray, g1)), _to_mutable(jax.tree.map(np.asarray, g2))
    if normalize:
        g1, g2 = _unit_norm_per_point(g1), _unit_norm_per_point(g2)
    rng = np.random.default_rng(seed)
    starts = [_unary_start(spec, g1, g2, assignment), {k: np.asarray(v) for k, v in identity_permutation(spec).items()}]
    if init is not None:
        starts.insert(0, {k: np.asarray(v) for k, v in init.items()})
    best, best_obj = None, -np.inf
    for start in starts:
        for r in range(max(int(restarts), 1)):
            order = np.arange(len(spec.names)) if r == 0 else None
            perms = coordinate_ascent(spec, start, g1, g2, rng, max_iter, order, assignment)
            obj = _objective(spec, perms, g1, g2)
            if best is None or obj > best_obj + 1e-12 * abs(best_obj):
                best, best_obj = perms, obj
    return {k: jnp.asarray(v, jnp.int32) for k, v in best.items()}, best_obj


# ------------------------------------------------------------------- transfer
def transfer_params(spec: PermutationSpec, perms: dict, source_start, source_t, target_start):
    """``theta2_0 + pi(theta1_t - theta1_0)``: the transferred parameters (jit-compiled pieces)."""
    return _transfer(spec, perms, source_start, source_t, target_start)


@functools.partial(jax.jit, static_argnums=(0,))
def _transfer(spec, perms, source_start, source_t, target_start):
    delta = jax.tree.map(jnp.subtract, source_t, source_start)
    return jax.tree.map(jnp.add, target_start, _permute(spec, perms, delta))


@dataclasses.dataclass
class TransferResult:
    """The output of :func:`gmt`, :func:`fgmt` or :func:`oracle`.

    Attributes:
      params: the transferred final parameters ``theta2_0 + pi_T(theta1_T - theta1_0)``.
      perms: the final permutations ``pi_T``.
      trajectory: the transferred trajectory ``theta2_{t_s} = theta2_0 + pi_s(theta1_{t_s} - theta1_0)``
        on the trajectory the method worked on.
      grad_evals: gradient evaluations used (source + target).
      objective: ``sum_i <g2_i, pi g1_i>`` at each outer step ``s``.
    """

    params: Any
    perms: dict
    trajectory: Trajectory
    grad_evals: int
    objective: list


PAD_MULTIPLE = 8  # stacks are zero-padded to a multiple of this: few compiled shapes, little wasted work


def _stack(trees, length: int | None = None):
    """Stack pytrees (host-side numpy) along a new leading axis, zero-padded to ``length``.

    The padding (to a multiple of ``PAD_MULTIPLE`` in GMT/FGMT) keeps the operand shapes of the jitted products
    in :func:`cost_matrix` to a few, so they compile a few times, not once per ``s``."""
    length = len(trees) if length is None else length

    def stack(*xs):
        xs = [np.asarray(x) for x in xs]
        out = np.zeros((length,) + xs[0].shape, xs[0].dtype)
        out[:len(xs)] = xs
        return out

    return jax.tree.map(stack, *trees)


def _check_like_source(source_start, target_start) -> None:
    """Raise ``ValueError`` saying what differs when ``target_start`` is not shaped like the source's parameters."""
    def shapes(tree):
        return {jax.tree_util.keystr(path): np.shape(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    src, tgt = shapes(source_start), shapes(target_start)
    if src.keys() != tgt.keys():
        missing, extra = sorted(src.keys() - tgt.keys()), sorted(tgt.keys() - src.keys())
        raise ValueError(f"target_start does not have the source's parameters (missing {missing}, extra {extra}): "
                         f"the new initialization must come from the same model as the source trajectory.")
    for key, shape in src.items():
        if tgt[key] != shape:
            raise ValueError(f"target_start{key} has shape {tgt[key]} but the source's has {shape}: the new "
                             f"initialization must come from the same architecture (same widths) as the source.")


def _finite_gradient(grad, point: int, which: str, what: str | None = None):
    """``grad`` unchanged, or :class:`NonFiniteGradientError` naming the point and the first non-finite leaf."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(grad)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            cause = f"the {which} run diverged (lower its learning rate)"
            if what is None:
                what, cause = f"the {which} gradient at trajectory point {point}", cause + " or grad_fn failed there"
            raise NonFiniteGradientError(f"{what}: NaN or inf entries in {jax.tree_util.keystr(path)}; {cause}.",
                                         point, which)
    return grad


def _run_matching(spec, source: Trajectory, target_start, grad_fn, *, recompute: bool, max_iter, seed, progress, desc,
                  normalize=False, assignment=linear_sum_assignment):
    T = len(source) - 1
    _check_like_source(source.initial, target_start)
    spec.validate(target_start)
    theta1_0 = source.initial
    perms = identity_permutation(spec)
    source_grads, target_grads = [], []
    evals = 0
    history, trajectory = [], [target_start]
    for s in progress_bar(range(1, T + 1), desc=desc, disable=not progress):
        theta1 = source.at(s - 1)
        source_grads.append(_finite_gradient(grad_fn(theta1, s - 1), s - 1, "source"))  # never change: cached
        evals += 1
        if recompute:  # GMT: every target point moves with the latest permutation
            target_grads = []
            for i in range(s):
                theta2 = _transfer(spec, perms, theta1_0, source.at(i), target_start)
                target_grads.append(_finite_gradient(grad_fn(theta2, i), i, "target"))
                evals += 1
        else:  # FGMT: only the newest target point, computed once with pi_{s-1}
            theta2 = _transfer(spec, perms, theta1_0, theta1, target_start)
            target_grads.append(_finite_gradient(grad_fn(theta2, s - 1), s - 1, "target"))
            evals += 1
        # zero-padded slots add nothing to the matching objective
        padded = min(T, -(-s // PAD_MULTIPLE) * PAD_MULTIPLE)
        perms, obj = match_gradients(spec, _stack(source_grads, padded), _stack(target_grads, padded), init=perms,
                                     max_iter=max_iter, seed=seed + s, normalize=normalize, assignment=assignment)
        history.append(obj)
        trajectory.append(_transfer(spec, perms, theta1_0, source.at(s), target_start))
    final = trajectory[-1]
    return TransferResult(final, perms, Trajectory.from_list(source.steps, trajectory), evals, history)


def gmt(spec: PermutationSpec, source: Trajectory, target_start, grad_fn: Callable, *, max_iter: int = 100,
        seed: int = 0, progress: bool = False, normalize: bool = False,
        assignment: Callable = linear_sum_assignment) -> TransferResult:
    """Gradient matching along the trajectory (Chijiwa, ICLR 2024).

    For ``s = 1..T``: recompute ``theta2_{t_i} = theta2_0 + pi_{s-1}(theta1_{t_i} - theta1_0)``
    and its gradient for every ``i < s``, then
    ``pi_s = argmin_pi sum_{i<s} ||grad L(theta2_{t_i}) - pi grad L(theta1_{t_i})||^2``.
    Costs ``T`` source and ``T (T + 1) / 2`` target gradient evaluations.

    Args:
      spec: the model's :class:`PermutationSpec`.
      source: the source trajectory ``theta1_{t_0..t_T}``.
      target_start: the new initialization ``theta2_0``.
      grad_fn: ``grad_fn(params, i)``, the loss gradient at trajectory point ``i``
        (use the same minibatch for source and target, e.g. :func:`problem_gradient`).
      assignment: the linear-assignment solver (:func:`coordinate_ascent`; default scipy's).
    """
    return _run_matching(spec, source, target_start, grad_fn, recompute=True, max_iter=max_iter, seed=seed,
                         progress=progress, desc="GMT", normalize=normalize, assignment=assignment)


FGMT_PATHS = ("linear", "recorded")


def fgmt(spec: PermutationSpec, source: Trajectory, target_start, grad_fn: Callable, *, num_points: int | None = None,
         path: str = "linear", max_iter: int = 100, seed: int = 0, progress: bool = False,
         normalize: bool = False, assignment: Callable = linear_sum_assignment) -> TransferResult:
    """Fast GMT (Chijiwa, ICLR 2024): gradient matching with cached target gradients, ``2 T`` evaluations.

    Each target gradient is computed once, at the point the transferred
    trajectory reaches with the permutation current when it is reached, and
    kept: ``2 T`` gradient evaluations in all, linear in ``T``.

    Args:
      path: the source path the gradients are matched along.

        - ``"linear"`` (the paper's FGMT, default): the straight line
          ``theta1_0 + (i / T)(theta1_T - theta1_0)``, ``i = 0..T``
          (``T + 1 = num_points``, default ``len(source)``). Needs only the two
          end points of the source run.
        - ``"recorded"``: the recorded points ``theta1_{t_0..t_T}`` themselves
          (the paper's released code interpolates between saved checkpoints;
          this is its case of one point per segment). Needs every recorded
          point. On MNIST-1D it transfers a plain-SGD run more accurately than
          the straight line, and a momentum-SGD run at LR 0.1 less accurately
          (``BUILD_NOTES.md``). ``num_points`` must be left unset.
      num_points: points of the straight line (``path="linear"`` only).

    The other arguments are :func:`gmt`'s.
    """
    if path == "linear":
        matched = source.linear(num_points)
    elif path == "recorded":
        if num_points is not None and num_points != len(source):
            raise ValueError(f'fgmt(path="recorded") matches at the {len(source)} recorded points; num_points='
                             f'{num_points} applies to path="linear" only (record the source at other steps instead).')
        matched = source
    else:
        raise ValueError(f"path must be one of {FGMT_PATHS}, got {path!r}.")
    return _run_matching(spec, matched, target_start, grad_fn, recompute=False, max_iter=max_iter, seed=seed,
                         progress=progress, desc="FGMT", normalize=normalize, assignment=assignment)


def oracle(spec: PermutationSpec, source: Trajectory, target: Trajectory, grad_fn: Callable | None = None, *,
           match: str = "displacements", max_iter: int = 100, seed: int = 0) -> TransferResult:
    """Permutations from the real target trajectory (a reference for GMT, not a method: it needs the training run).

    ``match="displacements"`` (default) fits the ansatz itself to the trained
    target run, ``pi = argmin_pi sum_{i>=1} ||(theta2_{t_i} - theta2_0) - pi(theta1_{t_i} - theta1_0)||^2``
    (the target-trajectory baseline of the paper's released code matches
    parameter differences in the same way). ``match="gradients"`` instead
    matches ``grad L(theta2_{t_i})`` of the trained target run with
    ``grad L(theta1_{t_i})`` for ``i < T``; once the target run has left the
    ansatz these are gradients at other points than GMT's, so it is not an
    upper reference. Transfers with the result.
    """
    if len(source) != len(target):
        raise ValueError(f"source has {len(source)} points but target {len(target)}: record both at the same steps.")
    _check_like_source(source.initial, target.initial)
    T = len(source) - 1
    if match == "displacements":
        d1 = jax.tree.map(lambda x: x[1:] - x[:1], source.params)
        d2 = jax.tree.map(lambda x: x[1:] - x[:1], target.params)
        for which, d in (("source", d1), ("target", d2)):
            _finite_gradient(d, T, which, f"the {which} trajectory's displacements from its first point")
        perms, obj = match_gradients(spec, d1, d2, max_iter=max_iter, seed=seed)
        evals = 0
    elif match == "gradients":
        if grad_fn is None:
            raise ValueError('oracle(match="gradients") needs grad_fn.')
        g1 = _stack([_finite_gradient(grad_fn(source.at(i), i), i, "source") for i in range(T)])
        g2 = _stack([_finite_gradient(grad_fn(target.at(i), i), i, "target") for i in range(T)])
        perms, obj = match_gradients(spec, g1, g2, max_iter=max_iter, seed=seed)
        evals = 2 * T
    else:
        raise ValueError(f'match must be "displacements" or "gradients", got {match!r}.')
    start = target.initial
    traj = [_transfer(spec, perms, source.initial, source.at(s), start) for s in range(T + 1)]
    return TransferResult(traj[-1], perms, Trajectory.from_list(source.steps, traj), evals, [obj])


def naive_transfer(source: Trajectory, target_start):
    """``theta2_0 + (theta1_T - theta1_0)`` with no permutation (the baseline of the paper)."""
    _check_like_source(source.initial, target_start)
    return jax.tree.map(lambda a, b, c: c + (b - a), source.initial, source.final, target_start)


def problem_gradient(problem, *, batch_size: int | None = 256, seed: int = 0) -> Callable:
    """``grad_fn(params, i)``: gradient of ``problem``'s training loss on minibatch ``i`` (jit-compiled).

    Minibatch ``i`` is a fixed random draw of ``batch_size`` training examples
    keyed by ``(seed, i)``, so source and target gradients at point ``i`` see
    the same data. ``batch_size=None`` (or at least the training set's size)
    takes the whole training set at every point: full-batch gradients, the
    same for every ``i``, which removes minibatch noise from the matching.
    Evaluation mode (no dropout).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of examples or None (full batch), got {batch_size}.")
    n = problem.data.num_train
    train = problem.device_data("train")  # device arrays, passed to the compiled gradient as arguments
    full_batch = batch_size is None or batch_size >= n
    key = jax.random.key(seed)

    @jax.jit
    def grad_fn(params, i, x_all, y_all):
        if full_batch:
            x, y = x_all, y_all
        else:
            idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch_size,), replace=False)
            x, y = x_all[idx], y_all[idx]

        def loss(p):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(problem.logits(p, x), y))

        return jax.grad(loss)(params)

    return lambda params, i: grad_fn(params, jnp.asarray(i, jnp.int32), train["x"], train["y"])


# ------------------------------------------------------- normalization statistics
def reestimate_batch_stats(model, variables: dict, x, **apply_kwargs) -> dict:
    """Recompute a flax model's ``batch_stats`` on inputs ``x`` after transfer.

    Transferred parameters come with no valid running statistics. This runs the
    model in training mode on ``x`` (one batch, all of it) and sets every running
    mean/variance to the statistic of that batch: the update
    ``new = m * old + (1 - m) * batch`` is evaluated at ``old = 0`` and
    ``old = 1`` to recover ``batch`` whatever the momentum ``m``. ``apply_kwargs``
    are passed to ``model.apply`` (default ``train=True``). Models without
    ``batch_stats`` (LayerNorm, none) are returned unchanged.
    """
    if "batch_stats" not in variables:
        return variables
    kwargs = {"train": True, **apply_kwargs}
    stats = variables["batch_stats"]

    def run(fill):
        filled = jax.tree.map(lambda a: jnp.full_like(a, fill), stats)
        _, updated = model.apply({**variables, "batch_stats": filled}, x, mutable=["batch_stats"], **kwargs)
        return updated["batch_stats"]

    at0, at1 = run(0.0), run(1.0)
    # at0 = (1 - m) * batch, at1 = m + (1 - m) * batch  =>  1 - m = 1 - (at1 - at0)
    new = jax.tree.map(lambda a, b: a / (1.0 - (b - a)), at0, at1)
    return {**variables, "batch_stats": new}
