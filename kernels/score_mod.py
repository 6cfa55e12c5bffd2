"""Sparse score modifications on the fastest attention: SDPA (cuDNN on Hopper) plus an exact correction.

A plan whose only change to the attention is a logit bias on a few key positions — ZeroTuning's
γ on the first token (log γ on key 0), `first_token_bias`, `key_bias` — and, after it, output
edits (head scale, replacement, shift) does not need a custom kernel. With the plain attention's
normalized output O_i and log-sum-exp L_i per row i, and p_ij = exp(s_ij − L_i) the plain
probabilities of the biased keys j ∈ P (s_ij = scale · q_i·k_j, computed here for those few keys
only), the biased attention is exactly

    w_ij = (exp(b_hj) − 1) · p_ij          (0 where row i cannot see key j)
    O'_i = (O_i + Σ_j w_ij v_j) / (1 + Σ_j w_ij)

because softmax(s + b)·V = (Σ_k e^{s_k} v_k + Σ_j (e^{b_j} − 1) e^{s_j} v_j) / (Σ_k e^{s_k} + Σ_j (e^{b_j} − 1) e^{s_j}).
The extra work is O(Q · |P| · D) next to the O(Q · K · D) attention: the plan runs at the plain
attention's speed. Numerics: O_i arrives in the input dtype; the correction is fp32. The
denominator is at least exp(min(b, 0)), so a negative bias amplifies O_i's rounding by up to
exp(−b): the path is taken only for biases in [log 0.5, 30] (γ from 0.5 up), otherwise — and for
masks, chunked prefill, softcap, logit scales, ACT, VAR or probability stats — the Triton kernel
(or the reference) runs as before. `route_reason` says which, and the choice is logged once.

A decode step over a short cache (≤ DECODE_MASK_MAX_KEYS) skips the correction: one SDPA call
with the bias as an additive mask (`decode_masked`), because there the step is host-bound and one
launch beats two. Otherwise the plain attention with its log-sum-exp: for a decode step,
FlashAttention with each key/value head's query heads as its query rows; for a prefill,
`torch.ops.aten._scaled_dot_product_cudnn_attention` — what SDPA picks on Hopper, grouped-query
key/values as they are — or the efficient-attention kernel where cuDNN refuses the call; the CPU
flash kernel on the CPU (those two want equal head counts: K and V are expanded for them). The correction is one Triton kernel
on CUDA (`_correct`: per row, the |P| biased keys' logits, weights and values, the head's output
scale, one read of q and O and one write) and the PyTorch `apply_sparse_bias` elsewhere — the
specification the kernel is tested against.
"""

from __future__ import annotations

import logging
import math

import torch

from headlab.plan import LayerPlan, upload

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch correction runs
    triton = None

log = logging.getLogger("headlab.kernels")
MIN_BIAS = math.log(0.5)
MAX_BIAS = 30.0
MAX_POSITIONS = 64
DECODE_MASK_MAX_KEYS = 4096
"""Decode steps over caches up to this length run as one masked SDPA call (`decode_masked`);
longer ones as FlashAttention + the Triton correction. Measured on an H100 (score_mod_bench):
the masked call wins at 1k (36 vs 127 µs) and 4k (104 vs 139 µs), loses from 8k (180 vs 158 µs;
at 32k 691 vs 167 µs) — SDPA's masked kernel does not split the cache across the GPU."""
_logged: set[str] = set()
# the overloads themselves: a decode step is host-bound, and resolving `torch.ops.aten.X(...)` costs
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention.default
_CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention.default


def enabled(query: torch.Tensor) -> bool:
    """Whether key-bias plans take this route for `query`: fp16 / bf16 CUDA tensors, with
    HEADLAB_KERNEL=auto (the default). fp32 keeps the exact reference (PyTorch's private
    efficient-attention op returned NaN for fp32 inputs here, measured); on the CPU the
    reference stays the oracle, and tests switch the route on there."""
    from headlab.kernels import kernel_choice

    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and kernel_choice() == "auto")


