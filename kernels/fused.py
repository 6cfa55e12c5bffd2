"""The Triton patched attention: same signature and results as `kernels.reference.patched_attention`.

`unsupported_reason(...)` says why a call cannot run on the kernels (the dispatcher then falls back
to the reference with a one-time warning); `patched_attention(...)` runs it:

- plain plan / stats: one fused pass (`_attn_fwd`; causal row blocks heaviest first, sparse key
  sets measured after the loop from their own keys, key / value tiles through tensor descriptors
  when it takes the argmax); stats on a small query window while the
  output is needed: the fused pass without stats plus a QK-only pass over the window rows;
- received attention: one more QK-only pass per key block reusing the rows' log-sum-exp
  (`_attn_colsum_t`, transposed, for plain logits over consecutive rows; `_attn_colsum` otherwise);
- ACT: a QK-only pass for the rows' log-sum-exp, the column pass for r[j], the sink sets
  (`reference.act_sink_sets`), each row's sink mass S_i from the few sink keys gathered in PyTorch
  ([B, H, Q, max sinks]), then the fused pass with ACT as a per-row bias log(β / c_i) on the sink
  keys (exact: see `triton_attention`'s docstring). Named difference from the reference: the
  non-sink mass R_i is taken as 1 − S_i instead of a second sum over the non-sink keys, so rows
  with S_i within ~1e-6 of 1 are calibrated with less precision.
- decode (few queries, long cache): the query heads of a key/value head are packed into one tile
  and the keys are split over programs (flash-decoding), merged by `_attn_combine`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from headlab.kernels.triton_attention import _attn_colsum, _attn_colsum_t, _attn_combine, _attn_fwd

from headlab.plan import LayerPlan
from headlab.stats import CompiledStats, LayerStats, as_slice

HEAD_DIMS = (16, 32, 64, 128)
"""Head sizes the kernels are built for (16 and 32 serve the interpreter tests and small models)."""
MAX_KEY_SETS = 128
"""Most spans + requested keys measured in one pass (the key-set matrix is [K, 128] at most)."""
DTYPES = (torch.float16, torch.bfloat16)
PREFILL_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 128, 8, 3),
}
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) of the output pass by head_dim; d=128 as `kernels/bench.py --sweep`
picked on an H100 (benchmarks/results/kernel_bench_h100.json), the others untuned."""
STATS_BLOCKS: dict[int, tuple[int, int, int, int]] = dict(PREFILL_BLOCKS)
"""The same for the output pass with probability stats (argmax, key sets, entropy) on its rows;
d=128 from `kernels/bench.py --sweep-stats` on an H100."""
QK_ONLY_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3),
}
"""The same for the QK-only passes (stats on a window, ACT's log-sum-exp)."""
DECODE_BLOCKS: dict[str, tuple[int, int, int]] = {"plain": (64, 4, 2), "stats": (32, 2, 3)}
"""(BLOCK_N, num_warps, num_stages) of decode (query heads of a group packed, keys split), without / with stats."""
COLSUM_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    16: (32, 64, 4, 3), 32: (32, 64, 4, 3), 64: (32, 128, 4, 3), 128: (32, 128, 4, 3),
}
"""(rows per step, keys per program, warps, stages) of the received-attention column pass."""
COLSUM_T_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 4, 3),
}
"""(keys per program, rows per step, warps, stages) of the transposed column pass (plain logits,
consecutive rows); d=128 as `benchmarks/act_bench.py --sweep` picked on an H100 (2.2 ms at 16k
keys against 3.9 ms for `_attn_colsum`; (128, 64, 4, 4) within 3% in another run)."""

