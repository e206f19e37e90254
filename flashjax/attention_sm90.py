"""FlashAttention for Hopper (sm_90) in Pallas's Mosaic GPU dialect: wgmma and TMA.

Forward: one program per 128 query rows of a (batch, head). Warpgroup 2 streams
128-key tiles of K and V through a ring of shared-memory slots with TMA;
warpgroups 0 and 1 each own 64 rows and run S = Q K^T, the online softmax and
O += P V with wgmma, taking turns on the tensor cores (ping-pong) so one's
exponentials hide behind the other's matmuls. It writes O and the log2-domain
log-sum-exp that the Triton forward in :mod:`flashjax.attention` writes.

Backward: the Triton backward runs two kernels, one for dK/dV and one for dQ,
which recomputes the scores and dP: seven matmuls per tile pair. This one does
five. One program per 128-key block of a (batch, head):

* warpgroup 2 streams query tiles (Q, dO, log-sum-exp, delta) through a ring of
  shared-memory slots with TMA;
* warpgroups 0 and 1 each own 64 of the block's keys. Per query tile each computes
  S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T and dK += dS^T Q with wgmma;
  both then write their half of dS^T to shared memory, and one of them (the two
  alternate by tile) computes dQ_tile = dS K over all 128 keys and adds it into a
  float32 dQ in HBM with a bulk TMA reduction (``cp.reduce.async.bulk``), one
  64 x head_dim tile at a time, instead of element-wise atomics.

Both cover what training a causal or bidirectional model needs: equal query and key
lengths that are multiples of 128, head_dim 64, bf16/f16, any GQA grouping, no
window, padding, segments, block-sparsity or soft-cap. `supports` says whether a call
qualifies; :mod:`flashjax.attention` uses the Triton kernels otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flashjax import _backend
from flashjax._attention_common import LOG2E

BLOCK_Q = 64  # query rows per step (wgmma M for dQ)
WG_KEYS = 64  # keys per compute warpgroup (wgmma M for S^T, dV, dP^T, dK)
COMPUTE_WGS = 2
BLOCK_K = WG_KEYS * COMPUTE_WGS
HEAD_DIM = 64
STAGES = 2  # depth of the K/V (forward) and query-tile (backward) rings


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 (GPU-only dialect)

    return plgpu


def _vary_like(x, like):
    """Give a kernel output the varying manual axes of the input it corresponds to.

    Inside `jax.shard_map` (with its default check_vma) a Mosaic GPU kernel's results
    carry no manual axes, while custom_vjp and shard_map expect q's own (`{V:model}`)."""
    return _backend.vary_over(x, _backend.varying_axes(like))


def _produce(n_steps, copies):
    """The producer warpgroup's loop: fill ring slot ``t % STAGES`` for each step t.

    ``copies(t, slot)`` lists ``(free barrier or None, gmem source, smem slot, ready
    barrier)`` in issue order; once the ring has wrapped (t >= STAGES) a copy first
    waits for its free barrier (the compute warpgroups' arrival on that slot)."""
    plgpu = _plgpu()
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, n_steps)
    def _(t):
        slot = lax.rem(t, jnp.int32(STAGES))
        for free, src, dst, ready in copies(t, slot):
            if free is not None:
                pl.when(t >= STAGES)(lambda free=free: plgpu.barrier_wait(free))
            plgpu.copy_gmem_to_smem(src, dst, ready)


