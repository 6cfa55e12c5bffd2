"""ACT on the fastest attention: SDPA (cuDNN on Hopper) plus an exact correction on the few sink keys.

ACT (METHODS.md; `kernels.reference.act_calibrate`) keeps β·A[i,s] on a head's sink keys S and
scales the other keys by c_i = (1 − β·S_i) / R_i, S_i = Σ_{s∈S} A[i,s], R_i = Σ_{j∉S} A[i,j]. In output
form, with U_i = Σ_{s∈S} A[i,s]·v_s and W_i = Σ_{j∉S} A[i,j]·v_j:

    z'_i = β·U_i + c_i·W_i                  (rows with R_i ≤ the smallest normal float: z_i, unchanged)

U_i and S_i need only the sink keys' logits and the row's log-sum-exp L_i (p_is = exp(s_is − L_i)).
W_i is where the care goes:

- **mode "full"** — from the plain attention's output z_i: W_i = z_i − U_i. One attention pass,
  but z arrives rounded to the input dtype, and c_i multiplies that rounding: c_i ≤ C_MAX
  (S_i ≤ 0.83 at β = 0.4) keeps it within C_MAX half-ulps of |z|. The kernel returns every c_i;
  rows above C_MAX — typically rows right after a hidden sink, which see few other keys — are
  recomputed exactly from their logits: on the GPU by `exact_rows` (the rows listed on the device,
  then each over every key it sees; its cost follows the number of such rows: 0.4 ms for 3.4% of
  the (head, row) pairs at 16k keys on an H100), in PyTorch by `_fix_rows`.
- **mode "masked"** — from the attention over values whose rows at the sink keys are zeroed
  (z^m_i = Σ_{j∉P} A[i,j]·v_j, exactly the non-sink part, rounded once): W_i = z^m_i + Σ_{j∈P∖S_h} A[i,j]·v_j.
  P is the union of the sink sets of the query heads sharing a key/value head (the zeroed copy is
  per key/value head); keys in P that are not this head's sinks are added back from their logits.
  Exact with no amplification; costs a copy of the values (~1% of the attention at 16k keys).

Calibrated sink sets (`InterventionPlan.act_with_sinks`) run the masked mode directly: one cuDNN
pass, no sync. Input-adaptive sinks (the paper's) need the received attention r[j] first: the
plain attention with its log-sum-exp, the transposed QK-only column pass (`_attn_colsum_t`), the
sink sets and lists built on the device (`sink_table`), then the full mode with the rows above
C_MAX recomputed (`exact_rows`) — nothing is read back to the host. In a decode step r[j]
is the one row's A[j]: `decode_adaptive` finds and calibrates the sinks in one pass after the
row's log-sum-exp.

Named difference, shared with the Triton kernel's ACT: the correction kernel takes R_i = 1 − S_i,
so R_i carries the absolute error of S_i — that of the row's log-sum-exp (cuDNN's: ~2e-6,
measured) — and the non-sink part the relative error ~2e-6 / R_i: below bf16's rounding while a
row's hidden sinks hold less than ~99.9% of it. `exact_rows` and `_fix_rows` sum R_i directly. A row that sees
only its own sinks (the first row, where the first token is a sink) is counted instead: R_i = 0,
and the row stays as it is, as in the reference (1 − S_i there is rounding noise, and taken as
R_i it left β·U_i: the row lost 1 − β of its output).
cuDNN with an additive per-key bias (−∞ on each head's sinks) would give R_i exactly, but ran
1.43× slower than plain cuDNN on the H100 (5.27 against 3.69 ms at 16k keys); the zeroed values
cost ~4%.

Taken for fp16/bf16 CUDA prefills (queries = keys, causal, or non-causal full attention) and
decode steps — input-adaptive sinks as `decode_adaptive`, calibrated ones as one attention call
without each head's sinks + an exact correction (`decode_excluded`, up to 4096 keys), or on the
Triton decode kernel that splits the cache over the GPU (`decode_excluded_split`: longer caches,
and steps with a key mask — left padding, `headlab.decode`'s static cache); for plans that change
no logit otherwise (no key bias, logit scale or VAR) and do not mix calibrated and adaptive
heads in a decode step, without softcap, probability stats or any other mask; `route_reason`
says why not, and the Triton kernel (or the reference) runs.
The correction is one Triton kernel on CUDA (`_act_correct`) and the PyTorch `apply_act`
elsewhere — the specification the kernel is tested against.
"""

from __future__ import annotations

import logging

import torch

from headlab.kernels import score_mod
from headlab.kernels.reference import act_row_factors, act_sink_sets, fixed_sink_mask
from headlab.plan import LayerPlan, upload

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch correction runs
    triton = None

log = logging.getLogger("headlab.kernels")
C_MAX = 4.0
"""Largest non-sink factor c_i the full mode accepts (amplification of z's rounding)."""
SINK_TABLE_BLOCK = 1024
"""Keys per step of `_act_sink_table` (one program per batch row and key/value head)."""
EXACT_ROWS_BLOCKS: tuple[int, int, int, int] = (64, 64, 4, 3)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) of `_act_exact_rows`, the rows above C_MAX
(`benchmarks/act_bench.py --sweep-exact-rows` times the choices)."""
CORRECT_BLOCKS: tuple[int, int] = (16, 2)
"""(BLOCK_M, num_warps) of `_act_correct` for calls of more than 16 queries
(`benchmarks/act_bench.py --sweep-correction` times the choices)."""
ADAPTIVE_DECODE_BLOCKS: tuple[int, int, int, int] = (64, 4, 3, 2)
"""(BLOCK_N, num_warps, num_stages, programs per SM) of `_act_adaptive_split`, the calibrating pass
of `decode_adaptive`; the programs per SM set the key splits of both passes
(`benchmarks/decode_graph_bench.py --sweep-adaptive` times the choices)."""
ADAPTIVE_LOGIT_BLOCKS: tuple[int, int, int] = (128, 4, 3)
"""(BLOCK_N, num_warps, num_stages) of `_act_adaptive_logits`, the pass of `decode_adaptive` that
reads the keys and stores the step's logits."""
DECODE_EXCLUDE_MAX_KEYS = score_mod.DECODE_MASK_MAX_KEYS
"""Decode steps with calibrated sinks over caches up to this length run as `decode_excluded`
(one masked attention call: the masked kernel does not split a long cache over the GPU, as
score_mod's decode threshold measured); longer ones over sink-zeroed values."""
_logged: set[str] = set()


def route_reason(plan: LayerPlan | None, q_len: int, k_len: int, attention_mask: torch.Tensor | None,
                 causal: bool, softcap: float | None, wants_probabilities: bool) -> str | None:
    """None when `plan`'s ACT can run as plain attention + the sparse sink correction; else why not."""
    if plan is None or not plan.has_act:
        return "no ACT"
    if plan.has_logit_scale or plan.has_bias or plan.has_var:
        return "the plan changes logits besides ACT (key bias, logit scale or VAR)"
    decode = q_len == 1 and k_len > 1
    if decode and attention_mask is not None and is_key_mask(attention_mask, k_len):
        attention_mask = None  # a key mask (padding, a static cache's free slots): the decode routes take it
    reason = score_mod.plain_call_reason(attention_mask, softcap, wants_probabilities)
    if reason is not None:
        return reason
    if decode:
        if plan.has_adaptive_act and plan.act_sinks is not None:
            return "a decode step mixing input-adaptive and calibrated sink sets (the Triton kernel)"
        return None
    if q_len != k_len:
        return "a chunked prefill (queries after a cache: the Triton kernel)"
    return None


def is_key_mask(mask: torch.Tensor, k_len: int) -> bool:
    """True for a boolean mask [B | 1, 1, 1, ≥ K] (True = attend): which keys every query head of
    a decode step sees — left padding, or the slots of a static cache not written yet."""
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] >= k_len


