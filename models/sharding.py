"""How the GPT's parameters are laid out over a ``("data", "fsdp", "model")`` mesh
(``flashjax.mesh.make_mesh``).

- ``fsdp_spec``: FSDP / ZeRO-3: split the largest dimension divisible by the
  ``fsdp`` axis (small or indivisible leaves replicate); optimizer moments
  follow the same rule.
- ``tensor_parallel_spec``: Megatron-style, by parameter name: the fused QKV
  and MLP-in matrices (``wqkv``, ``w_in``) split by column, the output
  projections (``wo``, ``w_out``) by row, over the ``model`` axis.
- ``param_shardings``: a NamedSharding for every leaf of a parameter pytree
  (tensor-parallel rule first when asked for, else FSDP); ``shard_like`` puts
  a pytree on them; ``allgather_to_host`` brings a sharded array back as numpy.

Training uses these in ``flashjax.models.train.make_sharded_train_step``;
serving (``flashjax.serving.generate``) with ``tensor_parallel=True``.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


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


def allgather_to_host(x) -> np.ndarray:
    return np.asarray(jax.device_get(jnp.asarray(x)))
