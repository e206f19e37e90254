"""The scheduler and block pool alone (no engine, no device): plans, admission,
prefix caching, forks, preemption and steps in flight."""

from __future__ import annotations

from flashjax.serving.blocks import BlockManager
from flashjax.serving.scheduler import Request, RequestParams, RequestStatus, Scheduler


def make(num_blocks=8, max_seqs=4, block_size=4, budget=16, rows=2, chunk=8, mode="recompute", prefix=True):
    bm = BlockManager(num_blocks, max_seqs, 16, block_size, prefix_caching=prefix)
    return Scheduler(bm, max_num_batched_tokens=budget, prefill_rows=rows, max_chunk=chunk, max_len=64,
                     preemption_mode=mode)


def run_plan(s: Scheduler, plan, sampled=None):
    """What the engine does around a plan, on the host only: grow blocks, advance caches,
    then read back one sampled token per sampling row."""
    bm = s.blocks
    for r, c in plan.prefills:
        bm.grow(r.slot, c)
        r.num_cached += c
        if r.num_cached == r.context_len:
            r.output.append(7 if sampled is None else sampled)
    for r in plan.decodes:
        bm.grow(r.slot, 1)
        r.num_cached += 1
        r.output.append(7 if sampled is None else sampled)
    for r, _ in plan.prefills:
        bm.register(r)
    for r in plan.decodes:
        bm.register(r)


def req(prompt, **kw):
    return Request("r", list(prompt), RequestParams(temperature=0, **kw))


def test_admission_chunks_and_budget():
    s = make(budget=10, rows=2, chunk=8)
    a, b, c = req(range(1, 13), max_tokens=4), req(range(20, 25), max_tokens=4), req(range(30, 33), max_tokens=4)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    # FCFS: a gets a chunk of 8 (max_chunk), b the 2 tokens left of the budget; c waits
    assert [(r, n) for r, n in plan.prefills] == [(a, 8), (b, 2)] and plan.admitted == [a, b]
    assert list(s.waiting) == [c] and not plan.decodes
    run_plan(s, plan)
    plan = s.schedule()
    assert plan.prefills[0] == (a, 4) and plan.prefills[1] == (b, 3)
    s.blocks.check()


def test_prefix_cache_attaches_full_blocks():
    s = make()
    shared = list(range(1, 9))  # two full blocks of 4
    a = req(shared + [50], max_tokens=2)
    s.add(a)
    run_plan(s, s.schedule())
    s.finish(a, "stop")
    assert s.blocks.num_used == 0 and len(s.blocks.evictable) == 2
    b = req(shared + [60, 61], max_tokens=2)
    s.add(b)
    plan = s.schedule()
    assert b.cached_prompt_tokens == 8 and plan.prefills == [(b, 2)]
    assert s.counters["prefix_hit_tokens"] == 8
    s.blocks.check()


def test_decode_waits_for_tokens_in_flight():
    s = make()
    a = req([1, 2, 3], max_tokens=3)
    s.add(a)
    run_plan(s, s.schedule())
    # two tokens sampled by dispatched steps, not read yet: the third and last is in flight
    a.num_cached += 2
    a.inflight = 2
    s.blocks.grow(a.slot, 2)
    assert a.pending == 1 and a.decode_room(64) == 0
    assert s.schedule().empty  # nothing to do until the host reads them


def test_blocked_without_preemption_then_preempts_newest():
    s = make(num_blocks=4, max_seqs=3, block_size=4, budget=16, rows=3, chunk=8)
    olds = [req([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=20), req([9, 8, 7, 6, 5, 4, 3, 2], max_tokens=20)]
    for r in olds:
        s.add(r)
    run_plan(s, s.schedule())  # each holds 2 full blocks (8 prompt tokens): the pool is full and
    # each decode needs a third
    assert s.blocks.num_available == 0
    plan = s.schedule(allow_preempt=False)
    assert plan.blocked and not plan.decodes and s.num_running == 2  # nothing changed
    plan = s.schedule()
    assert plan.preempted == [olds[1]] and plan.decodes == [olds[0]]
    assert olds[1].status is RequestStatus.WAITING and olds[1].slot == -1 and list(s.waiting) == [olds[1]]
    assert s.counters["preemptions"] == 1
    s.blocks.check()


def test_swap_preemption_reports_blocks_to_copy():
    s = make(num_blocks=4, max_seqs=3, block_size=4, budget=16, rows=3, chunk=8, mode="swap")
    a, b = req([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=20), req([9, 8, 7, 6, 5, 4, 3, 2], max_tokens=20)
    s.add(a)
    s.add(b)
    run_plan(s, s.schedule())
    blocks_b = s.blocks.tables[b.slot, :2].copy()
    plan = s.schedule()
    assert [r for r, _ in plan.swap_out] == [b] and list(plan.swap_out[0][1]) == list(blocks_b)
    assert b.status is RequestStatus.SWAPPED and b.swap == (None, 8)


def test_n_greater_than_one_forks_after_the_prompt():
    s = make(num_blocks=12)
    a = Request("r", [1, 2, 3, 4, 5, 6], RequestParams(temperature=0.5, max_tokens=4, n=3))
    a.fork_pending = True
    s.add(a)
    plan = s.schedule()
    assert plan.prefills == [(a, 5)] and len(a.reserved_slots) == 2  # all but the last prompt token
    run_plan(s, plan)
    plan = s.schedule()
    assert len(plan.forked) == 1 and plan.forked[0][0] is a
    kids = plan.forked[0][1]
    assert [k.index for k in kids] == [1, 2] and set(plan.decodes) == {a, *kids}
    # the partial last block (5 tokens = 1 full + 1 partial) is copied for each child
    assert len(plan.copies) == 2
    run_plan(s, plan)
    s.blocks.check()
