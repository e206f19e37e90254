"""flashjax: IO-aware attention for JAX, written in Pallas."""

from flashjax.attention import BlockSizes, flash_attention
from flashjax.reference import attention_reference

__all__ = ["BlockSizes", "flash_attention", "attention_reference"]
__version__ = "0.1.0"
