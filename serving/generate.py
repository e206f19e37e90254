"""Batch generation on the paged KV cache, with the decode loop on the device.

    tokens, lengths = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32,
                               sampling=SamplingParams(temperature=0.8, top_k=50, seed=0),
                               eos_id=tok.eot_id)

`generate` runs one jitted program: a prefill of all prompts (flash
attention, K/V written into the pages), then the whole decode loop as a
`lax.while_loop` whose carry holds the pages, the allocator state, the output
buffer and the per-row done flags; there is no host round trip per token.
Each row stops at `eos_id` (which is kept in its output and counted in its
length) or after `max_new_tokens`; the loop ends when every row is done.
Finished rows leave the decode batch (their slot is idle: no allocation, no
writes).

Shapes are bucketed so calls with different prompt lengths or token counts
reuse one compilation: the prompt is padded to a power of two, the output
buffer to a power of two, and the cache holds the model's whole context per
sequence (`num_blocks` defaults to batch * ceil(max_seq_len / block_size)).

`generate_stream` yields tokens as they come (a host loop over jitted chunks
of `chunk_tokens` decode steps, the same loop body); `stream_text` decodes
them to text for the CLI.

`kv_cache_dtype` picks the pages' dtype (None: the model's compute dtype;
"fp8": float8_e4m3fn pages with a scale per token and KV head, see
`flashjax.serving.runner`).

Bad input raises ValueError before anything runs: no or empty prompts, token
ids outside the vocabulary, prompt + max_new_tokens beyond the model's
context or the cache, invalid sampling values, more prompts than slots.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import kv_cache
from flashjax.mesh import replicated, use_mesh
from flashjax.models.sharding import param_shardings, shard_like
from flashjax.serving import runner as R
from flashjax.serving.sampling import SamplingArrays, SamplingParams, row_keys, sample, stack_params
from flashjax.tensor_parallel import page_sharding

__all__ = ["generate", "generate_stream", "stream_text", "GenerationPlan", "plan_generation",
           "trace_count"]


# --------------------------------------------------------------------------
# Validation and geometry (host)
# --------------------------------------------------------------------------


class GenerationPlan(NamedTuple):
    """Validated inputs and static shapes of one generate call."""
    prompts: list[np.ndarray]
    tokens: np.ndarray  # int32 [batch, prompt_bucket]
    lengths: np.ndarray  # int32 [batch]
    max_new_tokens: int
    out_len: int  # output buffer (bucket >= max_new_tokens)
    sampling: SamplingArrays
    eos_id: int  # -1: none
    pad_id: int
    block_size: int
    num_blocks: int
    max_seqs: int
    max_blocks_per_seq: int
    kv_dtype: str  # the cache's page dtype (its name: a static jit argument)


def _as_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _normalise_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    if prompts is None:
        raise ValueError("prompts is None; pass a list of token id lists")
    if isinstance(prompts, np.ndarray) or isinstance(prompts, jax.Array):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompts as an array must be [batch, seq], got shape {arr.shape}")
        prompts = list(arr)
    else:
        prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        try:
            a = np.asarray(p)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"prompt {i} is not a sequence of token ids: {e}") from None
        if a.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat sequence of token ids, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= vocab_size:
            bad = int(a[(a < 0) | (a >= vocab_size)][0])
            raise ValueError(f"prompt {i} has token id {bad} outside the vocabulary [0, {vocab_size})")
        out.append(a.astype(np.int32))
    return out


def plan_generation(config, prompts, max_new_tokens, sampling=None, *, eos_id=None, pad_id: int = 0,
                    block_size: int = 16, num_blocks: int | None = None,
                    max_seqs: int | None = None, kv_cache_dtype=None) -> GenerationPlan:
    """Validate a generate call and fix its shapes (raises ValueError on bad input)."""
    vocab, ctx = config.vocab_size, config.max_seq_len
    kv_dtype = R.cache_dtype(config, kv_cache_dtype).name
    prompts = _normalise_prompts(prompts, vocab)
    batch = len(prompts)
    max_new = _as_int("max_new_tokens", max_new_tokens, 1)
    block_size = R.check_block_size(block_size)
    if eos_id is not None:
        eos_id = _as_int("eos_id", eos_id, 0)
        if eos_id >= vocab:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab})")
    pad_id = _as_int("pad_id", pad_id, 0)
    arrays = stack_params(sampling, batch)
    max_blocks = -(-ctx // block_size)
    if max_seqs is None:
        max_seqs = batch
    max_seqs = _as_int("max_seqs", max_seqs, 1)
    if batch > max_seqs:
        raise ValueError(f"the batch has {batch} prompts but the cache has only max_seqs={max_seqs} slots")
    needs = []
    for i, p in enumerate(prompts):
        total = p.size + max_new
        if total > ctx:
            raise ValueError(
                f"prompt {i} has {p.size} tokens; with max_new_tokens={max_new} it needs {total} "
                f"positions but the model's context (max_seq_len) is {ctx}")
        needs.append(-(-total // block_size))
    if num_blocks is None:
        num_blocks = max_seqs * max_blocks
    num_blocks = _as_int("num_blocks", num_blocks, 1)
    if sum(needs) > num_blocks:
        raise ValueError(
            f"the KV cache pool of num_blocks={num_blocks} blocks (block_size {block_size}) cannot hold "
            f"the batch: its {batch} sequences need {sum(needs)} blocks for prompt + max_new_tokens")
    longest = max(p.size for p in prompts)
    tokens, lengths = R.pad_prompts(prompts, R.bucket(longest, maximum=ctx), pad_id=0)
    out_len = R.bucket(max_new, maximum=ctx)
    return GenerationPlan(prompts, tokens, lengths, max_new, out_len, arrays,
                          -1 if eos_id is None else eos_id, pad_id, block_size, num_blocks,
                          max_seqs, max_blocks, kv_dtype)


# --------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------


class _Carry(NamedTuple):
    pages: Any
    state: kv_cache.KVCacheState
    out: jax.Array  # int32 [B, out_len]
    last: jax.Array  # int32 [B] last sampled token
    done: jax.Array  # bool [B]
    count: jax.Array  # int32 [B] tokens generated
    step: jax.Array  # int32 [] next output column
    status: jax.Array  # int32 [] first allocator failure (OK if none)


_TRACES = {"start": 0, "loop": 0, "generate": 0}


def trace_count(name: str = "generate") -> int:
    """How many times a jitted piece was traced ("generate", "start", "loop"): a test hook."""
    return _TRACES[name]


def _start(model, tokens, lengths, sp: SamplingArrays, max_new, eos_id, pad_id, *, out_len,
           num_blocks, max_seqs, max_blocks_per_seq, block_size, kv_dtype=None) -> _Carry:
    """Prefill every prompt and sample the first new token."""
    B = tokens.shape[0]
    pages, state = R.init_cache(model.config, num_blocks=num_blocks, max_seqs=max_seqs,
                                block_size=block_size, max_blocks_per_seq=max_blocks_per_seq,
                                dtype=kv_dtype)
    seq_ids = jnp.arange(B, dtype=jnp.int32)
    logits, pages, state = R.prefill(model, pages, state, tokens, seq_ids, lengths)
    tok = sample(logits, sp, row_keys(sp.seed, 0))
    out = jnp.full((B, out_len), pad_id, jnp.int32).at[:, 0].set(tok)
    done = (tok == eos_id) | (max_new <= 1)
    return _Carry(pages, state, out, tok, done, jnp.ones((B,), jnp.int32), jnp.int32(1), state.status)


def _loop(model, carry: _Carry, sp: SamplingArrays, limit, max_new, eos_id, pad_id) -> _Carry:
    """Decode until every row is done, `limit` output columns are filled, or the
    allocator fails. A row is done after its EOS or its max_new-th token."""
    B = carry.last.shape[0]
    rows = jnp.arange(B, dtype=jnp.int32)

    def cond(c: _Carry):
        return (c.step < limit) & ~jnp.all(c.done) & (c.status == kv_cache.OK)

    def body(c: _Carry):
        seq_ids = jnp.where(c.done, -1, rows)
        logits, pages, state = R.decode(model, c.pages, c.state, c.last, seq_ids)
        tok = sample(logits, sp, row_keys(sp.seed, c.step))
        tok = jnp.where(c.done, pad_id, tok)
        out = jax.lax.dynamic_update_slice(c.out, tok[:, None], (jnp.int32(0), c.step))
        count = c.count + (~c.done).astype(jnp.int32)
        done = c.done | (tok == eos_id) | (c.step + 1 >= max_new)
        status = jnp.where(c.status == kv_cache.OK, state.status, c.status)
        return _Carry(pages, state, out, jnp.where(c.done, c.last, tok), done, count, c.step + 1, status)

    return jax.lax.while_loop(cond, body, carry)


_STATIC = ("graphdef", "out_len", "num_blocks", "max_seqs", "max_blocks_per_seq", "block_size", "kv_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC + ("mesh",))
def _generate_jit(params, tokens, lengths, sp, max_new, eos_id, pad_id, *, graphdef, out_len,
                  num_blocks, max_seqs, max_blocks_per_seq, block_size, kv_dtype, mesh=None):
    _TRACES["generate"] += 1
    with use_mesh(mesh):  # tensor parallel: kernels run per device on its heads
        model = nnx.merge(graphdef, params)
        carry = _start(model, tokens, lengths, sp, max_new, eos_id, pad_id, out_len=out_len,
                       num_blocks=num_blocks, max_seqs=max_seqs, max_blocks_per_seq=max_blocks_per_seq,
                       block_size=block_size, kv_dtype=kv_dtype)
        if mesh is not None:  # the KV pool (and FP8 scales) split by KV head; allocator state replicated
            carry = carry._replace(
                pages=jax.lax.with_sharding_constraint(
                    carry.pages, jax.tree.map(lambda x: page_sharding(mesh, x.ndim), carry.pages)),
                state=jax.lax.with_sharding_constraint(
                    carry.state, jax.tree.map(lambda _: replicated(mesh), carry.state)))
        carry = _loop(model, carry, sp, max_new, max_new, eos_id, pad_id)
    return carry.out, carry.count, carry.status


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start_jit(params, tokens, lengths, sp, max_new, eos_id, pad_id, *, graphdef, out_len,
               num_blocks, max_seqs, max_blocks_per_seq, block_size, kv_dtype):
    _TRACES["start"] += 1
    model = nnx.merge(graphdef, params)
    return _start(model, tokens, lengths, sp, max_new, eos_id, pad_id, out_len=out_len,
                  num_blocks=num_blocks, max_seqs=max_seqs, max_blocks_per_seq=max_blocks_per_seq,
                  block_size=block_size, kv_dtype=kv_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(1,))
def _loop_jit(params, carry, sp, limit, max_new, eos_id, pad_id, *, graphdef):
    _TRACES["loop"] += 1
    model = nnx.merge(graphdef, params)
    return _loop(model, carry, sp, limit, max_new, eos_id, pad_id)


def _device_args(plan: GenerationPlan):
    return (jnp.asarray(plan.tokens), jnp.asarray(plan.lengths), plan.sampling,
            jnp.int32(plan.max_new_tokens), jnp.int32(plan.eos_id), jnp.int32(plan.pad_id))


def _static(graphdef, plan: GenerationPlan):
    return dict(graphdef=graphdef, out_len=plan.out_len, num_blocks=plan.num_blocks,
                max_seqs=plan.max_seqs, max_blocks_per_seq=plan.max_blocks_per_seq,
                block_size=plan.block_size, kv_dtype=plan.kv_dtype)


def _check_status(status):
    status = int(status)
    if status != kv_cache.OK:
        raise RuntimeError(f"KV cache allocation failed during generation: {kv_cache.status_name(status)}")


def _split(model):
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flashjax.models GPT (an nnx.Module), got {type(model).__name__}")
    return nnx.split(model)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def generate(model, prompts, max_new_tokens: int, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             *, eos_id: int | None = None, pad_id: int = 0, block_size: int = 16,
             num_blocks: int | None = None, max_seqs: int | None = None, mesh=None,
             kv_cache_dtype=None):
    """Generate up to `max_new_tokens` tokens for each prompt, the loop on the device.

    model: a flashjax.models GPT. prompts: a list of token id sequences (any
    lengths >= 1) or an int array [batch, seq]. sampling: None (greedy), one
    SamplingParams for all rows, or one per row. eos_id: stop token (kept in
    the output). pad_id: fills the output past each row's length.
    block_size / num_blocks / max_seqs: paged cache geometry (defaults: 16,
    enough blocks for every row's whole context, one slot per prompt).

    mesh: a `flashjax.mesh.make_mesh(model=N)` mesh for tensor
    parallelism (heads and MLP split over N devices, KV pool split by KV head).
    kv_cache_dtype: the pages' dtype (None / "auto": the model's; "bf16", "fp16",
    "fp32", "fp8").

    Returns (tokens int32 [batch, max_new_tokens], lengths int32 [batch]) as
    numpy arrays.
    """
    plan = plan_generation(model.config, prompts, max_new_tokens, sampling, eos_id=eos_id, pad_id=pad_id,
                           block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs,
                           kv_cache_dtype=kv_cache_dtype)
    graphdef, params = _split(model)
    if mesh is not None:  # tensor parallel over mesh's "model" axis (flashjax.models.sharding)
        params = shard_like(params, param_shardings(params, mesh, tensor_parallel=True))
    out, count, status = _generate_jit(params, *_device_args(plan), **_static(graphdef, plan), mesh=mesh)
    _check_status(status)
    return np.asarray(out)[:, : plan.max_new_tokens], np.asarray(count)


def generate_stream(model, prompts, max_new_tokens: int, sampling=None, *, eos_id: int | None = None,
                    chunk_tokens: int = 8, block_size: int = 16, num_blocks: int | None = None,
                    max_seqs: int | None = None, kv_cache_dtype=None) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields the new tokens of each row as they come.

    Runs the prefill, then jitted chunks of up to `chunk_tokens` decode steps
    (the same while_loop as `generate`), returning to the host between
    chunks. Each item is a list (one per prompt) of that chunk's new token ids
    (an EOS included; empty for rows already done). Validation happens before
    the first item.
    """
    plan = plan_generation(model.config, prompts, max_new_tokens, sampling, eos_id=eos_id,
                           block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs,
                           kv_cache_dtype=kv_cache_dtype)
    chunk_tokens = _as_int("chunk_tokens", chunk_tokens, 1)
    graphdef, params = _split(model)
    return _stream(plan, graphdef, params, chunk_tokens)