SPAN_POST = True
"""Key-set masses of a prefill pass from the sets' own keys after its main loop (`_attn_fwd`'s
SPAN_POST) where the sets are sparse (`KeySets.sparse`); False, or dense sets, measure them in
every key block, at BLOCK_N ≤ 64 (the key-set tile shares shared memory with K and V then)."""
SPAN_CHUNK = 16
"""Keys per gathered tile of that pass: tl.dot's smallest inner size."""
SPAN_POST_MAX_FRACTION = 16
"""Sets are sparse when they hold at most K / this many keys (at least 64): the gathered pass
costs about a tenth of a block per 16 keys for every row block, against 13-18% of every block
for the product in the loop (`kernels/bench.py --stats-breakdown`)."""
FOLD_SCALE = True
"""Plain logits fold the softmax scale into the exp2 argument (`_attn_fwd`'s FOLD_SCALE)."""
HEAVY_FIRST = True
"""Causal passes over many rows start the row blocks that see the most keys first, per key/value
head (`_attn_fwd`'s HEAVY_FIRST): the grid's order is the order programs start in, so light blocks
last even out the tail, and programs running together read the same key/value head's keys."""
KV_DESC = True
"""Output passes over many rows that take the argmax read their unmasked key / value blocks through
tensor descriptors (`_attn_fwd`'s KV_DESC: bulk tile copies, Hopper and later) where
`_kv_descriptors` allows it: 7-11% faster with every stat on an H100 (the argmax alone 10-14%,
with the stats taken before the P·V product); the plain pass measured 2-7%
slower with them and QK-only window passes no different beyond noise, so those keep pointer loads
(benchmarks/results/stats_pass_h100.json `descriptor_runs`)."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    stats: CompiledStats | None,
    query_positions: torch.Tensor | int | None,
) -> str | None:
    """Why the kernels cannot compute this call (None when they can)."""
    if query.device.type != "cuda" and not interpreting():
        return f"tensors are on {query.device.type}; the Triton kernels run on CUDA"
    allowed = DTYPES + ((torch.float32,) if interpreting() else ())
    if query.dtype not in allowed or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (the kernels take float16 and bfloat16)"
    d, dv = query.shape[-1], value.shape[-1]
    if d not in HEAD_DIMS or dv != d:
        return f"head_dim {d} / value dim {dv} (the kernels take equal sizes in {HEAD_DIMS})"
    if isinstance(query_positions, torch.Tensor) and isinstance(as_slice(query_positions.cpu()), torch.Tensor):
        return "non-consecutive query positions"
    if attention_mask is not None:
        B, H, Q, _ = query.shape
        m = attention_mask.shape
        if attention_mask.dim() != 4 or m[0] not in (1, B) or m[1] not in (1, H) or m[2] not in (1, Q) \
                or m[3] < key.shape[2]:
            return f"attention mask of shape {tuple(m)} (expected [1|B, 1|H, 1|Q, ≥K] for q {tuple(query.shape)})"
        if attention_mask.dtype != torch.bool and not attention_mask.dtype.is_floating_point:
            return f"attention mask of dtype {attention_mask.dtype}"
    if stats is not None:
        if stats.matches:
            return "token-match stats (StatsRequest.matches) are measured by the reference"
        n_sets = len(stats.spans) + (0 if stats.keys is None else stats.keys.numel())
        if n_sets > MAX_KEY_SETS:
            return f"{n_sets} spans + keys requested (the kernels measure at most {MAX_KEY_SETS} in one pass)"
    return None


def _pow2(n: int, lo: int = 16) -> int:
    """The power of two ≥ n, at least `lo` (tl.dot and tl.arange want powers of two ≥ 16)."""
    return max(lo, triton.next_power_of_2(n))


class _Launch:
    """Everything a kernel launch needs that does not change between the passes of one call."""

    def __init__(self, query, key, value, scaling, is_causal, attention_mask, softcap, plan, q_offset):
        self.q, self.k, self.v = query, key, value
        self.H = query.shape[1]
        self.HKV, self.KN = key.shape[1], key.shape[2]
        self.device = query.device
        self.scaling, self.softcap, self.q_offset = scaling, softcap, q_offset
        self.dummy = _dummy(self.device)
        self.mask_mode, self.mask, self.mask_strides = 0, self.dummy, (0, 0, 0, 0)
        self.mask_floor = 0.0
        if attention_mask is not None:
            m = attention_mask
            if m.dtype == torch.bool:
                self.mask_mode, m = 1, m.view(torch.uint8)
            else:
                self.mask_mode = 2
                self.mask_floor = torch.finfo(m.dtype).min / 2  # the reference's threshold
            self.mask = m
            st = m.stride()
            self.mask_strides = tuple(st[i] if m.shape[i] > 1 else 0 for i in range(3)) + (st[3],)
        self.is_causal = bool(is_causal) and attention_mask is None
        self.logit_scale = self.bias = None
        self.kb = 0
        if plan is not None:
            if plan.has_logit_scale:
                self.logit_scale = plan.logit_scale.to(self.device, torch.float32).contiguous()
            if plan.has_bias:
                self.kb = plan.max_bias_position + 1
                self.bias = _cached(plan, "dense_bias", lambda: _dense_bias(plan, self.H, self.device))
        self.sink_flags = self.sink_bias = None
        self.num_sms = _num_sms(self.device)

    @property
    def plain_logits(self) -> bool:
        """The logits are q·k × scaling and a boolean mask at most (the kernel may fold the scale)."""
        return (FOLD_SCALE and self.logit_scale is None and self.softcap is None and self.bias is None
                and self.sink_flags is None and self.mask_mode != 2 and self.scaling > 0)

    def common(self):
        """Arguments shared by the forward and the column pass, after the strides."""
        d = self.dummy
        return dict(
            qk_scale=self.scaling * 1.4426950408889634,
            softcap=float(self.softcap or 1.0),
            LogitScale=self.logit_scale if self.logit_scale is not None else d,
            Bias=self.bias if self.bias is not None else d,
            stride_bias_h=self.kb,
            KB=self.kb,
            SinkFlag=self.sink_flags if self.sink_flags is not None else d,
            SinkBias=self.sink_bias if self.sink_bias is not None else d,
            Mask=self.mask,
            stride_mb=self.mask_strides[0], stride_mh=self.mask_strides[1],
            stride_mq=self.mask_strides[2], stride_mk=self.mask_strides[3], mask_floor=self.mask_floor,
            IS_CAUSAL=self.is_causal, MASK_MODE=self.mask_mode,
            HAS_LS=self.logit_scale is not None, HAS_SOFTCAP=self.softcap is not None,
            HAS_BIAS=self.bias is not None, HAS_SINK=self.sink_flags is not None,
            UPCAST=interpreting() and self.q.dtype == torch.bfloat16,
        )

    def forward(self, *, rows: slice | None = None, output: bool = True, head_scale: torch.Tensor | None = None,
                argmax: bool = False, key_sets: "KeySets | None" = None, entropy: bool = False,
                out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One `_attn_fwd` pass over query rows `rows` (default all); returns its outputs by name.

        With `rows`, the row-indexed tensors (sink bias, mask rows) are sliced to them.
        """
        q, offset = self.q, self.q_offset
        sink_bias, mask = self.sink_bias, self.mask
        if rows is not None:
            q = q[:, :, rows]
            offset = self.q_offset + rows.start
            if sink_bias is not None:
                sink_bias = sink_bias[:, :, rows].contiguous()
            if self.mask_mode:
                mask = _mask_rows(mask, rows)
        B, H, QN, D = q.shape
        KN, HKV = self.KN, self.HKV
        ratio = H // HKV
        dev = self.device
        few = QN * ratio <= 64 and QN <= 16
        group = ratio if few else 1
        rows_total = QN * group
        if few:
            block_n, warps, stages = DECODE_BLOCKS["stats" if (argmax or entropy or key_sets is not None) else "plain"]
            block_m = _pow2(rows_total)
        else:
            stats = argmax or entropy or key_sets is not None
            block_m, block_n, warps, stages = (STATS_BLOCKS if stats else PREFILL_BLOCKS)[D] if output else QK_ONLY_BLOCKS[D]
            if QN <= 64:
                block_m = 64
            if key_sets is not None and not (SPAN_POST and key_sets.sparse) and block_n > 64:
                block_n = 64  # the key-set tile must fit in shared memory beside K and V
        if interpreting():
            block_m, block_n = min(block_m, 32), 16
        m_blocks = triton.cdiv(rows_total, block_m)
        programs = B * (H // group) * m_blocks
        splits = 1
        if few and not interpreting():
            splits = max(1, min(triton.cdiv(2 * self.num_sms, programs), triton.cdiv(KN, 4 * block_n)))
        elif few and interpreting() and KN > 2 * block_n:
            splits = 2  # exercise the split + combine path in the tests
        split_size = triton.cdiv(triton.cdiv(KN, splits), block_n) * block_n
        splits = triton.cdiv(KN, split_size)
        n_rows = B * H * QN
        f32 = dict(device=dev, dtype=torch.float32)
        nsp = 0 if key_sets is None else key_sets.member.shape[1]
        span_post = bool(nsp) and SPAN_POST and not few and key_sets.sparse
        span_keys = key_sets.keys if span_post else self.dummy
        S = splits
        res: dict[str, torch.Tensor] = {}
        res["lse"] = torch.empty(B, H, QN, **f32)
        lse_w = torch.empty(S, B, H, QN, **f32) if S > 1 else res["lse"]
        if output:
            if out is None:
                out = torch.empty(B, QN, H, D, device=dev, dtype=q.dtype).transpose(1, 2)
            res["out"] = out
        out_w = torch.empty(S, B, H, QN, D, **f32) if (S > 1 and output) else (out if output else self.dummy)
        if argmax:
            # int64, what LayerStats holds: the kernels' int32 indices widen on the store, no extra launch
            res["argmax"] = torch.empty(B, H, QN, device=dev, dtype=torch.int64)
            res["argmax_prob"] = torch.empty(B, H, QN, **f32)
        ai_w = (torch.empty(S, B, H, QN, device=dev, dtype=torch.int32) if S > 1 else res["argmax"]) if argmax else self.dummy
        av_w = (torch.empty(S, B, H, QN, **f32) if S > 1 else res["argmax_prob"]) if argmax else self.dummy
        if nsp:
            res["spans"] = torch.empty(B, H, QN, nsp, **f32)
        sp_w = (torch.empty(S, B, H, QN, nsp, **f32) if S > 1 else res["spans"]) if nsp else self.dummy
        if entropy:
            res["entropy"] = torch.empty(B, H, QN, **f32)
        en_w = (torch.empty(S, B, H, QN, **f32) if S > 1 else res["entropy"]) if entropy else self.dummy
        hs = head_scale if head_scale is not None else self.dummy
        o_strides = out.stride() if output else (0, 0, 0, 0)
        common = self.common()
        common["SinkBias"] = sink_bias if sink_bias is not None else self.dummy
        common["Mask"] = mask
        heavy_first = HEAVY_FIRST and self.is_causal and not few  # not few: one query head per program
        descs = _kv_descriptors(self.k, self.v, block_n) if argmax and output and not few else None
        grid = (B * H * m_blocks, 1, S) if heavy_first else (m_blocks, B * (H // group), S)
        _attn_fwd[grid](
            q, self.k, self.v, out_w, lse_w,
            q.stride(0), q.stride(1), q.stride(2),
            self.k.stride(0), self.k.stride(1), self.k.stride(2),
            self.v.stride(0), self.v.stride(1), self.v.stride(2),
            o_strides[0], o_strides[1], o_strides[2],
            H, HKV, QN, KN, offset, split_size, n_rows,
            HeadScale=hs, Member=key_sets.member if nsp else self.dummy, SpanKeys=span_keys,
            n_span_chunks=span_keys.numel() // SPAN_CHUNK if span_post else 0, SPAN_CHUNK=SPAN_CHUNK,
            ArgIdx=ai_w, ArgVal=av_w, SpanOut=sp_w, Entropy=en_w,
            KDesc=descs[0] if descs else None, VDesc=descs[1] if descs else None,
            KV_DESC=descs is not None,
            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D,
            HAS_HEAD_SCALE=head_scale is not None,
            OUTPUT=output, ARGMAX=argmax, NSP=nsp, ENTROPY=entropy, SPLIT=S > 1,
            SPAN_POST=span_post, HEAVY_FIRST=heavy_first, FOLD_SCALE=self.plain_logits,
            num_warps=warps, num_stages=stages,
            **common,
        )
        if S > 1:
            _attn_combine[(n_rows,)](
                out_w, lse_w, ai_w, av_w, sp_w, en_w,
                out if output else self.dummy, res["lse"], res.get("argmax", self.dummy), res.get("argmax_prob", self.dummy),
                res.get("spans", self.dummy), res.get("entropy", self.dummy), hs,
                o_strides[0], o_strides[1], o_strides[2],
                H, QN, S, n_rows,
                HEAD_DIM=D, NS_P=_pow2(S, 2), OUTPUT=output, ARGMAX=argmax, NSP=nsp, ENTROPY=entropy,
                HAS_HEAD_SCALE=head_scale is not None, num_warps=1 if D <= 64 else 2,
            )
        return res

    def received(self, lse: torch.Tensor, row_lo: int, row_hi: int, rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(received [B, H, K], count [B, H, K]) over rows [row_lo, row_hi) — or the listed `rows`
        — from the rows' lse [B, H, Q]."""
        if rows is not None:
            rows = rows.to(self.device, torch.int32)
            row_lo, row_hi = 0, rows.numel()
        B, H, QN, D = self.q.shape
        recv = torch.empty(B, H, self.KN, device=self.device, dtype=torch.float32)
        cnt = torch.empty_like(recv)
        if (rows is None and self.mask_mode == 0 and self.logit_scale is None and self.bias is None
                and self.softcap is None and self.sink_flags is None):
            block_n, block_m, warps, stages = (16, 16, 4, 1) if interpreting() else COLSUM_T_BLOCKS[D]
            _attn_colsum_t[(triton.cdiv(self.KN, block_n), B * H)](
                self.q, self.k, lse, recv, cnt,
                self.q.stride(0), self.q.stride(1), self.q.stride(2),
                self.k.stride(0), self.k.stride(1), self.k.stride(2),
                H, self.HKV, QN, self.KN, self.q_offset, row_lo, row_hi, self.scaling * 1.4426950408889634,
                BLOCK_N=block_n, BLOCK_M=block_m, HEAD_DIM=D, IS_CAUSAL=self.is_causal,
                UPCAST=interpreting() and self.q.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
            )
            return recv, cnt
        block_m, block_n, warps, stages = (16, 16, 4, 1) if interpreting() else COLSUM_BLOCKS[D]
        _attn_colsum[(triton.cdiv(self.KN, block_n), B * H)](
            self.q, self.k, lse, recv, cnt, rows if rows is not None else self.dummy,
            self.q.stride(0), self.q.stride(1), self.q.stride(2),
            self.k.stride(0), self.k.stride(1), self.k.stride(2),
            H, self.HKV, QN, self.KN, self.q_offset, row_lo, row_hi,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, ROW_LIST=rows is not None, num_warps=warps, num_stages=stages,
            **self.common(),
        )
        return recv, cnt

    def sink_mass(self, sinks: torch.Tensor, lse: torch.Tensor, plan_sinks: int | None = None) -> torch.Tensor:
        """S_i = Σ_{s ∈ sinks} A[i, s] per row: [B, H, Q], from the few sink keys gathered in PyTorch.
        `plan_sinks`: a bound on the sink count of any head known on the host (`LayerPlan.act_decode_sink_bound`:
        calibrated sets, or a decode step's adaptive ones) — then nothing is read back from the GPU
        and a CUDA graph can hold the call."""
        B, H, QN, _ = self.q.shape
        if plan_sinks is not None:  # a host-side bound: no device read
            M = min(plan_sinks, self.KN)
        else:
            counts = sinks.sum(-1)
            M = int(counts.max()) if counts.numel() else 0
        if M == 0:
            return torch.zeros(B, H, QN, device=self.device)
        # positions of each head's sinks, padded with K (an invalid key) to M
        order = torch.sort(sinks.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :M]
        valid = torch.gather(sinks, -1, order)  # [B, H, M]
        ratio = H // self.HKV
        kh = (torch.arange(H, device=self.device) // ratio)[None, :, None]
        ks = self.k[torch.arange(B, device=self.device)[:, None, None], kh, order].float()  # [B, H, M, D]: sink keys only
        s = torch.matmul(self.q.float(), ks.transpose(-1, -2)) * self.scaling  # [B, H, Q, M]
        if self.logit_scale is not None:
            s = s * self.logit_scale[None, :, None, None]
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            inside = order < self.kb
            b = torch.gather(self.bias[None].expand(B, H, self.kb), -1, order.clamp_max(self.kb - 1))
            s = s + torch.where(inside, b, torch.zeros_like(b))[:, :, None, :]
        ok = valid[:, :, None, :].expand(B, H, QN, M)
        if self.mask_mode:
            m = self.mask if self.mask_mode == 2 else self.mask.bool()
            m = m.expand(B, H, QN, self.KN)
            mg = torch.gather(m, -1, order[:, :, None, :].expand(B, H, QN, M))
            if self.mask_mode == 1:
                ok = ok & mg
            else:
                ok = ok & (mg > torch.finfo(mg.dtype).min / 2)
                s = s + mg.float()
        elif self.is_causal:
            pos = torch.arange(QN, device=self.device) + self.q_offset
            ok = ok & (order[:, :, None, :] <= pos[None, None, :, None])
        lse_ok = torch.isfinite(lse)
        p = torch.exp(s - torch.where(lse_ok, lse, torch.zeros_like(lse))[..., None])
        p = torch.where(ok & lse_ok[..., None], p, torch.zeros_like(p))
        return p.sum(-1)


def _mask_rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The mask of query rows `rows` ([B, H, Q, K]; a mask broadcast over queries stays as it is)."""
    return mask if mask.shape[2] == 1 else mask[:, :, rows]


class KeySets:
    """The key sets a stats request measures (spans, then single requested keys) as the kernels read them.

    `member` is a [K, NSP] fp16 0/1 matrix: column i marks the keys of span i, then one column per
    requested key. `keys` lists the keys in any set, for a pass that visits only those.
    """

    def __init__(self, stats: CompiledStats, span_names: list[str], k_len: int, device: torch.device):
        n_keys = 0 if stats.keys is None else stats.keys.numel()
        member = torch.zeros(k_len, _pow2(len(span_names) + n_keys), device=device, dtype=torch.float16)
        for i, name in enumerate(span_names):
            member[stats.spans[name].to(device), i] = 1.0
        if n_keys:
            member[stats.keys.to(device), len(span_names) + torch.arange(n_keys, device=device)] = 1.0
        self.member = member
        # at most this many distinct keys are in a set: known on the host without a device read
        self.bound = min(k_len, sum(t.numel() for t in stats.spans.values()) + n_keys)
        self._keys: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        """Few enough keys for a gathered pass over them (`SPAN_POST_MAX_FRACTION`)."""
        return self.bound <= max(64, self.member.shape[0] // SPAN_POST_MAX_FRACTION)

    @property
    def keys(self) -> torch.Tensor:
        """[⌈bound / SPAN_CHUNK⌉ · SPAN_CHUNK] int32: the keys in any set, ascending, padded with
        K (no key); built on the device (no host wait) from the sets' sizes, once."""
        if self._keys is None:
            k_len = self.member.shape[0]
            width = triton.cdiv(max(self.bound, 1), SPAN_CHUNK) * SPAN_CHUNK
            pos = torch.arange(k_len, device=self.member.device, dtype=torch.int32)
            used = torch.where(self.member.amax(dim=1) > 0, pos, k_len).sort().values[:width]
            pad = torch.full((width - used.numel(),), k_len, device=used.device, dtype=torch.int32)
            self._keys = torch.cat([used, pad]).contiguous()
        return self._keys


def _dense_bias(plan: LayerPlan, n_heads: int, device: torch.device) -> torch.Tensor:
    """[H, max biased position + 1] fp32 logit bias (0 at unbiased keys)."""
    dense = torch.zeros(n_heads, plan.max_bias_position + 1, device=device)
    dense[:, plan.bias_positions.to(device)] = plan.bias.to(device, torch.float32)
    return dense


def _cached(owner: object, name: str, build):
    """A tensor derived from a compiled plan / stats request, built once per owner (sessions reuse them)."""
    cache = owner.__dict__.setdefault("_kernel_cache", {})
    if name not in cache:
        cache[name] = build()
    return cache[name]


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """A placeholder for pointer arguments a launch does not read."""
    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(1, device=device, dtype=torch.float32)
    return _DUMMIES[device]


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """Tensor descriptors over k, v [B, Hkv, K, D] with [1, 1, block_n, D] tiles, or None where the
    bulk copy cannot take them: before Hopper (the interpreter runs them anywhere), a last dimension
    that is not contiguous, or a base or stride that is not a multiple of 16 bytes."""
    if not KV_DESC or (_capability(k.device)[0] < 9 and not interpreting()):
        return None
    descs = []
    for t in (k, v):
        st = t.stride()
        if st[-1] != 1 or t.data_ptr() % 16 or any(x * t.element_size() % 16 for x in st[:-1]):
            return None
        descs.append(TensorDescriptor(t, list(t.shape), list(st), [1, 1, block_n, t.shape[-1]]))
    return descs[0], descs[1]


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


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
    query_positions: torch.Tensor | int | None = None,
    compute_output: bool = True,
    **_: object,
) -> tuple[torch.Tensor | None, LayerStats | None]:
    """`kernels.reference.patched_attention` on the Triton kernels (check `unsupported_reason` first).

    Shapes as the reference: query [B, H, Q, D], key/value [B, Hkv, K, D]; returns the head
    outputs [B, H, Q, D] in query.dtype (None with compute_output=False) and the LayerStats.
    """
    from headlab.kernels.reference import (
        act_row_factors,
        act_sink_sets,
        apply_output_interventions,
        key_logits,
        plan_for_call,
    )

    B, H, Q, D = query.shape
    K = key.shape[2]
    if H % key.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({key.shape[1]})")
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    query = _last_dim_contiguous(query)
    if query_positions is None:
        q_offset = K - Q
    elif isinstance(query_positions, int):
        q_offset = query_positions
    else:
        q_offset = int(query_positions.reshape(-1)[0]) if query_positions.numel() else 0
    plan = plan_for_call(plan, K, query.device)
    run = _Launch(query, key, value, scaling, is_causal, attention_mask, softcap, plan, q_offset)

    if plan is not None and plan.has_act:
        lse0 = run.forward(output=False)["lse"]
        if plan.has_adaptive_act:
            recv, cnt = run.received(lse0, 0, Q)
        else:  # calibrated sink sets only: no column pass
            recv = cnt = torch.zeros(B, H, K, device=query.device)
        sinks = act_sink_sets(recv, cnt, plan)
        # the sets' size from the host where it is bounded there (calibrated sets; a decode step's
        # adaptive sets): no device read, so a CUDA graph can hold the call
        bounded = not plan.has_adaptive_act or Q == 1
        s_mass = run.sink_mass(sinks, lse0, plan.act_decode_sink_bound(K) if bounded else None)
        beta = plan.act_beta.to(query.device, torch.float32)[None, :, None]
        c, movable = act_row_factors(s_mass, 1.0 - s_mass, beta)
        bias = torch.log(beta.expand_as(c)) - torch.log(c)
        run.sink_flags = sinks.to(torch.int8).contiguous()
        run.sink_bias = torch.where(movable, bias, torch.zeros_like(bias)).contiguous()

    replaces = plan is not None and plan.edits_outputs  # replaced or shifted: edited after the kernel
    head_scale = None
    if plan is not None and not replaces and plan.has_head_scale:
        head_scale = plan.head_scale.float().contiguous()

    wants_p = stats is not None and stats.wants_probabilities
    # the request's rows as a slice and their window: host work on a CPU index, done once per
    # compiled request (a decode step repeats it for every layer otherwise)
    sel, win = _cached(stats, "rows", lambda: _rows(stats)) if stats is not None else (None, None)
    if not wants_p:
        win = None
    key_sets = None
    span_names = list(stats.spans) if stats is not None else []
    n_keys = 0 if stats is None or stats.keys is None else stats.keys.numel()
    if wants_p and (span_names or n_keys):
        key_sets = _cached(stats, "key_sets", lambda: KeySets(stats, span_names, K, query.device))
    stat_kw = dict(argmax=bool(wants_p and stats.argmax), key_sets=key_sets, entropy=bool(wants_p and stats.entropy))

    out = None
    fused = wants_p and (not compute_output or (win.stop - win.start) * 4 >= Q)
    if compute_output:
        res = run.forward(output=True, head_scale=head_scale, **(stat_kw if fused else {}))
        out = res["out"]
    if wants_p:
        if fused and compute_output:
            st, st_rows = res, slice(win.start, win.stop)
        else:
            st, st_rows = run.forward(rows=win, output=False, **stat_kw), slice(0, win.stop - win.start)
    if replaces and out is not None:
        patch = plan.patch_tensor(B, Q, H, D, query.device)
        out = apply_output_interventions(out.float(), plan, slice(0, Q), patch).to(query.dtype)

    if stats is None:
        return out, None
    qi = stats.query_index
    layer = LayerStats(query_positions=qi + q_offset)
    if wants_p:
        pick = _cached(stats, ("pick", st_rows.start), lambda: as_slice((qi - win.start) + st_rows.start))
        if stats.argmax:
            layer.argmax = st["argmax"][:, :, pick].long()  # int64 already: no copy
            layer.argmax_prob = st["argmax_prob"][:, :, pick]
        for i, name in enumerate(span_names):
            layer.span_mass[name] = st["spans"][:, :, pick, i]
        if stats.entropy:
            layer.entropy = st["entropy"][:, :, pick]
        if n_keys:
            layer.key_probs = st["spans"][:, :, pick, len(span_names): len(span_names) + n_keys]
            layer.key_logits = key_logits(query, key, sel, stats.keys, scaling, softcap)
        if stats.received:
            listed = None if isinstance(sel, slice) else stats.query_index
            if compute_output and fused:  # the fused pass has the lse of every row of the call
                layer.received, layer.received_count = run.received(st["lse"], win.start, win.stop, listed)
            else:  # the window pass has the lse of the window's rows only: a launch over those rows
                sub = _Launch(query[:, :, win], key, value, scaling, is_causal,
                              None if attention_mask is None else _mask_rows(attention_mask, win), softcap, plan,
                              q_offset + win.start)
                sub.sink_flags = run.sink_flags
                sub.sink_bias = None if run.sink_bias is None else run.sink_bias[:, :, win].contiguous()
                layer.received, layer.received_count = sub.received(
                    st["lse"], 0, win.stop - win.start, None if listed is None else listed - win.start)
    if stats.head_outputs:
        if out is None:
            raise ValueError("head_outputs were requested with compute_output=False")
        layer.head_outputs = out[:, :, stats.selection()].float()
    return out, layer


def _rows(stats: CompiledStats) -> tuple[slice | torch.Tensor, slice]:
    """(the request's query rows as a slice where contiguous, else the index; the smallest window
    of rows holding them)."""
    sel = stats.selection()
    if isinstance(sel, slice) or not stats.query_index.numel():
        return sel, sel if isinstance(sel, slice) else slice(0, 0)
    return sel, slice(int(stats.query_index.min()), int(stats.query_index.max()) + 1)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dispatch_note() -> str:
    """One line naming the Triton build in use (for `headlab info`)."""
    return f"triton {triton.__version__}" + (" (interpreter)" if interpreting() else "")


__all__ = ["dispatch_note", "interpreting", "patched_attention", "unsupported_reason"]
