"""Where kernels run: compiled on a CUDA GPU, Pallas interpret mode elsewhere."""

from __future__ import annotations

import functools

import jax


def default_backend() -> str:
    return jax.default_backend()


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret=None` means: compile on GPU, interpret (on the CPU) otherwise."""
    if interpret is None:
        return not on_gpu()
    return bool(interpret)


@functools.cache
def gpu_name() -> str:
    dev = jax.devices()[0]
    return getattr(dev, "device_kind", str(dev))


@functools.cache
def num_multiprocessors() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM); 1 on CPU."""
    if not on_gpu():
        return 1
    dev = jax.devices()[0]
    count = getattr(dev, "core_count", None)
    if count:
        return int(count)
    return 132


@functools.cache
def compute_capability() -> str | None:
    """"9.0" on an H100/H200; None when the default backend is not a CUDA GPU."""
    if not on_gpu():
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if cc is None else str(cc)


def varying_axes(*xs) -> frozenset:
    """The manual mesh axes (inside `jax.shard_map`) that any of xs varies over; empty
    outside shard_map."""
    axes = frozenset()
    for x in xs:
        mat = getattr(jax.typeof(x), "manual_axis_type", None)
        if mat is not None:
            axes |= frozenset(mat.varying)
    return axes


def vary_over(x, axes: frozenset):
    """x, made to vary over `axes` too (`lax.pcast`); x itself when it already does."""
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def out_types(out_shape, inputs) -> list:
    """A kernel's output types, varying over every manual axis an input varies over.

    Inside `jax.shard_map(check_vma=True)` (its default) Pallas needs each output's
    `manual_axis_type`; elsewhere the field is ignored, so the kernel is unchanged."""
    mat = jax.sharding.ManualAxisType(varying=varying_axes(*inputs))
    return [jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat) for s in out_shape]
