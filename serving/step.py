"""The engine's device side: the paged KV pages, the last sampled token of every
slot, and one jitted call per engine step.

    runner = StepRunner(model, num_blocks=..., max_seqs=..., block_size=..., ...)
    out = runner.run(slots, prefill, steps=K)      # dispatch; returns device arrays at once
    host = jax.device_get(out)                     # later, while the next step runs

A call runs an optional chunked prefill (`prefill_rows` rows padded to a chunk
bucket) and then `steps` decode steps of every slot (0: none) inside one
`lax.while_loop`, sampling on the device with per-row settings. The inputs are
small host arrays (`SlotBatch`, `PrefillBatch`): block tables and lengths from
the host block pool (`flashjax.serving.blocks`; nothing is allocated on the
device), per-slot sampling settings and stop ids, and for decoding rows
whether the input token comes from the host or is the one the previous call
sampled (`last_tok`, which never leaves the device). So the engine can
dispatch step n + 1 before it has read step n's tokens.

Multi-step decode (`steps` > 1): row r runs `n_steps[r]` steps at most and
stops early on the device after sampling its end-of-text token or one of its
stop ids (up to `MAX_STOP_IDS`; more are checked on the host only). Tokens
after a stop are -1. The loop exits as soon as no row is live.

Sampling: per-row temperature / top-k / top-p / seed, after OpenAI presence and
frequency penalties (per-slot counts of generated tokens, `counts`, kept on the
device and zeroed when a new sequence takes the slot; a re-prefill after a
preemption counts the earlier outputs again) and a per-slot logit bias row.

Split calls (structured output, `flashjax.serving.guided`): a one-step call can
also be dispatched as two, `forward` (the model: pages written, logits left on
the device) then `sample(fwd, mask)`, which excludes each row's tokens outside
its int32 bitmask before sampling and returns what `run` would. The host
computes the masks while the device runs the forward. Without a mask the two
give what `run(..., steps=1 or 0)` gives (tests/test_guided.py compares them);
`run` keeps its own one-jit step, the program measured in the benchmarks.

Compiles: one variant per (prefill chunk bucket or none) x (decode steps 0, 1
or K) x table width. Split calls compile, when first used, a forward per
(chunk bucket or none) x (decode or not) x table width, as many model compiles
as the one-step variants they stand for, and a model-free sampling half per
(chunk bucket or none) x (decode or not) x (top-k/top-p or not).
Single-step and prefill calls also return log-probabilities: the sampled
token's and the top `top_k` (beam search, OpenAI logprobs).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashjax import kv_cache
from flashjax.serving import runner as R
from flashjax.serving.sampling import SamplingArrays, sample
from flashjax.serving.scheduler import MAX_LOGIT_BIAS, MAX_LOGPROBS

__all__ = ["StepRunner", "Forward", "SlotBatch", "PrefillBatch", "MAX_STOP_IDS"]

MAX_STOP_IDS = 4  # stop token ids per row checked on the device (eos not counted)

# Columns of SlotBatch.ints.
LENGTH, ACTIVE, N_STEPS, HOST_TOK, USE_HOST, STEP0, RESET, TOP_K, SEED, EOS = range(10)
STOP0 = 10
NUM_INT_COLS = STOP0 + MAX_STOP_IDS
CONST_COLS = slice(TOP_K, NUM_INT_COLS)  # per-sequence constants (set when a sequence takes the slot)
# Columns of SlotBatch.floats (all per-sequence constants).
TEMPERATURE, TOP_P, PRESENCE, FREQUENCY = range(4)
NUM_FLOAT_COLS = 4
# Columns of PrefillBatch.meta.
PF_SLOT, PF_LEN, PF_SAMPLE, PF_STEP0, PF_OUT0 = range(5)


class SlotBatch:
    """Host arrays for one call, one row per slot (numpy; a jitted call transfers them).

    ints [S, NUM_INT_COLS] int32: length before the call, active, decode steps for
      this call (0 = not decoding), host token and whether to use it (else the
      device's last sampled token), output index of the first token sampled,
      reset (a new sequence took the slot: zero its token counts), top_k, seed
      (uint32 bits), eos id (-1 none), stop ids (-1 padded).
    floats [S, 4] float32: temperature, top_p, presence and frequency penalties.
    tables [S, max_blocks_per_seq] int32: block tables from the host pool.
    """

    def __init__(self, max_seqs: int, max_blocks_per_seq: int):
        self.ints = np.zeros((max_seqs, NUM_INT_COLS), np.int32)
        self.ints[:, EOS:] = -1
        self.floats = np.zeros((max_seqs, NUM_FLOAT_COLS), np.float32)
        self.floats[:, TOP_P] = 1.0
        self.tables = np.full((max_seqs, max_blocks_per_seq), -1, np.int32)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(ints=self.ints.copy(), floats=self.floats.copy(), tables=self.tables.copy())


def sequence_constants(params, index: int, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ints[CONST_COLS], floats) of a sequence: sampling settings, eos and stop ids."""
    sp = params.sampling(index) if params.beam_width == 1 else None
    ints = np.full((NUM_INT_COLS - TOP_K,), -1, np.int32)
    floats = np.array([0.0, 1.0, params.presence_penalty, params.frequency_penalty], np.float32)
    ints[TOP_K - TOP_K] = 0 if sp is None else sp.top_k
    ints[SEED - TOP_K] = np.uint32(0 if sp is None else sp.seed).view(np.int32)
    if sp is not None:
        floats[:2] = (sp.temperature, sp.top_p)
    eos = None if params.ignore_eos else eos_id
    ints[EOS - TOP_K] = -1 if eos is None else int(eos)
    stops = list(params.stop_token_ids)[:MAX_STOP_IDS]
    ints[STOP0 - TOP_K: STOP0 - TOP_K + len(stops)] = stops
    return ints, floats


class PrefillBatch:
    """tokens [P, T] int32 and meta [P, 5] int32 (slot or -1, chunk length, samples, step0,
    prompt length: chunk tokens at positions >= it are earlier outputs, counted for penalties)."""

    def __init__(self, rows: int, chunk: int):
        self.tokens = np.zeros((rows, chunk), np.int32)
        self.meta = np.zeros((rows, 5), np.int32)
        self.meta[:, PF_SLOT] = -1

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(tokens=self.tokens, meta=self.meta)


@dataclasses.dataclass
class Forward:
    """A dispatched forward (`StepRunner.forward`) waiting for its sampling: device logits
    and the call's inputs that sampling reads."""

    logits: dict
    slots: dict
    prefill: dict | None


class StepRunner:
    """Owns the KV pages and `last_tok`; runs the jitted step (pages donated).

    kv_cache_dtype: the pages' dtype (None: the model's; "fp8": float8_e4m3fn pages
    with per-token scales, see `flashjax.serving.runner`)."""

    def __init__(self, model, *, num_blocks: int, max_seqs: int, block_size: int, max_blocks_per_seq: int,
                 logprobs_k: int, decode_kwargs: dict | None = None, kv_cache_dtype=None):
        self.config = model.config
        self.num_blocks = int(num_blocks)
        self.max_seqs = int(max_seqs)
        self.block_size = int(block_size)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        self.logprobs_k = int(logprobs_k)
        self.decode_kwargs = dict(decode_kwargs or {})
        self.graphdef, self.params = nnx.split(model)
        self.kv_cache_dtype = R.cache_dtype(self.config, kv_cache_dtype)
        self.pages = R.init_pages(self.config, self.num_blocks, self.block_size, self.kv_cache_dtype)
        self.last_tok = jnp.zeros((self.max_seqs,), jnp.int32)
        vocab = self.config.vocab_size
        self.top_k = min(vocab, max(self.logprobs_k, MAX_LOGPROBS))
        self.counts = jnp.zeros((self.max_seqs, vocab), jnp.int32)  # tokens generated per slot (penalties)
        self.bias = jnp.zeros((self.max_seqs, vocab), jnp.float32)  # logit bias per slot
        self.trace_counts: collections.Counter = collections.Counter()
        self._open: Forward | None = None  # a forward not sampled yet
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2, 3), static_argnames=("steps", "filtered"))
        self._forward = jax.jit(self._forward_impl, donate_argnums=(1,), static_argnames=("decode",))
        self._sample = jax.jit(self._sample_impl, donate_argnums=(0, 1), static_argnames=("filtered",))
        self._set_bias = jax.jit(self._set_bias_impl, donate_argnums=(0,))
        self._gather = jax.jit(self._gather_impl)
        self._scatter = jax.jit(self._scatter_impl, donate_argnums=(0,))
        self._copy = jax.jit(self._copy_impl, donate_argnums=(0,))

    # -- public ------------------------------------------------------------------
    def run(self, slots: dict, prefill: dict | None, *, steps: int, filtered: bool = False) -> dict[str, Any]:
        """Dispatch one call; returns its outputs as device arrays (not waited for).

        out["prefill"] = sampled ids [P]; out["decode"] = ids [steps, S] (-1: none).
        Single-step calls add, per decode row, out["tok_lp"] [S] (the sampled token's
        log-probability), out["top_lp"] / out["top_id"] [S, top_k]; prefill calls add
        the same for prefill rows under "pf_tok_lp", "pf_top_lp", "pf_top_id".
        """
        self._open = None
        self.pages, self.last_tok, self.counts, out = self._step(
            self.params, self.pages, self.last_tok, self.counts, self.bias, slots, prefill, steps=int(steps),
            filtered=bool(filtered))
        return out

    def lower(self, slots: dict, prefill: dict | None, *, steps: int, filtered: bool = False):
        """The step variant of these inputs' shapes, traced and lowered (nothing runs,
        nothing is donated). Its `.compile()` releases the GIL while XLA compiles, so
        several variants compile side by side in threads; `run` with the same shapes
        then finds the executable in jit's cache."""
        return self._step.lower(self.params, self.pages, self.last_tok, self.counts, self.bias, slots, prefill,
                                steps=int(steps), filtered=bool(filtered))

    def forward(self, slots: dict, prefill: dict | None, *, decode: bool) -> Forward:
        """Dispatch the model half of a one-step call (`decode`: one decode step of the slots
        with n_steps > 0, as `run(..., steps=1)`; else the prefill alone, as `steps=0`): the
        pages are written and the logits stay on the device. `sample` must follow before any
        step call (a forward left unsampled is dropped: its rows sample nothing); in between the
        host can compute what sampling needs (grammar masks)."""
        keep = {"ints": slots["ints"], "floats": slots["floats"]}  # sampling needs no block tables
        keep, prefill = jax.device_put((keep, prefill))  # sent once, for both halves
        self.pages, logits = self._forward(self.params, self.pages, self.last_tok, dict(keep, tables=slots["tables"]),
                                           prefill, decode=bool(decode))
        self._open = Forward(logits, keep, prefill)
        return self._open

    def sample(self, fwd: Forward, mask: np.ndarray | None = None, *, filtered: bool = False) -> dict[str, Any]:
        """Dispatch the sampling half of `fwd` (the last `forward`); with `mask` (int32
        [max_seqs, ceil(vocab / 32)] bitmasks, by slot) each row's tokens outside its mask are
        excluded. Returns what `run` returns for the same call (device arrays, not waited for)."""
        if fwd is not self._open:
            raise RuntimeError("StepRunner.sample: not the last step call's forward (or sampled already)")
        self._open = None
        self.last_tok, self.counts, out = self._sample(self.last_tok, self.counts, self.bias, fwd.logits, fwd.slots,
                                                       fwd.prefill, mask, filtered=bool(filtered))
        return out

    def set_bias(self, slot: int, items) -> None:
        """Make `slot`'s logit-bias row hold `items` ((token, bias) pairs; empty clears it)."""
        ids = np.full((MAX_LOGIT_BIAS,), -1, np.int32)
        vals = np.zeros((MAX_LOGIT_BIAS,), np.float32)
        for i, (t, b) in enumerate(items):
            ids[i], vals[i] = t, b
        self.bias = self._set_bias(self.bias, np.int32(slot), ids, vals)

    def swap_out(self, blocks: np.ndarray):
        """Host copies of these blocks' pages (every layer)."""
        idx = np.full((self.max_blocks_per_seq,), -1, np.int32)
        idx[: len(blocks)] = blocks
        return jax.device_get(self._gather(self.pages, idx))

    def swap_in(self, blocks: list[int], data) -> None:
        idx = np.full((self.max_blocks_per_seq,), -1, np.int32)
        idx[: len(blocks)] = blocks
        self.pages = self._scatter(self.pages, idx, data)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for i in range(0, len(copies), self.max_seqs):
            part = copies[i: i + self.max_seqs]
            src = np.full((self.max_seqs,), -1, np.int32)
            dst = src.copy()
            for j, (s_, d) in enumerate(part):
                src[j], dst[j] = s_, d
            self.pages = self._copy(self.pages, src, dst)

    # -- jitted ------------------------------------------------------------------
    def _state(self, tables, lengths, active) -> kv_cache.KVCacheState:
        nb = self.num_blocks
        return kv_cache.KVCacheState(
            free_stack=jnp.zeros((nb,), jnp.int32), num_free=jnp.int32(0), block_tables=tables,
            # refcount 1 everywhere: the host pool only ever points a write at a block
            # its row owns alone (shared blocks are full; forks copy the partial one)
            lengths=lengths, active=active, refcounts=jnp.ones((nb,), jnp.int32),
            status=jnp.int32(kv_cache.OK), block_size=self.block_size)

    def _pick(self, logits, sp: SamplingArrays, steps, filtered: bool):
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t.astype(jnp.uint32)))(sp.seed, steps)
        return sample(logits, sp, keys, filtered=filtered)

    @staticmethod
    def _adjust(logits, counts, presence, frequency, bias):
        """OpenAI presence / frequency penalties and logit bias (zeros leave logits as they are)."""
        c = counts.astype(jnp.float32)
        return (logits.astype(jnp.float32) - presence[:, None] * (c > 0) - frequency[:, None] * c + bias)

    def _logprobs(self, logits, tok):
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_id = jax.lax.top_k(lp, self.top_k)
        return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], top_lp, top_id.astype(jnp.int32)

    @staticmethod
    def _mask(logits, words):
        """Keep the logits whose bit is set in `words` (int32 [rows, ceil(V / 32)]); -inf elsewhere."""
        v = jnp.arange(logits.shape[1], dtype=jnp.int32)
        bits = jnp.right_shift(words[:, v // 32], v % 32) & 1
        return jnp.where(bits != 0, logits, -jnp.inf)

    @staticmethod
    def _sampling(slots) -> SamplingArrays:
        ints, floats = slots["ints"], slots["floats"]
        return SamplingArrays(temperature=floats[:, TEMPERATURE], top_k=ints[:, TOP_K], top_p=floats[:, TOP_P],
                              seed=jax.lax.bitcast_convert_type(ints[:, SEED], jnp.uint32))

    @staticmethod
    def _input_tokens(ints, last_tok):
        """Each decoding row's input token: the host's, or the one the previous call sampled."""
        return jnp.where(ints[:, USE_HOST] > 0, ints[:, HOST_TOK], last_tok)

    def _prefill_logits(self, model, pages, state, prefill):
        meta = prefill["meta"]
        return R.prefill(model, pages, state, prefill["tokens"], meta[:, PF_SLOT], meta[:, PF_LEN],
                         continuation=True, allocate=False)

    def _decode_logits(self, model, pages, state, lengths, tok, live):
        seq = jnp.where(live, jnp.arange(self.max_seqs, dtype=jnp.int32), -1)
        return R.decode(model, pages, state.replace(lengths=lengths), tok, seq,
                        decode_kwargs=self.decode_kwargs or None, allocate=False)

    def _sample_prefill(self, logits, last_tok, counts, bias, slots, prefill, mask, filtered):
        """Sample the prefill rows' next tokens from their last positions' logits [P, V]."""
        S = self.max_seqs
        ints, floats = slots["ints"], slots["floats"]
        meta = prefill["meta"]
        seq = meta[:, PF_SLOT]
        live = seq >= 0
        s = jnp.clip(seq, 0, S - 1)
        starts = jnp.where(live, ints[s, LENGTH], 0)
        # earlier outputs re-prefilled after a preemption count for the penalties again
        T = prefill["tokens"].shape[1]
        pos = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        is_out = live[:, None] & (jnp.arange(T)[None, :] < meta[:, PF_LEN, None]) & (pos >= meta[:, PF_OUT0, None])
        counts = counts.at[jnp.where(is_out, s[:, None], S), prefill["tokens"]].add(1, mode="drop")
        rows = jax.tree.map(lambda a: a[s], self._sampling(slots))
        logits = self._adjust(logits, counts[s], floats[s, PRESENCE], floats[s, FREQUENCY], bias[s])
        if mask is not None:
            logits = self._mask(logits, mask[s])
        tok = self._pick(logits, rows, meta[:, PF_STEP0], filtered)
        out = {"prefill": tok}
        out["pf_tok_lp"], out["pf_top_lp"], out["pf_top_id"] = self._logprobs(logits, tok)
        write = (meta[:, PF_SAMPLE] > 0) & live
        last_tok = last_tok.at[jnp.where(write, seq, S)].set(tok, mode="drop")
        counts = counts.at[jnp.where(write, seq, S), tok].add(1, mode="drop")
        return last_tok, counts, out

    def _sample_decode(self, logits, counts, bias, slots, live, step, mask, filtered):
        """Sample one decode step's tokens from its logits [S, V]: (logits as sampled, ids, counts)."""
        S = self.max_seqs
        floats = slots["floats"]
        logits = self._adjust(logits, counts, floats[:, PRESENCE], floats[:, FREQUENCY], bias)
        if mask is not None:
            logits = self._mask(logits, mask)
        new = self._pick(logits, self._sampling(slots), step, filtered)
        counts = counts.at[jnp.where(live, jnp.arange(S, dtype=jnp.int32), S), new].add(1, mode="drop")
        return logits, new, counts

    def _forward_logits(self, model, pages, last_tok, slots, prefill, decode: bool):
        """The model half of a one-step call: (pages, logits) with logits["prefill"] [P, V] (the
        prefill rows' last positions) and, with `decode`, logits["decode"] [S, V] (one decode
        step of every slot), neither adjusted nor masked yet."""
        ints = slots["ints"]
        state = self._state(slots["tables"], ints[:, LENGTH], ints[:, ACTIVE] > 0)
        logits = {}
        if prefill is not None:
            logits["prefill"], pages, state = self._prefill_logits(model, pages, state, prefill)
        if decode:
            tok = self._input_tokens(ints, last_tok)
            logits["decode"], pages, _ = self._decode_logits(model, pages, state, state.lengths, tok,
                                                             ints[:, N_STEPS] > 0)
        return pages, logits

    def _sample_logits(self, logits, last_tok, counts, bias, slots, prefill, mask, filtered):
        """The sampling half of a one-step call, on `_forward_logits`' logits (`mask`: None or
        int32 [S, ceil(V / 32)]): (last_tok, counts, outputs as a one-step `run` returns them)."""
        ints = slots["ints"]
        counts = jnp.where(ints[:, RESET, None] > 0, 0, counts)
        out = {}
        if prefill is not None:
            last_tok, counts, out = self._sample_prefill(logits["prefill"], last_tok, counts, bias, slots, prefill,
                                                         mask, filtered)
        if "decode" in logits:
            live = ints[:, N_STEPS] > 0
            tok = self._input_tokens(ints, last_tok)
            lg, new, counts = self._sample_decode(logits["decode"], counts, bias, slots, live, ints[:, STEP0], mask,
                                                  filtered)
            out["decode"] = jnp.where(live, new, -1)[None]
            out["tok_lp"], out["top_lp"], out["top_id"] = self._logprobs(lg, new)
            last_tok = jnp.where(live, new, tok)
        return last_tok, counts, out

    def _forward_impl(self, params, pages, last_tok, slots, prefill, *, decode):
        self.trace_counts["forward"] += 1
        model = nnx.merge(self.graphdef, params)
        return self._forward_logits(model, pages, last_tok, slots, prefill, decode)

    def _sample_impl(self, last_tok, counts, bias, logits, slots, prefill, mask, *, filtered):
        self.trace_counts["sample"] += 1
        return self._sample_logits(logits, last_tok, counts, bias, slots, prefill, mask, filtered)

    def _step_impl(self, params, pages, last_tok, counts, bias, slots, prefill, *, steps, filtered):
        # The one-call step, written out as it was measured on the H200 (2026-12-02: 8,029 tok/s
        # llama-7b saturation); `forward` + `sample` (structured output) split the same
        # computation over two calls, and tests/test_guided.py checks they agree with it.
        self.trace_counts["step"] += 1
        model = nnx.merge(self.graphdef, params)
        S = self.max_seqs
        ints, floats = slots["ints"], slots["floats"]
        counts = jnp.where(ints[:, RESET, None] > 0, 0, counts)
        presence, frequency = floats[:, PRESENCE], floats[:, FREQUENCY]
        state = self._state(slots["tables"], ints[:, LENGTH], ints[:, ACTIVE] > 0)
        sp = SamplingArrays(temperature=floats[:, TEMPERATURE], top_k=ints[:, TOP_K], top_p=floats[:, TOP_P],
                            seed=jax.lax.bitcast_convert_type(ints[:, SEED], jnp.uint32))
        out = {}
        if prefill is not None:
            meta = prefill["meta"]
            seq = meta[:, PF_SLOT]
            live = seq >= 0
            s = jnp.clip(seq, 0, S - 1)
            starts = jnp.where(live, ints[s, LENGTH], 0)
            logits, pages, state = R.prefill(model, pages, state, prefill["tokens"], seq, meta[:, PF_LEN],
                                             continuation=True, allocate=False)
            # earlier outputs re-prefilled after a preemption count for the penalties again
            T = prefill["tokens"].shape[1]
            pos = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            is_out = live[:, None] & (jnp.arange(T)[None, :] < meta[:, PF_LEN, None]) & (pos >= meta[:, PF_OUT0, None])
            counts = counts.at[jnp.where(is_out, s[:, None], S), prefill["tokens"]].add(1, mode="drop")
            rows = jax.tree.map(lambda a: a[s], sp)
            logits = self._adjust(logits, counts[s], presence[s], frequency[s], bias[s])
            if "mask" in slots:
                logits = self._mask(logits, slots["mask"][s])
            tok = self._pick(logits, rows, meta[:, PF_STEP0], filtered)
            out["prefill"] = tok
            out["pf_tok_lp"], out["pf_top_lp"], out["pf_top_id"] = self._logprobs(logits, tok)
            write = (meta[:, PF_SAMPLE] > 0) & live
            last_tok = last_tok.at[jnp.where(write, seq, S)].set(tok, mode="drop")
            counts = counts.at[jnp.where(write, seq, S), tok].add(1, mode="drop")
        if steps:
            n_steps = ints[:, N_STEPS]
            step0 = ints[:, STEP0]
            eos = ints[:, EOS]
            stop_ids = ints[:, STOP0:]
            tok = jnp.where(ints[:, USE_HOST] > 0, ints[:, HOST_TOK], last_tok)
            rows_all = jnp.arange(S, dtype=jnp.int32)

            def one(j, pages, lengths, tok, alive, counts):
                live = alive & (j < n_steps)
                seq = jnp.where(live, rows_all, -1)
                logits, pages, st = R.decode(model, pages, state.replace(lengths=lengths), tok, seq,
                                             decode_kwargs=self.decode_kwargs or None, allocate=False)
                logits = self._adjust(logits, counts, presence, frequency, bias)
                if "mask" in slots:
                    logits = self._mask(logits, slots["mask"])
                new = self._pick(logits, sp, step0 + j, filtered)
                counts = counts.at[jnp.where(live, rows_all, S), new].add(1, mode="drop")
                stop = (new == eos) | jnp.any(new[:, None] == stop_ids, axis=1)
                return logits, new, pages, st.lengths, jnp.where(live, new, tok), alive & ~(live & stop), \
                    jnp.where(live, new, -1), counts

            alive = n_steps > 0
            if steps == 1:
                logits, new, pages, _, tok, _, out_tok, counts = one(0, pages, state.lengths, tok, alive, counts)
                out["decode"] = out_tok[None]
                out["tok_lp"], out["top_lp"], out["top_id"] = self._logprobs(logits, new)
            else:
                # A fixed trip count (no early exit): XLA then runs the loop without copying
                # a predicate to the host each iteration, so the call is dispatched without
                # waiting for the device and the host overlaps it. Rows that stopped idle.
                def body(j, c):
                    pages, lengths, tok, alive, toks, counts = c
                    _, _, pages, lengths, tok, alive, new, counts = one(j, pages, lengths, tok, alive, counts)
                    return pages, lengths, tok, alive, toks.at[j].set(new), counts

                toks = jnp.full((steps, S), -1, jnp.int32)
                pages, _, tok, _, toks, counts = jax.lax.fori_loop(
                    0, steps, body, (pages, state.lengths, tok, alive, toks, counts))
                out["decode"] = toks
            last_tok = tok
        return pages, last_tok, counts, out

    def _set_bias_impl(self, bias, slot, ids, vals):
        self.trace_counts["bias"] += 1
        row = jnp.zeros((bias.shape[1],), jnp.float32).at[jnp.where(ids >= 0, ids, bias.shape[1])].set(
            vals, mode="drop")
        return bias.at[slot].set(row)

    # Every per-layer array (pages, and an FP8 cache's scales) has the block axis second.
    def _gather_impl(self, pages, idx):
        self.trace_counts["swap_out"] += 1
        i = jnp.clip(idx, 0, self.num_blocks - 1)
        return tuple(tuple(x[:, i] for x in layer) for layer in pages)

    def _scatter_impl(self, pages, idx, data):
        self.trace_counts["swap_in"] += 1
        i = jnp.where(idx >= 0, idx, self.num_blocks)
        return tuple(tuple(x.at[:, i].set(d, mode="drop") for x, d in zip(layer, saved))
                     for layer, saved in zip(pages, data))

    def _copy_impl(self, pages, src, dst):
        self.trace_counts["copy"] += 1
        return tuple(kv_cache.copy_blocks(*layer[:2], kv_cache.BlockCopy(src, dst), *layer[2:])
                     for layer in pages)
