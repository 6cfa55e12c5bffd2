"""The `"headlab"` attention function, registered in transformers' attention registry.

Loading a model with `attn_implementation="headlab"` routes every self-attention layer through
`headlab_attention_forward`. With no active `HeadModel.patched(...)` session it computes plain
SDPA attention (eager-exact numerics for soft-capped models); inside a session it applies the
session's plan and records its stats for the calling layer (`module.layer_idx`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from headlab.errors import PlanError, UnsupportedArchitectureError
from headlab.plan import InterventionPlan, LayerPlan
from headlab.stats import CompiledStats, HeadStats, LayerStats, StatsRequest, as_slice

ATTN_IMPLEMENTATION = "headlab"
SESSION_ATTR = "_headlab_session"


@dataclass
class PatchSession:
    """What one `patched(plan, stats)` context applies and records (`rec` in the docs)."""

    plan: InterventionPlan
    request: StatsRequest | None
    n_heads: int
    head_dim: int
    stats: HeadStats = field(default_factory=HeadStats)
    _compiled: dict[int, LayerPlan | None] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)
    _requests: dict[tuple[int, int], CompiledStats] = field(default_factory=dict)

    def layer_plan(self, layer: int, device: torch.device) -> LayerPlan | None:
        """The layer's compiled plan on `device`, built once per session (not per decode step)."""
        if layer not in self._compiled:
            compiled = self.plan.compile_layer(layer, self.n_heads, self.head_dim)
            self._compiled[layer] = None if compiled is None else compiled.to(device)
        return self._compiled[layer]

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
    from headlab.kernels import patched_attention
    from headlab.kernels.reference import apply_output_interventions

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
        if uses_positions and not positions_ok:
            raise PlanError(
                f"layer {layer}: its sliding-window cache has dropped early tokens, so key positions no longer "
                "match token positions; keep the input within the model's sliding window for position-based plans/stats"
            )

    if plan is None and stats is None and softcap is None:
        out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        return out.transpose(1, 2), None

    # SDPA computes every output at full speed unless the probabilities themselves change (or
    # softcap, which SDPA lacks); the patched attention then computes only the probability stats,
    # only on the rows asked for — e.g. the last prompt token of a retrieval-score prefill. When
    # the stats cover many rows and the Triton kernels run, one fused pass does both for less.
    sdpa_first = softcap is None and not (plan is not None and plan.touches_probabilities)
    if sdpa_first and stats is not None and stats.wants_probabilities and stats.query_index.numel() * 4 >= Q:
        from headlab.kernels import uses_triton

        sdpa_first = not uses_triton(query, key, value, attention_mask, stats)
    if sdpa_first:
        z = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs).float()
        rows = slice(0, Q)
        patch = plan.patch_tensor(B, Q, H, value.shape[-1], z.device) if plan is not None else None
        z = apply_output_interventions(z, plan, rows, patch)
        out = z.to(query.dtype)
        layer_stats = None
        if stats is not None:
            selected = as_slice(stats.query_index)
            if stats.wants_probabilities:
                positions = selected.start + (K - Q) if isinstance(selected, slice) else selected + (K - Q)
                window = replace(stats, query_index=torch.arange(stats.query_index.numel()), head_outputs=False)
                _, layer_stats = patched_attention(
                    query[:, :, selected], key, value, scaling=scaling, is_causal=causal,
                    attention_mask=None if attention_mask is None else attention_mask[:, :, selected],
                    stats=window, query_positions=positions, compute_output=False,
                )
            else:
                layer_stats = LayerStats(query_positions=stats.query_index)
            if stats.head_outputs:
                layer_stats.head_outputs = z[:, :, selected]
    else:
        out, layer_stats = patched_attention(
            query, key, value, scaling=scaling, is_causal=causal, attention_mask=attention_mask,
            softcap=softcap, plan=plan, stats=stats,
        )
    if layer_stats is not None:
        # Token positions, also past a sliding window where cache indices stop matching them.
        layer_stats.query_positions = stats.query_index + (session.tokens_seen(layer) - Q)
        session.stats.add(layer, layer_stats)
    return out.transpose(1, 2).contiguous(), None


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
