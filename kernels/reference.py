"""Exact patched attention in PyTorch: the specification every faster kernel is tested against.

`patched_attention` computes softmax attention with an `InterventionPlan` compiled for one layer
(`LayerPlan`) applied, and emits the stats of a `CompiledStats`, processing queries in chunks so
that at most one [B, H, chunk, K] block of the attention matrix exists at a time: memory is
O(chunk · K · H), never O(N²) for the whole layer. Everything is accumulated in fp32 and the
output is cast back to the query's dtype.

Shapes: query [B, H, Q, D]; key [B, Hkv, K, D]; value [B, Hkv, K, Dv]; H a multiple of Hkv (GQA).
Query i sits at key index K − Q + i (bottom-right alignment, as with a KV cache).

Mask: None (causal when `is_causal`, else full), a boolean mask [B, 1|H, Q, K] (True = attend),
or an additive float mask [B, 1|H, Q, K] (entries at the dtype's minimum or −inf are masked).
Rows that can see no key (padding queries) give zeros, never NaN.

The semantics of each intervention are documented in `headlab.plan`. ACT follows the reference
code (GATECH-EIC/ACT, `atten_process_eval`) with two named differences, both tested:
- the sink set is computed per batch row and from the queries of this call, with r[j] divided by
  the number of queries that can see key j (= N − j for an unpadded causal prefill, exactly the
  reference's `arange(N, 0, -1)`), so padding is handled;
- a row whose attention lies entirely on sinks (nowhere to move the mass) is left unchanged; the
  reference divides by zero there.
"""

from __future__ import annotations

import torch

from headlab.plan import REPLACE_MEAN, REPLACE_PATCH, REPLACE_ZERO, LayerPlan
from headlab.stats import CompiledStats, LayerStats, as_slice

DEFAULT_BLOCK_ELEMENTS = 1 << 23
"""Largest attention block (B·H·chunk·K fp32 entries, 32 MiB) held at a time."""


