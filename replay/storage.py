"""Where REPLAY's stored states live: device memory, host memory, or disk (orbax).

A :class:`Storage` is a value passed to a strategy; at run time it measures the
state's size from the pytree and turns its byte budgets into slots. States are
put on the device first; when the device slots are full the state needed
*last* (the lowest step index: the reverse pass walks from high to low) moves
to host memory, and from there to disk. Moving states keeps their values bit
for bit (and their shardings, restored on the way back), so every tier gives
the same exact metagradient.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax
import numpy as np

from .trees import tree_bytes


@dataclasses.dataclass(frozen=True)
class Storage:
    """Byte budgets of the tiers for stored states.

    Args:
      device_bytes: states held on the accelerator (``None``: no limit).
      host_bytes: states held in host memory once the device is full (``None``: no limit).
      directory: where states go once host memory is full (orbax checkpoints,
        removed as they are freed); ``None`` makes a temporary folder when needed.
    """

    device_bytes: int | None = None
    host_bytes: int | None = None
    directory: str | None = None

    def open(self, example_state) -> "TieredStore":
        size = max(tree_bytes(example_state), 1)
        slots = lambda budget: None if budget is None else budget // size  # noqa: E731
        return TieredStore(slots(self.device_bytes), slots(self.host_bytes), self.directory)


class TieredStore:
    """A mapping ``step -> state`` that spills the earliest-needed-last states to slower tiers."""

    def __init__(self, device_slots: int | None = None, host_slots: int | None = None, directory: str | None = None):
        self.device_slots, self.host_slots = device_slots, host_slots
        self._device: dict[int, object] = {}
        self._host: dict[int, tuple] = {}
        self._disk: dict[int, object] = {}  # step -> abstract state (shapes, dtypes, shardings)
        self._directory = directory
        self._owns_directory = False
        self._checkpointer = None

    def __len__(self):
        return len(self._device) + len(self._host) + len(self._disk)

    def tier_of(self, t: int) -> str:
        return "device" if t in self._device else "host" if t in self._host else "disk" if t in self._disk else "none"

    def __setitem__(self, t: int, state) -> None:
        self._device[t] = state
        if self.device_slots is not None and len(self._device) > self.device_slots:
            oldest = min(self._device)
            self._to_host(oldest, self._device.pop(oldest))

    def __getitem__(self, t: int):
        if t in self._device:
            return self._device[t]
        if t in self._host:
            leaves, treedef, shardings = self._host[t]
            return jax.tree.unflatten(treedef, [jax.device_put(x, s) for x, s in zip(leaves, shardings)])
        if t in self._disk:
            return self._checkpointer.restore(self._path(t), self._disk[t])
        raise KeyError(t)

    def __delitem__(self, t: int) -> None:
        if t in self._device:
            del self._device[t]
        elif t in self._host:
            del self._host[t]
        elif t in self._disk:
            del self._disk[t]
            shutil.rmtree(self._path(t), ignore_errors=True)
        else:
            raise KeyError(t)

    def _to_host(self, t, state):
        leaves, treedef = jax.tree.flatten(state)
        shardings = [getattr(x, "sharding", None) for x in leaves]
        self._host[t] = ([np.asarray(jax.device_get(x)) for x in leaves], treedef, shardings)
        if self.host_slots is not None and len(self._host) > self.host_slots:
            oldest = min(self._host)
            self._to_disk(oldest, self[oldest])
            del self._host[oldest]

    def _path(self, t: int) -> str:
        return os.path.join(self._directory, f"state_{t}")

    def _to_disk(self, t, state):
        import orbax.checkpoint as ocp

        if self._checkpointer is None:
            if self._directory is None:
                self._directory = tempfile.mkdtemp(prefix="replay_states_")
                self._owns_directory = True
            os.makedirs(self._directory, exist_ok=True)
            self._checkpointer = ocp.StandardCheckpointer()
        path = self._path(t)
        shutil.rmtree(path, ignore_errors=True)
        self._checkpointer.save(path, state)
        self._checkpointer.wait_until_finished()
        self._disk[t] = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def close(self):
        for t in list(self._disk):
            del self[t]
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._owns_directory:
            shutil.rmtree(self._directory, ignore_errors=True)
