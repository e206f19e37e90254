"""Flash-Decoding: one query token per sequence against a (paged) KV cache.

Two entry points share one Pallas kernel body:

* `paged_decode_attention(q, k_pages, v_pages, block_tables, lengths)` reads
  keys/values through a block table (the layout of `flashjax.kv_cache`):

      q             [batch, heads, head_dim]
      k_pages       [kv_heads, num_blocks, block_size, head_dim]
      v_pages       [kv_heads, num_blocks, block_size, head_dim]
      block_tables  int32 [batch, max_blocks]  (page ids; entries past a
                    sequence's length are never dereferenced, may be garbage)
      lengths       int32 [batch]              (0 <= length <= max_blocks*block_size)

* `decode_attention(q, k, v, lengths)` reads a dense cache, by default
  `k, v [batch, kv_len, kv_heads, head_dim]` (`kv_layout="bshd"`, the layout of
  `flash_attention` and of a model's dense cache) or
  `[batch, kv_heads, kv_len, head_dim]` (`kv_layout="bhsd"`).

The kernel only differs in how the address of a KV tile is computed, so the
two measure what paging costs.

FP8 cache. Both entry points also read a cache stored in `float8_e4m3fn`
with one float32 scale per token and KV head (`k_scales`, `v_scales`: the
pages' / cache's shape without head_dim; the layout of `flashjax.kv_cache`'s
FP8 pool, written by `kv_cache.write_kv_fp8`): a token's vector is
stored * scale. The kernel loads each tile in FP8 (half the bytes of bf16) and
converts it to q's dtype for the dots; the scales never touch the tile: a
key's scale multiplies its column of scores and a value's scale its column of
probabilities before P @ V (for float16 q the value tile itself is scaled,
so that unified-max probabilities times scale cannot overflow float16).
`DecodeConfig(fp8_dot="f16")` instead converts the tiles to float16 (one packed
PTX conversion per two values on sm_89+) and runs both dots in float16 with q
and the weights normalised per row (see the field).
Default tiles count FP8 bytes, so an FP8 tile holds twice the tokens of a
bf16 one (`DecodeConfig.tile_bytes`).

Algorithm (Flash-Decoding). The grid is (batch, kv_heads, num_splits). A
program owns all query heads of one KV head (GQA/MQA: the group is padded to
a [>=16, head_dim] q tile so each KV tile is read once and feeds a tensor-core
dot), and one contiguous chunk of the sequence's KV tiles: the tiles of a
sequence (its own length, not the batch maximum) are split evenly over the
`num_splits` programs. Each program runs an online softmax over its tiles
(full tiles unmasked, the one partial tile at the end of a sequence masked)
and writes its normalised partial output and log-sum-exp (base 2) in float32;
a second small Pallas kernel (one program per query head) merges the splits
with the log-sum-exp weights and writes the output in q's dtype, so a decode
call is two kernel launches. In the paged kernel, a program with few tiles
and no other program on its SM loads all of its page ids at once
(`DecodeConfig.preload`), so no K/V load inside its loop waits on a page-table
read.

Configuration. How the kernels run (tile addressing, page-id preload, split
merge, unified-max fallback, splits, warps, stages, default tile sizes) is one
frozen `DecodeConfig`, passed as `config=`; None means the documented defaults,
each field says what it does and why it defaults as it does.

`unified_max=phi` (FlashDecoding++): exponentials use the fixed maximum phi
instead of a running maximum, so the inner loop never rescales the
accumulator. Each program also tracks the true row maximum; if any score of
the split lies outside [phi + lo, phi + hi] (where exp could overflow or
underflow the accumulation dtype) the program recomputes its split with the
online softmax, so the result is exact in all cases.

Masking guarantees: keys at positions >= length are never used, and neither
block-table entries past the length nor pages they would name are read in
full tiles; in the final partial tile out-of-range page ids are replaced by a
valid id and the values are discarded by `where`, so NaN/Inf garbage in
unused pages or past the end of a partial page cannot leak into the result.
A sequence of length 0 gives zeros (and lse = -inf).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flashjax import _backend
from flashjax._attention_common import LN2, LOG2E

__all__ = [
    "DecodeConfig",
    "paged_decode_attention",
    "decode_attention",
    "decode_reference",
    "choose_num_splits",
    "SUPPORTED_HEAD_DIMS",
]

FP8 = jnp.dtype(jnp.float8_e4m3fn)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

# Window (in natural-log units, relative to phi) inside which the unified-max
# path is exact for the accumulation dtype of P @ V; outside it, the split is
# recomputed with the online softmax.
_UNIFIED_WINDOW = {
    jnp.dtype(jnp.float16): (-8.0, 10.0),  # p cast to fp16: stay normal, < 65504
    jnp.dtype(jnp.bfloat16): (-40.0, 40.0),
    jnp.dtype(jnp.float32): (-40.0, 40.0),
}


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

_PAGED_GATHERS = ("rows", "pages")
_PRELOADS = ("auto", "always", "never")
_COMBINES = ("pallas", "xla")
_FP8_DOTS = ("auto", "q", "f16")


def _expect_int(field, value, lo, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"DecodeConfig.{field} must be {what}, got {value!r}")
    return int(value)


def _expect_choice(field, value, choices):
    if not isinstance(value, str) or value not in choices:
        opts = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"DecodeConfig.{field} must be {opts}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How the decode kernels run: strategy switches and launch defaults.

    Frozen and hashable (usable as a static `jax.jit` argument); pass it as
    `config=` to `paged_decode_attention` / `decode_attention` (None means
    `DecodeConfig()`, the defaults below). Every setting except
    `unified_fallback=False` gives the exact result (up to float rounding); they
    differ in speed. Values are checked on construction (ValueError naming the
    field); `dataclasses.replace(cfg, field=...)` makes a variant. The fields
    are static: kernels are traced and compiled per config, and equal configs
    share them.

    Attributes:
      paged_gather: how the paged kernel addresses a KV tile. "rows" (default):
        one page id per token row, so K and V load straight into a 2D
        [tile, head_dim] tile with no reshape between the load and the dot;
        "pages": one page id per page, loading [pages, block_size, head_dim]
        and reshaping. "rows" is the default: in the sweep of
        `benchmarks/decode.py --sweep` on an H100 (bf16, batch 1 x 32k,
        `benchmarks/results/decode_sweep-H100-2026-11-25.json`) its best cell
        read 1.87 TB/s against 1.35 TB/s for "pages"; and only "rows" has the
        page-id preload below. Ignored by `decode_attention`.
      preload: page-id preload of the paged kernel ("rows" gather only). A
        program loads the page ids of all of its tiles at once instead of one
        tile's ids per loop step, so that no K/V address waits on a memory read
        inside the loop. "auto" (default) does it when a split spans at most
        `preload_max_tiles` tiles and the grid has at most one program per SM:
        then nothing else hides that wait. On an H100 (cold-L2 timings, one
        run): batch 1 x 4k, paging's cost against contiguous went from +11.8%
        to +3.0%, and batch 1 x 1k from +30% to +20%; with 8-tile splits
        (batch 1 x 16k) or more programs than SMs (batch 8 x 1k) it cost ~1 us
        instead. "always" / "never" force it (tests, experiments).
      preload_max_tiles: the longest split, in tiles, that `preload="auto"`
        preloads (default 4, from the measurements above; >= 0).
      combine: how split partials are merged when num_splits > 1. "pallas"
        (default): one small Pallas kernel (one program per query head) writes
        the final output, so a decode call is two kernel launches; "xla": a
        variadic XLA reduction over the log-sum-exp monoid plus its epilogue
        fusions.
      unified_fallback: with `unified_max` (FlashDecoding++), a split whose
        scores leave the window where exp(s - phi) is exact in the accumulation
        dtype is recomputed with the online softmax. True (default) keeps the
        result exact for all inputs; False drops the check-and-recompute (then
        results can overflow or lose precision: tests use it to show that their
        inputs really need the fallback). No effect without `unified_max`.
      num_splits: KV splits per sequence (Flash-Decoding). None (default) picks
        them so that batch * kv_heads * splits fills ~2 waves of SMs with at
        least 4 tiles per split (`choose_num_splits`). The `num_splits=`
        keyword of the entry points overrides it.
      num_warps: Triton warps per decode program (default 4; tuned with
        `benchmarks/decode.py --sweep` on an H100). The `num_warps=` keyword
        overrides it.
      num_stages: Triton software-pipelining stages of the inner loop (default
        3; tuned with the sweep). The `num_stages=` keyword overrides it.
      tile_bytes: bytes of K (and the same again of V) per inner-loop tile when
        the tile size is not given (`pages_per_block` / `block_k` = None):
        default 16 KiB, i.e. 64 tokens at head_dim 128 in bf16 and 128 in FP8
        (bytes of the cache as stored; tiles are a power of two of 16..128 tokens).
      long_split_tile_bytes: the tile size instead when each split covers at
        least `long_split_tokens` positions (default 32 KiB). A program that
        streams a long stretch of KV hides scattered page reads better with
        more bytes in flight: on an H100 (interleaved timings) paging's cost
        against contiguous went from +9.5% to +0.5% at batch 32 x 128k and from
        +8.7% to +0.0% at batch 64 x 128k, while 16 KiB stays faster for
        shorter splits (batch 8 x 128k, 26k tokens per split: 2.69 vs 2.44
        TB/s; batch 8 x 32k: 2.85 vs 2.55 TB/s).
      long_split_tokens: the split length, in positions, from which
        `long_split_tile_bytes` applies (default 32768, see above).
      fp8_dot: the dtype of the dots on an FP8 (float8_e4m3fn) cache; no effect
        on other caches. "auto" (default): "f16" for bfloat16 and float16 q,
        "q" for float32 q (whose dots keep float32's precision). "q": each K/V
        tile is converted to q's dtype and the dots run there. "f16": tiles are
        converted to float16 (exact for every e4m3 value) and both dots run in
        float16 with float32 accumulation. Why: sm_90 has no packed e4m3 -> bf16
        conversion (Triton goes through f16/f32 one value at a time), but has
        the packed `cvt.rn.f16x2.e4m3x2`. Measured on an H200
        (`benchmarks/decode.py --sweep-fp8`, batch 64 x 32k, bf16 q, best
        configuration of each): paged 1.95 ms with "q", 1.45 ms with "f16"
        (1.34x; against the bf16 cache's kernel 1.02x and 1.36x), contiguous
        1.69 and 1.40 ms. Nothing overflows or underflows in float16: q is
        divided per row by a power of two >= max|q_row| (exact for bf16 and
        float16 q; float32 q would be rounded to float16's 11 bits, which is why
        "auto" keeps float32 q on "q") and the scores multiplied back by it (with
        the key scales and sm_scale); the probabilities times the value scales
        (float32) are divided per row by their largest value in the tile, so the
        float16 weights lie in [0, 1] with the row's largest exactly 1 (a row of
        zero weights divides by 1), and that factor multiplies the tile's P @ V
        in float32 (one row maximum per tile more than "q"). The tiles
        themselves are never scaled or converted to float32.
    """

    paged_gather: str = "rows"
    preload: str = "auto"
    preload_max_tiles: int = 4
    combine: str = "pallas"
    unified_fallback: bool = True
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    tile_bytes: int = 16 * 1024
    long_split_tile_bytes: int = 32 * 1024
    long_split_tokens: int = 32768
    fp8_dot: str = "auto"

    def __post_init__(self):
        # Checked (and numpy scalars made plain Python values) once, here, so a
        # config that exists is valid and hashes/compares canonically.
        def put(field, value):
            object.__setattr__(self, field, value)

        put("paged_gather", _expect_choice("paged_gather", self.paged_gather, _PAGED_GATHERS))
        put("preload", _expect_choice("preload", self.preload, _PRELOADS))
        put("preload_max_tiles", _expect_int("preload_max_tiles", self.preload_max_tiles, 0,
                                             "an int >= 0 (tiles)"))
        put("combine", _expect_choice("combine", self.combine, _COMBINES))
        if not isinstance(self.unified_fallback, (bool, np.bool_)):
            raise ValueError(f"DecodeConfig.unified_fallback must be True or False, got "
                             f"{self.unified_fallback!r}")
        put("unified_fallback", bool(self.unified_fallback))
        if self.num_splits is not None:
            put("num_splits", _expect_int("num_splits", self.num_splits, 1,
                                          "a positive int or None (automatic)"))
        put("num_warps", _expect_int("num_warps", self.num_warps, 1, "a positive int"))
        put("num_stages", _expect_int("num_stages", self.num_stages, 1, "a positive int"))
        for field in ("tile_bytes", "long_split_tile_bytes"):
            put(field, _expect_int(field, getattr(self, field), 1, "a positive int (bytes)"))
        put("long_split_tokens", _expect_int("long_split_tokens", self.long_split_tokens, 1,
                                             "a positive int (positions)"))
        put("fp8_dot", _expect_choice("fp8_dot", self.fp8_dot, _FP8_DOTS))