def _logits(
    query: torch.Tensor,
    key_t: torch.Tensor,
    rows: slice,
    scaling: float,
    softcap: float | None,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled logits of query rows `rows`: [B, H, C, K] fp32, with GQA by broadcasting (no copy of K).

    `logit_scale` [H]: the plan's per-head factor ε_h, applied before the softcap as scaling the
    head's query would.
    """
    B, H, _, D = query.shape
    Hkv = key_t.shape[1]
    qc = query[:, :, rows].float()
    C = qc.shape[2]
    s = torch.matmul(qc.view(B, Hkv, H // Hkv, C, D), key_t.unsqueeze(2)).view(B, H, C, -1).mul_(scaling)
    if logit_scale is not None:
        s = s.mul_(logit_scale[None, :, None, None])
    if softcap is not None:
        s = s.div_(softcap).tanh_().mul_(softcap)
    return s


def _mask_block(
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    rows: slice,
    q_pos: torch.Tensor,
    k_len: int,
    shape: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(allowed [B|1, H|1, C, K] bool, additive float block or None) for query rows `rows`."""
    device = q_pos.device
    if attention_mask is None:
        if is_causal:
            allowed = torch.arange(k_len, device=device)[None, :] <= q_pos[rows][:, None]
        else:
            allowed = torch.ones(q_pos[rows].numel(), k_len, dtype=torch.bool, device=device)
        return allowed[None, None], None
    if attention_mask.shape[2] == 1:  # one mask row for every query
        block = attention_mask[:, :, :, :k_len].expand(-1, -1, q_pos[rows].numel(), -1)
    else:
        block = attention_mask[:, :, rows, :k_len]
    if block.dtype == torch.bool:
        return block, None
    additive = block.float()
    allowed = additive > torch.finfo(attention_mask.dtype).min / 2
    return allowed, additive


def _probabilities(
    query: torch.Tensor,
    key_t: torch.Tensor,
    rows: slice,
    *,
    scaling: float,
    softcap: float | None,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    q_pos: torch.Tensor,
    plan: LayerPlan | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities of rows `rows` after the plan's key bias: (A [B,H,C,K], allowed)."""
    s = _logits(query, key_t, rows, scaling, softcap, plan.logit_scale if plan is not None and plan.has_logit_scale else None)
    B, H, C, K = s.shape
    allowed, additive = _mask_block(attention_mask, is_causal, rows, q_pos, K, (B, H, C, K))
    if additive is not None:
        s = s + additive
    if plan is not None and plan.has_bias:
        s[..., plan.bias_positions] += plan.bias[None, :, None, :]
    # In place from here on: one [B, H, C, K] block is all this function holds.
    s.masked_fill_(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m.masked_fill_(~torch.isfinite(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    denom.masked_fill_(denom == 0, 1.0)
    return p.div_(denom), allowed


def attention_pattern(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    is_causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    plan: LayerPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole attention matrix of one call, as the patched attention weighs it: (scores
    [B, H, Q, K] fp32 — pre-softmax logits with the plan's logit scale and key bias, masked keys
    −inf — and pattern [B, H, Q, K] fp32 — the probabilities after ACT / VAR). O(B·H·Q·K) memory:
    for the integrations' pattern hooks (TransformerLens `hook_attn_scores` / `hook_pattern`),
    computed only when one is asked for."""
    B, H, Q, _ = query.shape
    K = key.shape[2]
    device = query.device
    key_t = key.float().transpose(-1, -2)
    q_pos = torch.arange(Q, device=device) + (K - Q)
    plan = plan_for_call(plan, K, device)
    rows = slice(0, Q)
    scores = _logits(query, key_t, rows, scaling, softcap, plan.logit_scale if plan is not None and plan.has_logit_scale else None)
    allowed, additive = _mask_block(attention_mask, is_causal, rows, q_pos, K, (B, H, Q, K))
    if additive is not None:
        scores = scores + additive
    if plan is not None and plan.has_bias:
        scores[..., plan.bias_positions] += plan.bias[None, :, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    pattern, _ = _probabilities(query, key_t, rows, scaling=scaling, softcap=softcap, attention_mask=attention_mask,
                                is_causal=is_causal, q_pos=q_pos, plan=plan)
    if plan is not None and plan.has_act:
        received = pattern.sum(dim=2)
        count = allowed.float().sum(dim=2).expand(B, H, K)
        pattern = act_calibrate(pattern, act_sink_sets(received, count, plan), plan.act_beta)
    if plan is not None and plan.has_var:
        pattern = var_redistribute(pattern, plan)
    return scores, pattern


def act_sink_sets(received: torch.Tensor, count: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """ACT's sink set per (batch, head): [B, H, K] bool.

    r[j] = received[j] / count[j]; S = {j : r[j] > τ_h} without its first element (the reference
    drops `indices[0]` whatever it is — normally key 0, the initial-token sink ACT keeps).
    Only heads with ACT enabled get a non-empty set.
    """
    r = torch.where(count > 0, received / count.clamp_min(1), torch.zeros_like(received))
    sinks = r > plan.act_tau.to(r.device)[None, :, None]
    first = sinks.int().argmax(dim=-1, keepdim=True)
    sinks = sinks.scatter(-1, first, torch.zeros_like(first, dtype=torch.bool))
    sinks = sinks & plan.act_heads.to(r.device)[None, :, None]
    if plan.act_sinks is not None:  # calibrated heads: their fixed positions, whatever this input's attention
        fixed = fixed_sink_mask(plan, received.shape[-1], r.device)
        sinks = torch.where(plan.act_fixed_heads.to(r.device)[None, :, None], fixed[None], sinks)
    return sinks


def fixed_sink_mask(plan: LayerPlan, k_len: int, device: torch.device) -> torch.Tensor:
    """[H, K] bool: the calibrated ACT sink positions of each head (`InterventionPlan.act_with_sinks`)
    among a call's K keys — positions past them are not in this call, so they drop out."""
    n_heads = plan.act_heads.shape[0]
    mask = torch.zeros(n_heads, k_len + 1, dtype=torch.bool, device=device)
    if plan.act_sinks is not None:
        # the host copy for the CPU: building a mask there never waits on the GPU
        pos = (plan.act_sinks_host if device.type == "cpu" else plan.act_sinks).to(device)
        pos = torch.where((pos >= 0) & (pos < k_len), pos, torch.full_like(pos, k_len))
        mask.scatter_(1, pos, True)
    return mask[:, :k_len]


def act_row_factors(sink_mass: torch.Tensor, rest: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ACT's per-row factors: (c, movable) with c = 1 + (1−β)·S_i / R_i for the non-sink keys, and
    movable = R_i above the smallest normal float (below it S_i / R_i overflows; such rows stay
    as they are, c = 1). `beta` broadcasts against the row tensors."""
    movable = rest > torch.finfo(torch.float32).tiny
    c = torch.where(movable, 1.0 + (1.0 - beta) * sink_mass / torch.where(movable, rest, torch.ones_like(rest)),
                    torch.ones_like(rest))
    return c, movable


def act_calibrate(attn: torch.Tensor, sinks: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACT on a probability block, in place: A[i,s] → β·A[i,s] on sinks, the removed mass to non-sinks.

    attn [B,H,C,K]; sinks [B,H,K] bool; beta [H]. Non-sink keys are scaled by
    c = 1 + (1−β)·S_i / R_i, S_i the row's sink mass and R_i = Σ_{k∉S} A[i,k] — the same as
    adding (1−β)·S_i · A[i,j] / R_i. R_i is summed directly rather than taken as 1 − S_i, which
    loses all precision when a row sits almost entirely on its sinks. Heads without sinks are
    unchanged (c = 1).
    """
    sink_cols = sinks.float().unsqueeze(-1)  # [B, H, K, 1]: row sums by matmul, no block-sized temporaries
    s_i = torch.matmul(attn, sink_cols)
    rest = torch.matmul(attn, 1.0 - sink_cols)
    b = beta.to(attn.device)[None, :, None, None]
    c, movable = act_row_factors(s_i, rest, b)
    b_row = torch.where(movable, b, torch.ones_like(rest))
    return attn.mul_(torch.where(sinks[:, :, None, :], b_row, c))


def var_redistribute(attn: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """VAR on a probability block, in place: attn [B,H,C,K]. For heads with p > 0, sources ×(1−p)
    and targets ×(1 + p·S_i/T_i) (S_i, T_i the row's mass on each set); rows without target mass
    stay as they are. Positions at or beyond K (not yet in the cache) are left out."""
    K = attn.shape[-1]
    src = torch.zeros(K, device=attn.device)
    tgt = torch.zeros(K, device=attn.device)
    src[plan.var_sources[plan.var_sources < K]] = 1.0
    tgt[plan.var_targets[plan.var_targets < K]] = 1.0
    s_i = torch.matmul(attn, src[:, None])  # [B, H, C, 1]
    t_i = torch.matmul(attn, tgt[:, None])
    p = plan.var_p.to(attn.device)[None, :, None, None]
    movable = t_i > torch.finfo(torch.float32).tiny
    f_src = torch.where(movable, 1.0 - p, torch.ones_like(t_i))
    f_tgt = torch.where(movable, 1.0 + p * s_i / torch.where(movable, t_i, torch.ones_like(t_i)), torch.ones_like(t_i))
    factor = torch.where(src.bool(), f_src, torch.where(tgt.bool(), f_tgt, torch.ones_like(f_src)))
    return attn.mul_(factor)


def apply_output_interventions(z: torch.Tensor, plan: LayerPlan | None, rows: slice, patch: torch.Tensor | None) -> torch.Tensor:
    """Replacement (zero / mean / patch), shift, then output scale, on head outputs z [B, H, C, Dv] fp32."""
    if plan is None:
        return z
    if not plan.edits_outputs:
        return z * plan.head_scale.to(z.device)[None, :, None, None] if plan.has_head_scale else z
    if plan.has_replacement:
        mode = plan.replace_mode.to(z.device)[None, :, None, None]
        if bool((plan.replace_mode == REPLACE_ZERO).any()):
            z = torch.where(mode == REPLACE_ZERO, torch.zeros_like(z), z)
        if plan.mean_out is not None:
            z = torch.where(mode == REPLACE_MEAN, plan.mean_out.to(z.device)[None, :, None, :].expand_as(z), z)
        if patch is not None:
            z = torch.where(mode == REPLACE_PATCH, patch[:, :, rows].to(z.device), z)
    if plan.shift_out is not None:
        z = z + plan.shift_out.to(z.device)[None, :, None, :]
    return z * plan.head_scale.to(z.device)[None, :, None, None]


def plan_for_call(plan: LayerPlan | None, k_len: int, device: torch.device) -> LayerPlan | None:
    """The layer plan on `device`, checked against a call with `k_len` keys (PlanError if it biases past them)."""
    if plan is None:
        return None
    plan = plan.to(device)
    if plan.max_bias_position >= k_len:
        from headlab.errors import PlanError

        raise PlanError(f"layer {plan.layer}: the plan biases key position {plan.max_bias_position}, "
                        f"but this call has only {k_len} keys")
    return plan


def key_logits(query: torch.Tensor, key: torch.Tensor, rows: slice | torch.Tensor, keys: torch.Tensor, scaling: float,
               softcap: float | None) -> torch.Tensor:
    """Pre-softmax logits of query rows `rows` at key positions `keys`: [B, H, Qs, P] fp32.

    q·k × scaling (softcapped), no mask and no plan: the QK-score of select-and-copy heads.
    """
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    q = query[:, :, rows].float()
    q = q.view(B, Hkv, H // Hkv, q.shape[2], D)
    k = key[:, :, keys].float()  # [B, Hkv, P, D]
    s = torch.matmul(q, k.transpose(-1, -2).unsqueeze(2)).view(B, H, q.shape[3], -1) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


class StatsCollector:
    """Accumulates LayerStats chunk by chunk for the selected queries."""

    def __init__(self, req: CompiledStats, shape: tuple[int, int, int], k_len: int, dv: int, row_positions: torch.Tensor,
                 device: torch.device):
        """row_positions [Q] (CPU): the key index of every query row of the call."""
        B, H, _ = shape
        self.req = req
        qi = req.query_index.cpu()  # row selection is bookkeeping: keep it off the GPU
        self.qi = qi
        n = qi.numel()
        self.window = as_slice(qi)  # the usual contiguous window: slices, no blocking index copies
        f32 = dict(device=device, dtype=torch.float32)
        self.out = LayerStats(query_positions=row_positions[qi])
        if req.argmax:
            self.out.argmax = torch.zeros(B, H, n, dtype=torch.long, device=device)
            self.out.argmax_prob = torch.zeros(B, H, n, **f32)
        for name in req.spans:
            self.out.span_mass[name] = torch.zeros(B, H, n, **f32)
        if req.entropy:
            self.out.entropy = torch.zeros(B, H, n, **f32)
        if req.received:
            self.out.received = torch.zeros(B, H, k_len, **f32)
            self.out.received_count = torch.zeros(B, H, k_len, **f32)
        if req.head_outputs:
            self.out.head_outputs = torch.zeros(B, H, n, dv, **f32)
        if req.keys is not None:
            self.out.key_probs = torch.zeros(B, H, n, req.keys.numel(), **f32)
        for name in req.matches:
            self.out.match_mass[name] = torch.zeros(B, H, n, **f32)

    def selected(self, rows: slice) -> tuple[torch.Tensor | slice, torch.Tensor | slice] | None:
        """(output slots, rows within the chunk) of the selected queries in chunk `rows`."""
        if isinstance(self.window, slice):
            start = self.window.start
            lo, hi = max(rows.start, start), min(rows.stop, self.window.stop)
            if lo >= hi:
                return None
            return slice(lo - start, hi - start), slice(lo - rows.start, hi - rows.start)
        hit = (self.qi >= rows.start) & (self.qi < rows.stop)
        if not bool(hit.any()):
            return None
        slots = hit.nonzero().squeeze(-1)
        return slots, self.qi[slots] - rows.start  # CPU indices: no device synchronization

    def add_probabilities(self, rows: slice, attn: torch.Tensor, allowed: torch.Tensor) -> None:
        sel = self.selected(rows)
        if sel is None:
            return
        slots, local = sel
        a = attn[:, :, local]
        o = self.out
        if self.req.argmax:
            prob, idx = a.max(dim=-1)
            o.argmax[:, :, slots] = idx
            o.argmax_prob[:, :, slots] = prob
        for name, pos in self.req.spans.items():
            o.span_mass[name][:, :, slots] = a[..., pos].sum(dim=-1)
        if self.req.entropy:
            o.entropy[:, :, slots] = torch.special.entr(a).sum(dim=-1)
        if self.req.keys is not None:
            o.key_probs[:, :, slots] = a[..., self.req.keys]
        if self.req.matches:
            pos = o.query_positions[slots].to(a.device)  # [n] token position of each selected query
            keys = torch.arange(a.shape[-1], device=a.device)
            for name, (ql, kl, strict) in self.req.matches.items():
                same = ql[:, pos, None] == kl[:, None, : a.shape[-1]]  # [1|B, n, K]: only this chunk's rows
                before = keys[None, :] < pos[:, None] if strict else keys[None, :] <= pos[:, None]
                o.match_mass[name][:, :, slots] = (a * (same & before)[:, None].to(a.dtype)).sum(dim=-1)
        if self.req.received:
            o.received += a.sum(dim=2)
            o.received_count += allowed[:, :, local].float().sum(dim=2).expand_as(o.received_count)

    def add_key_logits(self, query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None) -> None:
        if self.req.keys is not None:
            self.out.key_logits = key_logits(query, key, self.window, self.req.keys, scaling, softcap)

    def add_outputs(self, rows: slice, z: torch.Tensor) -> None:
        if not self.req.head_outputs:
            return
        sel = self.selected(rows)
        if sel is not None:
            slots, local = sel
            self.out.head_outputs[:, :, slots] = z[:, :, local]

    def result(self) -> LayerStats:
        """The stats, left on the device: moving them to the CPU here would wait on the GPU at every layer."""
        return self.out


def chunk_rows(batch: int, heads: int, q_len: int, k_len: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Queries per chunk so that one [B, H, chunk, K] block holds at most `block_elements`."""
    return max(1, min(q_len, block_elements // max(1, batch * heads * k_len)))


def patched_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    is_causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    plan: LayerPlan | None = None,
    stats: CompiledStats | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    query_positions: torch.Tensor | int | None = None,
    compute_output: bool = True,
) -> tuple[torch.Tensor | None, LayerStats | None]:
    """Attention with a layer's interventions applied and its stats emitted.

    `query_positions` [Q]: the key index of each query row, when the rows are not the last Q
    positions (e.g. a subset of a prefill's queries) — or an int, the key index of the first row
    of consecutive rows; causal masking without a mask uses it.
    `compute_output=False` emits the probability stats only (no values read, output None): for
    callers that get the outputs elsewhere (SDPA) and want stats on some rows.

    Returns (output [B, H, Q, Dv] in query.dtype — the per-head z before o_proj, and the
    LayerStats or None when no stats were asked).
    """
    B, H, Q, _ = query.shape
    Hkv, K, Dv = key.shape[1], key.shape[2], value.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    device = query.device
    key_t = key.float().transpose(-1, -2)
    v = value.float().unsqueeze(2) if compute_output else None  # [B, Hkv, 1, K, Dv]
    if query_positions is None or isinstance(query_positions, int):
        first = K - Q if query_positions is None else query_positions
        row_positions = torch.arange(Q) + first
        q_pos = torch.arange(Q, device=device) + first  # built on the device: no host-blocking copy
    else:
        row_positions = query_positions.cpu()
        q_pos = query_positions.to(device)
    chunk = chunk_rows(B, H, Q, K, block_elements)
    plan = plan_for_call(plan, K, device)
    patch = plan.patch_tensor(B, Q, H, Dv, device) if plan is not None else None
    kw = dict(scaling=scaling, softcap=softcap, attention_mask=attention_mask, is_causal=is_causal, q_pos=q_pos, plan=plan)

    sinks = None
    if plan is not None and plan.has_act:
        received = torch.zeros(B, H, K, device=device)
        count = torch.zeros(B, H, K, device=device)
        # (calibrated sink sets only: no pass over the input, the sets are the plan's)
        for r0 in range(0, Q if plan.has_adaptive_act else 0, chunk):
            rows = slice(r0, min(Q, r0 + chunk))
            attn, allowed = _probabilities(query, key_t, rows, **kw)
            received += attn.sum(dim=2)
            count += allowed.float().sum(dim=2).expand(B, H, K)
        sinks = act_sink_sets(received, count, plan)

    collector = StatsCollector(stats, (B, H, Q), K, Dv, row_positions, device) if stats is not None else None
    if collector is not None:
        collector.add_key_logits(query, key, scaling, softcap)
    out = torch.empty(B, H, Q, Dv, dtype=query.dtype, device=device) if compute_output else None
    for r0 in range(0, Q, chunk):
        rows = slice(r0, min(Q, r0 + chunk))
        attn, allowed = _probabilities(query, key_t, rows, **kw)
        if sinks is not None:
            attn = act_calibrate(attn, sinks, plan.act_beta)
        if plan is not None and plan.has_var:
            attn = var_redistribute(attn, plan)
        if collector is not None and stats.wants_probabilities:
            collector.add_probabilities(rows, attn, allowed)
        if not compute_output:
            continue
        C = attn.shape[2]
        z = torch.matmul(attn.view(B, Hkv, H // Hkv, C, K), v).view(B, H, C, Dv)
        z = apply_output_interventions(z, plan, rows, patch)
        if collector is not None:
            collector.add_outputs(rows, z)
        out[:, :, rows] = z.to(query.dtype)
    return out, (collector.result() if collector is not None else None)
