"""flashjax: IO-aware attention for JAX, written in Pallas."""

from flashjax.attention import BlockSizes, flash_attention
from flashjax.reference import attention_reference
from flashjax.decode import DecodeConfig, decode_attention, paged_decode_attention
from flashjax import kv_cache

__all__ = ["BlockSizes", "flash_attention", "attention_reference", "DecodeConfig",
           "decode_attention", "paged_decode_attention", "kv_cache"]
__version__ = "0.1.0"
