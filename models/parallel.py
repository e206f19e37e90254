"""Several devices with `jax.sharding`: data-parallel + FSDP training and
tensor-parallel attention.

One mesh with three axes serves every layout:

- ``data``: batch split, parameters replicated (data parallel);
- ``fsdp``: batch split *and* every large parameter (and its optimizer state)
  split along its largest divisible dimension, gathered by XLA when used
  (fully sharded data parallel / ZeRO-3);
- ``model``: attention heads (and the KV pool's KV heads) split, and the MLP
  and projection matrices split column-/row-wise (tensor parallel).

XLA's partitioner (GSPMD) places the collectives for the dense layers. The
Pallas kernels cannot be partitioned automatically, so while a mesh is active
(``use_mesh``) the model's attention runs the kernels inside ``jax.shard_map``:
each device attends over its own batch shard and its own heads. A mesh of one
device is the same code path, so a single GPU needs nothing special.

Across hosts, call ``jax.distributed.initialize()`` first on every host; then
``jax.devices()`` lists the GPUs of all hosts and ``make_mesh`` spans them.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
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
    import flashjax

    mesh = current_mesh()
    if mesh is None or mesh.shape["model"] == 1:
        return flashjax.flash_attention(q, k, v, **kw)
    arrays = {n: x for n, x in kw.items() if isinstance(x, (jax.Array, np.ndarray, tuple))}
    static = {n: x for n, x in kw.items() if n not in arrays}
    spec = P(None, None, "model", None)

    def f(q, k, v, arrays):
        return flashjax.flash_attention(q, k, v, **arrays, **static)

    arr_specs = jax.tree.map(lambda _: P(), arrays)
    return jax.shard_map(f, mesh=mesh, in_specs=(spec, spec, spec, arr_specs), out_specs=spec,
                         check_vma=False)(q, k, v, arrays)


def tp_paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, **kw):
    """`flashjax.paged_decode_attention` with query heads and the KV pool's KV heads
    split over the model axis; block tables and lengths (the allocator's view) are
    replicated, so every device reads the same blocks of its own heads."""
    import flashjax

    mesh = current_mesh()
    if mesh is None or mesh.shape["model"] == 1:
        return flashjax.paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, **kw)

    def f(q, kp, vp, t, l):
        return flashjax.paged_decode_attention(q, kp, vp, t, l, **kw)

    qs, ps = P(None, "model", None), P("model", None, None, None)
    return jax.shard_map(f, mesh=mesh, in_specs=(qs, ps, ps, P(), P()), out_specs=qs,
                         check_vma=False)(q, k_pages, v_pages, block_tables, lengths)


def page_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [kv_heads, num_blocks, block_size, head_dim]: split by KV head."""
    return NamedSharding(mesh, P("model", None, None, None))


# --------------------------------------------------------------------------- parameters


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def fsdp_spec(shape, fsdp: int) -> P:
    """Split the largest dimension divisible by `fsdp` (small or indivisible leaves replicate)."""
    if fsdp == 1 or len(shape) == 0 or math.prod(shape) < 1024:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


_COLUMN = re.compile(r"(wqkv|w_in)/(kernel|bias)")
_ROW = re.compile(r"(wo|w_out)/kernel")


def tensor_parallel_spec(name: str, shape, tp: int) -> P:
    """Megatron-style: QKV and MLP-in split by columns, output projections by rows."""
    if tp == 1:
        return P()
    if _COLUMN.search(name) and shape[-1] % tp == 0:
        return P(*([None] * (len(shape) - 1)), "model")
    if _ROW.search(name) and len(shape) == 2 and shape[0] % tp == 0:
        return P("model", None)
    return P()


def param_shardings(params, mesh: Mesh, *, tensor_parallel: bool = False):
    """NamedShardings for a parameter pytree (an nnx.State or any pytree of arrays)."""
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["model"]

    def one(path, x):
        shape = tuple(x.shape)
        spec = tensor_parallel_spec(_path_name(path), shape, tp) if tensor_parallel else P()
        if spec == P():
            spec = fsdp_spec(shape, fsdp)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_dim] = BATCH
    return NamedSharding(mesh, P(*spec))


# --------------------------------------------------------------------------- training


def make_sharded_train_step(graphdef, tx, mesh: Mesh, params, *, donate: bool = True):
    """(step, params, opt_state) for training over `mesh`.

    `step(params, opt_state, x, y)` takes x, y int32 [grad_accum, micro_batch,
    seq] with micro_batch divisible by data*fsdp; parameters and optimizer state
    stay sharded (FSDP over the "fsdp" axis); the flash kernels run per device.
    """
    from flashjax.models.train import train_step_fn

    ps = param_shardings(params, mesh)
    params = shard_like(params, ps)
    # Optimizer moments follow the same shape rule as the parameters; scalars replicate.
    fsdp = mesh.shape["fsdp"]
    os_ = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)),
                       jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=os_)(params)
    raw = train_step_fn(graphdef, tx)
    data = batch_sharding(mesh, 3, 1)

    def step(params, opt_state, x, y):
        with use_mesh(mesh):
            return raw(params, opt_state, x, y)

    jitted = jax.jit(step, in_shardings=(ps, os_, data, data), out_shardings=(ps, os_, None),
                     donate_argnums=(0, 1) if donate else ())
    return jitted, params, opt_state


def describe(mesh: Mesh) -> dict[str, Any]:
    return {"devices": int(mesh.size), **{k: int(v) for k, v in mesh.shape.items()},
            "platform": mesh.devices.flat[0].platform}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def allgather_to_host(x) -> np.ndarray:
    return np.asarray(jax.device_get(jnp.asarray(x)))
