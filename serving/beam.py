"""Beam search on the paged cache (`RequestParams(beam_width=W)`).

A beam group starts as one leader sequence. After each decode step the
group's live beams offer their top-W next tokens (log-probabilities from the
step); the W best continuations by summed log-probability survive. A parent's
first surviving child takes over its slot, further children fork it (full
blocks shared, the partial last block copied). A continuation that ends in
end-of-text or a stop id, or whose text completes a stop string (tokens and text
cut there), is finished; the group ends when W are finished, at
`max_tokens`, or at the context length, and returns its `n` best.

Beam steps run synchronously (each step's top tokens are read before the next
is planned); the engine does not overlap them with the device.
"""

from __future__ import annotations

import collections

from flashjax.serving.detokenizer import Detokenizer
from flashjax.serving.handles import StreamEvent
from flashjax.serving.scheduler import Request, RequestStatus

__all__ = ["BeamState", "beam_step"]


class BeamState:
    def __init__(self, width: int):
        self.width = width
        self.finished: list[tuple[float, list[int], str]] = []


def _stop_cut(output, params, prompt, ids):
    """(ids, text, stopped): a beam's tokens and text cut at its first stop string."""
    if not params.stop or output.tokenizer is None:
        return ids, None, False
    d = Detokenizer(output.tokenizer, stop=params.stop, prompt_ids=prompt)
    _, stopped = d.push(ids)
    if not stopped:
        return ids, None, False
    return list(ids[: d.num_tokens]), d.text, True


def beam_step(items, now: float, *, scheduler, runner, output, max_len: int) -> None:
    """items: (beam, top logprobs, top ids) of one group's live beams, after a decode."""
    handle = items[0][0].group
    W = handle.params.beam_width
    st: BeamState = handle.beam
    bm = scheduler.blocks
    cands = []
    for r, lps, ids in items:
        for lp, t in zip(lps.tolist(), ids.tolist()):
            cands.append((r.beam_score + lp, r, int(t)))
    cands.sort(key=lambda c: (-c[0], c[1].index, c[2]))
    eos = None if handle.params.ignore_eos else output.eos_id
    stops = set(handle.params.stop_token_ids) | ({eos} if eos is not None else set())
    chosen = []
    for score, r, t in cands:
        if len(chosen) >= W - len(st.finished):
            break
        out = r.output + [t]
        cut, _, stopped = _stop_cut(output, handle.params, r.prompt, out)
        if t in stops or stopped:  # a stop id / end-of-text, or a stop string completed
            st.finished.append((score, cut, "stop"))
            if len(st.finished) >= W:
                break
            continue
        chosen.append((score, r, t))
    output.first_token(handle, now)
    parents = [r for r, _, _ in items]
    used = collections.Counter(id(r) for _, r, _ in chosen)
    for r in parents:
        if used[id(r)] == 0:
            scheduler.remove(r)
            scheduler.release(r)
            r.status = RequestStatus.FINISHED
    taken = collections.Counter()
    new_beams = []
    copies = []
    orig = {id(r): list(r.output) for r in parents}
    spare = [s for p in parents for s in p.reserved_slots]  # slots reserved by the leader go first
    for p in parents:
        p.reserved_slots = []
    for score, r, t in chosen:
        if taken[id(r)] == 0:
            beam = r
        else:
            slot = spare.pop() if spare else bm.take_slot(activate=False)
            bm.activate(slot)
            c = bm.fork(r.slot, slot)
            if c is not None:
                copies.append(c)
            beam = Request(r.request_id, list(r.prompt), r.params, index=0, group=handle)
            beam.arrival, beam.order = r.arrival, r.order
            beam.slot = slot
            beam.num_cached = r.num_cached
            beam.hashes = list(r.hashes)
            beam.status = RequestStatus.RUNNING
            scheduler.running.append(beam)
        beam.output = orig[id(r)] + [t]
        taken[id(r)] += 1
        beam.beam_score = score
        beam.fork_pending = False
        new_beams.append(beam)
    for s in spare:
        bm.release(s)
    runner.copy_blocks(copies)
    handle.seqs = list(new_beams)
    done = len(st.finished) >= W or not new_beams
    if not done and len(new_beams[0].output) >= handle.params.max_tokens:
        done = True
    if not done and new_beams[0].context_len >= max_len:
        done = True
    if done:
        final = list(st.finished) + [(b.beam_score, list(b.output), "length") for b in new_beams]
        final.sort(key=lambda f: -f[0])
        for b in new_beams:
            scheduler.remove(b)
            scheduler.release(b)
            b.status = RequestStatus.FINISHED
        for i, (score, out, reason) in enumerate(final[: handle.params.n]):
            out, text, _ = _stop_cut(output, handle.params, handle.prompt, out)
            handle.token_ids[i] = out
            eos = None if handle.params.ignore_eos else output.eos_id
            handle.texts[i] = text if text is not None else output.decode_text(
                out[:-1] if out and out[-1] == eos else out)
            handle.finish_reasons[i] = reason
            handle.scores[i] = score
            handle._emit(StreamEvent(i, out, handle.texts[i], reason))
        output.finish_handle(handle)