_DEFAULT_CONFIG = DecodeConfig()


def _resolve_fp8_dot(fp8_dot: str, q_dtype) -> str:
    """DecodeConfig.fp8_dot with "auto" resolved for q's dtype ("f16" for 16-bit q)."""
    if fp8_dot != "auto":
        return fp8_dot
    return "f16" if jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "q"

# Module switches of earlier versions, now fields of DecodeConfig: reading one
# says where it went (and makes a stale `monkeypatch.setattr` fail loudly
# instead of silently changing nothing).
_REMOVED_SWITCHES = {
    "PAGED_GATHER": "paged_gather", "PRELOAD": "preload", "PRELOAD_MAX_TILES": "preload_max_tiles",
    "COMBINE": "combine", "_UNIFIED_FALLBACK": "unified_fallback",
    "DEFAULT_NUM_WARPS": "num_warps", "DEFAULT_NUM_STAGES": "num_stages",
    "DEFAULT_TILE_BYTES": "tile_bytes", "LONG_SPLIT_TILE_BYTES": "long_split_tile_bytes",
    "LONG_SPLIT_TOKENS": "long_split_tokens",
}


def __getattr__(name):
    field = _REMOVED_SWITCHES.get(name)
    if field is not None:
        raise AttributeError(
            f"flashjax.decode.{name} was replaced by DecodeConfig.{field} (default "
            f"{getattr(_DEFAULT_CONFIG, field)!r}): pass config=DecodeConfig({field}=...) to "
            f"paged_decode_attention / decode_attention")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_config(config, num_splits, num_warps, num_stages) -> DecodeConfig:
    """The call's config: `config` (None: the defaults) with the num_splits /
    num_warps / num_stages keywords, where given, taking precedence."""
    if config is None:
        config = _DEFAULT_CONFIG
    elif not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a flashjax.decode.DecodeConfig or None, got "
                        f"{type(config).__name__}: {config!r}")
    over = {k: v for k, v in (("num_splits", num_splits), ("num_warps", num_warps),
                              ("num_stages", num_stages)) if v is not None}
    return dataclasses.replace(config, **over) if over else config


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------


