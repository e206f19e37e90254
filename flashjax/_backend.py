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
