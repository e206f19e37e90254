"""Device meshes: the one ``("data", "fsdp", "model")`` mesh every layout uses, and
the mesh that is active while a model is traced.

Axes:

- ``data``: batch split, parameters replicated (data parallel);
- ``fsdp``: batch split *and* every large parameter (and its optimizer state)
  split along its largest divisible dimension, gathered by XLA when used
  (fully sharded data parallel / ZeRO-3);
- ``model``: attention heads (and the KV pool's KV heads) split, and the MLP
  and projection matrices split column-/row-wise (tensor parallel).

``make_mesh`` builds the mesh; ``use_mesh`` makes it the active one (read with
``current_mesh``) so that the attention kernels run per device under
``jax.shard_map`` (see ``flashjax.tensor_parallel``); ``batch_sharding`` and
``replicated`` are the shardings of a batch and of replicated state on it. A mesh
of one device is the same code path, so a single GPU needs nothing special.

Across hosts, call ``jax.distributed.initialize()`` first on every host; then
``jax.devices()`` lists the GPUs of all hosts and ``make_mesh`` spans them.

Where the rest lives: the kernels under ``shard_map`` in ``flashjax.tensor_parallel``,
the GPT's parameter shardings in ``flashjax.models.sharding``, the sharded training
step in ``flashjax.models.train`` (``make_sharded_train_step``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")  # the axes the batch is split over

_MESH: list[Mesh | None] = [None]


def make_mesh(*, data: int | None = None, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over `devices` (default: all of them).

    `data=None` takes whatever the other two leave. Sizes must multiply to the
    device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("model", model)):
        if size < 1:
            raise ValueError(f"mesh axis {name} must be >= 1, got {size}")
    if data is None:
        if n % (fsdp * model):
            raise ValueError(f"fsdp*model = {fsdp * model} does not divide the {n} devices")
        data = n // (fsdp * model)
    if data * fsdp * model != n:
        raise ValueError(f"mesh data*fsdp*model = {data}*{fsdp}*{model} != {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp, model), AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """While active (at trace time), the model's kernels run per device under shard_map."""
    prev = _MESH[0]
    _MESH[0] = mesh
    try:
        yield mesh
    finally:
        _MESH[0] = prev


def current_mesh() -> Mesh | None:
    return _MESH[0]


def batch_size_multiple(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_dim] = BATCH
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> dict[str, Any]:
    return {"devices": int(mesh.size), **{k: int(v) for k, v in mesh.shape.items()},
            "platform": mesh.devices.flat[0].platform}