def _stream(plan, graphdef, params, chunk_tokens):
    args = _device_args(plan)
    sp, max_new, eos, pad = args[2:]
    carry = _start_jit(params, *args, **_static(graphdef, plan))
    seen = np.zeros(len(plan.prompts), np.int64)
    total = plan.max_new_tokens
    while True:
        out, count, step, status, done = jax.device_get(
            (carry.out, carry.count, carry.step, carry.status, carry.done))
        _check_status(status)
        chunk = [out[b, seen[b]: count[b]].tolist() for b in range(len(seen))]
        seen = count.astype(np.int64)
        if any(chunk):
            yield chunk
        if int(step) >= total or bool(np.all(done)):
            return
        limit = jnp.int32(min(int(step) + chunk_tokens, total))
        carry = _loop_jit(params, carry, sp, limit, max_new, eos, pad, graphdef=graphdef)


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, sampling: SamplingParams | None = None,
                *, stop_at_eot: bool = True, chunk_tokens: int = 8, block_size: int = 16,
                kv_cache_dtype=None) -> Iterator[str]:
    """Yield text pieces of a continuation of `prompt` (one sequence).

    An empty prompt starts from the end-of-text token. If prompt +
    max_new_tokens exceed the model's context, the start of the prompt is
    dropped (max_new_tokens itself must be below the context).
    """
    ctx = model.config.max_seq_len
    max_new = _as_int("max_new_tokens", max_new_tokens, 1)
    if max_new >= ctx:
        raise ValueError(f"max_new_tokens {max_new} must be below the model's context of {ctx} tokens")
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot_id]
    if len(ids) + max_new > ctx:
        ids = ids[len(ids) + max_new - ctx:]
    eos = tokenizer.eot_id if stop_at_eot else None
    # The prompt's ids give the first new word its context (a SentencePiece leading space).
    dec = tokenizer.stream_decoder(prompt_ids=ids if prompt else ())
    for chunk in generate_stream(model, [ids], max_new, sampling, eos_id=eos, chunk_tokens=chunk_tokens,
                                 block_size=block_size, kv_cache_dtype=kv_cache_dtype):
        for t in chunk[0]:
            if eos is not None and t == eos:
                break
            piece, _ = dec.push([t])
            if piece:
                yield piece
    tail = dec.flush()
    if tail:
        yield tail
