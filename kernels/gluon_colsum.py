"""The received-attention column pass on Hopper in Gluon (Triton's explicit-layout dialect).

`triton_attention._attn_colsum_t` computes r[j] = Σ_i exp(s_ij − L_i) one tile at a time: the
tile's QK product, then its exp2 and row sums. A warp group waits for each product before the
exp2 of its tile, so the tensor cores and the exp2 units take turns (Nsight Compute at 16k keys:
exp2 unit 57% busy, issue slots 43%; `benchmarks/results/act_adaptive_h100.json`). Triton 3.6's
`tl.dot` gives no handle on that wait. Gluon's `warpgroup_mma(..., is_async=True)` does: this pass
issues the product of the next row block, computes the exp2 and sums of the current one while it
runs, then waits — the overlap FlashAttention-3 calls intra-warpgroup pipelining.

Same contract as `_attn_colsum_t` (plain logits, consecutive rows [row_lo, row_hi), causal or
not); bf16 / fp16 inputs, head_dim 64 or 128, sm_90. `fused._Launch.received` takes it where
`fused.COLSUM_GLUON` and the GPU allow, and `_attn_colsum_t` elsewhere.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
except ImportError:  # a Triton without Gluon: the Triton pass runs
    gluon = None

if gluon is not None:
    LOG2E = gl.constexpr(1.4426950408889634)
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    from triton.experimental.gluon.language.nvidia.hopper import async_copy

    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # 3.6 / 3.9

    @gluon.jit
    def _block_sums(s, lse, m0, offs_m, cols, start_n, row_hi, KN, q_offset, qk_scale,
                    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
        """Σ over row block [m0, m0 + BLOCK_M) of exp2(s·scale − L) per key [BLOCK_N], from its
        product s [BLOCK_N keys, BLOCK_M rows] and its rows' log-sum-exp in base 2 (loaded an
        iteration earlier: a load here would wait its full latency). Only blocks that cross the
        causal edge, the end of the rows or the end of the keys are masked (the mask costs issue
        slots in a pass bound by them)."""
        p = gl.exp2(s * qk_scale - lse[None, :])
        ragged = (m0 + BLOCK_M > row_hi) | (start_n + BLOCK_N > KN)
        if IS_CAUSAL:
            ragged = ragged | (m0 + q_offset < start_n + BLOCK_N - 1)
        if ragged:
            rows = m0 + offs_m
            seen = (rows < row_hi)[None, :] & (cols < KN)[:, None]
            if IS_CAUSAL:
                seen = seen & (cols[:, None] <= rows[None, :] + q_offset)
            p = gl.where(seen, p, 0.0)
        return gl.sum(p, axis=1)

    @gluon.jit
    def _colsum_wgmma(
        Q, K, Lse, Recv, Count,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        H, HKV, QN, KN, q_offset, row_lo, row_hi, qk_scale,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
        STAGES: gl.constexpr = 3,
    ):
        """One key block [BLOCK_N] of one (batch, head): Recv[b, h, j] = Σ_rows exp(s_ij − L_i)
        and Count[b, h, j] = how many of rows [row_lo, row_hi) see j. S^T = K·Q^T is the
        accumulator [BLOCK_N keys, BLOCK_M rows], so each key's sum over rows stays in its thread
        and quad. 4 warps (one warp group)."""
        pid_n = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // (H // HKV)
        b64 = b.to(gl.int64)
        start_n = pid_n * BLOCK_N

        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.bfloat16)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.bfloat16)
        cols_l: gl.constexpr = gl.SliceLayout(1, mma)
        rows_l: gl.constexpr = gl.SliceLayout(0, mma)

        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
        kn = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        k = gl.load(K + b64 * stride_kb + kvh.to(gl.int64) * stride_kh + kn[:, None] * stride_kn + offs_d[None, :],
                    mask=(kn < KN)[:, None], other=0.0)
        k_smem = gl.allocate_shared_memory(k.dtype, [BLOCK_N, HEAD_DIM], k_sl, k)
        q_smem = gl.allocate_shared_memory(k.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_sl)

        q_base = Q + b64 * stride_qb + h.to(gl.int64) * stride_qh
        lse_base = Lse + (b64 * H + h) * QN
        cols = start_n + gl.arange(0, BLOCK_N, layout=cols_l)
        offs_m = gl.arange(0, BLOCK_M, layout=rows_l)
        offs_ml = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))

        first = row_lo
        if IS_CAUSAL:  # rows before the block's first key see none of it
            first = gl.maximum(row_lo, start_n - q_offset)
            first = (first - row_lo) // BLOCK_M * BLOCK_M + row_lo
        n_steps = gl.cdiv(row_hi - first, BLOCK_M)

        recv = gl.zeros([BLOCK_N], gl.float32, cols_l)
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
        # row blocks stream through a ring of STAGES shared-memory slots by cp.async, two ahead
        for j in gl.static_range(STAGES - 1):
            rows_j = first + j * BLOCK_M + offs_ml
            _async_load(q_smem.index(j), q_base + rows_j[:, None] * stride_qm + offs_d[None, :],
                        mask=(rows_j < row_hi)[:, None])
            async_copy.commit_group()
        s = zero
        lse_prev = gl.zeros([BLOCK_M], gl.float32, rows_l)
        for i in range(0, n_steps):
            async_copy.wait_group(STAGES - 2)  # block i has landed (this thread's copies)
            _barrier()  # every thread's copies, and every warp done with the slot refilled below
            hopper.fence_async_shared()
            tok = hopper.warpgroup_mma(k_smem, q_smem.index(i % STAGES).permute((1, 0)), zero, use_acc=False,
                                       is_async=True)
            rows_n = first + (i + STAGES - 1) * BLOCK_M + offs_ml
            _async_load(q_smem.index((i + STAGES - 1) % STAGES),
                        q_base + rows_n[:, None] * stride_qm + offs_d[None, :], mask=(rows_n < row_hi)[:, None])
            async_copy.commit_group()
            rows_i = first + i * BLOCK_M + offs_m
            lse_i = gl.load(lse_base + rows_i, mask=rows_i < row_hi, other=0.0) * LOG2E  # used next iteration
            if i > 0:  # the previous block's exp2 and sums while this block's product runs
                recv += _block_sums(s, lse_prev, first + (i - 1) * BLOCK_M, offs_m, cols, start_n, row_hi, KN,
                                    q_offset, qk_scale, BLOCK_N, BLOCK_M, IS_CAUSAL)
            s = hopper.warpgroup_mma_wait(0, deps=[tok])
            lse_prev = lse_i
        if n_steps > 0:
            recv += _block_sums(s, lse_prev, first + (n_steps - 1) * BLOCK_M, offs_m, cols, start_n, row_hi, KN,
                                q_offset, qk_scale, BLOCK_N, BLOCK_M, IS_CAUSAL)
        async_copy.wait_group(0)

        ok_n = cols < KN
        if IS_CAUSAL:
            cnt = gl.minimum(gl.maximum(row_hi + q_offset - gl.maximum(cols, row_lo + q_offset), 0), row_hi - row_lo)
        else:
            cnt = gl.zeros([BLOCK_N], gl.int32, cols_l) + (row_hi - row_lo)
        gl.store(Recv + (b64 * H + h) * KN + cols, recv, mask=ok_n)
        gl.store(Count + (b64 * H + h) * KN + cols, cnt.to(gl.float32), mask=ok_n)
