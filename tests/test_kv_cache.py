"""Paged KV-cache allocator: unit tests, a Hypothesis model check of random op
sequences (block ownership, refcounts, atomic failure, fork/copy-on-write and
the token contents seen through the pages), and use under jit / while_loop."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flashjax import kv_cache as kc

NB, MAX_SEQS, MAX_BPS, BS = 7, 4, 5, 4
CAP = MAX_BPS * BS
W = CAP  # tokens written per write_kv call (padded with seq id -1)

allocate = jax.jit(kc.allocate)
append = jax.jit(kc.append)
append_step = jax.jit(kc.append_step)
free = jax.jit(kc.free)
fork_and_copy = jax.jit(kc.fork_and_copy)
write_kv = jax.jit(kc.write_kv)
gather_kv = jax.jit(kc.gather_kv)


def cdiv(a, b):
    return -(-a // b)


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def same_but_status(a, b):
    return leaves_equal(a.replace(status=jnp.int32(0)), b.replace(status=jnp.int32(0)))


# --------------------------------------------------------------- unit tests


def test_init_and_allocate_in_order():
    s = kc.init_state(NB, MAX_SEQS, MAX_BPS, BS)
    kc.check_invariants(s)
    s = kc.allocate(s, 1, 9)
    assert int(s.status) == kc.OK
    assert np.asarray(s.block_tables[1]).tolist() == [0, 1, 2, -1, -1]
    assert int(s.num_free) == NB - 3 and int(s.lengths[1]) == 9 and bool(s.active[1])
    kc.check_invariants(s)
    assert kc.status_name(s.status) == "ok"


def test_out_of_blocks_changes_nothing():
    s = kc.init_state(4, 3, 4, BS)
    s = kc.allocate(s, 0, 10)  # 3 blocks
    t = kc.allocate(s, 1, 5)  # needs 2, 1 free
    assert int(t.status) == kc.OUT_OF_BLOCKS
    assert same_but_status(s, t)
    t = kc.append(s, 0, 3)  # 10 -> 13 needs a 4th block: fits
    assert int(t.status) == kc.OK and int(t.num_free) == 0
    u = kc.append(t, 0, 4)  # 13 -> 17: 5th block, none left
    assert int(u.status) == kc.SEQ_TOO_LONG or int(u.status) == kc.OUT_OF_BLOCKS
    assert same_but_status(t, u)
    u = kc.append_step(kc.allocate(kc.free(t, 0), 2, 16))  # 16 -> 17 needs a 5th block
    assert int(u.status) == kc.SEQ_TOO_LONG


def test_status_codes():
    s = kc.allocate(kc.init_state(NB, MAX_SEQS, MAX_BPS, BS), 0, 4)
    assert int(kc.allocate(s, 0, 1).status) == kc.SEQ_ACTIVE
    assert int(kc.allocate(s, MAX_SEQS, 1).status) == kc.INVALID_SEQ
    assert int(kc.allocate(s, -1, 1).status) == kc.INVALID_SEQ
    assert int(kc.allocate(s, 1, -2).status) == kc.INVALID_ARG
    assert int(kc.allocate(s, 1, CAP + 1).status) == kc.SEQ_TOO_LONG
    assert int(kc.append(s, 1, 1).status) == kc.SEQ_INACTIVE
    assert int(kc.free(s, 2).status) == kc.SEQ_INACTIVE
    assert int(kc.fork(s, 0, 0)[0].status) == kc.INVALID_SEQ
    assert int(kc.fork(s, 1, 2)[0].status) == kc.SEQ_INACTIVE
    assert int(kc.fork(kc.allocate(s, 1, 0), 0, 1)[0].status) == kc.SEQ_ACTIVE
    bad = kc.append_batch(s, jnp.array([1, 1, 0, 0], jnp.int32))
    assert int(bad.status) == kc.SEQ_INACTIVE and same_but_status(s, bad)


def test_fork_shares_full_blocks_and_copies_partial():
    s = kc.allocate(kc.init_state(NB, MAX_SEQS, MAX_BPS, BS), 0, 10)  # blocks 0,1,2 (2 partial)
    kp, vp = kc.init_pages(NB, BS, 2, 8, jnp.float32)
    k = jnp.arange(10 * 2 * 8, dtype=jnp.float32).reshape(10, 2, 8)
    kp, vp = kc.write_kv(kp, vp, s, jnp.zeros(10, jnp.int32), jnp.arange(10), k, -k)
    s2, copy = kc.fork(s, 0, 3)
    assert int(s2.status) == kc.OK
    assert (int(copy.src), int(copy.dst)) == (2, 3)
    assert np.asarray(s2.block_tables[3]).tolist() == [0, 1, 3, -1, -1]
    assert np.asarray(s2.refcounts[:4]).tolist() == [2, 2, 1, 1]
    kc.check_invariants(s2)
    kp, vp = kc.copy_blocks(kp, vp, copy)
    kd, vd = kc.gather_kv(kp, vp, s2.block_tables, s2.lengths)
    np.testing.assert_array_equal(kd[3, :10], k)
    np.testing.assert_array_equal(vd[3, :10], -k)
    # writes into shared blocks are dropped, into the private copy they land
    s3 = kc.append(kc.append(s2, 0, 1), 3, 1)
    kp2, _ = kc.write_kv(kp, vp, s3, jnp.array([3, 3, 0]), jnp.array([1, 10, 10]),
                         jnp.ones((3, 2, 8)), jnp.ones((3, 2, 8)))
    kd2, _ = kc.gather_kv(kp2, vp, s3.block_tables, s3.lengths)
    np.testing.assert_array_equal(kd2[0, :10], k)  # history untouched
    np.testing.assert_array_equal(kd2[3, 1], k[1])  # dropped: block 0 is shared
    assert (np.asarray(kd2[3, 10]) == 1).all() and (np.asarray(kd2[0, 10]) == 1).all()
    # at a block boundary nothing is copied
    s4, copy = kc.fork(kc.allocate(s, 1, 8), 1, 2)
    assert (int(copy.src), int(copy.dst)) == (-1, -1) and int(s4.status) == kc.OK
    kc.check_invariants(s4)
    # free the source: shared blocks stay with the fork
    s5 = kc.free(s2, 0)
    assert int(s5.status) == kc.OK
    assert np.asarray(s5.refcounts[:4]).tolist() == [1, 1, 0, 1]
    kc.check_invariants(s5)


def test_fork_out_of_blocks_returns_no_copy():
    s = kc.allocate(kc.init_state(3, 2, 3, BS), 0, 9)  # 3 blocks, last partial, none free
    s2, copy = kc.fork(s, 0, 1)
    assert int(s2.status) == kc.OUT_OF_BLOCKS and same_but_status(s, s2)
    assert (int(copy.src), int(copy.dst)) == (-1, -1)


def test_free_batch_and_append_batch():
    s = kc.init_state(NB, MAX_SEQS, MAX_BPS, BS)
    for i, n in enumerate([3, 4, 5, 0]):
        s = kc.allocate(s, i, n)
    s = kc.append_batch(s, jnp.array([1, 1, 0, 5], jnp.int32))
    assert int(s.status) == kc.OK
    assert np.asarray(s.lengths).tolist() == [4, 5, 5, 5]
    kc.check_invariants(s)
    s = kc.free_batch(s, jnp.array([True, False, True, False]))
    assert int(s.status) == kc.OK and int(s.num_free) == NB - 4
    kc.check_invariants(s)


def test_write_and_gather_prefill_shapes():
    s = kc.allocate(kc.allocate(kc.init_state(NB, MAX_SEQS, MAX_BPS, BS), 0, 6), 1, 6)
    kp, vp = kc.init_pages(NB, BS, 3, 4, jnp.bfloat16)
    k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 3, 4)), jnp.bfloat16)
    kp, vp = kc.write_kv(kp, vp, s, jnp.array([[0], [1]]), jnp.arange(6)[None, :], k, k)
    kd, _ = kc.gather_kv(kp, vp, s.block_tables, s.lengths, max_len=8)
    assert kd.shape == (MAX_SEQS, 8, 3, 4)
    np.testing.assert_array_equal(np.asarray(kd[:2, :6], np.float32), np.asarray(k, np.float32))
    assert (np.asarray(kd[:, 6:], np.float32) == 0).all()
    with pytest.raises(ValueError, match="k and v must have shape"):
        kc.write_kv(kp, vp, s, jnp.array([0]), jnp.array([0]), k, k)


def test_ops_inside_while_loop_and_scan():
    """A decode loop in lax.while_loop: one token per active sequence per step
    until the pool runs out; the failing step must leave the state intact."""
    s = kc.init_state(NB, MAX_SEQS, 8, BS)
    s = kc.allocate(kc.allocate(s, 0, 3), 2, 4)

    def cond(c):
        s, n = c
        return s.status == kc.OK

    def body(c):
        s, n = c
        t = kc.append_step(s)
        return t, n + (t.status == kc.OK)

    out, steps = jax.jit(lambda s: jax.lax.while_loop(cond, body, (s, 0)))(s)
    # python model: lengths 3 and 4 grow together until 12 blocks are used
    l0, l1, n = 3, 4, 0
    while cdiv(l0 + 1, BS) + cdiv(l1 + 1, BS) <= NB:
        l0, l1, n = l0 + 1, l1 + 1, n + 1
    assert int(steps) == n and int(out.status) == kc.OUT_OF_BLOCKS
    assert np.asarray(out.lengths).tolist() == [l0, 0, l1, 0]
    kc.check_invariants(out)

    def step(s, x):
        seq, n = x
        s = kc.allocate(s, seq, n)
        a = s.status
        s, _ = kc.fork(s, seq, (seq + 1) % MAX_SEQS)
        f = s.status
        s = kc.free(s, seq)
        return s, jnp.stack([a, f, s.status])

    seqs = jnp.array([0, 1, 2, 3, 1], jnp.int32)
    ns = jnp.array([5, 7, 1, 4, 30], jnp.int32)
    init = kc.init_state(NB, MAX_SEQS, MAX_BPS, BS)
    final, statuses = jax.jit(lambda s: jax.lax.scan(step, s, (seqs, ns)))(init)
    kc.check_invariants(final)
    # the same ops run eagerly give the same states and statuses
    s, eager = init, []
    for x in zip(seqs, ns):
        s, code = step(s, x)
        eager.append(np.asarray(code).tolist())
    assert np.asarray(statuses).tolist() == eager
    assert leaves_equal(s, final)
    # step 1 allocates into the slot step 0 forked into: SEQ_ACTIVE, then it is
    # forked on and freed; step 4 asks for more than max_blocks_per_seq
    assert eager[0] == [kc.OK] * 3 and eager[1][0] == kc.SEQ_ACTIVE
    assert eager[4][0] == kc.SEQ_TOO_LONG


# ------------------------------------------------------ Hypothesis model check

ANY_SEQ = list(range(-1, MAX_SEQS + 1))


def draw_op(data, m):
    """An op biased towards ones that can succeed (given the model), with
    some chance of an arbitrary (often invalid) one."""
    active = sorted(m.tokens)
    inactive = [i for i in range(MAX_SEQS) if i not in m.tokens]
    kind = data.draw(st.sampled_from(["alloc", "alloc", "append", "append", "step", "fork",
                                      "fork", "free"]))

    def pick(pool):
        if pool and data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(pool))
        return data.draw(st.sampled_from(ANY_SEQ))

    if kind == "alloc":
        return (kind, pick(inactive), data.draw(st.integers(-1, CAP + 2)))
    if kind == "append":
        return (kind, pick(active), data.draw(st.integers(-1, 9)))
    if kind == "fork":
        return (kind, pick(active), pick(inactive))
    if kind == "free":
        return (kind, pick(active))
    return (kind,)


class Model:
    """Independent model: per sequence its tokens and abstract block ids."""

    def __init__(self):
        self.tokens: dict[int, list[float]] = {}
        self.blocks: dict[int, list[int]] = {}
        self.ids = itertools.count()

    def used(self):
        return len({b for bl in self.blocks.values() for b in bl})

    def free_blocks(self):
        return NB - self.used()

    def grow(self, seq, n):
        cur = len(self.tokens[seq])
        for _ in range(cdiv(cur + n, BS) - cdiv(cur, BS)):
            self.blocks[seq].append(next(self.ids))


def valid(seq):
    return 0 <= seq < MAX_SEQS


def expected_status(m: Model, op):
    kind = op[0]
    if kind == "alloc":
        _, seq, n = op
        if not valid(seq):
            return kc.INVALID_SEQ
        if n < 0:
            return kc.INVALID_ARG
        if seq in m.tokens:
            return kc.SEQ_ACTIVE
        if cdiv(n, BS) > MAX_BPS:
            return kc.SEQ_TOO_LONG
        return kc.OUT_OF_BLOCKS if cdiv(n, BS) > m.free_blocks() else kc.OK
    if kind == "append":
        _, seq, n = op
        if not valid(seq):
            return kc.INVALID_SEQ
        if n < 0:
            return kc.INVALID_ARG
        if seq not in m.tokens:
            return kc.SEQ_INACTIVE
        cur = len(m.tokens[seq])
        if cdiv(cur + n, BS) > MAX_BPS:
            return kc.SEQ_TOO_LONG
        return kc.OUT_OF_BLOCKS if cdiv(cur + n, BS) - cdiv(cur, BS) > m.free_blocks() else kc.OK
    if kind == "step":
        if any(cdiv(len(t) + 1, BS) > MAX_BPS for t in m.tokens.values()):
            return kc.SEQ_TOO_LONG
        need = sum(cdiv(len(t) + 1, BS) - cdiv(len(t), BS) for t in m.tokens.values())
        return kc.OUT_OF_BLOCKS if need > m.free_blocks() else kc.OK
    if kind == "fork":
        _, src, dst = op
        if not (valid(src) and valid(dst)) or src == dst:
            return kc.INVALID_SEQ
        if src not in m.tokens:
            return kc.SEQ_INACTIVE
        if dst in m.tokens:
            return kc.SEQ_ACTIVE
        partial = len(m.tokens[src]) % BS != 0
        return kc.OUT_OF_BLOCKS if partial and m.free_blocks() < 1 else kc.OK
    _, seq = op
    if not valid(seq):
        return kc.INVALID_SEQ
    return kc.OK if seq in m.tokens else kc.SEQ_INACTIVE


def write_tokens(kp, vp, s, writes, values):
    """writes: list of (seq, pos); pad to W with seq -1 (dropped)."""
    seqs = np.full(W, -1, np.int32)
    pos = np.zeros(W, np.int32)
    vals = np.zeros((W, 1, 2), np.float32)
    for i, ((q, p), val) in enumerate(zip(writes, values)):
        seqs[i], pos[i], vals[i] = q, p, val
    return write_kv(kp, vp, s, jnp.asarray(seqs), jnp.asarray(pos),
                    jnp.asarray(vals), jnp.asarray(-vals))


def check_against_model(m: Model, s, kp, vp):
    kc.check_invariants(s)
    tables = np.asarray(s.block_tables)
    assert sorted(np.flatnonzero(np.asarray(s.active)).tolist()) == sorted(m.tokens)
    assert int(s.num_free) == m.free_blocks()
    mapping: dict[int, int] = {}
    for seq, abstract in m.blocks.items():
        assert int(s.lengths[seq]) == len(m.tokens[seq])
        real = tables[seq, :len(abstract)].tolist()
        for a, r in zip(abstract, real):
            assert mapping.setdefault(a, r) == r, "one model block maps to two blocks"
    assert len(set(mapping.values())) == len(mapping), "two model blocks share a real block"
    kd, vd = gather_kv(kp, vp, s.block_tables, s.lengths)
    kd, vd = np.asarray(kd), np.asarray(vd)
    for seq, toks in m.tokens.items():
        np.testing.assert_array_equal(kd[seq, :len(toks), 0, 0], np.asarray(toks, np.float32))
        np.testing.assert_array_equal(vd[seq, :len(toks), 0, 0], -np.asarray(toks, np.float32))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 30))
def test_random_op_sequences(data, num_ops):
    m = Model()
    s = kc.init_state(NB, MAX_SEQS, MAX_BPS, BS)
    kp, vp = kc.init_pages(NB, BS, 1, 2, jnp.float32)
    counter = itertools.count(1)
    for _ in range(num_ops):
        op = draw_op(data, m)
        want = expected_status(m, op)
        before = s
        kind = op[0]
        if kind == "alloc":
            s = allocate(s, op[1], op[2])
        elif kind == "append":
            s = append(s, op[1], op[2])
        elif kind == "step":
            s = append_step(s)
        elif kind == "fork":
            s, kp, vp = fork_and_copy(s, kp, vp, op[1], op[2])
        else:
            s = free(s, op[1])
        event(f"{kind}: {kc.status_name(want)}")
        assert int(s.status) == want, (op, kc.status_name(s.status), kc.status_name(want))
        if want != kc.OK:
            assert same_but_status(before, s), f"failed {op} changed the state"
            check_against_model(m, s, kp, vp)
            continue
        writes = []
        if kind == "alloc":
            _, seq, n = op
            m.tokens[seq], m.blocks[seq] = [], []
            m.grow(seq, n)
            writes = [(seq, p) for p in range(n)]
        elif kind == "append":
            _, seq, n = op
            m.grow(seq, n)
            cur = len(m.tokens[seq])
            writes = [(seq, cur + i) for i in range(n)]
        elif kind == "step":
            for seq in list(m.tokens):
                m.grow(seq, 1)
                writes.append((seq, len(m.tokens[seq])))
        elif kind == "fork":
            _, src, dst = op
            m.tokens[dst] = list(m.tokens[src])
            blocks = list(m.blocks[src])
            if len(m.tokens[src]) % BS:
                blocks[-1] = next(m.ids)  # copy-on-write
            m.blocks[dst] = blocks
        else:
            del m.tokens[op[1]], m.blocks[op[1]]
        values = [float(next(counter)) for _ in writes]
        for (seq, _), val in zip(writes, values):
            m.tokens[seq].append(val)
        if writes:
            kp, vp = write_tokens(kp, vp, s, writes, values)
        check_against_model(m, s, kp, vp)
