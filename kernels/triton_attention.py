"""Triton kernels of the patched attention: one fused online-softmax pass with the plan and the stats.

`_attn_fwd` is a FlashAttention-style forward (prefill, chunked prefill and decode) that applies,
inside its loop over key blocks, every change the plan makes to the logits — per-head logit scale
(Ships), softcap, per-head key-position bias (ZeroTuning, first-token bias), ACT's per-row bias on
sink keys — and accumulates the per-row stats next to the output: the argmax key and its
probability, the masses on up to 128 named key sets (spans and single requested keys, as one
[BLOCK_N, NSP] 0/1 matrix multiplied by the probability tile on the tensor cores) and the entropy.
It writes the row log-sum-exp, which `_attn_colsum` (received attention per key, QK only) and
ACT reuse. No N×N tensor is allocated anywhere.

Layout: q [B, H, Q, D]; k, v [B, Hkv, K, D]. A program owns BLOCK_M "rows" of one group of GROUP
query heads sharing a key/value head: row r is query r // GROUP of head h0 + r % GROUP. GROUP = 1
for prefill (the usual layout); for decode, GROUP = H / Hkv packs the query heads of a key/value
head into one tile so that the cache is read once per group. Decode also splits the keys over
programs (flash-decoding); `_attn_combine` merges the splits, stats included.

Numerics: logits are carried in base 2 (× log2 e) so that exp2 is the only transcendental in the
loop; everything is accumulated in fp32; the probabilities meet V in the input dtype (as in
FlashAttention) and the key-set matrix in fp16. UPCAST (Triton's CPU interpreter only, whose
tl.dot mishandles bfloat16) makes the dots fp32 after rounding the probabilities to the input
dtype, so the interpreter computes what the GPU does.

ACT is exact as a logit bias: with S_i the sink mass of row i and c_i = 1 + (1 − β)·S_i / R_i,
softmax(s + log(β / c_i)·1[j ∈ sinks]) = β·A on sinks and c_i·A elsewhere — the reference's
calibration (see `kernels.reference.act_calibrate`), so all stats and the output follow from the
same online softmax.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _add_bias(s, bias_ptr, head_off, stride_bias_h, cols, KB, rows_ok, GROUP: tl.constexpr):
    if GROUP == 1:
        b = tl.load(bias_ptr + head_off * stride_bias_h + cols, mask=cols < KB, other=0.0)
        return s + b[None, :] * LOG2E
    b = tl.load(bias_ptr + head_off[:, None] * stride_bias_h + cols[None, :],
                mask=rows_ok[:, None] & (cols < KB)[None, :], other=0.0)
    return s + b * LOG2E


@triton.jit
def _logits_tile(
    q, k, start_n, offs_n, n_hi,
    head_off, row_pos, rows_ok, ls_row, sink_bias_row,
    bias_ptr, stride_bias_h, KB,
    sink_ptr, sink_off_row,
    mask_ptr, mask_off_row, stride_mask_k, mask_floor,
    qk_scale, softcap,
    IS_CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, BOUNDED: tl.constexpr, BIAS_PHASE: tl.constexpr,
    HAS_LS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINK: tl.constexpr,
    GROUP: tl.constexpr, UPCAST: tl.constexpr, SCALED: tl.constexpr = True,
):
    """(base-2 logits [BLOCK_M, BLOCK_N] of the rows against the key tile k [BLOCK_N, D] at positions
    start_n + offs_n, −inf where masked; the mask itself). The caller loads k (pointer loads, masked
    beyond n_hi where BOUNDED, or a tensor descriptor). Unbounded tiles (every key visible to every
    row) are not masked at all. SCALED=False (plain logits only: no logit scale, softcap, bias, sink
    bias or float mask) leaves the product q·k unscaled, for the caller to fold qk_scale into its
    exp2 argument. `offs_n` may be any key positions (a gathered tile) with start_n = 0."""
    cols = start_n + offs_n
    if UPCAST:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # softcap · tanh(x / softcap) in natural units, tanh through exp2 (no libdevice needed)
        x = s * (qk_scale * LN2)
        if HAS_LS:
            x = x * ls_row[:, None]
        y = 2.0 * LOG2E * x / softcap
        y = tl.minimum(tl.maximum(y, -126.0), 126.0)
        s = softcap * (1.0 - 2.0 / (tl.math.exp2(y) + 1.0)) * LOG2E
    elif SCALED:
        s = s * qk_scale
        if HAS_LS:
            s = s * ls_row[:, None]
    # BIAS_PHASE: 0 = every tile of this loop lies in the biased key range, 1 = none does,
    # 2 = check per tile (a run-time branch: kept out of the long unmasked loop).
    if HAS_BIAS:
        if BIAS_PHASE == 0:
            s = _add_bias(s, bias_ptr, head_off, stride_bias_h, cols, KB, rows_ok, GROUP)
        elif BIAS_PHASE == 2:  # noqa: SIM102 - a compile-time branch around a run-time one
            if start_n < KB:
                s = _add_bias(s, bias_ptr, head_off, stride_bias_h, cols, KB, rows_ok, GROUP)
    if HAS_SINK:
        if GROUP == 1:
            f = tl.load(sink_ptr + sink_off_row + cols, mask=cols < n_hi, other=0)
            s = s + tl.where(f[None, :] != 0, sink_bias_row[:, None], 0.0)
        else:
            f = tl.load(sink_ptr + sink_off_row[:, None] + cols[None, :], mask=rows_ok[:, None] & (cols < n_hi)[None, :],
                        other=0)
            s = s + tl.where(f != 0, sink_bias_row[:, None], 0.0)
    allowed = rows_ok[:, None] & (cols < n_hi)[None, :]
    if MASK_MODE == 1:  # boolean mask, True = attend
        mk = tl.load(mask_ptr + mask_off_row[:, None] + cols[None, :] * stride_mask_k, mask=allowed, other=0)
        allowed = allowed & (mk != 0)
    elif MASK_MODE == 2:  # additive float mask; entries below half the dtype's minimum are masked
        mk = tl.load(mask_ptr + mask_off_row[:, None] + cols[None, :] * stride_mask_k, mask=allowed, other=0.0).to(tl.float32)
        allowed = allowed & (mk > mask_floor)
        s = s + mk * LOG2E
    elif IS_CAUSAL:
        allowed = allowed & (cols[None, :] <= row_pos[:, None])
    if BOUNDED or MASK_MODE != 0:
        s = tl.where(allowed, s, float("-inf"))
    return s, allowed


@triton.jit
def _kv_tile(desc, base, stride_n, b, kvh, start_n, offs_n, offs_d, hi,
             DESC: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The key (or value) tile [BLOCK_N, HEAD_DIM] at start_n of one (b, kv head): through the tensor
    descriptor `desc` with DESC, else from `base` (that head's first row) by pointers, masked beyond
    `hi` with MASKED (zeros there)."""
    if DESC:
        return desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    ptrs = base + (start_n + offs_n)[:, None] * stride_n + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=((start_n + offs_n) < hi)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _argmax_step(s, raw_max, blk_max, am_idx, am_val, offs_n, start_n, BLOCK_N: tl.constexpr):
    """The running argmax after one key block: the first column holding the block's max, taken where
    the block's max beats the rows' best so far — a compare, a select and a min per element, in
    every block. Cheaper on an H100 than tl.argmax's (value, index) pairs or a block-wide vote on
    whether any row's max grew (kernels/bench.py --stats-breakdown)."""
    better = blk_max > am_val
    blk_idx = tl.min(tl.where(s == raw_max[:, None], offs_n[None, :], BLOCK_N), 1) + start_n
    return tl.where(better, blk_idx, am_idx), tl.maximum(am_val, blk_max)