def _decode_kernel(
    q_ref,  # [group, head_dim]: the query heads of one KV head
    k_ref,  # paged: [num_blocks, block_size, head_dim]; dense: [kv_len, head_dim]
    v_ref,
    ks_ref,  # FP8 cache: per-token scales, k_ref's shape without head_dim; else None
    vs_ref,
    bt_ref,  # paged: [max_blocks_padded] int32; dense: None
    len_ref,  # [batch] int32 (whole array)
    o_ref,  # [group, head_dim]: q dtype if one split, else float32 partial
    lse_ref,  # [group] float32 (base-2 log-sum-exp of this split)
    *,
    block_h: int,
    max_len: int,
    paged: bool,
    tile: int,
    pages_per_tile: int,
    page_size: int,
    num_pages: int,
    kv_len: int,
    num_splits: int,
    group: int,
    sm_scale: float,
    softcap: float | None,
    unified_max: float | None,
    unified_window: tuple[float, float],
    precision,
    gather: str,
    fallback: bool,
    preload_tiles: int,
    fp8_dot: str,
):
    b = pl.program_id(0)
    quantized = ks_ref is not None
    # DecodeConfig.fp8_dot="f16": an FP8 cache's dots in float16, q normalised per row.
    f16_dots = quantized and fp8_dot == "f16"
    # Compute dtype of the dots (an FP8 tile is converted to it).
    cdt = jnp.dtype(jnp.float16) if f16_dots else q_ref.dtype
    scale_v_tile = quantized and not f16_dots and jnp.dtype(cdt) == jnp.float16
    dot_precision = None if f16_dots else precision
    split = pl.program_id(2)
    head_dim = q_ref.shape[-1]
    length = jnp.minimum(jnp.maximum(len_ref[b], 0), max_len)
    rows = pl.ds(0, block_h)
    row_valid = jnp.arange(block_h) < group
    if group == block_h:
        q = q_ref[...]
    else:  # pad the group to block_h (>= 16) rows for the tensor-core dots
        q = plgpu.load(q_ref.at[rows, :], mask=row_valid[:, None], other=0)
    # What multiplies the raw scores of a row (after the key scales): sm_scale in
    # the units of exp2 (or of the soft cap's tanh argument).
    score_mul = sm_scale / softcap if softcap is not None else sm_scale * LOG2E
    if f16_dots:
        # q / qs in [-1, 1] in float16, qs a power of two >= max|q_row| (so bf16 and
        # f16 q convert exactly); scores are multiplied back by qs. A zero (or
        # padded) row gets qs = 1; a NaN row stays NaN.
        qf = q.astype(jnp.float32)
        amax = jnp.max(jnp.abs(qf), axis=1)
        qs = jnp.exp2(jnp.clip(jnp.ceil(jnp.log2(amax)), -126.0, 127.0))
        qs = jnp.where(amax > 0, qs, 1.0)
        q = (qf * (1.0 / qs)[:, None]).astype(cdt)
        score_mul = (qs * score_mul)[:, None]  # [block_h, 1]

    n_tiles = pl.cdiv(length, tile)
    tiles_per_split = pl.cdiv(n_tiles, num_splits)
    t_start = jnp.minimum(split * tiles_per_split, n_tiles)
    t_end = jnp.minimum(t_start + tiles_per_split, n_tiles)
    # Tiles [t_start, t_full) are entirely below `length`; [t_full, t_end) is
    # the (at most one) partial tile at the end of the sequence.
    t_full = jnp.maximum(t_start, jnp.minimum(t_end, length // tile))

    shift = page_size.bit_length() - 1  # page_size is a power of two
    if preload_tiles:
        # Short splits: the page ids of all of this split's tiles in one load,
        # so inside the loop K/V addresses need no memory access and the
        # loads of the next tiles are issued while this one is computed.
        tr = jnp.arange(preload_tiles, dtype=jnp.int32)[:, None]
        rr = jnp.arange(tile, dtype=jnp.int32)[None, :]
        pages_all = (t_start + tr) * pages_per_tile + lax.shift_right_logical(rr, jnp.int32(shift))
        ids_all = bt_ref[jnp.minimum(pages_all, bt_ref.shape[0] - 1)]  # [preload_tiles, tile]

    def load_kv(t, masked: bool):
        """K and V tiles [tile, head_dim] of tile t, and their scales [tile] (None
        unless the cache is FP8)."""
        ks = vs = None
        if paged and gather == "rows":
            # One page id per tile row, so K/V load straight into a 2D
            # [tile, head_dim] tile (no reshape between the load and the dot).
            r = jnp.arange(tile, dtype=jnp.int32)
            page = t * pages_per_tile + lax.shift_right_logical(r, jnp.int32(shift))
            row = r & (page_size - 1)
            if preload_tiles:
                ids = jnp.sum(jnp.where(tr == t - t_start, ids_all, 0), axis=0)
            else:
                ids = bt_ref[page]
            if masked:
                ids = jnp.where(page < pl.cdiv(length, page_size), ids, 0)
            # Never form an address outside the pool, whatever the table says.
            ids = jnp.minimum(jnp.maximum(ids, 0), num_pages - 1)
            k = k_ref[ids, row]
            v = v_ref[ids, row]
            if quantized:
                ks = ks_ref[ids, row]
                vs = vs_ref[ids, row]
        elif paged:
            # One page id per page: [pages, block_size, head_dim] -> [tile, head_dim].
            ids = bt_ref[pl.ds(t * pages_per_tile, pages_per_tile)]
            if masked:
                page = t * pages_per_tile + jnp.arange(pages_per_tile, dtype=jnp.int32)
                ids = jnp.where(page < pl.cdiv(length, page_size), ids, 0)
            ids = jnp.minimum(jnp.maximum(ids, 0), num_pages - 1)
            k = k_ref[ids].reshape(tile, head_dim)
            v = v_ref[ids].reshape(tile, head_dim)
            if quantized:
                ks = ks_ref[ids].reshape(tile)
                vs = vs_ref[ids].reshape(tile)
        elif tile > kv_len or (masked and kv_len % tile):
            # Clamp rows into the array (values past `length` are discarded).
            idx = jnp.minimum(t * tile + jnp.arange(tile, dtype=jnp.int32), kv_len - 1)
            k = k_ref[idx]
            v = v_ref[idx]
            if quantized:
                ks = ks_ref[idx]
                vs = vs_ref[idx]
        else:
            k = k_ref[pl.ds(t * tile, tile), :]
            v = v_ref[pl.ds(t * tile, tile), :]
            if quantized:
                ks = ks_ref[pl.ds(t * tile, tile)]
                vs = vs_ref[pl.ds(t * tile, tile)]
        return k, v, ks, vs

    def scores(t, k, ks, masked: bool):
        if quantized:
            k = k.astype(cdt)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=dot_precision,
        )  # [block_h, tile]
        if quantized:  # key j is stored * ks[j]: so is its score
            s = s * ks[None, :]
        if softcap is not None:
            s = jnp.tanh(s * score_mul) * (softcap * LOG2E)
        else:
            s = s * score_mul
        if masked:
            pos = t * tile + jnp.arange(tile, dtype=jnp.int32)
            s = jnp.where((pos < length)[None, :], s, -jnp.inf)
        return s

    def pv(p, v, vs, t, masked: bool):
        if quantized:
            v = v.astype(cdt)
        if masked:
            pos = t * tile + jnp.arange(tile, dtype=jnp.int32)
            ok = pos < length
            v = jnp.where(ok[:, None], v, jnp.zeros_like(v))
            if quantized:  # a slot past the length may hold any scale (NaN included)
                vs = jnp.where(ok, vs, 0.0)
        if f16_dots:
            # Weights p * vs (float32) divided per row by their largest value in
            # the tile, so the float16 weights lie in [0, 1] whatever the scales
            # and the row's largest term keeps float16's full precision; the
            # factor comes back on the float32 product. A row whose weights are
            # all 0 (probabilities that underflowed, zero value scales, masked
            # slots) divides by 1.
            pw = p * vs[None, :]
            c = jnp.max(pw, axis=1)
            c = jnp.where(c > 0, c, 1.0)
            w = (pw * (1.0 / c)[:, None]).astype(cdt)
            return c[:, None] * lax.dot_general(
                w, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        if scale_v_tile:
            v = (v.astype(jnp.float32) * vs[:, None]).astype(cdt)
        elif quantized:  # value j is stored * vs[j]: weigh its probability column by it
            p = p * vs[None, :]
        return lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=precision,
        )

    def online_body(masked: bool):
        def body(t, carry):
            acc, m, l = carry
            k, v, ks, vs = load_kv(t, masked)
            s = scores(t, k, ks, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + pv(p, v, vs, t, masked)
            return acc, m_new, l
        return body

    def run_online():
        acc = jnp.zeros((block_h, head_dim), jnp.float32)
        m = jnp.full((block_h,), -jnp.inf, jnp.float32)
        l = jnp.zeros((block_h,), jnp.float32)
        carry = lax.fori_loop(t_start, t_full, online_body(False), (acc, m, l))
        return lax.fori_loop(t_full, t_end, online_body(True), carry)

    if unified_max is None:
        acc, m, l = run_online()
    else:
        phi = float(unified_max) * LOG2E
        lo, hi = (w * LOG2E for w in unified_window)

        def unified_body(masked: bool):
            def body(t, carry):
                acc, mx, l = carry
                k, v, ks, vs = load_kv(t, masked)
                s = scores(t, k, ks, masked)
                mx = jnp.maximum(mx, jnp.max(s, axis=1))
                p = jnp.exp2(s - phi)
                l = l + jnp.sum(p, axis=1)
                acc = acc + pv(p, v, vs, t, masked)
                return acc, mx, l
            return body

        acc = jnp.zeros((block_h, head_dim), jnp.float32)
        mx = jnp.full((block_h,), -jnp.inf, jnp.float32)
        l = jnp.zeros((block_h,), jnp.float32)
        carry = lax.fori_loop(t_start, t_full, unified_body(False), (acc, mx, l))
        acc, mx, l = lax.fori_loop(t_full, t_end, unified_body(True), carry)
        rel = mx - phi
        row_ok = ~row_valid | ((rel >= lo) & (rel <= hi))
        bad = jnp.max(jnp.where(row_ok, 0, 1)) > 0
        bad = bad & (t_end > t_start)
        m_phi = jnp.full((block_h,), phi, jnp.float32)
        if fallback:
            acc, m, l = lax.cond(bad, run_online, lambda: (acc, m_phi, l))
        else:
            m = m_phi

    has = l > 0
    o = (acc / jnp.where(has, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)
    if o_ref.shape[0] == block_h:  # group == block_h, or padded split partials
        o_ref[...] = o
        lse_ref[...] = lse
    else:
        plgpu.store(o_ref.at[rows, :], o, mask=row_valid[:, None])
        plgpu.store(lse_ref.at[rows], lse, mask=row_valid)


# --------------------------------------------------------------------------
# Heuristics
# --------------------------------------------------------------------------


def choose_num_splits(batch: int, kv_heads: int, max_len: int, tile: int,
                      num_sms: int | None = None, min_tiles_per_split: int = 4) -> int:
    """Splits of the KV length so that batch*kv_heads*splits fills ~2 waves of
    SMs, with each split keeping at least `min_tiles_per_split` tiles."""
    if num_sms is None:
        num_sms = _backend.num_multiprocessors()
    programs = max(1, batch * kv_heads)
    want = -(-2 * num_sms // programs)
    max_tiles = -(-max(1, max_len) // tile)
    cap = max(1, max_tiles // min_tiles_per_split)
    return int(max(1, min(want, cap)))


def _default_tile_tokens(head_dim: int, itemsize: int, tile_bytes: int) -> int:
    # tile_bytes of K (and of V) per tile: 16 KiB is 64 tokens at head_dim 128 in bf16.
    return int(max(16, min(128, _next_pow2(tile_bytes // (head_dim * itemsize)))))


def _auto_tile_tokens(head_dim, itemsize, batch, kv_heads, max_len, num_splits,
                      config: DecodeConfig | None = None) -> int:
    """Default tile: config.tile_bytes, or config.long_split_tile_bytes when each
    split covers at least config.long_split_tokens positions."""
    config = _DEFAULT_CONFIG if config is None else config
    tile = _default_tile_tokens(head_dim, itemsize, config.tile_bytes)
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_len, tile)
    if max_len >= config.long_split_tokens * num_splits:
        tile = _default_tile_tokens(head_dim, itemsize, config.long_split_tile_bytes)
    return tile


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_q(q, name="q"):
    if not hasattr(q, "shape") or q.ndim != 3:
        raise ValueError(
            f"{name} must have shape [batch, heads, head_dim] (one query token per "
            f"sequence), got shape {getattr(q, 'shape', None)}")
    if jnp.dtype(q.dtype) not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype must be bfloat16, float16 or float32, got {q.dtype}")


def _check_kv_dtypes(q, k, v, k_scales, v_scales, names, scale_shape, scale_doc) -> bool:
    """K/V dtypes against q's; for an FP8 cache, its scales. Returns whether the
    cache is FP8."""
    kn, vn = names
    fp8 = [jnp.dtype(x.dtype) == FP8 for x in (k, v)]
    if any(fp8):
        if not all(fp8):
            raise TypeError(f"{kn} and {vn} must both be float8_e4m3fn or both {q.dtype}, got "
                            f"{k.dtype} and {v.dtype}")
        for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
            if sc is None:
                raise ValueError(f"{name} is required: {kn}/{vn} are float8_e4m3fn (an FP8 cache "
                                 f"stores one float32 scale per token and KV head, "
                                 f"shape {scale_doc})")
            if not hasattr(sc, "shape") or tuple(sc.shape) != tuple(scale_shape):
                raise ValueError(f"{name} must have shape {scale_doc}={tuple(scale_shape)}, got "
                                 f"shape {getattr(sc, 'shape', None)}")
            if jnp.dtype(sc.dtype) != jnp.float32:
                raise TypeError(f"{name} must be float32, got {sc.dtype}")
        return True
    for name, x in ((kn, k), (vn, v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} dtype {x.dtype} must equal q dtype {q.dtype} (or be "
                            f"float8_e4m3fn, with k_scales and v_scales)")
    for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
        if sc is not None:
            raise ValueError(f"{name} is only for a float8_e4m3fn cache; {kn}/{vn} are {k.dtype}")
    return False


def _check_head_dim(head_dim):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim must be one of {SUPPORTED_HEAD_DIMS} (a power of two >= 16 that "
            f"the kernel's tiles can hold), got {head_dim}; pad q, k and v with zeros "
            f"up to the next power of two (and pass sm_scale=1/sqrt(original head_dim))")


def _check_lengths(lengths, batch, cap, name="lengths"):
    if not hasattr(lengths, "shape") or tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape [batch]=({batch},), got "
                         f"{getattr(lengths, 'shape', None)}")
    if jnp.dtype(lengths.dtype) != jnp.int32:
        raise TypeError(f"{name} must be int32, got {lengths.dtype}")
    if _is_concrete(lengths):
        arr = np.asarray(lengths)
        if arr.size and (arr.min() < 0 or arr.max() > cap):
            raise ValueError(
                f"{name} must lie in [0, {cap}] (the capacity of the cache per sequence), "
                f"got min {arr.min()} max {arr.max()}")


def _check_common(sm_scale, softcap, unified_max, num_splits, num_warps, num_stages):
    if sm_scale is not None and not (isinstance(sm_scale, (int, float, np.floating))
                                     and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite python float, got {sm_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float, np.floating)) and softcap > 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    if unified_max is not None and not (isinstance(unified_max, (int, float, np.floating))
                                        and math.isfinite(unified_max)):
        raise ValueError(f"unified_max must be a finite python float or None, got {unified_max!r}")
    if num_splits is not None and (not isinstance(num_splits, (int, np.integer)) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    for name, val in (("num_warps", num_warps), ("num_stages", num_stages)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name} must be a positive int or None, got {val!r}")


# --------------------------------------------------------------------------
# Shared driver
# --------------------------------------------------------------------------


def _combine_kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, num_splits: int, chunk: int):
    """Merge the splits of one query head: o_ref [splits_pad, head_dim] (float32,
    normalised per split), lse_ref [splits_pad] (base 2); rows >= num_splits are
    never written by the decode kernel and are masked here. Writes the final
    output row (q dtype) and its base-2 log-sum-exp."""
    head_dim = o_ref.shape[-1]

    def body(c, carry):
        acc, m, l = carry
        rows = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        valid = rows < num_splits
        lse = plgpu.load(lse_ref.at[pl.ds(c * chunk, chunk)], mask=valid, other=-jnp.inf)
        o = plgpu.load(o_ref.at[pl.ds(c * chunk, chunk), :], mask=valid[:, None], other=0.0)
        m_new = jnp.maximum(m, jnp.max(lse))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        w = jnp.exp2(lse - m_use)  # empty splits (lse = -inf) weigh 0
        scale = jnp.exp2(m - m_use)
        acc = acc * scale + jnp.sum(w[:, None] * o, axis=0)
        l = l * scale + jnp.sum(w)
        return acc, m_new, l

    init = (jnp.zeros((head_dim,), jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0))
    n_chunks = -(-num_splits // chunk)
    if n_chunks == 1:
        acc, m, l = body(0, init)
    else:
        acc, m, l = lax.fori_loop(0, n_chunks, body, init)
    has = l > 0
    out_ref[...] = jnp.where(has, acc / jnp.where(has, l, 1.0), 0.0).astype(out_ref.dtype)
    lse_out_ref[...] = jnp.full((1,), jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf))


def _combine_pallas(o, lse2, *, num_splits, group, out_dtype, interpret):
    """o [B, Hkv, S_pad, block_h, D] f32 and lse2 [B, Hkv, S_pad, block_h] (first
    num_splits splits written) -> out [B, Hkv, group, D] in out_dtype and
    lse2 [B, Hkv, group]. One small Pallas kernel, one program per query head,
    so a decode call is two launches (no XLA reduction and epilogue fusions)."""
    batch, kv_heads, s_pad, _, head_dim = o.shape
    chunk = min(s_pad, max(16, _next_pow2(8192 // head_dim)))
    out, lse = pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=num_splits, chunk=chunk),
        grid=(batch, kv_heads, group),
        in_specs=[pl.BlockSpec((None, None, s_pad, None, head_dim), lambda b, h, g: (b, h, 0, g, 0)),
                  pl.BlockSpec((None, None, s_pad, None), lambda b, h, g: (b, h, 0, g))],
        out_specs=[pl.BlockSpec((None, None, None, head_dim), lambda b, h, g: (b, h, g, 0)),
                   pl.BlockSpec((None, None, None, 1), lambda b, h, g: (b, h, g, 0))],
        out_shape=_backend.out_types([jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), out_dtype),
                                      jax.ShapeDtypeStruct((batch, kv_heads, group, 1), jnp.float32)],
                                     [o, lse2]),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="flashjax_decode_combine",
    )(o, lse2)
    return out, lse[..., 0]


def _lse_monoid(x, y):
    """Merge (max, sum of 2^(lse - max), sum of 2^(lse - max) * o) pairs."""
    m1, l1, a1 = x
    m2, l2, a2 = y
    m = jnp.maximum(m1, m2)
    s1 = jnp.where(m1 == -jnp.inf, 0.0, jnp.exp2(m1 - m))
    s2 = jnp.where(m2 == -jnp.inf, 0.0, jnp.exp2(m2 - m))
    return m, l1 * s1 + l2 * s2, a1 * s1 + a2 * s2


def _combine(o, lse2):
    """Merge splits: o [B, Hkv, S, G, D] f32 (normalised per split) and lse2
    [B, Hkv, S, G] (base 2) -> o [B, Hkv, G, D] f32, lse2 [B, Hkv, G]. One
    variadic XLA reduction (log-sum-exp monoid), so a single small kernel."""
    m_in = jnp.broadcast_to(lse2[..., None], o.shape)
    l_in = jnp.ones_like(o)
    f32 = jnp.float32
    m, l, a = lax.reduce((m_in, l_in, o), (f32(-jnp.inf), f32(0.0), f32(0.0)), _lse_monoid, (2,))
    has = l > 0
    out = jnp.where(has, a / jnp.where(has, l, 1.0), 0.0)
    lse = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)[..., 0]
    return out, lse


def _run(q, k, v, ks, vs, bt, lengths, *, layout, kv_heads, tile, pages_per_tile, page_size,
         num_pages, kv_len, max_len, sm_scale, softcap, unified_max, config, interpret,
         return_lse, name):
    """Resolve defaults (static Python values), then call the jitted core, so
    eager calls reuse compiled kernels."""
    batch, heads, head_dim = q.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    num_splits = config.num_splits
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_len, tile)
    return _core(
        q, k, v, ks, vs, bt, lengths, layout=layout, kv_heads=kv_heads, tile=tile,
        pages_per_tile=pages_per_tile, page_size=page_size, num_pages=num_pages, kv_len=kv_len,
        max_len=max_len, sm_scale=float(sm_scale),
        softcap=None if softcap is None else float(softcap), num_splits=int(num_splits),
        unified_max=None if unified_max is None else float(unified_max),
        num_warps=config.num_warps, num_stages=config.num_stages,
        interpret=_backend.resolve_interpret(interpret), return_lse=bool(return_lse), name=name,
        gather=config.paged_gather, fallback=config.unified_fallback, preload=config.preload,
        preload_max_tiles=config.preload_max_tiles, combine=config.combine,
        # Only an FP8 cache reads fp8_dot: other caches share one compilation.
        fp8_dot=_resolve_fp8_dot(config.fp8_dot, q.dtype) if ks is not None else "q",
    )


@functools.partial(jax.jit, static_argnames=(
    "layout", "kv_heads", "tile", "pages_per_tile", "page_size", "num_pages", "kv_len",
    "max_len", "sm_scale", "softcap", "num_splits", "unified_max", "num_warps", "num_stages",
    "interpret", "return_lse", "name", "gather", "fallback", "preload", "preload_max_tiles",
    "combine", "fp8_dot"))
def _core(q, k, v, ks, vs, bt, lengths, *, layout, kv_heads, tile, pages_per_tile, page_size,
          num_pages, kv_len, max_len, sm_scale, softcap, num_splits, unified_max,
          num_warps, num_stages, interpret, return_lse, name, gather, fallback, preload,
          preload_max_tiles, combine, fp8_dot):
    batch, heads, head_dim = q.shape
    group = heads // kv_heads
    block_h = max(16, _next_pow2(group))
    paged = layout == "paged"
    if paged:
        kv_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
        scale_spec = pl.BlockSpec((None, num_pages, page_size), lambda b, h, s: (h, 0, 0))
        # Pad the table to whole tiles so a tile never reads past a row's end.
        pad = -bt.shape[1] % pages_per_tile
        if pad:
            bt = jnp.pad(bt, ((0, 0), (0, pad)))
    elif layout == "bshd":
        kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
        scale_spec = pl.BlockSpec((None, kv_len, None), lambda b, h, s: (b, 0, h))
    else:
        kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (b, h, 0, 0))
        scale_spec = pl.BlockSpec((None, None, kv_len), lambda b, h, s: (b, h, 0))
    if ks is None:
        scale_spec = None

    qg = q.reshape(batch, kv_heads, group, head_dim)  # free: heads are kv-head major
    # Most tiles a split can own (its share of the longest possible sequence).
    split_tiles = pl.cdiv(pl.cdiv(max_len, tile), num_splits)
    # gather, preload and combine come from a DecodeConfig, checked on construction.
    use = preload == "always" or (
        preload == "auto" and split_tiles <= preload_max_tiles
        and batch * kv_heads * num_splits <= _backend.num_multiprocessors())
    preload_tiles = _next_pow2(split_tiles) if paged and gather == "rows" and use else 0
    precision = (lax.Precision.HIGHEST, lax.Precision.HIGHEST) if q.dtype == jnp.float32 else None
    # The unified-max window of the dtype that the probabilities are cast to: with
    # fp8_dot="f16" they are normalised per row before the float16 cast, so only
    # the float32 sums bound it.
    f16_dots = ks is not None and fp8_dot == "f16"
    window = _UNIFIED_WINDOW[jnp.dtype(jnp.float32 if f16_dots else q.dtype)]
    if f16_dots:
        name = f"{name}_f16dot"
    kernel = functools.partial(
        _decode_kernel, block_h=block_h, max_len=max_len, paged=paged, tile=tile,
        pages_per_tile=pages_per_tile, page_size=page_size, num_pages=num_pages, kv_len=kv_len,
        num_splits=num_splits, group=group, sm_scale=float(sm_scale),
        softcap=None if softcap is None else float(softcap),
        unified_max=None if unified_max is None else float(unified_max),
        unified_window=window, precision=precision,
        gather=gather, fallback=fallback, preload_tiles=preload_tiles, fp8_dot=fp8_dot,
    )
    in_specs = [
        pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
        kv_spec,
        kv_spec,
        scale_spec,
        scale_spec,
        (pl.BlockSpec((None, bt.shape[1]), lambda b, h, s: (b, 0)) if paged else None),
        pl.BlockSpec((batch,), lambda b, h, s: (0,)),
    ]
    if num_splits == 1:
        # One split: the kernel writes the final output; nothing to combine.
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), q.dtype),
                     jax.ShapeDtypeStruct((batch, kv_heads, group), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
                     pl.BlockSpec((None, None, group), lambda b, h, s: (b, h, 0))]
    else:
        # Partials padded to power-of-two splits x block_h rows (the combine
        # kernel's tiles); splits >= num_splits stay unwritten and are masked.
        s_pad = _next_pow2(num_splits)
        out_shape = [
            jax.ShapeDtypeStruct((batch, kv_heads, s_pad, block_h, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, s_pad, block_h), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
        ]
    o, lse2 = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=_backend.out_types(out_shape, [x for x in (qg, k, v, ks, vs, bt, lengths)
                                                 if x is not None]),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(qg, k, v, ks, vs, bt, lengths)
    if num_splits > 1 and combine == "pallas":
        o, lse2 = _combine_pallas(o, lse2, num_splits=num_splits, group=group,
                                  out_dtype=q.dtype, interpret=interpret)
    elif num_splits > 1:
        o, lse2 = _combine(o[:, :, :num_splits, :group], lse2[:, :, :num_splits, :group])
    out = o.reshape(batch, heads, head_dim).astype(q.dtype)
    if return_lse:
        return out, (lse2 * LN2).reshape(batch, heads)
    return out


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def paged_decode_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    *,
    k_scales=None,
    v_scales=None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    pages_per_block: int | None = None,
    softcap: float | None = None,
    unified_max: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    return_lse: bool = False,
    config: DecodeConfig | None = None,
):
    """Decode attention of one query token per sequence against a paged KV cache.

    Args:
      q: [batch, heads, head_dim] (bfloat16, float16 or float32).
      k_pages, v_pages: [kv_heads, num_blocks, block_size, head_dim], same dtype
        as q, or both float8_e4m3fn (an FP8 cache, with k_scales and v_scales);
        heads % kv_heads == 0; block_size a power of two; head_dim in
        SUPPORTED_HEAD_DIMS.
      block_tables: int32 [batch, max_blocks]; block j of sequence b holds its
        tokens [j*block_size, (j+1)*block_size). Only the first
        ceil(lengths[b]/block_size) entries are used.
      lengths: int32 [batch], 0 <= lengths <= max_blocks*block_size (clipped
        into that range under jit). Length 0 gives a zero output.
      k_scales, v_scales: FP8 cache only (required with it): float32
        [kv_heads, num_blocks, block_size]; token t's key vector of a head is
        k_pages[...] * k_scales[...] (`flashjax.kv_cache.quantize_fp8`). The
        kernel computes in q's dtype (in float16 with config.fp8_dot="f16").
      sm_scale: score scale, default 1/sqrt(head_dim).
      num_splits: KV splits per sequence (Flash-Decoding); None: config.num_splits,
        whose default None picks one from batch, kv_heads, max_blocks*block_size
        and the number of SMs.
      pages_per_block: pages loaded per inner-loop iteration (power of two;
        tile = pages_per_block*block_size tokens, >= 16); None: ~config.tile_bytes
        of K (16 KiB; config.long_split_tile_bytes, 32 KiB, when a split spans
        >= config.long_split_tokens positions).
      softcap: if set, scores become softcap*tanh(scores/softcap).
      unified_max: FlashDecoding++ fixed softmax maximum phi (in units of the
        scaled, soft-capped score); exact, with per-split fallback.
      num_warps, num_stages: Triton compiler parameters; None: config.num_warps
        / config.num_stages (4 / 3).
      interpret: None = compile on GPU, interpret elsewhere.
      return_lse: also return the natural log-sum-exp [batch, heads] (float32,
        -inf for empty sequences).
      config: a `DecodeConfig` (tile addressing, page-id preload, split merge,
        unified-max fallback and the defaults above); None = `DecodeConfig()`.
        The num_splits, num_warps and num_stages keywords, when not None, take
        precedence over its fields of the same names.

    Returns:
      [batch, heads, head_dim] in q.dtype (and the lse if requested).
    """
    _check_q(q)
    _check_common(sm_scale, softcap, unified_max, num_splits, num_warps, num_stages)
    config = _resolve_config(config, num_splits, num_warps, num_stages)
    batch, heads, head_dim = q.shape
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"{name} must have shape [kv_heads, num_blocks, block_size, head_dim], "
                             f"got shape {getattr(x, 'shape', None)}")
    quantized = _check_kv_dtypes(q, k_pages, v_pages, k_scales, v_scales, ("k_pages", "v_pages"),
                                 k_pages.shape[:3], "[kv_heads, num_blocks, block_size]")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got {k_pages.shape} "
                         f"and {v_pages.shape}")
    kv_heads, num_pages, page_size, head_dim_k = k_pages.shape
    if head_dim_k != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) must equal head_dim of k_pages/v_pages "
                         f"({head_dim_k})")
    _check_head_dim(head_dim)
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not _is_pow2(page_size):
        raise ValueError(f"block_size (k_pages.shape[2]) must be a power of two, got {page_size}")
    if num_pages < 1:
        raise ValueError("k_pages must hold at least one block")
    if not hasattr(block_tables, "shape") or block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must have shape [batch={batch}, max_blocks], got "
                         f"{getattr(block_tables, 'shape', None)}")
    if jnp.dtype(block_tables.dtype) != jnp.int32:
        raise TypeError(f"block_tables must be int32, got {block_tables.dtype}")
    max_blocks = block_tables.shape[1]
    if max_blocks < 1:
        raise ValueError("block_tables must have at least one column")
    max_len = max_blocks * page_size
    _check_lengths(lengths, batch, max_len)
    if pages_per_block is None:
        tile = _auto_tile_tokens(head_dim, jnp.dtype(k_pages.dtype).itemsize, batch, kv_heads,
                                 max_len, config.num_splits, config)
        pages_per_block = max(1, tile // page_size)
        pages_per_block = min(pages_per_block, _next_pow2(max_blocks))
    if not isinstance(pages_per_block, (int, np.integer)) or not _is_pow2(int(pages_per_block)):
        raise ValueError(f"pages_per_block must be a power of two, got {pages_per_block!r}")
    pages_per_block = max(int(pages_per_block), -(-16 // page_size))  # tile >= 16 rows
    tile = pages_per_block * page_size
    return _run(
        q, k_pages, v_pages, k_scales if quantized else None, v_scales if quantized else None,
        block_tables, lengths, layout="paged", kv_heads=kv_heads,
        tile=tile, pages_per_tile=pages_per_block, page_size=page_size, num_pages=num_pages,
        kv_len=max_len, max_len=max_len, sm_scale=sm_scale, softcap=softcap,
        unified_max=unified_max, config=config, interpret=interpret, return_lse=return_lse,
        name=f"flashjax_paged_decode{'_fp8' if quantized else ''}_p{pages_per_block}x{page_size}",
    )


def decode_attention(
    q,
    k,
    v,
    lengths=None,
    *,
    k_scales=None,
    v_scales=None,
    kv_layout: str = "bshd",
    sm_scale: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    softcap: float | None = None,
    unified_max: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    return_lse: bool = False,
    config: DecodeConfig | None = None,
):
    """Decode attention against a dense (contiguous) KV cache; same kernel body
    as `paged_decode_attention`.

    Args:
      q: [batch, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim] (kv_layout="bshd", default) or
        [batch, kv_heads, kv_len, head_dim] (kv_layout="bhsd"); same dtype as q,
        or both float8_e4m3fn (an FP8 cache, with k_scales and v_scales).
      lengths: int32 [batch] valid keys per sequence (default: kv_len for all).
      k_scales, v_scales: FP8 cache only (required with it): float32, k's shape
        without head_dim ([batch, kv_len, kv_heads] or [batch, kv_heads, kv_len]).
      block_k: tokens per inner-loop tile (power of two >= 16); None: ~16 KiB of
        K, 32 KiB when a split spans >= 32k positions (config.tile_bytes,
        config.long_split_tile_bytes, config.long_split_tokens).
      Other arguments as in `paged_decode_attention` (config.paged_gather and
        config.preload only concern the paged kernel).
    """
    _check_q(q)
    _check_common(sm_scale, softcap, unified_max, num_splits, num_warps, num_stages)
    config = _resolve_config(config, num_splits, num_warps, num_stages)
    batch, heads, head_dim = q.shape
    if kv_layout not in ("bshd", "bhsd"):
        raise ValueError(f"kv_layout must be 'bshd' or 'bhsd', got {kv_layout!r}")
    for name, x in (("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"{name} must have shape {_layout_doc(kv_layout)}, got shape "
                             f"{getattr(x, 'shape', None)}")
    quantized = _check_kv_dtypes(q, k, v, k_scales, v_scales, ("k", "v"), k.shape[:3],
                                 _layout_doc(kv_layout).replace(", head_dim]", "]"))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if kv_layout == "bshd":
        kb, kv_len, kv_heads, head_dim_k = k.shape
    else:
        kb, kv_heads, kv_len, head_dim_k = k.shape
    if kb != batch:
        raise ValueError(f"k/v batch ({kb}) must equal q batch ({batch})")
    if head_dim_k != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) must equal head_dim of k/v ({head_dim_k})")
    _check_head_dim(head_dim)
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if kv_len < 1:
        raise ValueError("k/v must hold at least one position (kv_len >= 1)")
    if lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    _check_lengths(lengths, batch, kv_len)
    if block_k is None:
        block_k = _auto_tile_tokens(head_dim, jnp.dtype(k.dtype).itemsize, batch, kv_heads,
                                    kv_len, config.num_splits, config)
        block_k = max(16, min(block_k, _next_pow2(kv_len)))
    if not isinstance(block_k, (int, np.integer)) or not _is_pow2(int(block_k)) or block_k < 16:
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k!r}")
    block_k = int(block_k)
    return _run(
        q, k, v, k_scales if quantized else None, v_scales if quantized else None, None, lengths,
        layout=kv_layout, kv_heads=kv_heads,
        tile=block_k, pages_per_tile=1, page_size=block_k, num_pages=1, kv_len=kv_len,
        max_len=kv_len, sm_scale=sm_scale, softcap=softcap, unified_max=unified_max,
        config=config, interpret=interpret, return_lse=return_lse,
        name=f"flashjax_decode{'_fp8' if quantized else ''}_{kv_layout}_k{block_k}",
    )


def _layout_doc(kv_layout):
    return ("[batch, kv_len, kv_heads, head_dim]" if kv_layout == "bshd"
            else "[batch, kv_heads, kv_len, head_dim]")


def decode_reference(q, k, v, lengths=None, *, k_scales=None, v_scales=None, sm_scale=None,
                     softcap=None, return_lse=False, dtype=jnp.float32):
    """Plain-XLA decode attention over a dense [batch, kv_len, kv_heads, head_dim]
    cache, computed in `dtype`; the XLA peer of the benchmark and a test oracle.
    An FP8 cache (k_scales, v_scales [batch, kv_len, kv_heads]) is dequantized first."""
    if k_scales is not None:
        k = k.astype(dtype) * k_scales[..., None].astype(dtype)
    if v_scales is not None:
        v = v.astype(dtype) * v_scales[..., None].astype(dtype)
    batch, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    qf = q.astype(dtype).reshape(batch, kv_heads, group, head_dim)
    s = jnp.einsum("bhgd,bkhd->bhgk", qf, k.astype(dtype),
                   preferred_element_type=dtype) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if lengths is not None:
        mask = jnp.arange(kv_len)[None, :] < lengths[:, None]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgk,bkhd->bhgd", p, v.astype(dtype), preferred_element_type=dtype)
    o = (o / jnp.where(l > 0, l, 1.0)).reshape(batch, heads, head_dim)
    if return_lse:
        lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
        return o, lse.reshape(batch, heads)
    return o
