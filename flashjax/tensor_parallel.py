"""The attention kernels under ``jax.shard_map``, split over the active mesh.

XLA's partitioner (GSPMD) places the collectives for the dense layers, but it
cannot partition a Pallas kernel. So while a mesh is active
(``flashjax.mesh.use_mesh``) these wrappers run the kernels inside
``jax.shard_map``, each device on its own heads (the mesh's ``model`` axis) and,
for training, its own batch shard (``data`` x ``fsdp``). With no mesh, or a
mesh of one device, they call the kernel directly.

- ``head_sharded(fn)``: any ``fn(q, k, v) -> o`` on [batch, seq, heads, dim]
  (the model's causal attention runs through it);
- ``tp_flash_attention``: ``flashjax.flash_attention`` with heads split, batch
  whole (serving prefill);
- ``tp_paged_decode_attention``: ``flashjax.paged_decode_attention`` with query
  heads and the KV pool's KV heads split (serving decode);
- ``page_sharding``: the KV pool's sharding that goes with it.

Kernels only: no model code here (the GPT's parameter shardings are in
``flashjax.models.sharding``).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flashjax.attention import flash_attention
from flashjax.decode import paged_decode_attention
from flashjax.mesh import BATCH, current_mesh


def head_sharded(fn: Callable, *, batch_axis: bool = True) -> Callable:
    """Wrap an attention kernel `fn(q, k, v) -> o` ([batch, seq, heads, dim]) so that,
    under an active mesh, it runs per device on its batch shard and its heads."""

    def wrapped(q, k, v):
        mesh = current_mesh()
        if mesh is None or mesh.size == 1:
            return fn(q, k, v)
        tp = mesh.shape["model"]
        for name, x in (("query", q), ("key/value", k)):
            if x.shape[2] % tp:
                raise ValueError(f"{name} heads ({x.shape[2]}) must be divisible by the mesh's model axis ({tp})")
        spec = P(BATCH if batch_axis else None, None, "model", None)
        return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q, k, v)

    return wrapped


def tp_flash_attention(q, k, v, **kw):
    """`flashjax.flash_attention` with heads split over the mesh's model axis (serving:
    the batch is not split); any per-batch keyword arrays are replicated."""
    mesh = current_mesh()
    if mesh is None or mesh.shape["model"] == 1:
        return flash_attention(q, k, v, **kw)
    arrays = {n: x for n, x in kw.items() if isinstance(x, (jax.Array, np.ndarray, tuple))}
    static = {n: x for n, x in kw.items() if n not in arrays}
    spec = P(None, None, "model", None)

    def f(q, k, v, arrays):
        return flash_attention(q, k, v, **arrays, **static)

    arr_specs = jax.tree.map(lambda _: P(), arrays)
    return jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec, arr_specs), out_specs=spec,
                         check_vma=False)(q, k, v, arrays)


def tp_paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None,
                              v_scales=None, **kw):
    """`flashjax.paged_decode_attention` with query heads and the KV pool's KV heads
    split over the model axis; block tables and lengths (the allocator's view) are
    replicated, so every device reads the same blocks of its own heads. An FP8
    pool's k_scales / v_scales are split by KV head like its pages."""
    mesh = current_mesh()
    if mesh is None or mesh.shape["model"] == 1:
        return paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, k_scales=k_scales,
                                      v_scales=v_scales, **kw)

    def f(q, kp, vp, t, l, scales):
        ks, vs = scales if scales is not None else (None, None)
        return paged_decode_attention(q, kp, vp, t, l, k_scales=ks, v_scales=vs, **kw)

    scales = None if k_scales is None else (k_scales, v_scales)
    qs, ps, ss = P(None, "model", None), P("model", None, None, None), P("model", None, None)
    scale_specs = None if scales is None else (ss, ss)
    return jax.shard_map(f, mesh=mesh, in_specs=(qs, ps, ps, P(), P(), scale_specs), out_specs=qs,
                         check_vma=False)(q, k_pages, v_pages, block_tables, lengths, scales)


def page_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """KV pages [kv_heads, num_blocks, block_size, head_dim] (and, ndim=3, an FP8
    pool's scales [kv_heads, num_blocks, block_size]): split by KV head."""
    return NamedSharding(mesh, P("model", *([None] * (ndim - 1))))