@triton.jit
def _entropy_step(u_i, alpha, p, s, MASKED: tl.constexpr):
    """The running Σ p·s of the rows (for the entropy), rescaled by alpha; MASKED: −inf logits may
    occur (masked keys, ACT's β = 0), whose p = 0 must not meet s."""
    if MASKED:
        return u_i * alpha + tl.sum(tl.where(p > 0, p * s, 0.0), 1)
    return u_i * alpha + tl.sum(p * s, 1)


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, HKV, QN, KN, q_offset, split_size, n_rows,
    qk_scale, softcap,
    LogitScale, HeadScale,
    Bias, stride_bias_h, KB,
    SinkFlag, SinkBias,
    Mask, stride_mb, stride_mh, stride_mq, stride_mk, mask_floor,
    Member, SpanKeys, n_span_chunks, ArgIdx, ArgVal, SpanOut, Entropy,
    KDesc, VDesc,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_LS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr,
    OUTPUT: tl.constexpr, ARGMAX: tl.constexpr, NSP: tl.constexpr, ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    SPAN_POST: tl.constexpr, SPAN_CHUNK: tl.constexpr, HEAVY_FIRST: tl.constexpr, FOLD_SCALE: tl.constexpr,
    KV_DESC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (row block, head group, split) of the patched attention.

    Key-set masses (NSP > 0): inside the loop over key blocks (the probability tile times the
    key-set tile, every block), or with SPAN_POST after it, over only the keys that belong to a
    set: SpanKeys lists them (ascending, padded with KN to n_span_chunks × SPAN_CHUNK), gathered
    SPAN_CHUNK at a time into a small tile against the rows' final maximum — for sparse sets
    (needles, a first-token span) a fraction of a block instead of a dot in every block, and the
    main loop keeps the plain pass's block shape.

    FOLD_SCALE (plain logits: `_logits_tile`'s SCALED=False) folds the softmax scale into the
    exp2 argument (one fused multiply-add per element instead of a multiply and a subtraction).

    KV_DESC: the unmasked key blocks (phases 0 and 1) come through tensor descriptors KDesc / VDesc
    over k, v [B, Hkv, K, D] (Hopper's tensor memory accelerator: one bulk copy per tile, no
    per-element addresses in registers); the masked blocks keep masked pointer loads, so a key
    beyond the program's range is never read.

    Without SPLIT it writes the final output (× head scale, input dtype) and stats; with SPLIT it
    writes its split's normalized partials (fp32 output, log-sum-exp, argmax logit, key-set
    fractions, entropy) at [split, ...] for `_attn_combine`.
    """
    if HEAVY_FIRST:
        # one grid axis (GROUP = 1): per key/value head, its query heads' row blocks from the last
        # (under a causal mask, the most keys) to the first. Programs start in grid order, so light
        # blocks fill the tail, and the programs running at once read one key/value head's keys.
        n_m = tl.cdiv(QN, BLOCK_M)
        ratio = H // HKV
        pid = tl.program_id(0)
        per_kv = ratio * n_m
        r = pid % per_kv
        pid_m = n_m - 1 - r // ratio
        pid_g = (pid // per_kv) * ratio + r % ratio
    else:
        pid_m = tl.program_id(0)
        pid_g = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_groups = H // GROUP
    b = pid_g // n_groups
    h0 = (pid_g % n_groups) * GROUP
    kvh = h0 // (H // HKV)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_q = offs_r // GROUP
    row_h = h0 + offs_r % GROUP
    rows_ok = row_q < QN
    row_pos = q_offset + row_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + row_h[:, None].to(tl.int64) * stride_qh + row_q[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows_ok[:, None], other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    if GROUP == 1:
        head_off = h0
    else:
        head_off = row_h
    ls_row = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if HAS_LS:
        if GROUP == 1:
            ls_row = ls_row * tl.load(LogitScale + h0)
        else:
            ls_row = tl.load(LogitScale + row_h, mask=rows_ok, other=1.0)
    row_flat = (b64 * H + row_h) * QN + row_q  # index of (b, h, q) in [B, H, Q] arrays
    sink_bias_row = tl.zeros([BLOCK_M], tl.float32)
    sink_off_row = 0
    if HAS_SINK:
        sink_bias_row = tl.load(SinkBias + row_flat, mask=rows_ok, other=0.0) * LOG2E
        if GROUP == 1:
            sink_off_row = (b64 * H + h0) * KN
        else:
            sink_off_row = (b64 * H + row_h) * KN
    mask_off_row = b64 * stride_mb + row_h.to(tl.int64) * stride_mh + row_q.to(tl.int64) * stride_mq

    # Key range of this program: its split, cut at the causal diagonal of its last row.
    lo = pid_s * split_size
    hi = tl.minimum(KN, lo + split_size)
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, QN - 1)
    first_q = (pid_m * BLOCK_M) // GROUP
    if IS_CAUSAL and MASK_MODE == 0:
        hi = tl.minimum(hi, q_offset + last_q + 1)
        # blocks entirely below every row's diagonal and inside the keys need no mask
        full_hi = tl.minimum(hi, q_offset + first_q + 1)
    elif MASK_MODE == 0:
        full_hi = hi
    else:
        full_hi = lo
    full_hi = tl.maximum(lo, lo + ((full_hi - lo) // BLOCK_N) * BLOCK_N)
    # the biased key blocks at the start (a first-token bias: one block) get their own short loop
    head_hi = lo
    if HAS_BIAS:
        head_hi = tl.minimum(full_hi, lo + tl.cdiv(tl.maximum(KB - lo, 0), BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    am_val = tl.full([BLOCK_M], float("-inf"), tl.float32)
    am_idx = tl.zeros([BLOCK_M], tl.int32)
    u_i = tl.zeros([BLOCK_M], tl.float32)
    if NSP > 0:
        span_acc = tl.zeros([BLOCK_M, NSP], tl.float32)
        offs_sp = tl.arange(0, NSP)
    else:
        span_acc = tl.zeros([BLOCK_M, 16], tl.float32)
        offs_sp = tl.arange(0, 16)

    for phase in tl.static_range(3):
        if phase == 0:  # full blocks inside the bias range
            start, stop = lo, head_hi
        elif phase == 1:  # full blocks: no mask, no bias
            start, stop = head_hi, full_hi
        else:  # the diagonal, the last partial block, masked rows
            start, stop = full_hi, hi
        for start_n in range(start, stop, BLOCK_N):
            k = _kv_tile(KDesc, k_base, stride_kn, b, kvh, start_n, offs_n, offs_d, hi,
                         KV_DESC and phase != 2, phase == 2, BLOCK_N, HEAD_DIM)
            s, _ = _logits_tile(
                q, k, start_n, offs_n, hi, head_off, row_pos, rows_ok, ls_row, sink_bias_row,
                Bias, stride_bias_h, KB, SinkFlag, sink_off_row, Mask, mask_off_row, stride_mk, mask_floor, qk_scale, softcap,
                IS_CAUSAL, MASK_MODE, phase == 2, phase, HAS_LS, HAS_SOFTCAP, HAS_BIAS, HAS_SINK, GROUP, UPCAST,
                not FOLD_SCALE,
            )
            raw_max = tl.max(s, 1)
            if FOLD_SCALE:  # s is q·k: the block max in base-2 units, per row
                blk_max = raw_max * qk_scale
            else:
                blk_max = raw_max
            m_new = tl.maximum(m_i, blk_max)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            if FOLD_SCALE:
                p = tl.math.exp2(s * qk_scale - m_use[:, None])
            else:
                p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            # the stats before the P·V product, so that the fp32 tiles s and p end here: taken after it,
            # with K / V through descriptors, the pass with every stat was 1.07-1.11x slower on an H100
            # (benchmarks/results/stats_pass_h100.json `descriptor_runs`)
            if ARGMAX:
                am_idx, am_val = _argmax_step(s, raw_max, blk_max, am_idx, am_val, offs_n, start_n, BLOCK_N)
            if ENTROPY:  # Σ p·s, in q·k units under FOLD_SCALE (scaled once at the end)
                u_i = _entropy_step(u_i, alpha, p, s, phase == 2 or HAS_SINK)
            l_i = l_i * alpha + tl.sum(p, 1)
            if OUTPUT:
                v = _kv_tile(VDesc, v_base, stride_vn, b, kvh, start_n, offs_n, offs_d, hi,
                             KV_DESC and phase != 2, phase == 2, BLOCK_N, HEAD_DIM)
                if UPCAST:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if NSP > 0 and not SPAN_POST:
                cols = start_n + offs_n
                member = tl.load(Member + cols[:, None] * NSP + offs_sp[None, :], mask=(cols < hi)[:, None], other=0.0)
                span_acc = span_acc * alpha[:, None] + tl.dot(p.to(tl.float16), member)
            m_i = m_new

    if NSP > 0 and SPAN_POST:
        # the keys of the sets, gathered SPAN_CHUNK at a time, against the rows' final maximum
        m_post = tl.where(m_i == float("-inf"), 0.0, m_i)
        offs_c = tl.arange(0, SPAN_CHUNK)
        for c in range(0, n_span_chunks):
            cols = tl.load(SpanKeys + c * SPAN_CHUNK + offs_c)
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < hi)[:, None], other=0.0)
            s, _ = _logits_tile(
                q, k, 0, cols, hi, head_off, row_pos, rows_ok, ls_row, sink_bias_row,
                Bias, stride_bias_h, KB, SinkFlag, sink_off_row, Mask, mask_off_row, stride_mk, mask_floor,
                qk_scale, softcap,
                IS_CAUSAL, MASK_MODE, True, 2, HAS_LS, HAS_SOFTCAP, HAS_BIAS, HAS_SINK, GROUP, UPCAST, not FOLD_SCALE,
            )
            if FOLD_SCALE:
                p = tl.math.exp2(s * qk_scale - m_post[:, None])
            else:
                p = tl.math.exp2(s - m_post[:, None])
            member = tl.load(Member + cols[:, None] * NSP + offs_sp[None, :], mask=(cols < hi)[:, None], other=0.0)
            span_acc += tl.dot(p.to(tl.float16), member)
    if ENTROPY and FOLD_SCALE:
        u_i = u_i * qk_scale

    # Normalized results; rows (or splits) that see no key give zeros and lse = −inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    m_fin = tl.where(seen, m_i, 0.0)
    lse = tl.where(seen, (m_fin + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_off = b64 * stride_ob + row_h[:, None].to(tl.int64) * stride_oh + row_q[:, None] * stride_om + offs_d[None, :]
    split_row = pid_s.to(tl.int64) * n_rows + row_flat
    if SPLIT:
        tl.store(Lse + split_row, lse, mask=rows_ok)
    else:
        tl.store(Lse + row_flat, lse, mask=rows_ok)
    if OUTPUT:
        o = acc / l_safe[:, None]
        if SPLIT:
            tl.store(Out + split_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=rows_ok[:, None])
        else:
            if HAS_HEAD_SCALE:
                if GROUP == 1:
                    o = o * tl.load(HeadScale + h0)
                else:
                    o = o * tl.load(HeadScale + row_h, mask=rows_ok, other=1.0)[:, None]
            tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=rows_ok[:, None])
    if ARGMAX:
        tl.store(ArgIdx + split_row, am_idx, mask=rows_ok)
        if SPLIT:
            tl.store(ArgVal + split_row, tl.where(seen, am_val * LN2, float("-inf")), mask=rows_ok)
        else:
            tl.store(ArgVal + split_row, tl.where(seen, tl.math.exp2(am_val - m_fin) / l_safe, 0.0), mask=rows_ok)
    if NSP > 0:
        frac = span_acc / l_safe[:, None]
        tl.store(SpanOut + split_row[:, None] * NSP + offs_sp[None, :], frac, mask=rows_ok[:, None])
    if ENTROPY:
        ent = tl.where(seen, (tl.math.log2(l_safe) + m_fin - u_i / l_safe) * LN2, 0.0)
        tl.store(Entropy + split_row, ent, mask=rows_ok)


@triton.jit
def _attn_combine(
    OutPart, LsePart, ArgIdxPart, ArgValPart, SpanPart, EntPart,
    Out, Lse, ArgIdx, ArgProb, SpanOut, Entropy, HeadScale,
    stride_ob, stride_oh, stride_om,
    H, QN, NS, n_rows,
    HEAD_DIM: tl.constexpr, NS_P: tl.constexpr,
    OUTPUT: tl.constexpr, ARGMAX: tl.constexpr, NSP: tl.constexpr, ENTROPY: tl.constexpr, HAS_HEAD_SCALE: tl.constexpr,
):
    """Merge the key splits of one (b, h, q) row: weights exp(lse_s − lse)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, NS_P)
    ok = offs_s < NS
    lse_s = tl.load(LsePart + offs_s * n_rows + row, mask=ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    any_seen = m > float("-inf")
    m_use = tl.where(any_seen, m, 0.0)
    w = tl.exp(lse_s - m_use)
    tot = tl.sum(w, 0)
    tot_safe = tl.where(any_seen, tot, 1.0)
    w = w / tot_safe
    lse = tl.where(any_seen, m_use + tl.log(tot_safe), float("-inf"))
    tl.store(Lse + row, lse)
    b = row // (H * QN)
    h = (row // QN) % H
    q = row % QN
    if OUTPUT:
        offs_d = tl.arange(0, HEAD_DIM)
        o_s = tl.load(OutPart + (offs_s[:, None] * n_rows + row) * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        o = tl.sum(o_s * w[:, None], 0)
        if HAS_HEAD_SCALE:
            o = o * tl.load(HeadScale + h)
        tl.store(Out + b * stride_ob + h * stride_oh + q * stride_om + offs_d, o.to(Out.dtype.element_ty))
    if ARGMAX:
        v_s = tl.load(ArgValPart + offs_s * n_rows + row, mask=ok, other=float("-inf"))
        best = tl.argmax(v_s, 0, tie_break_left=True)
        best_val = tl.max(v_s, 0)
        idx = tl.sum(tl.where(offs_s == best, tl.load(ArgIdxPart + offs_s * n_rows + row, mask=ok, other=0), 0), 0)
        tl.store(ArgIdx + row, idx)
        tl.store(ArgProb + row, tl.where(any_seen, tl.exp(best_val - lse), 0.0))
    if NSP > 0:
        offs_sp = tl.arange(0, NSP)
        f = tl.load(SpanPart + (offs_s[:, None] * n_rows + row) * NSP + offs_sp[None, :], mask=ok[:, None], other=0.0)
        tl.store(SpanOut + row * NSP + offs_sp, tl.sum(f * w[:, None], 0))
    if ENTROPY:
        e_s = tl.load(EntPart + offs_s * n_rows + row, mask=ok, other=0.0)
        # entropy of a mixture of distributions on disjoint keys: Σ w_s H_s − Σ w_s log w_s
        tl.store(Entropy + row, tl.sum(w * e_s - tl.where(w > 0, w * tl.log(tl.where(w > 0, w, 1.0)), 0.0), 0))


@triton.jit
def _row_phases(start_n, row_lo, row_hi, q_offset, KN, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """How a column pass over key block [start_n, start_n + BLOCK_N) splits rows [row_lo, row_hi)
    (BLOCK_M-aligned from row_lo): (first, full_lo, full_end) — rows [first, full_lo) cross the
    causal diagonal (masked), [full_lo, full_end) see every key of the block (unmasked),
    [full_end, row_hi) are the ragged tail (masked); rows before `first` see none of the block."""
    first = row_lo
    full_lo = row_lo
    if CAUSAL:
        first = tl.maximum(row_lo, start_n - q_offset)
        first = (first - row_lo) // BLOCK_M * BLOCK_M + row_lo
        full_lo = tl.maximum(first, start_n + BLOCK_N - 1 - q_offset)
        full_lo = tl.minimum(row_hi, row_lo + tl.cdiv(full_lo - row_lo, BLOCK_M) * BLOCK_M)
    full_end = row_lo + (row_hi - row_lo) // BLOCK_M * BLOCK_M
    full_end = tl.where(start_n + BLOCK_N <= KN, tl.maximum(full_end, full_lo), full_lo)
    return first, full_lo, full_end


@triton.jit
def _attn_colsum(
    Q, K, Lse, Recv, Count, Rows,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    H, HKV, QN, KN, q_offset, row_lo, row_hi,
    qk_scale, softcap,
    LogitScale, Bias, stride_bias_h, KB, SinkFlag, SinkBias,
    Mask, stride_mb, stride_mh, stride_mq, stride_mk, mask_floor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HAS_LS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SINK: tl.constexpr, UPCAST: tl.constexpr, ROW_LIST: tl.constexpr,
):
    """Received attention per key of one (key block, b, h): Σ over rows [row_lo, row_hi) (or the
    rows listed in Rows[row_lo:row_hi] with ROW_LIST) of A[i, j],
    with A[i, j] = exp(s[i, j] − lse_i) from the rows' log-sum-exp, and the count of rows that see j."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // (H // HKV)
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    cols = start_n + offs_n
    k_ptrs = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + cols[:, None] * stride_kn + offs_d[None, :]
    ls_row = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if HAS_LS:
        ls_row = ls_row * tl.load(LogitScale + h)
    sink_off = (b64 * H + h) * KN
    # per-element accumulators, reduced over rows once at the end: a cross-thread column
    # reduction per tile made this pass instruction-bound
    recv = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    cnt = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_full = tl.zeros([BLOCK_N], tl.float32)  # rows counted by whole tiles
    # Row ranges: [first, full_lo) cross the diagonal (masked), [full_lo, full_end) see the whole key
    # block (unmasked), [full_end, row_hi) is the ragged tail (masked). Without a plain causal
    # shape every row goes through the masked loop.
    first = row_lo
    full_lo = row_hi
    full_end = row_hi
    if IS_CAUSAL and MASK_MODE == 0 and not ROW_LIST:
        first, full_lo, full_end = _row_phases(start_n, row_lo, row_hi, q_offset, KN, True, BLOCK_M, BLOCK_N)
    for phase in tl.static_range(3):
        if phase == 0:
            r_start, r_stop = first, full_lo
        elif phase == 1:
            r_start, r_stop = full_lo, full_end
        else:
            r_start, r_stop = full_end, row_hi
        for m0 in range(r_start, r_stop, BLOCK_M):
            if ROW_LIST:  # rows Rows[row_lo:row_hi] of an explicit selection
                rows_ok = m0 + offs_m < row_hi
                rows = tl.load(Rows + m0 + offs_m, mask=rows_ok, other=0)
            else:
                rows = m0 + offs_m
                rows_ok = rows < row_hi
            q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                        mask=rows_ok[:, None], other=0.0)
            row_flat = (b64 * H + h) * QN + rows
            sink_bias_row = tl.zeros([BLOCK_M], tl.float32)
            if HAS_SINK:
                sink_bias_row = tl.load(SinkBias + row_flat, mask=rows_ok, other=0.0) * LOG2E
            mask_off_row = b64 * stride_mb + h.to(tl.int64) * stride_mh + rows.to(tl.int64) * stride_mq
            if phase != 1:
                k = tl.load(k_ptrs, mask=(cols < KN)[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
            s, allowed = _logits_tile(
                q, k, start_n, offs_n, KN, h, q_offset + rows, rows_ok, ls_row, sink_bias_row,
                Bias, stride_bias_h, KB, SinkFlag, sink_off, Mask, mask_off_row, stride_mk, mask_floor, qk_scale, softcap,
                IS_CAUSAL, MASK_MODE, phase != 1, 2, HAS_LS, HAS_SOFTCAP, HAS_BIAS, HAS_SINK, 1, UPCAST,
            )
            lse = tl.load(Lse + row_flat, mask=rows_ok, other=float("-inf")) * LOG2E
            lse_use = tl.where(lse == float("-inf"), 0.0, lse)
            if phase == 1:  # whole tiles every row of which sees every key: finite logits and lse
                recv += tl.math.exp2(s - lse[:, None])
                n_full += BLOCK_M * 1.0
            else:
                recv += tl.where(s > float("-inf"), tl.math.exp2(s - lse_use[:, None]), 0.0)
                cnt += allowed.to(tl.float32)
    ok = cols < KN
    tl.store(Recv + (b64 * H + h) * KN + cols, tl.sum(recv, 0), mask=ok)
    tl.store(Count + (b64 * H + h) * KN + cols, tl.sum(cnt, 0) + n_full, mask=ok)


@triton.jit
def _attn_colsum_t(
    Q, K, Lse, Recv, Count,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    H, HKV, QN, KN, q_offset, row_lo, row_hi, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """`_attn_colsum` for plain logits (no mask, bias, logit scale, softcap or sink flags) and
    consecutive rows, computed transposed: the program's key block is the left operand
    (S^T = K·Q^T, [BLOCK_N keys, BLOCK_M rows]), so the sum over rows is a reduction along each
    key's own row of the tile — within a thread and its quad, as FlashAttention sums a row —
    instead of across the threads that hold different rows. The count of rows that see key j
    follows from the causal shape: rows i in [row_lo, row_hi) with i + q_offset ≥ j."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // (H // HKV)
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=(cols < KN)[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    lse_base = Lse + (b64 * H + h) * QN
    recv = tl.zeros([BLOCK_N], tl.float32)
    first, full_lo, full_end = _row_phases(start_n, row_lo, row_hi, q_offset, KN, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for phase in tl.static_range(3):
        if phase == 0:
            r_start, r_stop = first, full_lo
        elif phase == 1:
            r_start, r_stop = full_lo, full_end
        else:
            r_start, r_stop = full_end, row_hi
        for m0 in range(r_start, r_stop, BLOCK_M):
            rows = m0 + offs_m
            if phase == 1:
                q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :])
                lse = tl.load(lse_base + rows) * LOG2E
            else:
                rows_ok = rows < row_hi
                q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=rows_ok[:, None], other=0.0)
                lse = tl.load(lse_base + rows, mask=rows_ok, other=0.0) * LOG2E
            if UPCAST:
                q = q.to(tl.float32)
            s = tl.dot(k, tl.trans(q)) * qk_scale            # [BLOCK_N, BLOCK_M], base 2
            p = tl.math.exp2(s - lse[None, :])
            if phase != 1:
                ok = (rows < row_hi)[None, :] & (cols < KN)[:, None]
                if IS_CAUSAL:
                    ok = ok & (cols[:, None] <= rows[None, :] + q_offset)
                p = tl.where(ok, p, 0.0)
            recv += tl.sum(p, 1)
    ok_n = cols < KN
    if IS_CAUSAL:
        cnt = tl.minimum(tl.maximum(row_hi + q_offset - tl.maximum(cols, row_lo + q_offset), 0), row_hi - row_lo)
    else:
        cnt = tl.zeros([BLOCK_N], tl.int32) + (row_hi - row_lo)
    tl.store(Recv + (b64 * H + h) * KN + cols, recv, mask=ok_n)
    tl.store(Count + (b64 * H + h) * KN + cols, cnt.to(tl.float32), mask=ok_n)
