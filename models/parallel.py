"""Compatibility module: the old home of the multi-device code, kept so that
``from flashjax.models import parallel`` and ``parallel.make_mesh(...)`` etc. keep
working. New code should import from the modules named for each job:

- ``flashjax.mesh`` — device meshes: ``make_mesh``, ``use_mesh``, ``current_mesh``,
  ``batch_size_multiple``, ``batch_sharding``, ``replicated``, ``describe``
  (and the axis names ``AXES``, ``BATCH``);
- ``flashjax.tensor_parallel`` — the kernels under ``jax.shard_map``:
  ``head_sharded``, ``tp_flash_attention``, ``tp_paged_decode_attention``,
  ``page_sharding``;
- ``flashjax.models.sharding`` — the GPT's parameter layouts: ``fsdp_spec``,
  ``tensor_parallel_spec``, ``param_shardings``, ``shard_like``,
  ``allgather_to_host``;
- ``flashjax.models.train`` — ``make_sharded_train_step``.

This module only re-exports those names (the same objects); nothing in the
repository imports it, so it closes no import loop.
"""

from __future__ import annotations

from flashjax.mesh import (
    AXES,
    BATCH,
    batch_sharding,
    batch_size_multiple,
    current_mesh,
    describe,
    make_mesh,
    replicated,
    use_mesh,
)
from flashjax.models.sharding import (
    allgather_to_host,
    fsdp_spec,
    param_shardings,
    shard_like,
    tensor_parallel_spec,
)
from flashjax.models.train import make_sharded_train_step
from flashjax.tensor_parallel import (
    head_sharded,
    page_sharding,
    tp_flash_attention,
    tp_paged_decode_attention,
)

__all__ = [
    "AXES", "BATCH", "make_mesh", "use_mesh", "current_mesh", "batch_size_multiple",
    "batch_sharding", "replicated", "describe",
    "head_sharded", "tp_flash_attention", "tp_paged_decode_attention", "page_sharding",
    "fsdp_spec", "tensor_parallel_spec", "param_shardings", "shard_like", "allgather_to_host",
    "make_sharded_train_step",
]
