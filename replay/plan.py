"""Checkpointing plans: which states to store, recompute and free, in plain Python.

A plan is a sequence of operations over integer step indices. Executing it
(:func:`replay.strategies.execute`, with the compiled pieces of
:mod:`replay.compiled`) yields the reverse-mode metagradient of a training run
``state_{t+1} = step(state_t, meta, t)``, ``t = 0 .. T-1``.

Operations (each a small tuple):

* ``Advance(src, dst)``: recompute ``state_dst`` from the stored ``state_src`` and
  store it (``dst - src`` forward steps).
* ``Objective(t)``: evaluate the metaobjective on the stored ``state_t`` (``t == T``)
  and seed the reverse pass with its cotangent.
* ``Backprop(start, stop)``: a *leaf*: from the stored ``state_start`` recompute the
  states ``start .. stop-1``, then pull the running cotangent back through steps
  ``stop-1, ..., start`` (in that order).  The leaf keeps ``stop - start`` states
  alive while it runs.
* ``Free(t)``: drop the stored ``state_t``.

:func:`kary_plan` is the lazy k-ary tree of REPLAY (Engstrom, Ilyas, Chen, Feldmann,
Moses, Madry, "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751,
Sec. 3): one forward pass keeps ``k`` evenly spaced states; the reverse traversal
splits the last unprocessed segment into ``k`` children, recomputes their starting
states from the parent's, and recurses into them from the last to the first.  At
most ``1 + (k - 1) * depth + leaf_size`` states are alive, with
``depth = ceil(log_k(T / leaf_size))``, and about ``T * depth * (k - 1) / k``
steps are recomputed on top of the first forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, NamedTuple, Union


class Advance(NamedTuple):
    src: int
    dst: int


class Objective(NamedTuple):
    t: int


class Backprop(NamedTuple):
    start: int
    stop: int


class Free(NamedTuple):
    t: int


Op = Union[Advance, Objective, Backprop, Free]


def _check(num_steps: int, k: int, leaf_size: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}: a run needs at least one step.")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}: REPLAY splits each segment into k children (use k=2 for the least memory).")
    if not isinstance(leaf_size, int) or leaf_size < 1:
        raise ValueError(f"leaf_size must be an integer >= 1, got {leaf_size!r}.")


def split_points(start: int, stop: int, parts: int) -> list[int]:
    """Boundaries ``start = c_0 < c_1 < ... < c_m = stop`` of ``m = min(parts, stop - start)`` near-equal chunks."""
    n = stop - start
    m = min(parts, n)
    return [start + (j * n) // m for j in range(m + 1)]


def kary_plan(num_steps: int, k: int, leaf_size: int = 1) -> Iterator[Op]:
    """Yield REPLAY's lazy k-ary traversal for a run of ``num_steps`` steps.

    ``state_0`` is assumed stored before the plan starts and is never freed by it.
    Segments of at most ``leaf_size`` steps are handled by one ``Backprop`` leaf.
    """
    _check(num_steps, k, leaf_size)
    # First forward pass: keep the k evenly spaced top-level states, reach T.
    top = split_points(0, num_steps, k)
    for src, dst in zip(top[:-1], top[1:]):
        yield Advance(src, dst)
    yield Objective(num_steps)
    yield Free(num_steps)
    yield from _reverse_children(top, k, leaf_size)


def _reverse_children(bounds: list[int], k: int, leaf_size: int) -> Iterator[Op]:
    # bounds[j] are stored for j < len(bounds) - 1; process chunks last to first.
    for j in range(len(bounds) - 2, -1, -1):
        yield from _segment(bounds[j], bounds[j + 1], k, leaf_size)
        if j > 0:
            yield Free(bounds[j])


def _segment(start: int, stop: int, k: int, leaf_size: int) -> Iterator[Op]:
    """Reverse through ``[start, stop)`` given the stored ``state_start`` (left stored)."""
    if stop - start <= leaf_size:
        yield Backprop(start, stop)
        return
    bounds = split_points(start, stop, k)
    for src, dst in zip(bounds[:-2], bounds[1:-1]):
        yield Advance(src, dst)
    yield from _reverse_children(bounds, k, leaf_size)


def tree_depth(num_steps: int, k: int, leaf_size: int = 1) -> int:
    """Number of splitting levels before every segment has at most ``leaf_size`` steps."""
    _check(num_steps, k, leaf_size)
    depth, longest = 0, num_steps
    while longest > leaf_size:
        longest = math.ceil(longest / k)
        depth += 1
    return depth


def live_state_bound(num_steps: int, k: int, leaf_size: int = 1) -> int:
    """Upper bound on states alive at once under :func:`kary_plan`, ``state_0`` included."""
    depth = tree_depth(num_steps, k, leaf_size)
    # state_0, k - 1 children per level, the leaf's own states (or state_T at the top).
    return 1 + (k - 1) * max(depth, 1) + max(leaf_size, 1)


@dataclasses.dataclass(frozen=True)
class PlanStats:
    """What a plan costs: steps recomputed forward, step VJPs, peak live states."""

    forward_steps: int  # steps advanced by Advance ops (the first forward pass included)
    leaf_steps: int  # steps recomputed inside leaves (equal to the VJPs taken)
    peak_live_states: int
    num_ops: int

    @property
    def total_step_evaluations(self) -> int:
        return self.forward_steps + self.leaf_steps


def leaf_buffer_states(op: Backprop, leaf_size: int | None) -> int:
    """States a leaf holds on top of the stored ones while it runs.

    The compiled leaf stacks a buffer of ``leaf_size`` states (padded), except for
    ``leaf_size == 1`` which uses the stored state directly; with ``leaf_size=None``
    only the states the leaf really needs (``stop - start - 1``) are counted.
    """
    if leaf_size is None:
        return op.stop - op.start - 1
    return 0 if leaf_size == 1 else leaf_size


def simulate(plan, num_steps: int, leaf_size: int | None = None) -> tuple[PlanStats, list[int]]:
    """Run a plan symbolically; check it is valid; return its cost and the VJP order.

    ``leaf_size`` counts each leaf's stacked buffer as the compiled executor holds it.

    Raises ``AssertionError`` when an op reads a state that is not stored, a VJP is
    taken out of order, or a state is stored twice.
    """
    stored = {0}
    vjp_order: list[int] = []
    seeded = False
    forward = leaf = ops = 0
    peak = 1
    for op in plan:
        ops += 1
        if isinstance(op, Advance):
            assert op.src in stored, f"{op}: state {op.src} is not stored"
            assert op.dst not in stored, f"{op}: state {op.dst} is already stored"
            assert op.src < op.dst <= num_steps, op
            forward += op.dst - op.src
            stored.add(op.dst)
            peak = max(peak, len(stored))
        elif isinstance(op, Objective):
            assert op.t == num_steps and op.t in stored and not seeded, op
            seeded = True
        elif isinstance(op, Backprop):
            assert seeded, f"{op} before the objective seeded the reverse pass"
            assert op.start in stored, f"{op}: state {op.start} is not stored"
            expected_stop = vjp_order[-1] if vjp_order else num_steps
            assert op.stop == expected_stop, f"{op}: the reverse pass is at step {expected_stop}"
            leaf += op.stop - op.start
            peak = max(peak, len(stored) + leaf_buffer_states(op, leaf_size))
            vjp_order.extend(range(op.stop - 1, op.start - 1, -1))
        elif isinstance(op, Free):
            assert op.t in stored and op.t != 0, f"{op}: cannot free"
            stored.remove(op.t)
        else:
            raise AssertionError(f"unknown op {op!r}")
    return PlanStats(forward, leaf, peak, ops), vjp_order


def binomial(c: int, r: int) -> int:
    """``beta(c, r) = C(c + r, c)``: the most blocks ``c`` checkpoints reverse with ``r`` repetitions (Griewank)."""
    return math.comb(c + r, c)


def binomial_plan(num_steps: int, checkpoints: int, leaf_size: int = 1) -> Iterator[Op]:
    """Yield a binomial (revolve-optimal) checkpointing plan with ``checkpoints`` stored states.

    Griewank, "Achieving logarithmic growth of temporal and spatial complexity in
    reverse automatic differentiation" (1992); Griewank & Walther, "Algorithm 799:
    revolve" (ACM TOMS 2000). The run is cut into blocks of ``leaf_size`` steps
    (each reversed by one ``Backprop`` leaf); with ``c`` checkpoints and ``n``
    blocks, the first checkpoint goes ``m = max(n - beta(c-1, r), beta(c, r-2))``
    blocks in (clipped to ``[1, n-1]``), where ``r`` is the least repetition
    number with ``beta(c, r) >= n``; the part
    right of it is reversed with ``c - 1`` checkpoints, then the left part with
    ``c``. This minimizes the recomputed steps for the memory, so at equal
    memory it recomputes fewer steps than the k-ary tree.
    At most ``2 + checkpoints + leaf_size`` states are alive (``state_0``,
    the checkpoints, ``state_T`` or a leaf's buffer).
    """
    _check(num_steps, 2, leaf_size)
    if not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be an integer >= 1, got {checkpoints!r}.")
    bounds = list(range(0, num_steps, leaf_size)) + [num_steps]
    num_blocks = len(bounds) - 1

    def segment(i0: int, i1: int, c: int) -> Iterator[Op]:
        # The left part is handled by the loop (same c), the right part by recursion (c - 1): depth <= c.
        while i1 - i0 > 1:
            n = i1 - i0
            r = 0
            while binomial(c, r) < n:
                r += 1
            m = min(n - 1, max(1, n - binomial(c - 1, r), binomial(c, r - 2) if r >= 2 else 1))
            yield Advance(bounds[i0], bounds[i0 + m])
            yield from segment(i0 + m, i1, c - 1)
            yield Free(bounds[i0 + m])
            i1 = i0 + m
        if i1 == num_blocks:  # the rightmost block: finish the forward pass and seed the reverse pass
            yield Advance(bounds[i0], num_steps)
            yield Objective(num_steps)
            yield Free(num_steps)
        yield Backprop(bounds[i0], bounds[i1])

    yield from segment(0, num_blocks, min(checkpoints, max(num_blocks - 1, 1)))
