"""The `"headlab"` attention function, registered in transformers' attention registry.

Loading a model with `attn_implementation="headlab"` routes every self-attention layer through
`headlab_attention_forward`. With no active `HeadModel.patched(...)` session it computes plain
SDPA attention (eager-exact numerics for soft-capped models); inside a session it applies the
session's plan and records its stats for the calling layer (`module.layer_idx`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from headlab.errors import PlanError, UnsupportedArchitectureError
from headlab.plan import InterventionPlan, LayerPlan
from headlab.stats import CompiledStats, HeadStats, LayerStats, StatsRequest

ATTN_IMPLEMENTATION = "headlab"
SESSION_ATTR = "_headlab_session"
OBSERVE_ATTR = "_headlab_observe"
"""Set on an attention module by an integration whose hooks ask to see what happens inside the
call (TransformerLens's hook_attn_scores / hook_pattern / hook_rot_q / hook_rot_k): a set of
"pattern" and/or "qk". The call then leaves a dict in OBSERVED_ATTR: "scores" and "pattern"
[B, H, Q, K] fp32 (O(N²) memory, on demand only), "q" [B, H, Q, D] and "k" [B, Hkv, Q, D] (the
call's new keys) after the rotary embedding."""
OBSERVED_ATTR = "_headlab_observed"
MASKED_DECODE_SPLIT_KEYS = 4096
"""A plain decode step (≤ 16 queries) with an attention mask over more keys than this — or any,
inside `static_decode_steps()` — runs on the Triton decode kernel. transformers' SDPA path copies
the keys and values to every query head when a mask is given (`repeat_kv`: GQA in SDPA is used
only without a mask), 0.5 GB per layer at a 32k cache; at 1k keys that path's host time (100–190
µs a call, by host) is below the Triton launch's (280–400 µs), which is what counts unless the step
is replayed from a CUDA graph — there the Triton call takes 11 µs against that path's 37 µs
(benchmarks/results/decode_graph_bench_h100.json, `plain_masked*` / `sdpa_masked` rows)."""
_static_steps = 0


@contextlib.contextmanager
def static_decode_steps() -> Iterator[None]:
    """Within: the decode steps of `headlab.decode` (a static cache with a key mask, replayed from a
    CUDA graph, where only GPU time counts): plain masked decode calls take the Triton decode
    kernel whatever the cache length, and the eager steps run the same kernels as the graph."""
    global _static_steps
    _static_steps += 1
    try:
        yield
    finally:
        _static_steps -= 1


@dataclass
class PatchSession:
    """What one `patched(plan, stats)` context applies and records (`rec` in the docs)."""

    plan: InterventionPlan
    request: StatsRequest | None
    n_heads: int
    head_dim: int
    stats: HeadStats = field(default_factory=HeadStats)
    row_plans: list[InterventionPlan] | None = None
    """One plan per batch row (each already combined with `plan`): rows that share a plan object
    run together, so one batch can hold several single-head ablations × the prompts."""
    capture: "AttributionCapture | None" = None
    _compiled: dict[int, LayerPlan | None] = field(default_factory=dict)
    _plan_layers: tuple[torch.device, dict[int, LayerPlan | None]] | None = None
    _row_groups: dict[int, list[tuple[torch.Tensor, LayerPlan | None]]] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)
    _requests: dict[tuple[int, int], CompiledStats] = field(default_factory=dict)

    def layer_plan(self, layer: int, device: torch.device) -> LayerPlan | None:
        """The layer's compiled plan on `device`: looked up once per session (not per decode
        step) in the plan's own cache (`InterventionPlan.compiled_layers`), so that a later
        session with the same plan reuses it and the kernel caches it holds."""
        if layer not in self._compiled:
            if self._plan_layers is None or self._plan_layers[0] != device:
                self._plan_layers = (device, self.plan.compiled_layers(self.n_heads, self.head_dim, device))
            shared = self._plan_layers[1]
            if layer not in shared:
                compiled = self.plan.compile_layer(layer, self.n_heads, self.head_dim)
                shared[layer] = None if compiled is None else compiled.to(device)
            self._compiled[layer] = shared[layer]
        return self._compiled[layer]

    def row_groups(self, layer: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, LayerPlan | None]]:
        """The layer's row groups: (row indices [b], the layer plan they share), rows without a
        change in this layer together in one group. Built once per layer."""
        assert self.row_plans is not None
        if batch != len(self.row_plans):
            raise PlanError(f"this forward has batch {batch}, but patched(row_plans=...) gave {len(self.row_plans)} "
                            "plans; pass one plan per batch row")
        if layer not in self._row_groups:
            compiled: dict[int, LayerPlan | None] = {}
            members: dict[int | None, list[int]] = {}
            for row, plan in enumerate(self.row_plans):
                if id(plan) not in compiled:
                    lp = plan.compile_layer(layer, self.n_heads, self.head_dim)
                    if lp is not None and any(z.shape[0] != 1 for z in lp.patches.values()):
                        raise PlanError("a row plan's patched outputs must have batch 1 (they describe one row)")
                    compiled[id(plan)] = None if lp is None else lp.to(device)
                key = id(plan) if compiled[id(plan)] is not None else None
                members.setdefault(key, []).append(row)
            self._row_groups[layer] = [(torch.tensor(rows, device=device), None if key is None else compiled[key])
                                       for key, rows in members.items()]
        return self._row_groups[layer]

    def layer_request(self, layer: int, q_len: int, k_len: int, device: torch.device) -> CompiledStats | None:
        """The stats request resolved for a call of this shape, built once (every layer shares it)."""
        if self.request is None or self.request.is_empty() or not self.request.covers(layer):
            return None
        if (q_len, k_len) not in self._requests:
            self._requests[(q_len, k_len)] = self.request.compile(q_len, k_len, device)
        return self._requests[(q_len, k_len)]

    def track_positions(self, layer: int, q_len: int, k_len: int) -> bool:
        """Track tokens seen by a layer; False when its cache dropped early keys (sliding window)."""
        seen = q_len if k_len == q_len else self._seen.get(layer, 0) + q_len
        self._seen[layer] = seen
        return k_len >= seen

    def tokens_seen(self, layer: int) -> int:
        return self._seen.get(layer, 0)

    def positions(self) -> dict[int, int]:
        """Tokens seen per layer: a snapshot for `restore_positions` (a captured CUDA graph step
        runs this Python once at capture and never at replay; `headlab.decode` keeps the count)."""
        return dict(self._seen)

    def restore_positions(self, seen: dict[int, int]) -> None:
        self._seen = dict(seen)

    def skip_positions(self, n: int) -> None:
        """Count `n` more tokens in every layer (decode steps replayed without running this Python)."""
        self._seen = {layer: count + n for layer, count in self._seen.items()}