def supports(*, q_len, kv_len, head_dim, dtype, window, softcap, masked, sparse) -> str | None:
    """None when the call can run here; otherwise the reason it cannot (for logs/tests)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (bf16/f16 only)"
    if head_dim != HEAD_DIM:
        return f"head_dim {head_dim} (64 only)"
    if q_len != kv_len or q_len % BLOCK_K:
        return f"lengths {q_len}/{kv_len} (equal multiples of {BLOCK_K} only)"
    if window or softcap is not None or masked or sparse:
        return "window, soft-cap, padding/segment masks or block-sparsity"
    return None


def forward(q, k, v, *, causal: bool, sm_scale: float, poison: bool = False):
    """O and the log2-domain log-sum-exp [batch, heads, seq] (float32) of attention.

    One program per 128 query rows of a (batch, head): warpgroups 0 and 1 each own 64
    rows and run S = Q K^T, the online softmax and O += P V with wgmma; warpgroup 2
    streams 128-key tiles of K and V through a ring of shared-memory slots with TMA.
    The two compute warpgroups take turns on the tensor cores (ping-pong): one issues
    its matmuls while the other runs its softmax (a rendezvous barrier orders them),
    so the exponentials hide behind the other warpgroup's wgmma.
    """
    plgpu = _plgpu()
    batch, seq, heads, d = q.shape
    group = heads // k.shape[2]
    dtype = q.dtype
    rows_per_cta = WG_KEYS * COMPUTE_WGS  # 64 query rows per warpgroup
    n_kv = seq // BLOCK_K
    scale_log2 = float(sm_scale) * LOG2E
    fold_scale = scale_log2 > 0  # max(s) * c is max(s * c) only for c > 0
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    row_vec = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, bars):
        q_smem, k_smem, v_smem, lse_smem = smem
        q_bar, k_bar, v_bar, k_free, v_free, turn = bars

        def rendezvous():  # both compute warpgroups reach this point
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        qc = lax.axis_index("q")
        if causal:  # heaviest query blocks launch first
            qc = (seq // rows_per_cta - 1) - qc
        wg = lax.axis_index("wg")
        kh = lax.div(h, jnp.int32(group))
        # Causal: key tiles up to the one holding the CTA's last row (128-aligned, so
        # both warpgroups end on the same tile, the diagonal one, which is masked).
        n_steps = (qc + 1) * (rows_per_cta // BLOCK_K) if causal else jnp.int32(n_kv)

        def kv_tiles(t, slot):
            keys = pl.ds(t * BLOCK_K, BLOCK_K)
            return [(k_free.at[slot], k_ref.at[b, keys, kh], k_smem.at[slot], k_bar.at[slot]),
                    (v_free.at[slot], v_ref.at[b, keys, kh], v_smem.at[slot], v_bar.at[slot])]

        pl.when(wg == COMPUTE_WGS)(lambda: _produce(n_steps, kv_tiles))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q0 = qc * rows_per_cta + wg * WG_KEYS
            rows = pl.ds(q0, WG_KEYS)
            q_tile = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_tile, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            # Warpgroup 0 issues its first matmul before warpgroup 1 does.
            pl.when(wg == 1)(rendezvous)

            def step(t, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(t, jnp.int32(STAGES))
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                    rendezvous()  # the other warpgroup may issue its matmuls now
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((WG_KEYS, BLOCK_K), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if not fold_scale:
                    s = s * scale_log2
                if masked:  # after any scaling: -inf times a scale <= 0 is not -inf
                    q_pos = q0 + plgpu.broadcasted_iota(
                        jnp.int32, (WG_KEYS, BLOCK_K), 0, layout=plgpu.Layout.WGMMA)
                    k_pos = t * BLOCK_K + plgpu.broadcasted_iota(
                        jnp.int32, (WG_KEYS, BLOCK_K), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(q_pos >= k_pos, s, -jnp.inf)
                # m is kept in scaled log2 units. With a positive scale it folds into
                # exp2's argument: one fused multiply-add per score instead of two ops.
                if fold_scale:
                    m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
                else:
                    m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2((s * scale_log2 if fold_scale else s)
                             - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                # Softmax done; wait until the other one has issued its matmuls.
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(turn)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                plgpu.layout_cast(jnp.zeros((WG_KEYS, d), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((WG_KEYS,), -jnp.inf, jnp.float32), row_vec),
                plgpu.layout_cast(jnp.zeros((WG_KEYS,), jnp.float32), row_vec),
            )
            if causal:
                carry = lax.fori_loop(0, n_steps - 1, functools.partial(step, masked=False), carry)
                carry = step(n_steps - 1, carry, masked=True)
            else:
                carry = lax.fori_loop(0, n_steps, functools.partial(step, masked=False), carry)
            pl.when(wg == 0)(rendezvous)  # balances warpgroup 1's first one
            acc, m, l = carry
            q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, rows, h], commit_group=False)
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
            plgpu.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        smem = (
            plgpu.SMEM((COMPUTE_WGS, WG_KEYS, d), dtype, transforms=tr),  # Q, then O
            plgpu.SMEM((STAGES, BLOCK_K, d), dtype, transforms=tr),  # K ring
            plgpu.SMEM((STAGES, BLOCK_K, d), dtype, transforms=tr),  # V ring
            plgpu.SMEM((COMPUTE_WGS, WG_KEYS), jnp.float32),  # lse
        )
        bars = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=STAGES),
            plgpu.Barrier(num_barriers=STAGES),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=STAGES),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=STAGES),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # ping-pong turns
        )
        pl.run_scoped(lambda *scoped: body(q_ref, k_ref, v_ref, o_ref, lse_ref, *scoped),
                      smem, bars, collective_axes="wg")

    o_type = jax.ShapeDtypeStruct(q.shape, dtype)
    lse_type = jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)
    if poison:
        refs = (jax.new_ref(jnp.full(o_type.shape, jnp.nan, dtype)),
                jax.new_ref(jnp.full(lse_type.shape, jnp.nan, jnp.float32)))
        outs, out_type = refs, ()
    else:
        outs, out_type = (), [o_type, lse_type]
    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(heads, seq // rows_per_cta, batch),
        grid_names=("heads", "q", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, *outs)
    o, lse = (refs[0][...], refs[1][...]) if poison else res
    return _vary_like(o, q), _vary_like(lse, q)


def backward(q, k, v, do, lse2, delta, *, causal: bool, sm_scale: float, poison: bool = False):
    """dQ, dK, dV of softmax(q k^T * sm_scale) v.

    q, do: [batch, seq, heads, 64]; k, v: [batch, seq, kv_heads, 64];
    lse2: [batch, heads, seq] float32 log-sum-exp of the scaled scores in log2 units
    (as the forward writes it); delta: [batch, heads, seq] float32 rowsum(dO * O).
    poison: dK/dV start as NaN buffers (a testing aid: an unwritten row stays NaN).
    """
    plgpu = _plgpu()
    batch, seq, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    n_q = seq // BLOCK_Q
    n_kv = seq // BLOCK_K
    scale_log2 = float(sm_scale) * LOG2E
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    wgmma_row = plgpu.Layout.WGMMA.reduce(0)  # a [BLOCK_Q] vector along S^T's columns

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
             smem, bars):
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, out_smem = smem
        (k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, consumed, ds_ready, ds_free) = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        kb = lax.axis_index("kv")
        wg = lax.axis_index("wg")
        kh = lax.div(h, jnp.int32(group))
        k0 = kb * BLOCK_K
        # Causal: start at the first query tile that sees any key of the block (the
        # first BLOCK_K // BLOCK_Q tiles from there cross the diagonal: masked).
        first = lax.div(k0, jnp.int32(BLOCK_Q)) if causal else jnp.int32(0)
        n_steps = n_q - first

        def q_tiles(t, slot):  # the slot is free once both compute warpgroups consumed it
            rows = pl.ds((first + t) * BLOCK_Q, BLOCK_Q)
            return [(consumed.at[slot], q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot]),
                    (None, lse_ref.at[b, h, rows], lse_smem.at[slot], lse_bar.at[slot]),
                    (None, do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot]),
                    (None, delta_ref.at[b, h, rows], delta_smem.at[slot], delta_bar.at[slot])]

        pl.when(wg == COMPUTE_WGS)(lambda: _produce(n_steps, q_tiles))

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            own = pl.ds(wg * WG_KEYS, WG_KEYS)
            key_rows = pl.ds(k0 + wg * WG_KEYS, WG_KEYS)
            plgpu.copy_gmem_to_smem(k_ref.at[b, key_rows, kh], k_smem.at[own], k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, key_rows, kh], v_smem.at[own], v_bar.at[wg])
            for w in range(COMPUTE_WGS):  # dQ reads both halves of K
                plgpu.barrier_wait(k_bar.at[w])
            plgpu.barrier_wait(v_bar.at[wg])
            k_own = k_smem.at[own]
            v_own = v_smem.at[own]
            zeros = plgpu.layout_cast(jnp.zeros((WG_KEYS, d), jnp.float32), plgpu.Layout.WGMMA)

            def step(t, carry, masked: bool):
                dk_acc, dv_acc = carry
                slot = lax.rem(t, jnp.int32(STAGES))
                q_tile = first + t
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(lse_bar.at[slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, k_own, q_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores, plgpu.ACC((WG_KEYS, BLOCK_Q), jnp.float32))
                lse = plgpu.load(lse_smem.at[slot], layout=wgmma_row)
                p_t = jnp.exp2(s_t * scale_log2
                               - lax.broadcast_in_dim(lse, (WG_KEYS, BLOCK_Q), [1]))
                if masked:
                    key_pos = (k0 + wg * WG_KEYS) + plgpu.broadcasted_iota(
                        jnp.int32, (WG_KEYS, BLOCK_Q), 0, layout=plgpu.Layout.WGMMA)
                    q_pos = q_tile * BLOCK_Q + plgpu.broadcasted_iota(
                        jnp.int32, (WG_KEYS, BLOCK_Q), 1, layout=plgpu.Layout.WGMMA)
                    p_t = jnp.where(q_pos >= key_pos, p_t, 0.0)
                plgpu.barrier_wait(do_bar.at[slot])

                def dv_dp(refs):
                    dv_ref_, dp_ref_ = refs
                    plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dp_ref_, v_own, do_smem.at[slot].transpose((1, 0)))

                dv_acc, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(
                    plgpu.layout_cast(jnp.zeros((WG_KEYS, BLOCK_Q), jnp.float32),
                                      plgpu.Layout.WGMMA))))
                plgpu.barrier_wait(delta_bar.at[slot])
                delta = plgpu.load(delta_smem.at[slot], layout=wgmma_row)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (WG_KEYS, BLOCK_Q), [1]))
                ds16 = ds_t.astype(dtype)

                def dk_step(acc_ref):
                    plgpu.wgmma(acc_ref, ds16, q_smem.at[slot])

                dk_acc = pl.run_state(dk_step)(plgpu.ACC.init(dk_acc))
                plgpu.barrier_arrive(consumed.at[slot])

                # Hand this warpgroup's half of dS^T to the tile's dQ owner.
                dslot = lax.rem(t, jnp.int32(2))

                @pl.when(t >= 2)
                def _():
                    plgpu.barrier_wait(ds_free.at[dslot])

                ds_smem.at[dslot, own][...] = ds16
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[dslot])

                @pl.when(dslot == wg)
                def _():
                    plgpu.barrier_wait(ds_ready.at[dslot])

                    def dq_step(acc_ref):
                        plgpu.wgmma(acc_ref, ds_smem.at[dslot].transpose((1, 0)), k_smem)
                        return acc_ref[...]

                    dq = pl.run_scoped(dq_step, plgpu.ACC((BLOCK_Q, d), jnp.float32))
                    plgpu.barrier_arrive(ds_free.at[dslot])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dq_smem free again
                    dq_smem.at[wg][...] = dq
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dq_smem.at[wg],
                                            dq_ref.at[b, pl.ds(q_tile * BLOCK_Q, BLOCK_Q), h],
                                            reduction_op="add")

                return dk_acc, dv_acc

            carry = (zeros, zeros)
            if causal:
                n_masked = jnp.minimum(n_steps, BLOCK_K // BLOCK_Q)
                carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(n_masked, n_steps, functools.partial(step, masked=False),
                                      carry)
            else:
                carry = lax.fori_loop(0, n_steps, functools.partial(step, masked=False), carry)
            dk_acc, dv_acc = carry
            plgpu.wait_smem_to_gmem(0)
            out_smem.at[0, own][...] = (dk_acc * sm_scale).astype(out_smem.dtype)
            out_smem.at[1, own][...] = dv_acc.astype(out_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[0, own], dk_ref.at[b, key_rows, h],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(out_smem.at[1, own], dv_ref.at[b, key_rows, h])
            plgpu.wait_smem_to_gmem(0)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref):
        tr = (tiling, swizzle)
        smem = (
            plgpu.SMEM((BLOCK_K, d), dtype, transforms=tr),  # K
            plgpu.SMEM((BLOCK_K, d), dtype, transforms=tr),  # V
            plgpu.SMEM((STAGES, BLOCK_Q, d), dtype, transforms=tr),  # Q ring
            plgpu.SMEM((STAGES, BLOCK_Q, d), dtype, transforms=tr),  # dO ring
            plgpu.SMEM((STAGES, BLOCK_Q), jnp.float32),  # lse ring
            plgpu.SMEM((STAGES, BLOCK_Q), jnp.float32),  # delta ring
            plgpu.SMEM((2, BLOCK_K, BLOCK_Q), dtype, transforms=tr),  # dS^T, two tiles
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, d), jnp.float32, transforms=dq_tr),  # dQ tiles
            plgpu.SMEM((2, BLOCK_K, d), out_dtype, transforms=out_tr),  # dK, dV out
        )
        bars = (
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K halves
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # V halves
            plgpu.Barrier(num_barriers=STAGES),  # Q
            plgpu.Barrier(num_barriers=STAGES),  # dO
            plgpu.Barrier(num_barriers=STAGES),  # lse
            plgpu.Barrier(num_barriers=STAGES),  # delta
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=STAGES),  # slot consumed
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),  # dS^T tile written
            plgpu.Barrier(num_arrivals=1, num_barriers=2),  # dS^T tile read by dQ
        )
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                 dq_ref, dk_ref, dv_ref, *scoped),
            smem, bars, collective_axes="wg")

    # With GQA each query head writes its own dK/dV (float32), summed over the group below.
    out_dtype = dtype if group == 1 else jnp.float32
    out_tr = (tiling, swizzle) if group == 1 else (plgpu.TilingTransform((8, 32)), swizzle)
    dkv_type = jax.ShapeDtypeStruct((batch, seq, heads, d), out_dtype)
    dq_tr = (plgpu.TilingTransform((8, 32)), swizzle)  # swizzled: fewer bank conflicts
    dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
    if poison:
        dk_ref = jax.new_ref(jnp.full(dkv_type.shape, jnp.nan, out_dtype))
        dv_ref = jax.new_ref(jnp.full(dkv_type.shape, jnp.nan, out_dtype))
        outs, out_type = (dk_ref, dv_ref), ()
    else:
        outs, out_type = (), [dkv_type, dkv_type]
    res = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(heads, n_kv, batch),
        grid_names=("heads", "kv", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, do, lse2, delta, dq_acc, *outs)
    dk, dv = (dk_ref[...], dv_ref[...]) if poison else res
    dq = (dq_acc[...] * sm_scale).astype(dtype)
    if group > 1:
        shape = (batch, seq, kv_heads, group, d)
        dk = dk.reshape(shape).sum(axis=3)
        dv = dv.reshape(shape).sum(axis=3)
    return (_vary_like(dq, q), _vary_like(dk.astype(k.dtype), k),
            _vary_like(dv.astype(v.dtype), v))