def sink_lists(sinks: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per key/value head, the union P of its query heads' sink positions, and which are whose.

    sinks [B, H, K] bool → (positions [B, Hkv, M] int32, −1 padded; member [B, H, M] int8, 1 where
    position m is a sink of head h), or None when no head has a sink. Reads M back (a sync)."""
    B, H, K = sinks.shape
    groups = sinks.view(B, n_kv, H // n_kv, K)
    union = groups.any(2)
    M = int(union.sum(-1).max())
    if M == 0:
        return None
    order = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :M]  # [B, Hkv, M]
    valid = torch.gather(union, -1, order)
    positions = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
    member = torch.gather(groups, -1, order[:, :, None, :].expand(B, n_kv, H // n_kv, M)) & valid[:, :, None, :]
    return positions.contiguous(), member.reshape(B, H, M).to(torch.int8).contiguous()


def fixed_lists(plan: LayerPlan, n_kv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`sink_lists` of a plan's calibrated sink sets ([1, Hkv, M] / [1, H, M], shared by every
    batch row), built on the host once per plan and device."""
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    slot = ("act_fixed_lists", n_kv, device)
    if slot not in cache:
        sets = plan.act_sinks_host
        H = sets.shape[0]
        sinks = torch.zeros(1, H, int(sets.max()) + 1, dtype=torch.bool)
        for h in range(H):
            row = sets[h][sets[h] >= 0]
            sinks[0, h, row] = True
        lists = sink_lists(sinks, n_kv)
        cache[slot] = None if lists is None else (upload(lists[0], device), upload(lists[1], device))
    return cache[slot]


def zeroed_values(value: torch.Tensor, positions: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """A copy of value [B, Hkv, K, D] with each key/value head's rows at `positions` [B or 1, Hkv, M]
    set to zero (positions −1 or ≥ K ignored). `where`: the (kv head, position) pairs of
    batch-shared positions, precomputed (`_fixed_where`: no device sync)."""
    out = value.clone()
    B, Hkv, K, _ = value.shape
    # a zero on the device: a Python 0 would be copied from pageable host memory on every call,
    # a copy that makes the host wait for all the GPU work queued before it
    zero = torch.zeros((), device=value.device, dtype=value.dtype)
    if where is not None:
        out[:, where[0], where[1]] = zero
        return out
    pos = positions.long().expand(B, Hkv, positions.shape[-1])
    b, h, m = torch.nonzero((pos >= 0) & (pos < K), as_tuple=True)
    out[b, h, pos[b, h, m]] = zero
    return out


def _fixed_where(plan: LayerPlan, n_kv: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv heads, positions) of a calibrated plan's sink union below k_len, from the host copy of
    the plan (built once per plan, device and set of positions present: a decode step past the
    last sink reuses it, with no host-to-device copy)."""
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    slot = ("act_fixed_where", n_kv, min(k_len, plan.act_max_sink + 1), device)
    if slot not in cache:
        sets = plan.act_sinks_host
        group = sets.shape[0] // n_kv
        pairs = sorted({(h // group, int(p)) for h in range(sets.shape[0]) for p in sets[h].tolist() if 0 <= p < k_len})
        kv = torch.tensor([a for a, _ in pairs], dtype=torch.long)
        pos = torch.tensor([b for _, b in pairs], dtype=torch.long)
        cache[slot] = (upload(kv, device), upload(pos, device))
    return cache[slot]


def received(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float,
             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(received attention Σ_i A[i, j], count of rows that see j), both [B, H, K] fp32, from the
    rows' log-sum-exp: the transposed column pass on CUDA (and in Triton's interpreter), chunked
    PyTorch elsewhere."""
    if score_mod.use_kernel(query) and (query.device.type == "cuda" or query.dtype != torch.float64):
        from headlab.kernels.fused import _Launch

        run = _Launch(query, key, None, scaling, causal, None, None, None, key.shape[2] - query.shape[2])
        return run.received(lse.float().contiguous(), 0, query.shape[2])
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(ct).unsqueeze(2)
    recv = torch.zeros(B, H, K, dtype=ct, device=query.device)
    for r0 in range(0, Q, 256):
        rows = torch.arange(r0, min(Q, r0 + 256), device=query.device)
        q = query[:, :, rows].to(ct).view(B, Hkv, H // Hkv, rows.numel(), D)
        p = torch.exp(torch.matmul(q, k.transpose(-1, -2)).view(B, H, rows.numel(), K) * scaling
                      - lse[:, :, rows].to(ct)[..., None])
        if causal:
            p = p * (torch.arange(K, device=query.device)[None, :] <= rows[:, None] + (K - Q))
        recv += p.sum(2)
    if causal:
        cnt = (Q - (torch.arange(K, device=query.device) - (K - Q)).clamp_min(0)).clamp(0, Q)
    else:
        cnt = torch.full((K,), Q, device=query.device)
    return recv.float(), cnt.float().expand(B, H, K).contiguous()


def apply_act(z: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              positions: torch.Tensor, member: torch.Tensor, beta: torch.Tensor, scaling: float, causal: bool,
              masked: bool, row_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z' [B, H, Q, D] fp32 (fp64 for fp64 inputs), c [B, H, Q]): ACT from the plain attention's
    `z` and `lse` (mode "full") or from the masked attention's (`masked`, values zeroed at
    `positions`): the module docstring's formula. positions [B or 1, Hkv, M]; member [B or 1, H, M];
    beta [H]. The query rows sit at key positions `row_positions` [Q] (default: the last Q)."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    pos = positions.long().expand(B, Hkv, positions.shape[-1])
    M = pos.shape[-1]
    valid = (pos >= 0) & (pos < K)
    idx = pos.clamp(0, K - 1)[..., None].expand(B, Hkv, M, D)
    kp = torch.gather(key.to(ct), 2, idx)                              # [B, Hkv, M, D]
    vp = torch.gather(value.to(ct), 2, idx)
    s = torch.matmul(query.to(ct).view(B, Hkv, G, Q, D), kp.unsqueeze(2).transpose(-1, -2)) * scaling  # [B, Hkv, G, Q, M]
    p = torch.exp(s.view(B, H, Q, M) - lse.to(ct)[..., None])
    visible = valid.repeat_interleave(G, 1)[:, :, None, :]
    if causal:
        rows = torch.arange(Q, device=query.device) + (K - Q) if row_positions is None else row_positions
        visible = visible & (pos.repeat_interleave(G, 1)[:, :, None, :] <= rows[None, None, :, None])
    p = torch.where(visible, p, torch.zeros_like(p))
    mine = member.bool().expand(B, H, M)[:, :, None, :]
    ps = torch.where(mine, p, torch.zeros_like(p))
    S = ps.sum(-1)
    # a row that sees only its own sinks has R_i = 0 exactly, where 1 − S_i is rounding noise
    n_seen = (rows + 1).clamp_max(K)[None, None, :] if causal else K
    only_sinks = (mine & visible).sum(-1) >= n_seen
    U = torch.matmul(ps.view(B, Hkv, G, Q, M), vp.unsqueeze(2)).view(B, H, Q, D)
    if masked:
        W = z.to(ct) + torch.matmul((p - ps).view(B, Hkv, G, Q, M), vp.unsqueeze(2)).view(B, H, Q, D)
    else:
        W = z.to(ct) - U
    b = beta.to(query.device, ct)[None, :, None]
    c, movable = act_row_factors(S, torch.where(only_sinks, torch.zeros_like(S), 1.0 - S), b)
    out = torch.where(movable[..., None], b[..., None] * U + c[..., None] * W, U + W)
    return out, c


def apply_act_excluded(o_n: torch.Tensor, lse_n: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, positions: torch.Tensor, member: torch.Tensor,
                       beta: torch.Tensor, scaling: float) -> torch.Tensor:
    """z' [B, H, Q, D] fp32 from the attention without each head's own sinks (o_n [B, H, Q, D],
    lse_n [B, H, Q]; queries that see every key): with the sinks' weights w_s = exp(s_s − m)
    relative to their largest logit m, A = Σ w_s, U = Σ w_s v_s and r = exp(lse_n − m),
    z' = (β·U + (r + (1 − β)·A)·o_n) / (r + A) — exact, no cancellation and R_i = r / (r + A)
    exactly; rows with no non-sink key (r = 0) stay as they are, U / A."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    pos = positions.long().expand(B, Hkv, positions.shape[-1])
    M = pos.shape[-1]
    idx = pos.clamp(0, K - 1)[..., None].expand(B, Hkv, M, D)
    kp, vp = torch.gather(key.float(), 2, idx), torch.gather(value.float(), 2, idx)
    s = torch.matmul(query.float().view(B, Hkv, G, Q, D), kp.unsqueeze(2).transpose(-1, -2)).view(B, H, Q, M) * scaling
    own = ((member.expand(B, H, M) != 0) & ((pos >= 0) & (pos < K)).repeat_interleave(G, 1))[:, :, None, :]
    s = torch.where(own, s, torch.full_like(s, float("-inf")))
    top = s.amax(-1, keepdim=True)
    has_sink = torch.isfinite(top)
    w = torch.exp(s - torch.where(has_sink, top, torch.zeros_like(top)))
    a = w.sum(-1, keepdim=True)
    u = torch.matmul(w.view(B, Hkv, G, Q, M), vp.unsqueeze(2)).view(B, H, Q, D)
    b = beta.to(query.device, torch.float32)[None, :, None, None]
    r = torch.where(has_sink, torch.exp(lse_n.float()[..., None] - torch.where(has_sink, top, torch.zeros_like(top))),
                    torch.ones_like(top))
    y = (b * u + (r + (1.0 - b) * a) * o_n.float()) / (r + a)
    return torch.where(r > 0, y, u / torch.where(has_sink, a, torch.ones_like(a)))


def decode_excluded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan,
                    scaling: float) -> tuple[torch.Tensor, bool]:
    """A decode step with calibrated sinks over a cache up to DECODE_EXCLUDE_MAX_KEYS: one attention
    call with each head's own sinks masked out (an additive bias row per query head, the query
    heads of a key/value head as its rows, kept per plan and grown by doubling) that returns
    its log-sum-exp, then the exact correction (`apply_act_excluded`; the Triton kernel
    `_act_excluded` on CUDA). No copy of the cache and no cancellation. Returns (outputs
    [B, H, 1, D], whether the output scale is applied)."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    positions, member = fixed_lists(plan, Hkv, query.device)
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    slot = ("act_exclude_bias", query.dtype, query.device)
    buf = cache.get(slot)
    if buf is None or buf.shape[-1] < K:
        cap = 1 << max(10, (K - 1).bit_length())
        buf = torch.zeros(H, cap, dtype=query.dtype)
        buf[fixed_sink_mask(plan, cap, torch.device("cpu"))] = torch.finfo(query.dtype).min  # exp() of it is 0, no NaN
        buf = cache[slot] = upload(buf, query.device)
    bias = buf.view(1, Hkv, G, -1)[..., :K]
    if query.device.type == "cuda":
        o_n, lse_n = torch.ops.aten._scaled_dot_product_efficient_attention(
            query.reshape(B, Hkv, G, D), key, value, bias.expand(B, Hkv, G, K), True, 0.0, False, scale=scaling)[:2]
        lse_n = lse_n[..., :G].reshape(B, H, 1).float()
    else:  # the CPU: the same call spelled out (tests)
        s = torch.matmul(query.float().view(B, Hkv, G, D), key.float().transpose(-1, -2)) * scaling + bias.float()
        lse_n = torch.logsumexp(s, -1)
        o_n = torch.matmul(torch.softmax(s, -1), value.float())
        lse_n = lse_n.reshape(B, H, 1)
    o_n = o_n.reshape(B, H, 1, D)
    if not score_mod.use_kernel(query):
        return apply_act_excluded(o_n, lse_n, query, key, value, positions, member, plan.act_beta, scaling), False
    return _excluded_correction(o_n, lse_n, query, key, value, positions, member, plan, scaling)


def triton_decode_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> str | None:
    """Why `decode_excluded_split` cannot use the Triton kernels for this call (None when it can)."""
    if not score_mod.use_kernel(query):
        return "no Triton correction kernel for these tensors"
    from headlab.kernels.fused import unsupported_reason

    return unsupported_reason(query, key, value, attention_mask, None, None)


def decode_excluded_split(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan,
                          scaling: float, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """`decode_excluded` on headlab's Triton decode kernel, which splits a long cache over the GPU
    and takes a key mask [B | 1, 1, 1, ≥ K] (`is_key_mask`: left padding, the free slots of
    `headlab.decode`'s static cache): the attention with each head's own sinks excluded (a logit
    bias of −1e30 on them: weight 0, and no −∞ arithmetic) and its log-sum-exp, then
    `_act_excluded`. A sink the mask hides is no sink of that row. No device sync and no copy of
    the cache: a CUDA graph can hold it. Where the Triton kernels cannot run, the same in PyTorch.
    Returns (outputs [B, H, 1, D], whether the output scale is applied)."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    lists = fixed_lists(plan, Hkv, query.device)
    bias = _exclusion_bias(plan, min(K, plan.act_max_sink + 1), query.device)
    kernel = triton_decode_reason(query, key, value, attention_mask) is None
    if kernel:
        from headlab.kernels.fused import _Launch

        run = _Launch(query, key, value, scaling, False, attention_mask, None, None, K - Q)
        if lists is not None:
            run.bias, run.kb = bias, bias.shape[1]
        res = run.forward(output=True)
        o_n, lse_n = res["out"], res["lse"]
    else:  # spelled out: [B, Hkv, G, K] logits of the step's one query per head
        s = torch.matmul(query.float().view(B, Hkv, G, D), key.float().transpose(-1, -2)) * scaling
        if lists is not None:
            s[..., : bias.shape[1]] += bias.view(Hkv, G, -1)
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask[:, :, :, :K].view(-1, 1, 1, K), float("-inf"))
        lse_n = torch.logsumexp(s, -1).reshape(B, H, 1)
        o_n = torch.matmul(torch.softmax(s, -1), value.float()).reshape(B, H, 1, D)
    if lists is None:
        return o_n.float(), False
    positions, member = lists
    if kernel:  # the kernel reads the key mask at the sink positions itself
        return _excluded_correction(o_n, lse_n, query, key, value, positions, member, plan, scaling, attention_mask)
    if attention_mask is not None:  # a hidden key is no sink of this row
        pos = positions.long().repeat_interleave(G, 1)  # [1, H, M]
        seen = attention_mask[:, 0, 0, :K].expand(B, K)
        visible = torch.gather(seen, 1, pos.clamp(0, K - 1).expand(B, H, -1).reshape(B, -1)).view(B, H, -1)
        member = (member.bool() & visible & (pos >= 0)).to(torch.int8)
    return apply_act_excluded(o_n, lse_n, query, key, value, positions, member, plan.act_beta, scaling), False


def decode_adaptive(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan, scaling: float,
                    attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """A decode step under the paper's input-adaptive ACT: (outputs [B, H, 1, D], whether the output
    scale is applied). With one query per row, r[j] is that row's A[j], so the sink set is
    {j : A[j] > τ} without its first key, and the calibration needs only the row's log-sum-exp.
    On CUDA, three launches split over the GPU: `_act_adaptive_logits` reads the keys once and
    stores the step's logits (fp32 [B·H, K]: 4 MiB at 32k keys against 64 MiB of keys) with each
    split's max and sum; `_act_adaptive_split` combines those into the row's log-sum-exp, then
    reads the logits back with V, finds each key's sink status from its probability and sums
    U = Σ_sinks A·v, W = Σ_rest A·v, S and R directly (R exact, as the reference), each split
    keeping its first sink apart; `_act_adaptive_combine` moves the row's first sink back to the
    rest and writes β·U + c·W. No device read: a CUDA graph holds it.
    `attention_mask`: none, or a key mask (`is_key_mask`). Elsewhere spelled out in PyTorch, the
    specification the kernels are tested against."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    head_scale = not plan.edits_outputs
    if triton_decode_reason(query, key, value, attention_mask) is not None:
        s = torch.matmul(query.float().view(B, Hkv, G, D), key.float().transpose(-1, -2)).view(B, H, K) * scaling
        seen = torch.ones(B, 1, K, dtype=torch.bool, device=query.device)
        if attention_mask is not None:
            seen = attention_mask[:, 0, :1, :K].expand(B, 1, K)
        s = s.masked_fill(~seen, float("-inf"))
        p = torch.softmax(s, -1)
        sinks = (p > plan.act_tau.to(p.device)[None, :, None]) & plan.act_heads.to(p.device)[None, :, None] & seen
        first = sinks.int().argmax(-1, keepdim=True)  # the paper drops the set's first key (normally key 0)
        sinks = sinks.scatter(-1, first, torch.zeros_like(first, dtype=torch.bool))
        ps = torch.where(sinks, p, torch.zeros_like(p))
        pn = p - ps
        v = value.float().repeat_interleave(G, 1)  # [B, H, K, D]
        u, w = torch.matmul(ps[:, :, None], v)[:, :, 0], torch.matmul(pn[:, :, None], v)[:, :, 0]
        c, movable = act_row_factors(ps.sum(-1), pn.sum(-1), plan.act_beta.to(p.device, torch.float32)[None, :])
        beta = plan.act_beta.to(p.device, torch.float32)[None, :, None]
        y = torch.where(movable[..., None], beta * u + c[..., None] * w, u + w)
        return y[:, :, None], False
    from headlab.kernels.fused import _num_sms, interpreting

    block_g = max(16, triton.next_power_of_2(G))
    block_n, warps, stages, per_sm = ADAPTIVE_DECODE_BLOCKS
    logit_n, logit_warps, logit_stages = ADAPTIVE_LOGIT_BLOCKS
    if interpreting():
        block_n = logit_n = 16
    splits = max(1, min(triton.cdiv(per_sm * _num_sms(query.device), B * Hkv), triton.cdiv(K, 4 * block_n)))
    if interpreting() and K > 2 * block_n:
        splits = 2  # exercise the split + combine path in the tests
    split_size = triton.cdiv(triton.cdiv(K, splits), max(block_n, logit_n)) * max(block_n, logit_n)
    splits = triton.cdiv(K, split_size)
    rows = B * H
    f32 = dict(device=query.device, dtype=torch.float32)
    logits = torch.empty(rows, K, **f32)
    m_part, l_part = (torch.empty(splits, rows, **f32) for _ in range(2))
    u, w, fv = (torch.empty(splits, rows, D, **f32) for _ in range(3))
    sm, rm, fp = (torch.empty(splits, rows, **f32) for _ in range(3))
    fi = torch.empty(splits, rows, device=query.device, dtype=torch.int32)
    tau32, act8 = _adaptive_factors(plan)
    beta32, scale32 = _kernel_factors(plan)
    if attention_mask is not None:
        kmask, kmb, kmk = attention_mask.view(torch.uint8), attention_mask.stride(0) if attention_mask.shape[0] > 1 else 0, \
            attention_mask.stride(3)
    else:
        kmask, kmb, kmk = act8, 0, 0  # not read
    upcast = interpreting() and query.dtype == torch.bfloat16
    _act_adaptive_logits[(splits, B * Hkv)](
        query, key, kmask, logits, m_part, l_part,
        query.stride(0), query.stride(1), *key.stride()[:3], kmb, kmk,
        H, Hkv, K, split_size, rows, scaling,
        GROUP=G, BLOCK_G=block_g, BLOCK_N=logit_n, HEAD_DIM=D, HAS_KMASK=attention_mask is not None, UPCAST=upcast,
        num_warps=logit_warps, num_stages=logit_stages,
    )
    _act_adaptive_split[(splits, B * Hkv)](
        logits, value, m_part, l_part, tau32, act8, u, w, sm, rm, fi, fp, fv,
        *value.stride()[:3],
        H, Hkv, K, split_size, rows, splits,
        GROUP=G, BLOCK_G=block_g, BLOCK_N=block_n, HEAD_DIM=D, NS_P=max(2, triton.next_power_of_2(splits)),
        UPCAST=upcast, num_warps=warps, num_stages=stages,
    )
    y = torch.empty(B, Q, H, D, device=query.device, dtype=query.dtype if head_scale else torch.float32)
    block_d = min(D, 32)
    _act_adaptive_combine[(rows, D // block_d)](
        u, w, sm, rm, fi, fp, fv, beta32, scale32, y,
        H, K, splits, rows,
        NS_P=max(2, triton.next_power_of_2(splits)), HEAD_DIM=D, BLOCK_D=block_d,
        HAS_SCALE=head_scale and plan.has_head_scale, num_warps=1,
    )
    return y.transpose(1, 2), head_scale


def _exclusion_bias(plan: LayerPlan, width: int, device: torch.device) -> torch.Tensor:
    """[H, width] fp32: −1e30 at each head's calibrated sink positions below `width`, 0 elsewhere (kept per plan)."""
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    slot = ("act_exclusion_bias", width, device)
    if slot not in cache:
        bias = torch.zeros(plan.act_heads.shape[0], width)
        bias[fixed_sink_mask(plan, width, torch.device("cpu"))] = -1e30
        cache[slot] = upload(bias, device)
    return cache[slot]


def _excluded_correction(o_n: torch.Tensor, lse_n: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, positions: torch.Tensor, member: torch.Tensor, plan: LayerPlan,
                         scaling: float, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """`_act_excluded` over o_n [B, H, 1, D] and lse_n [B, H, 1] (natural log): (y [B, H, 1, D],
    whether the output scale is applied). `member` [1, H, M]; `key_mask` [B | 1, 1, 1, ≥ K] bool
    (`is_key_mask`): a sink it hides is no sink of that row."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    head_scale = not plan.edits_outputs
    beta32, scale32 = _kernel_factors(plan)
    y = torch.empty(B, Q, H, D, device=query.device, dtype=query.dtype if head_scale else torch.float32)
    lse_n = lse_n.reshape(B, H, Q).float().contiguous()
    if key_mask is not None:
        kmask, kmb, kmk = key_mask.view(torch.uint8), key_mask.stride(0) if key_mask.shape[0] > 1 else 0, key_mask.stride(3)
    else:
        kmask, kmb, kmk = member, 0, 0  # not read
    _act_excluded[(1, B * H)](
        query, key, value, o_n, lse_n, positions, member, beta32, scale32, y, kmask,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *o_n.stride()[:3],
        0, positions.stride(1), 0, member.stride(1), kmb, kmk,
        H, Hkv, Q, K, positions.shape[-1], scaling,
        HAS_SCALE=head_scale and plan.has_head_scale, HAS_KMASK=key_mask is not None, BLOCK_M=16, HEAD_DIM=D,
        num_warps=2,
    )
    return y.transpose(1, 2), head_scale


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan, scaling: float,
           causal: bool, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(head outputs [B, H, Q, D], whether the plan's output scale is already applied) under the
    plan's ACT, for a call `route_reason` accepted (see `score_mod.attend` for the output contract).
    `attention_mask`: only a decode step's key mask (`is_key_mask`), with calibrated sinks."""
    Hkv = key.shape[1]
    full_causal = causal and query.shape[2] > 1  # a decode step's one query sees every key
    if plan.has_adaptive_act and query.shape[2] == 1:
        _note("input-adaptive sinks, a decode step: the log-sum-exp pass + one pass that finds the sinks and calibrates")
        return decode_adaptive(query, key, value, plan, scaling, attention_mask)
    if plan.has_adaptive_act:
        z, lse = score_mod.attention_with_lse(query, key, value, scaling, full_causal)
        recv, cnt = received(query, key, lse, scaling, causal)
        if score_mod.use_kernel(query):
            _note("input-adaptive sinks: plain attention + column pass + sparse correction, rows above C_MAX "
                  "recomputed (no read back)")
            return _adaptive_on_kernels(z, lse, recv, cnt, query, key, value, plan, scaling, causal)
        lists = sink_lists(act_sink_sets(recv, cnt, plan), Hkv)
        if lists is None:
            _note("input-adaptive sinks: none found, plain attention")
            return z.float(), False
        y, c, scaled = _correct(z, lse, query, key, value, lists, plan, scaling, causal, masked=False)
        bad = torch.nonzero(c > C_MAX)  # [N, 3]: the (b, h, row) whose z rounding c_i would amplify
        if bad.shape[0]:
            _fix_rows(y, scaled, bad, lse, query, key, value, lists, plan, scaling, causal)
        _note("input-adaptive sinks (PyTorch): plain attention + column sums + correction, rows above C_MAX recomputed")
        return y, scaled
    long_decode = query.shape[2] == 1 and key.shape[2] > DECODE_EXCLUDE_MAX_KEYS
    if attention_mask is not None or (long_decode and triton_decode_reason(query, key, value, None) is None):
        _note("calibrated sinks, a decode step with a key mask or a long cache: the decode kernel without the "
              "sinks + the correction")
        return decode_excluded_split(query, key, value, plan, scaling, attention_mask)
    if query.shape[2] == 1 and key.shape[2] <= DECODE_EXCLUDE_MAX_KEYS:
        _note("calibrated sinks, a short decode step: one attention call without the sinks + the correction")
        return decode_excluded(query, key, value, plan, scaling)
    lists = fixed_lists(plan, Hkv, query.device)
    if lists is None:
        return score_mod.attention_with_lse(query, key, value, scaling, full_causal)[0].float(), False
    _note("calibrated sinks: one pass over sink-zeroed values + sparse correction")
    where = _fixed_where(plan, Hkv, key.shape[2], query.device)
    zm, lse = score_mod.attention_with_lse(query, key, zeroed_values(value, lists[0], where), scaling, full_causal)
    y, _, scaled = _correct(zm, lse, query, key, value, lists, plan, scaling, causal, masked=True)
    return y, scaled


def sink_table(recv: torch.Tensor, cnt: torch.Tensor, plan: LayerPlan, n_kv: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference.act_sink_sets` and `sink_lists` in one Triton launch that reads nothing back:
    (sinks [B, H, K] int8, dense; positions [B, Hkv, K] int32 and member [B, H, K] int8 — the
    lists of `sink_lists`, of which the first count [B, Hkv] int32 are valid). From the received
    attention and its row counts [B, H, K] fp32 (`received`)."""
    from headlab.kernels.fused import interpreting

    B, H, K = recv.shape
    G = H // n_kv
    dev = recv.device
    sinks = torch.empty(B, H, K, device=dev, dtype=torch.int8)
    member = torch.empty(B, H, K, device=dev, dtype=torch.int8)
    positions = torch.empty(B, n_kv, K, device=dev, dtype=torch.int32)
    count = torch.empty(B, n_kv, device=dev, dtype=torch.int32)
    tau32, act8 = _adaptive_factors(plan)
    fixed = plan.act_sinks is not None  # heads with calibrated sets: their positions, whatever this input's r
    if fixed:
        fmask = fixed_sink_mask(plan, K, dev).view(torch.uint8)
        fheads = plan.act_fixed_heads.to(dev, torch.int8).contiguous()
    else:
        fmask, fheads = act8, act8  # not read
    _act_sink_table[(B * n_kv,)](
        recv.contiguous(), cnt.contiguous(), tau32, act8, fmask, fheads, sinks, positions, member, count,
        H, n_kv, K, fmask.stride(0) if fixed else 0,
        GROUP=G, BLOCK_G=max(2, triton.next_power_of_2(G)), BLOCK_K=16 if interpreting() else SINK_TABLE_BLOCK,
        FIXED=fixed, num_warps=4,
    )
    return sinks, positions, member, count


def exact_rows(y: torch.Tensor, c: torch.Tensor, sinks: torch.Tensor, lse: torch.Tensor, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, plan: LayerPlan, scaling: float, causal: bool,
               head_scale: bool) -> None:
    """Recompute in place the rows of y [B, H, Q, D] (`correct`'s output) whose factor c [B, H, Q]
    exceeds C_MAX, from their logits as the reference does (`_act_exact_rows`; the PyTorch
    `_fix_rows` is its specification): two launches, the row lists built on the device, so no
    count is read back and the cost follows the number of such rows. sinks [B, H, K] int8
    (`sink_table`), lse [B, H, Q] fp32 (natural log)."""
    from headlab.kernels.fused import interpreting

    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    rows = torch.empty(B * H, Q, device=query.device, dtype=torch.int32)
    n_rows = torch.empty(B * H, device=query.device, dtype=torch.int32)
    _act_flag_rows[(B * H,)](c, rows, n_rows, Q, C_MAX, BLOCK=16 if interpreting() else 1024, num_warps=4)
    block_m, block_n, warps, stages = (16, 16, 4, 1) if interpreting() else EXACT_ROWS_BLOCKS
    beta32, scale32 = _kernel_factors(plan)
    _act_exact_rows[(triton.cdiv(Q, block_m), B * H)](
        query, key, value, lse, sinks, rows, n_rows, beta32, scale32, y,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *y.stride()[:3],
        H, Hkv, Q, K, K - Q, scaling * 1.4426950408889634,
        CAUSAL=causal, HAS_SCALE=head_scale and plan.has_head_scale, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D,
        UPCAST=interpreting() and query.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
    )


def _adaptive_on_kernels(z: torch.Tensor, lse: torch.Tensor, recv: torch.Tensor, cnt: torch.Tensor,
                         query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan,
                         scaling: float, causal: bool) -> tuple[torch.Tensor, bool]:
    """The paper's input-adaptive ACT in a prefill, after the plain attention (z, lse) and the
    column sums: the sink sets and lists (`sink_table`), the full-mode correction, and the rows
    whose factor exceeds C_MAX recomputed exactly (`exact_rows`). Nothing is read back to the host."""
    B, H, Q, _ = query.shape
    sinks, positions, member, count = sink_table(recv, cnt, plan, key.shape[1])
    scale_here = not plan.edits_outputs
    lse = lse.reshape(B, H, Q).float().contiguous()
    y, c = correct(z, lse, query, key, value, positions, member, plan, scaling, causal, False, scale_here, count=count)
    exact_rows(y, c, sinks, lse, query, key, value, plan, scaling, causal, scale_here)
    return y, scale_here


def _fix_rows(y: torch.Tensor, scaled: bool, bad: torch.Tensor, lse: torch.Tensor, query: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, lists: tuple[torch.Tensor, torch.Tensor], plan: LayerPlan,
              scaling: float, causal: bool) -> None:
    """Recompute the rows (b, h, i) listed in `bad` [N, 3] of y in place, as the reference does:
    from the row's probabilities over every key it sees, U and S_i over its sinks and W and R_i
    over the others summed directly (no cancellation, R_i not taken as 1 − S_i), fp32
    accumulation; on CUDA the products run on TF32 tensor cores, exact for bf16 inputs (8-bit
    mantissas fit TF32's 10; fp16 rounds in its last bit). For the few rows whose factor c_i
    exceeds C_MAX — on a model trained on real text (zoo:pycode-llama, every head, 1k tokens)
    0.2-0.6% of a layer's (head, row) pairs, mostly rows right after a hidden sink. The PyTorch
    path (tensors the Triton kernels do not take) and the specification of `exact_rows`."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    positions, member = lists
    dev = query.device
    # pairs grouped by (batch row, key/value head) — the rows of a group share their keys — and
    # padded to [groups, slots]: a few batched products for any number of pairs (the step is
    # host-bound: one Python loop per group cost ~1.2 ms each on the H100's host)
    group_of = bad[:, 0] * Hkv + bad[:, 1] // G
    order = torch.argsort(group_of, stable=True)
    bad, group_of = bad[order], group_of[order]
    groups, counts = torch.unique_consecutive(group_of, return_counts=True)
    n_groups, n_slots, last_row = (int(x) for x in torch.stack([counts.new_tensor(groups.numel()), counts.max(),
                                                                 bad[:, 2].max()]).tolist())
    gidx = torch.repeat_interleave(torch.arange(n_groups, device=dev), counts)
    slot = torch.arange(bad.shape[0], device=dev) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    b_n, h_n, r_n = bad[:, 0], bad[:, 1], bad[:, 2]
    b_g, kvh_g = groups // Hkv, groups % Hkv
    n_keys = last_row + (K - Q) + 1 if causal else K
    qp = torch.zeros(n_groups, n_slots, D, device=dev)
    qp[gidx, slot] = query[b_n, h_n, r_n].float()
    lp = torch.zeros(n_groups, n_slots, device=dev)
    lp[gidx, slot] = lse[b_n, h_n, r_n].float()
    row_pos = torch.full((n_groups, n_slots), -1, dtype=torch.long, device=dev)  # padding sees no key
    row_pos[gidx, slot] = r_n + (K - Q) if causal else torch.full_like(r_n, K)
    pb = b_n if positions.shape[0] > 1 else torch.zeros_like(b_n)
    pos = positions[pb, h_n // G].long()                                                  # [N, M]
    own = torch.where((member[pb, h_n] != 0) & (pos >= 0) & (pos < n_keys), pos, torch.full_like(pos, n_keys))
    sink = torch.zeros(n_groups, n_slots, n_keys + 1, dtype=torch.bool, device=dev)
    sink[gidx, slot] = sink[gidx, slot].scatter(1, own, True)
    beta = torch.zeros(n_groups, n_slots, 1, device=dev)
    beta[gidx, slot] = plan.act_beta.to(dev, torch.float32)[h_n][:, None]
    kg = key[b_g, kvh_g, :n_keys].float()                                                 # [groups, n_keys, D]
    vg = value[b_g, kvh_g, :n_keys].float()
    keys = torch.arange(n_keys, device=dev)
    out = torch.empty(n_groups, n_slots, D, device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        step = max(1, (1 << 26) // (n_groups * n_keys))
        for s0 in range(0, n_slots, step):
            sl = slice(s0, s0 + step)
            s = torch.bmm(qp[:, sl], kg.transpose(1, 2)) * scaling                       # [groups, slots, n_keys]
            p = torch.exp(s - lp[:, sl, None]) * (keys[None, None, :] <= row_pos[:, sl, None])
            ps = p * sink[:, sl, :n_keys]
            pr = p - ps
            u, w = torch.bmm(ps, vg), torch.bmm(pr, vg)
            s_mass, r_mass = ps.sum(-1, keepdim=True), pr.sum(-1, keepdim=True)
            movable = r_mass > torch.finfo(torch.float32).tiny
            c = (1.0 - beta[:, sl] * s_mass) / torch.where(movable, r_mass, torch.ones_like(r_mass))
            out[:, sl] = torch.where(movable, beta[:, sl] * u + c * w, u + w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fixed = out[gidx, slot]
    if scaled and plan.has_head_scale:
        fixed = fixed * plan.head_scale.to(dev, torch.float32)[h_n][:, None]
    y[b_n, h_n, r_n] = fixed.to(y.dtype)


def _note(route: str) -> None:
    if route not in _logged:
        _logged.add(route)
        log.info("ACT plans: %s", route)


def _correct(z, lse, query, key, value, lists, plan: LayerPlan, scaling: float, causal: bool,
             masked: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(outputs, c [B, H, Q], whether the output scale is applied): the Triton kernel where it runs, else `apply_act`."""
    positions, member = lists
    if score_mod.use_kernel(query):
        scale_here = not plan.edits_outputs
        y, c = correct(z, lse, query, key, value, positions, member, plan, scaling, causal, masked, scale_here)
        return y, c, scale_here
    y, c = apply_act(z, lse, query, key, value, positions, member, plan.act_beta, scaling, causal, masked)
    return y, c, False


def _kernel_factors(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(β [H], output scale [H]) as the kernels read them, fp32 and contiguous, kept per plan."""
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    if "act_beta32" not in cache:
        cache["act_beta32"] = plan.act_beta.float().contiguous()
        cache["head_scale32"] = plan.head_scale.float().contiguous()
    return cache["act_beta32"], cache["head_scale32"]


def _adaptive_factors(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ [H] fp32, ACT heads [H] int8) as the input-adaptive kernels read them, kept per plan."""
    cache = plan.__dict__.setdefault("_kernel_cache", {})
    if "act_adaptive32" not in cache:
        cache["act_adaptive32"] = (plan.act_tau.float().contiguous(), plan.act_heads.to(torch.int8).contiguous())
    return cache["act_adaptive32"]


def correct(z: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            positions: torch.Tensor, member: torch.Tensor, plan: LayerPlan, scaling: float, causal: bool,
            masked: bool, head_scale: bool, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_act` (and, with `head_scale`, the plan's output scale) in one Triton launch:
    (y [B, H, Q, D] in query.dtype, or fp32 without `head_scale`; c [B, H, Q] fp32). `count`
    [B, Hkv] int32: how many of each list's positions are valid (`sink_table`); None: all."""
    B, H, Q, D = query.shape
    K = key.shape[2]
    beta32, scale32 = _kernel_factors(plan)
    y = torch.empty(B, Q, H, D, device=query.device, dtype=query.dtype if head_scale else torch.float32)
    c = torch.empty(B, H, Q, device=query.device, dtype=torch.float32)
    lse = lse.reshape(B, H, Q).float().contiguous()
    block_m, warps = (16, 2) if Q <= 16 else CORRECT_BLOCKS
    pb = 0 if positions.shape[0] == 1 else positions.stride(0)
    mb = 0 if member.shape[0] == 1 else member.stride(0)
    _act_correct[(triton.cdiv(Q, block_m), B * H)](
        query, key, value, z, lse, positions, member, count if count is not None else c, beta32, scale32, y, c,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *z.stride()[:3],
        pb, positions.stride(1), mb, member.stride(1),
        H, key.shape[1], Q, K, positions.shape[-1], K - Q, scaling,
        CAUSAL=causal, MASKED=masked, HAS_SCALE=head_scale and plan.has_head_scale, HAS_COUNT=count is not None,
        BLOCK_M=block_m, HEAD_DIM=D, num_warps=warps,
    )
    return y.transpose(1, 2), c


if triton is not None:
    from headlab.kernels.score_mod import _program_head, _row_outputs, _row_queries, _row_tile, _store_rows

    @triton.jit
    def _listed_prob(Pos, Mem, Kp, q, lse, rows, d, b, h, kvh, m, spb, sph, smb, smh, skb, skh, skn, KN, q_offset,
                     scale, CAUSAL: tl.constexpr):
        """(position, whether it is head h's own sink, which rows see it [BLOCK_M], A[row, key]
        [BLOCK_M]: 0 where the row does not see it — past the causal edge, or a padding entry) of the
        m-th listed key."""
        pos = tl.load(Pos + b * spb + kvh * sph + m)
        mine = tl.load(Mem + b * smb + h * smh + m) != 0
        inside = (pos >= 0) & (pos < KN)
        pos = tl.where(inside, pos, 0)
        k = tl.load(Kp + b * skb + kvh * skh + pos * skn + d).to(tl.float32)
        p = tl.exp(tl.sum(q * k[None, :], 1) * scale - lse)
        seen = inside & (rows >= 0)
        if CAUSAL:
            seen = seen & (pos <= rows + q_offset)
        return pos, mine, seen, tl.where(seen, p, 0.0)

    @triton.jit
    def _act_correct(Qp, Kp, Vp, Zp, Lp, Pos, Mem, Count, Beta, Scale, Yp, Cp,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, szb, szh, szm,
                     spb, sph, smb, smh,
                     H, HKV, QN, KN, M, q_offset, scale,
                     CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_COUNT: tl.constexpr,
                     BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """BLOCK_M rows of one (batch, head): z' = β·U + c·W over the M listed keys (module docstring)
        — with HAS_COUNT, the first Count[b, kvh] of them (`sink_table`'s lists, sized on the device).
        One key per step: the listed keys at once as fp32 products (tl.dot, input_precision "ieee")
        measured 4.7× slower on an H100 (335 against 71.5 µs at 4k, act_bench --sweep-correction)."""
        b, h = _program_head(H, Beta, H, False)  # every head: the head list is not read
        kvh, rows, ok, d, q, lse = _row_queries(Qp, Lp, b, h, sqb, sqh, sqm, H, HKV, QN, BLOCK_M, HEAD_DIM)
        if HAS_COUNT:
            M = tl.load(Count + b * HKV + kvh)
        # Two steps over the listed keys, one accumulator: first S_i (and the own sinks each row
        # sees), which give c_i; then z' = c_i·z + Σ_m w_m·p_m·v_m with each key's weight known
        # (full mode: β − c on own sinks, 0 elsewhere; masked: β on own sinks, c on the others).
        # Two [BLOCK_M, D] accumulators (U and the rest) and z held through the loop cost
        # registers, hence programs per SM, in a kernel bound by memory latency.
        s_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_own = tl.zeros([BLOCK_M], dtype=tl.int32)  # the head's own sinks each row sees
        for m in range(0, M):
            pos, mine, seen, p = _listed_prob(Pos, Mem, Kp, q, lse, rows, d, b, h, kvh, m, spb, sph, smb, smh,
                                              skb, skh, skn, KN, q_offset, scale, CAUSAL)
            s_mass += tl.where(mine, p, 0.0)
            n_own += (seen & mine).to(tl.int32)
        beta = tl.load(Beta + h)
        # a row that sees only its own sinks has R_i = 0 exactly, where 1 − S_i is rounding noise
        if CAUSAL:
            n_seen = tl.minimum(rows + q_offset + 1, KN)
        else:
            n_seen = KN
        r_mass = tl.where(n_own >= n_seen, 0.0, 1.0 - s_mass)
        movable = r_mass > 1.1754943508222875e-38
        c = tl.where(movable, 1.0 + (1.0 - beta) * s_mass / tl.where(movable, r_mass, 1.0), 1.0)
        b_own = tl.where(movable, beta, 1.0)
        if MASKED:  # z' = β·U + c·(z + rest)
            w_own, w_rest = b_own, c
        else:  # z' = β·U + c·(z − U)
            w_own, w_rest = b_own - c, c * 0.0
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for m in range(0, M):
            pos, mine, _, p = _listed_prob(Pos, Mem, Kp, q, lse, rows, d, b, h, kvh, m, spb, sph, smb, smh,
                                           skb, skh, skn, KN, q_offset, scale, CAUSAL)
            v = tl.load(Vp + b * svb + kvh * svh + pos * svn + d).to(tl.float32)
            acc += (p * tl.where(mine, w_own, w_rest))[:, None] * v[None, :]
        y = c[:, None] * _row_outputs(Zp, b, h, rows, ok, d, szb, szh, szm) + acc
        _store_rows(Yp, Scale, y, b, h, rows, ok, d, QN * H * HEAD_DIM, HEAD_DIM, H * HEAD_DIM, HAS_SCALE)
        tl.store(Cp + (b * H + h) * QN + rows, c, mask=ok)


    @triton.jit
    def _own_sink(Pos, Mem, KMask, b, h, kvh, m, spb, sph, smb, smh, skmb, skmk, KN, HAS_KMASK: tl.constexpr):
        """(position, whether it is a sink of head h that row b sees) of the m-th listed key."""
        pos = tl.load(Pos + b * spb + kvh * sph + m)
        mine = (tl.load(Mem + b * smb + h * smh + m) != 0) & (pos >= 0) & (pos < KN)
        if HAS_KMASK:
            mine = mine & (tl.load(KMask + b * skmb + tl.where(mine, pos, 0) * skmk) != 0)
        return pos, mine

    @triton.jit
    def _act_excluded(Qp, Kp, Vp, Zp, Lp, Pos, Mem, Beta, Scale, Yp, KMask,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, szb, szh, szm, spb, sph, smb, smh, skmb, skmk,
                      H, HKV, QN, KN, M, scale,
                      HAS_SCALE: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """BLOCK_M rows of one (batch, head), from the attention without the head's own sinks
        (O_N, lse_N): z' = (β·U + (r + (1 − β)·A)·O_N) / (r + A), A and U the sinks' weights and
        weighted values relative to their largest logit m, r = exp(lse_N − m); r = 0 (no
        non-sink key): the row as it is, U / A. With HAS_KMASK a sink the key mask hides is none."""
        b, h = _program_head(H, Beta, H, False)  # every head: the head list is not read
        kvh, rows, ok, d, q, o_n, lse_n = _row_tile(Qp, Zp, Lp, b, h, sqb, sqh, sqm, szb, szh, szm, H, HKV, QN,
                                                    BLOCK_M, HEAD_DIM)
        top = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        for m in range(0, M):  # the largest own-sink logit: weights relative to it cannot overflow
            pos, mine = _own_sink(Pos, Mem, KMask, b, h, kvh, m, spb, sph, smb, smh, skmb, skmk, KN, HAS_KMASK)
            if mine:
                k = tl.load(Kp + b * skb + kvh * skh + pos * skn + d).to(tl.float32)
                top = tl.maximum(top, tl.sum(q * k[None, :], 1) * scale)
        a = tl.zeros([BLOCK_M], dtype=tl.float32)
        u = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for m in range(0, M):
            pos, mine = _own_sink(Pos, Mem, KMask, b, h, kvh, m, spb, sph, smb, smh, skmb, skmk, KN, HAS_KMASK)
            if mine:
                k = tl.load(Kp + b * skb + kvh * skh + pos * skn + d).to(tl.float32)
                v = tl.load(Vp + b * svb + kvh * svh + pos * svn + d).to(tl.float32)
                w = tl.exp(tl.sum(q * k[None, :], 1) * scale - top)
                a += w
                u += w[:, None] * v[None, :]
        beta = tl.load(Beta + h)
        has_sink = a > 0
        r = tl.where(has_sink, tl.exp(lse_n - tl.where(has_sink, top, 0.0)), 1.0)
        y = (beta * u + (r + (1.0 - beta) * a)[:, None] * o_n) / (r + a)[:, None]
        y = tl.where((r > 0)[:, None], y, u / tl.where(has_sink, a, 1.0)[:, None])
        _store_rows(Yp, Scale, y, b, h, rows, ok, d, QN * H * HEAD_DIM, HEAD_DIM, H * HEAD_DIM, HAS_SCALE)


if triton is not None:
    @triton.jit
    def _act_sink_table(Recv, Cnt, Tau, Act, Fixed, FixedHeads, Sinks, Pos, Mem, Count,
                        H, HKV, KN, sfh,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, FIXED: tl.constexpr):
        """One (batch, key/value head): its query heads' sink sets from the received attention —
        `reference.act_sink_sets` (r[j] = Recv / Cnt > τ_h without each set's first key, ACT heads
        only; with FIXED, the calibrated heads' positions instead) — written dense (Sinks
        [B, H, KN] int8) and as `sink_lists` does, without reading anything back: the union's
        positions in order (Pos [B, Hkv, KN] int32, the first Count[b, kvh] valid) and whose they
        are (Mem [B, H, KN] int8). Keys in blocks of BLOCK_K, in order, so that each head's first
        key is known when its block is reached."""
        bk = tl.program_id(0)
        b = bk // HKV
        kvh = bk % HKV
        g = tl.arange(0, BLOCK_G)
        gok = g < GROUP
        h = kvh * GROUP + g
        row = (b * H + h).to(tl.int64) * KN
        tau = tl.load(Tau + h, mask=gok, other=2.0)
        act = (tl.load(Act + h, mask=gok, other=0) != 0) & gok
        if FIXED:
            fixed_head = tl.load(FixedHeads + h, mask=gok, other=0) != 0
        found = tl.zeros([BLOCK_G], dtype=tl.int32)  # the head's first key above τ is behind us
        n = 0
        for k0 in range(0, KN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            at = row[:, None] + cols[None, :]
            inside = gok[:, None] & (cols < KN)[None, :]
            recv = tl.load(Recv + at, mask=inside, other=0.0)
            cnt = tl.load(Cnt + at, mask=inside, other=0.0)
            r = tl.where(cnt > 0, recv / tl.maximum(cnt, 1.0), 0.0)
            above = inside & (r > tau[:, None])
            first = tl.min(tl.where(above, cols[None, :], KN), 1)
            drop = (found == 0) & (first < KN)
            sink = above & act[:, None] & ~((cols[None, :] == first[:, None]) & drop[:, None])
            found = tl.where(first < KN, 1, found)
            if FIXED:
                fixed = tl.load(Fixed + h[:, None] * sfh + cols[None, :], mask=inside, other=0) != 0
                sink = tl.where(fixed_head[:, None], fixed & inside, sink)
            tl.store(Sinks + at, sink.to(tl.int8), mask=inside)
            union = tl.max(sink.to(tl.int32), 0)  # [BLOCK_K]
            slot = n + tl.cumsum(union, 0) - 1
            listed = union > 0
            tl.store(Pos + bk.to(tl.int64) * KN + slot, cols, mask=listed)
            tl.store(Mem + row[:, None] + slot[None, :], sink.to(tl.int8), mask=gok[:, None] & listed[None, :])
            n += tl.sum(union, 0)
        tl.store(Count + bk, n)

    @triton.jit
    def _act_flag_rows(Cp, Rows, NRows, QN, c_max, BLOCK: tl.constexpr):
        """One (batch, head): the rows whose factor c_i exceeds c_max, in order (Rows [B·H, QN]
        int32, the first NRows[b·H + h] valid) — the work list of `_act_exact_rows`, without a
        read back to the host."""
        bh = tl.program_id(0)
        base = bh.to(tl.int64) * QN
        n = 0
        for r0 in range(0, QN, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            flag = (tl.load(Cp + base + rows, mask=rows < QN, other=0.0) > c_max).to(tl.int32)
            tl.store(Rows + base + n + tl.cumsum(flag, 0) - 1, rows, mask=flag > 0)
            n += tl.sum(flag, 0)
        tl.store(NRows + bh, n)

    @triton.jit
    def _weighted_values(p, v, UPCAST: tl.constexpr):
        """p [BLOCK_M, BLOCK_N] fp32 · v [BLOCK_N, D] with p rounded to v's dtype, as the attention
        pass does (under the interpreter's UPCAST the rounded p meets v in fp32 products)."""
        if UPCAST:
            return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        return tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _act_exact_rows(Qp, Kp, Vp, Lp, Sinks, Rows, NRows, Beta, Scale, Yp,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, syb, syh, sym,
                        H, HKV, QN, KN, q_offset, qk_scale,
                        CAUSAL: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
        """BLOCK_M listed rows of one (batch, head) (`_act_flag_rows`' list; programs past its
        count do nothing), computed as the reference does: every key the row sees, its
        probability from the row's log-sum-exp, U and S over the head's sinks, W and R over the
        others summed directly (no cancellation, R not taken as 1 − S), then z' = β·U + c·W with
        c = 1 + (1 − β)·S / R (R at most the smallest normal float: U + W, the row as it is).
        The probabilities meet V in its dtype, as in the attention pass. The rows are in order,
        so a block's loop ends at its last row's causal edge."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)  # int64 offsets, as `_program_head`
        h = (bh % H).to(tl.int64)
        n_rows = tl.load(NRows + bh)
        start = tl.program_id(0) * BLOCK_M
        if start < n_rows:
            kvh = h // (H // HKV)
            idx = start + tl.arange(0, BLOCK_M)
            ok = idx < n_rows
            rows = tl.load(Rows + bh.to(tl.int64) * QN + idx, mask=ok, other=0)
            d = tl.arange(0, HEAD_DIM)
            q = tl.load(Qp + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :], mask=ok[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(Lp + bh.to(tl.int64) * QN + rows, mask=ok, other=0.0) * 1.4426950408889634
            if CAUSAL:
                hi = tl.minimum(tl.max(tl.where(ok, rows, 0), 0) + q_offset + 1, KN)
            else:
                hi = KN
            k_base = Kp + b * skb + kvh * skh
            v_base = Vp + b * svb + kvh * svh
            s_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
            r_mass = tl.zeros([BLOCK_M], dtype=tl.float32)
            u = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            w = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            for n0 in range(0, hi, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                cok = cols < hi
                k = tl.load(k_base + cols[:, None] * skn + d[None, :], mask=cok[:, None], other=0.0)
                v = tl.load(v_base + cols[:, None] * svn + d[None, :], mask=cok[:, None], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                seen = ok[:, None] & cok[None, :]
                if CAUSAL:
                    seen = seen & (cols[None, :] <= rows[:, None] + q_offset)
                p = tl.where(seen, tl.math.exp2(s - lse[:, None]), 0.0)
                sink = tl.load(Sinks + bh.to(tl.int64) * KN + cols, mask=cok, other=0) != 0
                if tl.max(sink.to(tl.int32), 0) > 0:  # most blocks hold none of the head's few sinks
                    ps = tl.where(sink[None, :], p, 0.0)
                    p = p - ps
                    s_mass += tl.sum(ps, 1)
                    u += _weighted_values(ps, v, UPCAST)
                r_mass += tl.sum(p, 1)
                w += _weighted_values(p, v, UPCAST)
            beta = tl.load(Beta + h)
            movable = r_mass > 1.1754943508222875e-38
            c = 1.0 + (1.0 - beta) * s_mass / tl.where(movable, r_mass, 1.0)
            y = tl.where(movable[:, None], beta * u + c[:, None] * w, u + w)
            _store_rows(Yp, Scale, y, b, h, rows, ok, d, syb, syh, sym, HAS_SCALE)

    @triton.jit
    def _split_rows(H, HKV, KN, split_size, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The program of a decode kernel over (key split, batch × kv head): (batch, kv head, its
        query heads [BLOCK_G] (the tile's rows), which rows are real, dims, each row's offset in
        [B·H, KN] logits, the split's key range [lo, hi))."""
        bk = tl.program_id(1)
        b = (bk // HKV).to(tl.int64)  # int64 offsets: a batch of long caches passes 2^31 elements
        kvh = bk % HKV
        g = tl.arange(0, BLOCK_G)
        h = kvh * GROUP + g
        lo = tl.program_id(0) * split_size
        return (b, kvh, h, g < GROUP, tl.arange(0, HEAD_DIM), (b * H + h).to(tl.int64) * KN, lo,
                tl.minimum(lo + split_size, KN))

    @triton.jit
    def _cache_tile(Ptr, head_off, stride_n, cols, cok, d, UPCAST: tl.constexpr):
        """Rows `cols` [BLOCK_N] of one (batch, kv head) of a key or value cache, [BLOCK_N, D]
        (zeros past the split), fp32 under the interpreter's UPCAST."""
        x = tl.load(Ptr + head_off + cols[:, None] * stride_n + d[None, :], mask=cok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _act_adaptive_logits(Qp, Kp, KMask, Sb, Mp, Lp,
                             sqb, sqh, skb, skh, skn, skmb, skmk,
                             H, HKV, KN, split_size, n_rows, scale,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                             HAS_KMASK: tl.constexpr, UPCAST: tl.constexpr):
        """One key split of one (batch, kv head), its query heads as the tile's rows (a decode
        step: one query each): the logits s = q·k·scale (−inf on masked keys) stored in fp32 at
        Sb [B·H, KN], and the split's running max and sum of exp(s − max) at [split, row] — the
        one read of the keys; `_act_adaptive_split` reads the logits back instead of K."""
        b, kvh, h, gok, d, s_row, lo, hi = _split_rows(H, HKV, KN, split_size, GROUP, BLOCK_G, HEAD_DIM)
        q = tl.load(Qp + b * sqb + h[:, None] * sqh + d[None, :], mask=gok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cok = cols < hi
            k = _cache_tile(Kp, b * skb + kvh * skh, skn, cols, cok, d, UPCAST)
            s = tl.dot(q, tl.trans(k)) * scale
            allowed = gok[:, None] & cok[None, :]
            if HAS_KMASK:
                allowed = allowed & (tl.load(KMask + b * skmb + cols * skmk, mask=cok, other=0) != 0)[None, :]
            s = tl.where(allowed, s, float("-inf"))
            tl.store(Sb + s_row[:, None] + cols[None, :], s, mask=gok[:, None] & cok[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
            m_i = m_new
        row = tl.program_id(0) * n_rows + b * H + h
        tl.store(Mp + row, m_i, mask=gok)
        tl.store(Lp + row, l_i, mask=gok)

    @triton.jit
    def _act_adaptive_split(Sb, Vp, Mp, Lp, Tau, Act, Up, Wp, Sp, Rp, Fi, Fp, Fv,
                            svb, svh, svn,
                            H, HKV, KN, split_size, n_rows, NS,
                            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                            NS_P: tl.constexpr, UPCAST: tl.constexpr):
        """One key split of one (batch, kv head), its query heads as the tile's rows: the rows'
        log-sum-exp from every split's (max, sum) of `_act_adaptive_logits`, then from the stored
        logits each key's probability A, its sink status A > τ (ACT heads only), and the sums
        U = Σ_sinks A·v, W = Σ_rest A·v, S, R; the split's first sink key per row (index, A, A·v)
        is kept in them too, for the combine to move. Reads V and the logits, not K."""
        b, kvh, h, gok, d, s_row, lo, hi = _split_rows(H, HKV, KN, split_size, GROUP, BLOCK_G, HEAD_DIM)
        s_i = tl.arange(0, NS_P)
        parts = s_i[None, :] * n_rows + (b * H + h)[:, None]
        pok = gok[:, None] & (s_i < NS)[None, :]
        m_s = tl.load(Mp + parts, mask=pok, other=float("-inf"))
        l_s = tl.load(Lp + parts, mask=pok, other=0.0)
        m = tl.max(m_s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        tot = tl.sum(l_s * tl.exp(m_s - m[:, None]), 1)
        lse = m + tl.log(tl.where(tot > 0, tot, 1.0))  # a row that sees no key: every logit −inf, A = 0
        tau = tl.load(Tau + h, mask=gok, other=2.0)
        act = tl.load(Act + h, mask=gok, other=0) != 0
        u = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        w = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        fv = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        s_mass = tl.zeros([BLOCK_G], dtype=tl.float32)
        r_mass = tl.zeros([BLOCK_G], dtype=tl.float32)
        fp = tl.zeros([BLOCK_G], dtype=tl.float32)
        first = tl.zeros([BLOCK_G], dtype=tl.int32) + KN
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cok = cols < hi
            v = _cache_tile(Vp, b * svb + kvh * svh, svn, cols, cok, d, UPCAST)
            s = tl.load(Sb + s_row[:, None] + cols[None, :], mask=gok[:, None] & cok[None, :], other=float("-inf"))
            p = tl.exp(s - lse[:, None])
            sink = (p > tau[:, None]) & act[:, None]
            # a row has at most ⌊1/τ⌋ sinks: most blocks have none and cost one dot, as plain decode
            if tl.max(tl.max(sink.to(tl.int32), 1), 0) > 0:
                block_first = tl.min(tl.where(sink, cols[None, :], KN), 1)
                take = (first == KN) & (block_first < KN)
                one = tl.where((cols[None, :] == block_first[:, None]) & take[:, None], p, 0.0)
                fp += tl.sum(one, 1)
                fv += tl.dot(one.to(v.dtype), v)
                first = tl.where(take, block_first, first)
                ps = tl.where(sink, p, 0.0)
                pn = p - ps
                s_mass += tl.sum(ps, 1)
                u += tl.dot(ps.to(v.dtype), v)
            else:
                pn = p
            r_mass += tl.sum(pn, 1)
            w += tl.dot(pn.to(v.dtype), v)
        row = tl.program_id(0) * n_rows + b * H + h
        tl.store(Sp + row, s_mass, mask=gok)
        tl.store(Rp + row, r_mass, mask=gok)
        tl.store(Fi + row, first, mask=gok)
        tl.store(Fp + row, fp, mask=gok)
        at = row[:, None] * HEAD_DIM + d[None, :]
        tl.store(Up + at, u, mask=gok[:, None])
        tl.store(Wp + at, w, mask=gok[:, None])
        tl.store(Fv + at, fv, mask=gok[:, None])

    @triton.jit
    def _act_adaptive_combine(Up, Wp, Sp, Rp, Fi, Fp, Fv, Beta, Scale, Yp, H, KN, NS, n_rows,
                              NS_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr):
        """BLOCK_D dims of one (batch, head) row (program_id(1): which): the splits' sums, the
        row's first sink (the one with the smallest index over the splits) moved back to the rest
        — the paper drops it from the set — then y = β·U + c·W, c = 1 + (1 − β)·S / R (rows with R
        at most the smallest normal float: U + W). Several programs per row: one per row left
        the 32 rows of a batch-1 step to 32 programs, latency-bound (12.8 µs at 33 splits)."""
        row = tl.program_id(0)
        h = row % H
        b = row // H
        s_i = tl.arange(0, NS_P)
        ok = s_i < NS
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        fi = tl.load(Fi + s_i * n_rows + row, mask=ok, other=KN)
        first = tl.min(fi, 0)
        has_first = first < KN
        sel = ok & (fi == first) & has_first  # one split at most: a split's first sink is its own key
        at = (s_i[:, None] * n_rows + row) * HEAD_DIM + d[None, :]
        f_mass = tl.sum(tl.where(sel, tl.load(Fp + s_i * n_rows + row, mask=ok, other=0.0), 0.0), 0)
        f_split = tl.argmin(fi, 0)
        f_out = tl.load(Fv + (f_split * n_rows + row) * HEAD_DIM + d, mask=d < tl.where(has_first, HEAD_DIM, 0), other=0.0)
        s_mass = tl.sum(tl.load(Sp + s_i * n_rows + row, mask=ok, other=0.0), 0) - f_mass
        r_mass = tl.sum(tl.load(Rp + s_i * n_rows + row, mask=ok, other=0.0), 0) + f_mass
        u = tl.sum(tl.load(Up + at, mask=ok[:, None], other=0.0), 0) - f_out
        w = tl.sum(tl.load(Wp + at, mask=ok[:, None], other=0.0), 0) + f_out
        beta = tl.load(Beta + h)
        movable = r_mass > 1.1754943508222875e-38
        c = 1.0 + (1.0 - beta) * s_mass / tl.where(movable, r_mass, 1.0)
        y = tl.where(movable, beta * u + c * w, u + w)
        if HAS_SCALE:
            y = y * tl.load(Scale + h)
        tl.store(Yp + (b * H + h) * HEAD_DIM + d, y.to(Yp.dtype.element_ty))


__all__ = ["C_MAX", "apply_act", "apply_act_excluded", "attend", "correct", "decode_adaptive", "decode_excluded", "decode_excluded_split",
           "exact_rows", "fixed_lists", "is_key_mask", "received", "route_reason", "sink_lists", "sink_table",
           "triton_decode_reason", "zeroed_values"]