def plain_call_reason(attention_mask: torch.Tensor | None, softcap: float | None,
                      wants_probabilities: bool) -> str | None:
    """Why a call cannot take its plain attention from SDPA and correct it sparsely (None when it
    can): what every sparse route (this one, `act_sparse`) needs of the call itself."""
    if softcap is not None:
        return "soft-capped logits"
    if wants_probabilities:
        return "probability stats are measured in the kernel"
    if attention_mask is not None:
        return "an attention mask"
    return None


def route_reason(plan: LayerPlan | None, q_len: int, k_len: int, attention_mask: torch.Tensor | None,
                 causal: bool, softcap: float | None, wants_probabilities: bool) -> str | None:
    """None when `plan` can run as plain attention + the exact sparse-bias correction; else why not."""
    if plan is None or not plan.has_bias:
        return "no key bias"
    if plan.has_logit_scale or plan.has_act or plan.has_var:
        return "the plan changes more than a few keys' logits (logit scale, ACT or VAR)"
    reason = plain_call_reason(attention_mask, softcap, wants_probabilities)
    if reason is not None:
        return reason
    if causal and q_len not in (1, k_len):
        return "a chunked prefill (queries after a cache)"
    if plan.bias_positions.numel() > MAX_POSITIONS:
        return f"more than {MAX_POSITIONS} biased keys"
    lo, hi = plan.facts["bias_range"]  # read where the plan was compiled, on the CPU: no device sync
    if lo < MIN_BIAS or hi > MAX_BIAS:
        return f"a key bias outside [{MIN_BIAS:.3f}, {MAX_BIAS:g}] (γ below 0.5 would amplify rounding)"
    return None


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    ratio = n_heads // t.shape[1]
    return t if ratio == 1 else t.repeat_interleave(ratio, dim=1)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B, H, Q, D] in query.dtype, L [B, H, Q] fp32 natural log-sum-exp) of plain attention
    (top-left causal when `is_causal`: use it with Q == K)."""
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    # FlashAttention and cuDNN only for the dtypes they implement (the route itself is taken for
    # fp16 / bf16 only: `enabled`).
    half = query.dtype in (torch.float16, torch.bfloat16)
    if query.device.type == "cuda" and half and Q == 1 and not is_causal:
        # Decode: the query heads of a key/value head become that head's query rows (one query:
        # no mask to break), so FlashAttention reads the cache once per group, copies nothing and
        # — unlike cuDNN, which builds a plan per new key length — costs the same at every step.
        try:
            out = _FLASH(query.reshape(B, Hkv, H // Hkv, D), key, value, 0.0, False, False, scale=scaling)
            return out[0].reshape(B, H, 1, D), out[1].reshape(B, H, 1)
        except RuntimeError:  # e.g. fp32 tensors: cuDNN / efficient attention below
            pass
    if query.device.type == "cuda":
        if half:
            try:  # cuDNN takes grouped-query key/values as they are (measured: no copy, SDPA's own speed)
                out = _CUDNN(query, key, value, None, True, 0.0, is_causal, False, scale=scaling)
                return out[0], out[1].view(query.shape[:3])
            except RuntimeError:
                pass
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query.contiguous(), _expand_kv(key, H).contiguous(), _expand_kv(value, H).contiguous(), None, True, 0.0,
            is_causal, scale=scaling)
        return out[0], out[1][..., : query.shape[2]].float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, _expand_kv(key, H), _expand_kv(value, H), 0.0, is_causal, scale=scaling)
    return out, lse.float()


def apply_sparse_bias(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      positions: torch.Tensor, bias: torch.Tensor, scaling: float, q_offset: int,
                      causal: bool) -> torch.Tensor:
    """O' [B, H, Q, D] (fp32; fp64 for fp64 inputs): the plain attention `out` (with its `lse`)
    as it is with logit `bias` [H, P] added on key `positions` [P] (the module docstring's formula)."""
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    kp = key[:, :, positions].to(ct)                                      # [B, Hkv, P, D]
    vp = value[:, :, positions].to(ct)
    q = query.to(ct).view(B, Hkv, H // Hkv, Q, D)
    s = torch.matmul(q, kp.unsqueeze(2).transpose(-1, -2)).view(B, H, Q, -1) * scaling   # [B, H, Q, P]
    w = torch.exp(s - lse.to(ct)[..., None]) * torch.expm1(bias.to(ct))[None, :, None, :]
    if causal:
        rows = torch.arange(Q, device=query.device) + q_offset
        w = w * (positions[None, :] <= rows[:, None])
    num = out.to(ct) + torch.matmul(w.view(B, Hkv, H // Hkv, Q, -1), vp.unsqueeze(2)).view(B, H, Q, D)
    return num / (1.0 + w.sum(-1, keepdim=True))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan, scaling: float,
           causal: bool, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(head outputs [B, H, Q, D], whether the plan's output scale is already applied) of the
    biased attention, for a call `route_reason` accepted. With the Triton correction the outputs
    are in query.dtype and scaled unless the plan also replaces or shifts outputs (then they are
    fp32 and unscaled, like the PyTorch correction's, for `apply_output_interventions`)."""
    if attention_mask is not None:
        raise ValueError("score_mod.attend takes no attention mask (route_reason refuses masked calls)")
    Q, K = query.shape[2], key.shape[2]
    where = query.device.type
    if where not in _logged:
        _logged.add(where)
        log.info("key-bias plans on %s: plain attention with its log-sum-exp + the exact sparse correction", where)
    if Q == 1 and K <= DECODE_MASK_MAX_KEYS:
        return decode_masked(query, key, value, plan, scaling)
    out, lse = attention_with_lse(query, key, value, scaling, causal and Q == K and Q > 1)
    if use_kernel(query):
        scale_here = not plan.edits_outputs
        return correct(out, lse, query, key, value, plan, scaling, K - Q, causal, scale_here), scale_here
    return apply_sparse_bias(out, lse, query, key, value, plan.bias_positions, plan.bias, scaling, K - Q, causal), False


def decode_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan,
                  scaling: float) -> tuple[torch.Tensor, bool]:
    """A decode step (one query per row) as one SDPA call with the plan's bias as an additive
    mask: (outputs [B, H, 1, D], whether the output scale is applied). Each key/value head's query
    heads are its query rows and the bias row [H, K] is viewed as [1, Hkv, G, K], so nothing is
    copied; the bias row is kept per plan and device, grown by doubling. One launch instead of
    two: on short caches a decode step is host-bound, and this is what it saves (the benchmark
    measures where the two-launch route overtakes it). The bias is carried in the query's dtype."""
    B, H, _, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    slot = ("decode_bias", query.dtype, query.device)
    buf = cache.get(slot)
    if buf is None or buf.shape[-1] < K:
        cap = 1 << max(10, (K - 1).bit_length())
        buf = torch.zeros(H, cap, device=query.device, dtype=query.dtype)
        buf[:, plan.bias_positions] = plan.bias.to(query.device, query.dtype)
        cache[slot] = buf
    mask = buf.view(1, Hkv, H // Hkv, -1)[..., :K]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, Hkv, H // Hkv, D), key, value, attn_mask=mask, scale=scaling).reshape(B, H, 1, D)
    if plan.edits_outputs:
        return out.float(), False
    if plan.has_head_scale:
        hs = cache.get(("head_scale", query.dtype, query.device))
        if hs is None:
            hs = cache[("head_scale", query.dtype, query.device)] = plan.head_scale.to(query.device, query.dtype).view(1, H, 1, 1)
        out = out * hs
    return out, True


def use_kernel(query: torch.Tensor) -> bool:
    """The Triton correction: CUDA tensors (or the interpreter, for tests), head_dim a power of two."""
    if triton is None or query.shape[-1] & (query.shape[-1] - 1) or query.shape[-1] < 16:
        return False
    if query.device.type == "cuda":
        return True
    from headlab.kernels.fused import interpreting

    return interpreting()


def correct(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            plan: LayerPlan, scaling: float, q_offset: int, causal: bool, head_scale: bool) -> torch.Tensor:
    """`apply_sparse_bias` (and, with `head_scale`, the plan's output scale) in one Triton launch;
    [B, H, Q, D] in query.dtype, or fp32 without `head_scale`. With `head_scale` only the heads the
    plan changes (`LayerPlan.biased_or_scaled_heads`) are read and rewritten, in place in `out`
    (the attention's own output, which the caller owns): every other head's output is already
    final, and at 4k tokens a pass over all heads' q and O is ~10% of cuDNN's attention time."""
    B, H, Q, D = query.shape
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    if "expm1_bias" not in cache:
        cache["expm1_bias"] = torch.expm1(plan.bias.float()).contiguous()
        cache["positions32"] = plan.bias_positions.to(torch.int32).contiguous()
        cache["head_scale32"] = plan.head_scale.float().contiguous()
    weights, positions = cache["expm1_bias"], cache["positions32"]
    lse = lse.reshape(B, H, Q).contiguous()
    subset = head_scale and out.dtype == query.dtype and out.stride(-1) == 1
    if subset:
        changed = plan.biased_or_scaled_heads
        if not changed:
            return out
        if ("changed_heads32", query.device) not in cache:
            cache[("changed_heads32", query.device)] = upload(torch.tensor(changed, dtype=torch.int32), query.device)
        heads, n_heads = cache[("changed_heads32", query.device)], len(changed)
        y, y_strides = out, out.stride()[:3]
    else:
        heads, n_heads = weights, H  # not read
        # y as [B, Q, H, D] memory (the layout the attention returns to the model)
        y = torch.empty(B, Q, H, D, device=query.device, dtype=query.dtype if head_scale else torch.float32)
        y_strides = (Q * H * D, D, H * D)
    block_m = 16 if Q <= 16 else 64
    _correct[(triton.cdiv(Q, block_m), B * n_heads)](
        query, key, value, out, lse, positions, weights, cache["head_scale32"], y, heads,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3], *y_strides,
        H, key.shape[1], Q, positions.numel(), n_heads, q_offset, scaling,
        CAUSAL=causal, HAS_SCALE=head_scale and plan.has_head_scale, SUBSET=subset, BLOCK_M=block_m, HEAD_DIM=D,
        num_warps=4 if block_m == 64 else 2,
    )
    return y if subset else y.transpose(1, 2)


if triton is not None:
    @triton.jit
    def _program_head(H, Heads, NH, SUBSET: tl.constexpr):
        """(batch, head) of this program (program_id(1) = batch × head; with SUBSET, batch × the
        index of a listed head in Heads[NH])."""
        bh = tl.program_id(1)
        # int64, as the attention pass's offsets: b × (a batch row's stride) passes 2^31 elements
        # from B·Q·H·D ≥ 2^31 (9 rows of 64k tokens at 32 × 128), where int32 offsets wrap
        if SUBSET:
            return (bh // NH).to(tl.int64), tl.load(Heads + bh % NH).to(tl.int64)
        return (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _row_queries(Qp, Lp, b, h, sqb, sqh, sqm, H, HKV, QN, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The kv head, rows, row mask and dims of this program's (batch b, head h, row block
        program_id(0)), and its rows' q (fp32) and log-sum-exp."""
        kvh = h // (H // HKV)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < QN
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Qp + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        lse = tl.load(Lp + (b * H + h) * QN + rows, mask=ok, other=0.0)
        return kvh, rows, ok, d, q, lse

    @triton.jit
    def _row_outputs(Zp, b, h, rows, ok, d, szb, szh, szm):
        """The rows' attention output (fp32 [BLOCK_M, D])."""
        return tl.load(Zp + b * szb + h * szh + rows[:, None] * szm + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _row_tile(Qp, Zp, Lp, b, h, sqb, sqh, sqm, szb, szh, szm, H, HKV, QN, BLOCK_M: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
        """`_row_queries` and `_row_outputs` at once: the prologue of the sparse correction kernels
        that hold the output through their loop (`_correct` here, `act_sparse._act_excluded`)."""
        kvh, rows, ok, d, q, lse = _row_queries(Qp, Lp, b, h, sqb, sqh, sqm, H, HKV, QN, BLOCK_M, HEAD_DIM)
        z = _row_outputs(Zp, b, h, rows, ok, d, szb, szh, szm)
        return kvh, rows, ok, d, q, z, lse

    @triton.jit
    def _store_rows(Yp, Scale, y, b, h, rows, ok, d, syb, syh, sym, HAS_SCALE: tl.constexpr):
        """y (× the head's output scale) at Yp's (b, h, rows) with strides syb, syh, sym: a new
        [B, Q, H, D] buffer (the layout the model reads next), or the attention's own output."""
        if HAS_SCALE:
            y = y * tl.load(Scale + h)
        y_rows = Yp + b * syb + h * syh + rows[:, None] * sym
        tl.store(y_rows + d[None, :], y.to(Yp.dtype.element_ty), mask=ok[:, None])

    # q's, O's and y's strides stay specialized: Triton then knows their rows are 16-aligned and
    # moves them in 16-byte vectors (unspecialized, every element was its own store: measured 2.5×
    # slower at 4k on an H100); the rest would only add launch-time checks
    @triton.jit(do_not_specialize=["skb", "skh", "skn", "svb", "svh", "svn", "H", "HKV", "QN", "P", "NH", "q_offset"])
    def _correct(Qp, Kp, Vp, Op, Lp, Pos, W, Scale, Yp, Heads,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, syb, syh, sym,
                 H, HKV, QN, P, NH, q_offset, scale,
                 CAUSAL: tl.constexpr, HAS_SCALE: tl.constexpr, SUBSET: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
        """BLOCK_M rows of one (batch, head): O' = (O + Σ_p w_p v_p) / (1 + Σ_p w_p), w_p = W[h, p]·exp(s_p − L).
        With SUBSET only the heads listed in Heads[NH] (Yp may then be Op itself: rows are independent)."""
        b, h = _program_head(H, Heads, NH, SUBSET)
        kvh, rows, ok, d, q, o, lse = _row_tile(Qp, Op, Lp, b, h, sqb, sqh, sqm, sob, soh, som, H, HKV, QN,
                                                BLOCK_M, HEAD_DIM)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        for p in range(0, P):
            pos = tl.load(Pos + p)
            wb = tl.load(W + h * P + p)
            k = tl.load(Kp + b * skb + kvh * skh + pos * skn + d).to(tl.float32)
            v = tl.load(Vp + b * svb + kvh * svh + pos * svn + d).to(tl.float32)
            w = wb * tl.exp(tl.sum(q * k[None, :], 1) * scale - lse)
            if CAUSAL:
                w = tl.where(pos <= rows + q_offset, w, 0.0)
            acc += w[:, None] * v[None, :]
            den += w
        y = (o + acc) / (1.0 + den)[:, None]
        _store_rows(Yp, Scale, y, b, h, rows, ok, d, syb, syh, sym, HAS_SCALE)


__all__ = ["MIN_BIAS", "MAX_BIAS", "apply_sparse_bias", "attend", "attention_with_lse", "correct", "decode_masked", "enabled",
           "plain_call_reason", "route_reason", "use_kernel"]