def _plain_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs) -> torch.Tensor:
    """SDPA numerics, returned as head outputs [B, H, Q, Dv] (float32)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    return out.transpose(1, 2)


def headlab_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry point: returns ([B, Q, H, Dv], None)."""
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} passes `{unsupported}` to its attention; headlab's patched attention "
                "does not implement it yet. Load this model with attn_implementation='eager' instead."
            )
    if dropout and module.training:
        raise PlanError("headlab's patched attention is for inference: call model.eval() (attention dropout is active)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    session: PatchSession | None = getattr(module, SESSION_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    B, H, Q, _ = query.shape
    K = key.shape[2]

    plan = stats = None
    if session is not None:
        if layer is None:
            raise UnsupportedArchitectureError(f"{type(module).__name__} has no layer_idx; headlab cannot tell its layers apart")
        positions_ok = session.track_positions(layer, Q, K)
        plan = session.layer_plan(layer, query.device)
        stats = session.layer_request(layer, Q, K, query.device)
        uses_positions = (plan is not None and (plan.has_bias or plan.has_var)) or (stats is not None and stats.wants_probabilities)
        uses_positions = uses_positions or session.row_plans is not None or session.capture is not None
        if uses_positions and not positions_ok:
            raise PlanError(
                f"layer {layer}: its sliding-window cache has dropped early tokens, so key positions no longer "
                "match token positions; keep the input within the model's sliding window for position-based plans/stats"
            )
    call = _Call(module, attention_mask, dropout, scaling, softcap, is_causal, causal, kwargs)
    if session is not None and session.capture is not None:
        return session.capture.forward(call, layer, query, key, value, session.n_heads, session.head_dim), None
    if session is not None and session.row_plans is not None:
        groups = session.row_groups(layer, B, query.device)
        if len(groups) > 1:
            out = query.new_empty(B, H, Q, value.shape[-1])
            for rows, group_plan in groups:
                out[rows] = call.select(rows).attend(query[rows], key[rows], value[rows], group_plan, None)[0]
            return out.transpose(1, 2).contiguous(), None
        plan = groups[0][1]
    out, layer_stats = call.attend(query, key, value, plan, stats)
    observe = getattr(module, OBSERVE_ATTR, None)
    if observe:
        _observe(module, observe, query, key, attention_mask, scaling, softcap, causal, plan)
    if layer_stats is not None:
        # Token positions, also past a sliding window where cache indices stop matching them.
        layer_stats.query_positions = stats.query_index + (session.tokens_seen(layer) - Q)
        session.stats.add(layer, layer_stats)
    return out.transpose(1, 2).contiguous(), None


def _observe(module: torch.nn.Module, what: set[str], query: torch.Tensor, key: torch.Tensor,
             attention_mask: torch.Tensor | None, scaling: float, softcap: float | None, causal: bool,
             plan: LayerPlan | None) -> None:
    """Leave what an integration's hooks asked to see in the module's OBSERVED_ATTR (see OBSERVE_ATTR)."""
    observed: dict[str, torch.Tensor] = {}
    if "qk" in what:
        observed["q"], observed["k"] = query, key[:, :, key.shape[2] - query.shape[2]:]
    if "pattern" in what:
        from headlab.kernels.reference import attention_pattern

        with torch.no_grad():
            observed["scores"], observed["pattern"] = attention_pattern(
                query, key, scaling=scaling, is_causal=causal, attention_mask=attention_mask, softcap=softcap, plan=plan)
    setattr(module, OBSERVED_ATTR, observed)


@dataclass
class _Call:
    """The arguments of one attention call other than q, k, v: what `attend` needs to run it."""

    module: torch.nn.Module
    attention_mask: torch.Tensor | None
    dropout: float
    scaling: float
    softcap: float | None
    is_causal: bool | None
    causal: bool
    kwargs: dict[str, Any]

    def select(self, rows: torch.Tensor) -> "_Call":
        """The same call for a subset of the batch rows."""
        mask = self.attention_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[rows]
        return replace(self, attention_mask=mask)

    def differentiable(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Plain attention through autograd-capable code: SDPA, or the PyTorch reference for soft-capped logits."""
        if self.softcap is None:
            return self.plain(query, key, value)
        from headlab.kernels import reference_attention

        out, _ = reference_attention(query, key, value, scaling=self.scaling, is_causal=self.causal,
                                     attention_mask=self.attention_mask, softcap=self.softcap)
        return out

    def plain(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _plain_attention(self.module, query, key, value, self.attention_mask, self.dropout, self.scaling,
                                self.is_causal, self.kwargs)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: LayerPlan | None,
               stats: CompiledStats | None) -> tuple[torch.Tensor, LayerStats | None]:
        """Head outputs [B, H, Q, Dv] (query dtype) under `plan`, and the layer's stats when asked."""
        from headlab.kernels import patched_attention

        Q, K = query.shape[2], key.shape[2]
        if plan is None and stats is None and self.softcap is None:
            if (self.attention_mask is not None and Q <= 16 and query.is_cuda
                    and (K > MASKED_DECODE_SPLIT_KEYS or _static_steps)):
                from headlab.kernels import uses_triton

                if uses_triton(query, key, value, self.attention_mask):
                    return patched_attention(query, key, value, scaling=self.scaling, is_causal=self.causal,
                                             attention_mask=self.attention_mask)
            return self.plain(query, key, value), None
        if plan is not None and (plan.has_bias or plan.has_act):
            from headlab.kernels import act_sparse, score_mod

            # a few keys' logits biased, or ACT on a few sink keys: the plain attention at full
            # speed + an exact sparse correction (each route refuses the other's plans)
            route = act_sparse if plan.has_act else score_mod
            if score_mod.enabled(query) and route.route_reason(
                    plan, Q, K, self.attention_mask, self.causal, self.softcap,
                    stats is not None and stats.wants_probabilities) is None:
                mask = self.attention_mask if route is act_sparse else None  # only ACT takes a key mask
                z, scaled = route.attend(query, key, value, plan, self.scaling, self.causal, attention_mask=mask)
                return self._finish(z, query, key, value, plan, stats, edited=scaled)
        # SDPA computes every output at full speed unless the probabilities themselves change (or
        # softcap, which SDPA lacks); the patched attention then computes only the probability stats,
        # only on the rows asked for — e.g. the last prompt token of a retrieval-score prefill. When
        # the stats cover many rows and the Triton kernels run, one fused pass does both for less.
        sdpa_first = self.softcap is None and not (plan is not None and plan.touches_probabilities)
        if sdpa_first and stats is not None and stats.wants_probabilities and stats.query_index.numel() * 4 >= Q:
            from headlab.kernels import uses_triton

            sdpa_first = not uses_triton(query, key, value, self.attention_mask, stats)
        if not sdpa_first:
            return patched_attention(query, key, value, scaling=self.scaling, is_causal=self.causal,
                                     attention_mask=self.attention_mask, softcap=self.softcap, plan=plan, stats=stats)
        return self._finish(self.plain(query, key, value).float(), query, key, value, plan, stats)

    def _finish(self, z: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                plan: LayerPlan | None, stats: CompiledStats | None,
                edited: bool = False) -> tuple[torch.Tensor, LayerStats | None]:
        """Head outputs z [B, H, Q, Dv] (probabilities already as the plan wants them) with the
        plan's output edits applied (unless `edited`: done already), and the stats that do not
        change the probabilities."""
        from headlab.kernels import patched_attention
        from headlab.kernels.reference import apply_output_interventions

        B, H, Q = query.shape[:3]
        K = key.shape[2]
        if not edited:
            patch = plan.patch_tensor(B, Q, H, value.shape[-1], z.device) if plan is not None else None
            z = apply_output_interventions(z, plan, slice(0, Q), patch)
        layer_stats = None
        if stats is not None:
            selected = stats.selection()
            if stats.wants_probabilities:
                positions = selected.start + (K - Q) if isinstance(selected, slice) else selected + (K - Q)
                window = stats.window()
                mask = self.attention_mask
                _, layer_stats = patched_attention(
                    query[:, :, selected], key, value, scaling=self.scaling, is_causal=self.causal,
                    attention_mask=None if mask is None else mask[:, :, selected],
                    stats=window, query_positions=positions, compute_output=False,
                )
            else:
                layer_stats = LayerStats(query_positions=stats.query_index)
            if stats.head_outputs:
                layer_stats.head_outputs = z[:, :, selected].float()
        return z.to(query.dtype), layer_stats


@dataclass
class AttributionCapture:
    """What an attribution forward records (`headlab.attribution`): per layer, the head outputs z
    [B, H, Q, Dv] as they enter the output projection, inside the autograd graph, and dz = z' − z
    [B, H, Q, Dv] (fp32, no graph), z' the outputs under `ablation` computed from this forward's
    own q, k, v — each head's change as if it alone were ablated, since a plan acts on each head
    separately. The forward itself runs unpatched.

    `direct=True` detaches every attention's q, k, v, so gradients reach a head's output only
    through the residual stream, MLPs and norms — the paths path patching to the logits leaves
    open (every other head frozen at its clean output).
    """

    ablation: InterventionPlan
    direct: bool = False
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    _compiled: dict[int, LayerPlan | None] = field(default_factory=dict)

    def forward(self, call: _Call, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                n_heads: int, head_dim: int) -> torch.Tensor:
        """[B, Q, H, Dv] clean head outputs, recorded with their ablation deltas."""
        if layer in self.outputs:
            raise PlanError(f"layer {layer} ran twice in one attribution forward (generation or a cache?); "
                            "attribution needs a single forward pass")
        if self.direct:
            query, key, value = query.detach(), key.detach(), value.detach()
        z = call.differentiable(query, key, value)
        if not z.requires_grad:
            z = z.detach().clone().requires_grad_()
        if layer not in self._compiled:
            compiled = self.ablation.compile_layer(layer, n_heads, head_dim)
            self._compiled[layer] = None if compiled is None else compiled.to(query.device)
        plan = self._compiled[layer]
        if plan is not None:
            with torch.no_grad():
                alt, _ = call.attend(query.detach(), key.detach(), value.detach(), plan, None)
            self.outputs[layer] = z
            self.deltas[layer] = alt.float() - z.detach().float()
        return z.transpose(1, 2).contiguous()


_registered = False


def register() -> None:
    """Register the "headlab" attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, headlab_attention_forward)
    # Boolean masks, skipped (None) when plain causal/full attention needs none: the patched
    # attention builds causal blocks itself, so long inputs never allocate an N×N mask.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _registered = True
