"""`InterventionPlan`: what to change in which (layer, head), and its compiled per-layer tensors.

A plan is a composable, serializable description. Every builder method returns a new plan, so
plans can be shared and combined without aliasing:

    plan = InterventionPlan().prune_heads([(3, 5)]).scale_first_token({(1, 2): 1.5})

Semantics (METHODS.md), applied in this order inside the patched attention of each head:

1. logits  s[i,j] = ε_h · q_i·k_j · scaling (+ softcap, + the model's mask). ε_h is a per-head
   logit scale, 1 unless set: Ships' "undifferentiated attention" ablation (Zhou et al. 2025,
   reference code SafetyHeadAttribution: the head's query × ε, ε = 1e-4) drives it toward 0 so
   the head attends uniformly to every key it can see.
2. key bias: s[i,j] += b[h,j] on chosen key positions j. ZeroTuning's γ on the first token is
   b = log γ on key 0 — exact, because softmax renormalizes:
   A'[i,0] = γA[i,0] / (1+(γ−1)A[i,0]).
3. A = softmax(s)
4. ACT sink calibration (Yu et al. 2024, reference code GATECH-EIC/ACT): the sink set S of the head
   is {j : r[j] > τ} minus its first element, r[j] = Σ_i A[i,j] / #(queries that see j), computed
   on this same input (or, for a calibrated plan — `act_with_sinks` — fixed key positions found
   once on calibration inputs, the way a deployment reuses them); then A'[i,s] = β·A[i,s] for
   s ∈ S and the removed mass goes to the non-sink keys in proportion to their attention. The
   sinks keep exactly β·A (this is NOT a logit bias of log β).
4b. VAR redistribution (Kang et al. 2025): a fraction p of the row's attention on the source keys
   (visual sinks) moves to the target keys (other image tokens) in proportion to their attention.
5. z = A' v                                       (per-head output, before o_proj)
6. replacement: zero ablation (z = 0), mean ablation (z = mean z from a reference run) or
   patching (z = z from a cached run, for path patching)
6b. shift: z += v (Inference-Time Intervention, Li et al. 2023: v = α·σ·θ, θ a probe's unit
   direction, σ the std of z along θ; `headlab.analyses.probes.shift_plan` builds it)
7. output scale: z *= α (VHR reinforcement α > 1; pruning α = 0)

Positions are key indices as the attention sees them: indices into the (padded) `input_ids`
plus the cache, not RoPE positions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from headlab.errors import PlanError

Head = tuple[int, int]
AblationMode = Literal["zero", "mean"]

REPLACE_NONE, REPLACE_ZERO, REPLACE_MEAN, REPLACE_PATCH = 0, 1, 2, 3
"""Codes of LayerPlan.replace_mode: what replaces a head's output z."""


def _head(h: Any) -> Head:
    try:
        layer, head = h
        pair = (operator.index(layer), operator.index(head))  # ints (numpy/torch ints too), never a float or a str
    except (TypeError, ValueError):
        raise PlanError(f"a head must be a (layer, head) pair of ints, got {h!r}") from None
    if min(pair) < 0:
        raise PlanError(f"a head's layer and index must be >= 0, got {h!r}")
    return pair


def _number(x: Any, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite float in [low, high] read from a saved plan (PlanError otherwise)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not low <= x <= high:
        raise PlanError(f"{what} must be a finite number in [{low}, {high}], got {x!r}")
    return float(x)


def _act_setting(entry: Any) -> ActSetting:
    """One saved ACT entry: [layer, head, beta, tau] or, with calibrated sinks, [layer, head, beta, tau, [positions]]."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (4, 5):
        raise PlanError(f"an ACT entry must be [layer, head, beta, tau] or [layer, head, beta, tau, [sink positions]], got {entry!r}")
    sinks = None
    if len(entry) == 5:
        if not isinstance(entry[4], list) or not entry[4]:
            raise PlanError(f"the sink positions of ACT head ({entry[0]}, {entry[1]}) must be a non-empty list, got {entry[4]!r}")
        sinks = tuple(sorted({_head((0, p))[1] for p in entry[4]}))
    return ActSetting(_number(entry[2], "ACT beta", 0.0, 1.0), _number(entry[3], "ACT tau"), sinks)


def _heads_map(mapping: Mapping[Any, Any] | Iterable[Any], value: Any = None) -> dict[Head, Any]:
    if isinstance(mapping, Mapping):
        return {_head(h): v for h, v in mapping.items()}
    return {_head(h): value for h in mapping}


def _tensor_head(name: str) -> Head:
    """The head of a saved plan tensor named `mean.L.H` / `patch.L.H`."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in ("mean", "patch", "shift") or not (parts[1].isdigit() and parts[2].isdigit()):
        raise PlanError(f"plan tensor {name!r} is not named mean|patch|shift.<layer>.<head>")
    return (int(parts[1]), int(parts[2]))


@dataclass(frozen=True)
class ActSetting:
    """ACT calibration of one head: β (kept fraction of sink attention) and τ (sink threshold).

    `sinks`: None — the paper's input-adaptive sink set, found on every input from the received
    attention; a tuple of key positions — a calibrated sink set (`InterventionPlan.act_with_sinks`),
    used as it is on every input (τ unused; positions past a call's keys are absent from it)."""

    beta: float = 0.4
    tau: float = 0.1
    sinks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class InterventionPlan:
    """Per-(layer, head) interventions. See the module docstring for the exact semantics."""

    head_scales: dict[Head, float] = field(default_factory=dict)
    logit_scales: dict[Head, float] = field(default_factory=dict)
    key_biases: dict[Head, dict[int, float]] = field(default_factory=dict)
    act_heads: dict[Head, ActSetting] = field(default_factory=dict)
    ablations: dict[Head, AblationMode] = field(default_factory=dict)
    means: dict[Head, torch.Tensor] = field(default_factory=dict)
    patches: dict[Head, torch.Tensor] = field(default_factory=dict)
    shifts: dict[Head, torch.Tensor] = field(default_factory=dict)
    """head -> [head_dim] vector added to the head's output (ITI)."""
    var_heads: dict[Head, float] = field(default_factory=dict)
    """VAR: head -> p, the fraction of attention moved from `var_sources` to `var_targets`."""
    var_sources: tuple[int, ...] = ()
    var_targets: tuple[int, ...] = ()
    model_shape: tuple[int, int, int] | None = None
    """(n_layers, n_heads, head_dim) of the model the plan was built for, when known."""

    # ---- builders -------------------------------------------------------------------------
    def scale_heads(self, scales: Mapping[Head, float]) -> "InterventionPlan":
        """Multiply each head's output z by a factor (VHR: α > 1; 0 prunes). Factors compose."""
        new = dict(self.head_scales)
        for h, s in _heads_map(scales).items():
            s = float(s)
            if not math.isfinite(s):
                raise PlanError(f"scale for head {h} must be finite, got {s}")
            new[h] = new.get(h, 1.0) * s
        return replace(self, head_scales=new)

    def scale_logits(self, scales: Mapping[Head, float]) -> "InterventionPlan":
        """Multiply each head's attention logits q·k·scaling by a factor (= scaling its query). Factors compose."""
        new = dict(self.logit_scales)
        for h, s in _heads_map(scales).items():
            s = float(s)
            if not math.isfinite(s) or s < 0:
                raise PlanError(f"logit scale for head {h} must be finite and >= 0, got {s}")
            new[h] = new.get(h, 1.0) * s
        return replace(self, logit_scales=new)

    def uniform_attention(self, heads: Iterable[Head], epsilon: float = 1e-4) -> "InterventionPlan":
        """Ships' "undifferentiated attention": logits × ε, so each head spreads its attention
        (almost) uniformly over the keys it can see. ε = 0 is exactly uniform."""
        return self.scale_logits({h: epsilon for h in _heads_map(list(heads))})

    def prune_heads(self, heads: Iterable[Head]) -> "InterventionPlan":
        """Zero the output of each head (scale 0). A mapping's keys are the heads."""
        return self.scale_heads({h: 0.0 for h in _heads_map(list(heads))})

    def key_bias(self, biases: Mapping[Head, float], positions: int | Sequence[int]) -> "InterventionPlan":
        """Add a logit bias to the given key positions of each head (biases add up)."""
        pos = [positions] if isinstance(positions, int) else [int(p) for p in positions]
        if any(p < 0 for p in pos):
            raise PlanError(f"key positions must be >= 0, got {pos}")
        new = {h: dict(v) for h, v in self.key_biases.items()}
        for h, b in _heads_map(biases).items():
            b = float(b)
            if math.isnan(b) or b == math.inf:
                raise PlanError(f"logit bias for head {h} must be a number or -inf, got {b}")
            slot = new.setdefault(h, {})
            for p in pos:
                slot[p] = slot.get(p, 0.0) + b
        return replace(self, key_biases=new)

    def first_token_bias(self, biases: Mapping[Head, float]) -> "InterventionPlan":
        """Add an additive logit bias on key 0 (the first token) of each head."""
        return self.key_bias(biases, 0)

    def scale_first_token(self, gammas: Mapping[Head, float]) -> "InterventionPlan":
        """ZeroTuning: scale the first token's attention by γ and renormalize (= log γ on key 0)."""
        biases = {}
        for h, g in _heads_map(gammas).items():
            if not float(g) > 0:
                raise PlanError(f"ZeroTuning gamma for head {h} must be > 0, got {g}")
            biases[h] = math.log(float(g))
        return self.first_token_bias(biases)

    def act(self, heads: Iterable[Head] | Mapping[Head, ActSetting], beta: float = 0.4, tau: float = 0.1) -> "InterventionPlan":
        """ACT sink calibration on each head (paper defaults β=0.4, τ=0.1)."""
        if isinstance(heads, Mapping):
            settings = _heads_map(heads)
        else:
            settings = _heads_map(heads, ActSetting(beta, tau))
        for h, s in settings.items():
            if not (0.0 <= s.beta <= 1.0):
                raise PlanError(f"ACT beta for head {h} must be in [0, 1], got {s.beta}")
            if not (0.0 <= s.tau <= 1.0):
                raise PlanError(f"ACT tau for head {h} must be in [0, 1], got {s.tau}")
        return replace(self, act_heads={**self.act_heads, **settings})

    def act_with_sinks(self, sinks: Mapping[Head, Sequence[int]], beta: float = 0.4) -> "InterventionPlan":
        """ACT with calibrated sink sets: head -> the key positions calibrated once (for example
        by `headlab.analyses.act.calibrate_sinks` on a fixed prompt template) and reused on every
        input, instead of found again on each one. The calibration itself is the paper's (sinks
        keep β·A, the removed mass goes to the other keys in proportion); only the sink sets are
        fixed. Such a plan runs at the plain attention's speed on CUDA (`kernels.act_sparse`)."""
        if not (0.0 <= beta <= 1.0):
            raise PlanError(f"ACT beta must be in [0, 1], got {beta}")
        settings: dict[Head, ActSetting] = {}
        for head, positions in sinks.items():
            try:
                pos = sorted({operator.index(p) for p in positions})  # ints only: never a float or a str
            except TypeError:
                raise PlanError(f"ACT sinks of head {head} must be integer key positions, got {list(positions)}") from None
            if not pos or pos[0] < 0:
                raise PlanError(f"ACT sinks of head {head} must be a non-empty list of key positions >= 0, got {list(positions)}")
            settings[_head(head)] = ActSetting(beta, ActSetting.tau, tuple(pos))
        return replace(self, act_heads={**self.act_heads, **settings})

    def redistribute(self, heads: Iterable[Head] | Mapping[Head, float], sources: Sequence[int], targets: Sequence[int],
                     p: float = 0.6) -> "InterventionPlan":
        """VAR (Kang et al., "See What You Are Told"): in each head, a fraction p of the attention on
        the `sources` keys (visual sink tokens) moves to the `targets` keys (the other image tokens),
        in proportion to their attention: A[i,s] ← (1−p)·A[i,s]; A[i,t] ← A[i,t]·(1 + p·S_i / T_i),
        S_i and T_i the row's mass on sources and targets. Rows keep summing to 1; rows with no
        mass on the targets are left as they are. One source / target set per plan."""
        settings = _heads_map(heads) if isinstance(heads, Mapping) else _heads_map(heads, p)
        for h, value in settings.items():
            if not 0.0 <= float(value) <= 1.0:
                raise PlanError(f"VAR fraction p for head {h} must be in [0, 1], got {value}")
        src, tgt = tuple(sorted({int(x) for x in sources})), tuple(sorted({int(x) for x in targets}))
        if not src or not tgt:
            raise PlanError("VAR needs at least one source key (a visual sink) and one target key (an image token)")
        if min(src + tgt) < 0:
            raise PlanError("VAR key positions must be >= 0")
        if set(src) & set(tgt):
            raise PlanError(f"VAR sources and targets overlap at positions {sorted(set(src) & set(tgt))}")
        if self.var_heads and (self.var_sources, self.var_targets) != (src, tgt):
            raise PlanError("a plan holds one VAR source / target set; build another plan for other positions")
        return replace(self, var_heads={**self.var_heads, **{h: float(v) for h, v in settings.items()}},
                       var_sources=src, var_targets=tgt)

    def ablate_heads(
        self,
        heads: Iterable[Head],
        mode: AblationMode = "zero",
        means: Mapping[Head, torch.Tensor] | torch.Tensor | None = None,
    ) -> "InterventionPlan":
        """Replace each head's output by zeros or by its mean output from a reference run.

        `means` (mode="mean"): a mapping head -> Tensor[head_dim], or a Tensor[n_layers, n_heads,
        head_dim] such as `HeadStats.mean_head_outputs()`.
        """
        if mode not in ("zero", "mean"):
            raise PlanError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
        hs = list(_heads_map(heads))
        new_means = dict(self.means)
        if mode == "mean":
            if means is None:
                raise PlanError("mean ablation needs `means`: pass HeadStats.mean_head_outputs() from a reference run")
            for h in hs:
                m = means[h[0], h[1]] if isinstance(means, torch.Tensor) else means.get(h)
                if m is None:
                    raise PlanError(f"mean ablation of head {h}: `means` has no entry for it")
                new_means[h] = torch.as_tensor(m).detach().float().reshape(-1).cpu()
        return replace(self, ablations={**self.ablations, **{h: mode for h in hs}}, means=new_means)

    def patch_heads(self, outputs: Mapping[Head, torch.Tensor]) -> "InterventionPlan":
        """Replace each head's output by a cached one: Tensor[batch, queries, head_dim] per head.

        The forward the plan is applied to must have the same batch and query length (path
        patching: cache z from a corrupted run with `StatsRequest(head_outputs=True)`).
        """
        new = dict(self.patches)
        for h, z in _heads_map(outputs).items():
            z = torch.as_tensor(z).detach()
            if z.dim() == 2:
                z = z.unsqueeze(0)
            if z.dim() != 3:
                raise PlanError(f"patch for head {h} must be [batch, queries, head_dim], got shape {tuple(z.shape)}")
            new[h] = z
        return replace(self, patches=new)

    def shift_heads(self, shifts: Mapping[Head, torch.Tensor]) -> "InterventionPlan":
        """Add a vector to each head's output z ([head_dim] per head; shifts add up). ITI's
        intervention is z ← z + α·σ·θ: pass α·σ·θ (see `headlab.analyses.probes.shift_plan`)."""
        new = dict(self.shifts)
        for h, v in _heads_map(shifts).items():
            v = torch.as_tensor(v, dtype=torch.float32).detach().flatten().cpu()
            if not bool(torch.isfinite(v).all()):
                raise PlanError(f"shift for head {h} must be finite")
            new[h] = new[h] + v if h in new else v
        return replace(self, shifts=new)

    def for_model(self, spec: Any) -> "InterventionPlan":
        """Record the model shape the plan is meant for, and check every head against it."""
        plan = replace(self, model_shape=(spec.n_layers, spec.n_heads, spec.head_dim))
        plan.validate(spec)
        return plan

    def combine(self, other: "InterventionPlan") -> "InterventionPlan":
        """Both plans at once: scales multiply, biases add, the other's settings win elsewhere."""
        if self.model_shape and other.model_shape and self.model_shape != other.model_shape:
            raise PlanError(f"cannot combine plans built for different models: {self.model_shape} vs {other.model_shape}")
        plan = self.scale_heads(other.head_scales).scale_logits(other.logit_scales)
        for h, biases in other.key_biases.items():
            for p, b in biases.items():
                plan = plan.key_bias({h: b}, p)
        if other.var_heads:
            plan = plan.redistribute(other.var_heads, other.var_sources, other.var_targets)
        if other.shifts:
            plan = plan.shift_heads(other.shifts)
        return replace(
            plan,
            act_heads={**plan.act_heads, **other.act_heads},
            ablations={**plan.ablations, **other.ablations},
            means={**plan.means, **other.means},
            patches={**plan.patches, **other.patches},
            model_shape=self.model_shape or other.model_shape,
        )

    __add__ = combine

    # ---- inspection ----------------------------------------------------------------------
    def heads(self) -> set[Head]:
        """Every head the plan touches."""
        return (set(self.head_scales) | set(self.logit_scales) | set(self.key_biases) | set(self.act_heads)
                | set(self.ablations) | set(self.patches) | set(self.shifts) | set(self.var_heads))

    def layers(self) -> set[int]:
        return {layer for layer, _ in self.heads()}

    def is_empty(self) -> bool:
        return not self.heads()

    def validate(self, spec: Any) -> None:
        """Raise a PlanError naming the problem if the plan does not fit the model `spec`."""
        if self.model_shape is not None:
            own = (spec.n_layers, spec.n_heads, spec.head_dim)
            if tuple(self.model_shape) != own:
                raise PlanError(
                    f"this plan was built for a model with (layers, heads, head_dim) = {tuple(self.model_shape)}, "
                    f"but {spec.architecture} has {own}; rebuild the plan for this model"
                )
        for h in sorted(self.heads()):
            spec.check_head(*h, what="plan names head")
        for h, m in self.means.items():
            if m.numel() != spec.head_dim:
                raise PlanError(f"mean output for head {h} has {m.numel()} values, the model's head_dim is {spec.head_dim}")
        for h, z in self.patches.items():
            if z.shape[-1] != spec.head_dim:
                raise PlanError(f"patch for head {h} has head_dim {z.shape[-1]}, the model's is {spec.head_dim}")
        for h, v in self.shifts.items():
            if v.numel() != spec.head_dim:
                raise PlanError(f"shift for head {h} has {v.numel()} values, the model's head_dim is {spec.head_dim}")

    # ---- compilation ----------------------------------------------------------------------
    def _fingerprint(self) -> tuple:
        """What compilation reads, cheaply comparable: the values of every setting, and for each
        tensor its identity and version counter (bumped by any in-place change)."""
        def tensors(d: Mapping[Head, torch.Tensor]) -> tuple:
            return tuple((h, id(t), t._version) for h, t in d.items())

        return (tuple(self.head_scales.items()), tuple(self.logit_scales.items()),
                tuple((h, tuple(b.items())) for h, b in self.key_biases.items()), tuple(self.act_heads.items()),
                tuple(self.ablations.items()), tensors(self.means), tensors(self.patches), tensors(self.shifts),
                tuple(self.var_heads.items()), self.var_sources, self.var_targets)

    def compiled_layers(self, n_heads: int, head_dim: int, device: torch.device) -> dict[int, "LayerPlan | None"]:
        """The compiled layers of this plan for one model shape and device, kept on the plan across
        `patched(...)` sessions: each layer compiles and uploads once, and the layer plans keep the
        kernels' caches built from them (a session's first call per layer otherwise rebuilds and
        uploads them; compiling alone is ~0.3 ms a layer for a calibrated ACT plan on 16 heads, on a
        CPU core). A plan changed in place since
        (its dicts, or a tensor in them) is noticed, and compiled afresh. Layers fill in as asked."""
        cache = self.__dict__.get("_compiled_cache")
        fingerprint = self._fingerprint()
        if cache is None or cache[0] != fingerprint:
            # the tensors are kept with it: an id in the fingerprint is never reused while it lives
            alive = (*self.means.values(), *self.patches.values(), *self.shifts.values())
            cache = (fingerprint, {}, alive)
            object.__setattr__(self, "_compiled_cache", cache)  # a frozen dataclass: not a field
        return cache[1].setdefault((n_heads, head_dim, device), {})

    def compile_layer(self, layer: int, n_heads: int, head_dim: int) -> "LayerPlan | None":
        """The small per-layer tensors a kernel reads; None when the layer is untouched.

        Patches are kept per head and assembled per call (they depend on batch and length).
        """
        touched = [h for h in self.heads() if h[0] == layer]
        if not touched:
            return None
        scale = torch.ones(n_heads)
        for (l, h), s in self.head_scales.items():
            if l == layer:
                scale[h] = s
        logit_scale = torch.ones(n_heads)
        for (l, h), s in self.logit_scales.items():
            if l == layer:
                logit_scale[h] = s
        positions = sorted({p for (l, _), b in self.key_biases.items() if l == layer for p in b})
        bias = torch.zeros(n_heads, len(positions))
        for (l, h), b in self.key_biases.items():
            if l == layer:
                for p, v in b.items():
                    bias[h, positions.index(p)] = v
        beta = torch.ones(n_heads)
        tau = torch.ones(n_heads)
        act = torch.zeros(n_heads, dtype=torch.bool)
        fixed: dict[int, tuple[int, ...]] = {}
        for (l, h), s in self.act_heads.items():
            if l == layer:
                beta[h], tau[h], act[h] = s.beta, s.tau, True
                if s.sinks is not None:
                    fixed[h] = s.sinks
        act_sinks = None
        if fixed:
            act_sinks = torch.full((n_heads, max(len(p) for p in fixed.values())), -1, dtype=torch.long)
            for h, p in fixed.items():
                act_sinks[h, : len(p)] = torch.tensor(p)
        replace_mode = torch.zeros(n_heads, dtype=torch.int8)
        mean_out = None
        for (l, h), mode in self.ablations.items():
            if l == layer:
                replace_mode[h] = REPLACE_ZERO if mode == "zero" else REPLACE_MEAN
                if mode == "mean":
                    if mean_out is None:
                        mean_out = torch.zeros(n_heads, head_dim)
                    mean_out[h] = self.means[(l, h)]
        patch = {h: z for (l, h), z in self.patches.items() if l == layer}
        for h in patch:
            replace_mode[h] = REPLACE_PATCH
        shift_out = None
        for (l, h), v in self.shifts.items():
            if l == layer:
                if shift_out is None:
                    shift_out = torch.zeros(n_heads, head_dim)
                shift_out[h] = v
        var_p = torch.zeros(n_heads)
        for (l, h), v in self.var_heads.items():
            if l == layer:
                var_p[h] = v
        return LayerPlan(
            layer=layer,
            head_scale=scale,
            logit_scale=logit_scale,
            bias_positions=torch.tensor(positions, dtype=torch.long),
            bias=bias,
            act_heads=act,
            act_beta=beta,
            act_tau=tau,
            act_sinks=act_sinks,
            replace_mode=replace_mode,
            mean_out=mean_out,
            patches=patch,
            shift_out=shift_out,
            var_p=var_p,
            var_sources=torch.tensor(self.var_sources, dtype=torch.long),
            var_targets=torch.tensor(self.var_targets, dtype=torch.long),
        )

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (tensors of mean/patch ablations are listed, not inlined)."""
        return {
            "format": "headlab.plan/1",
            "model_shape": list(self.model_shape) if self.model_shape else None,
            "head_scales": [[l, h, s] for (l, h), s in sorted(self.head_scales.items())],
            "logit_scales": [[l, h, s] for (l, h), s in sorted(self.logit_scales.items())],
            "key_biases": [[l, h, p, b] for (l, h), d in sorted(self.key_biases.items()) for p, b in sorted(d.items())],
            "act": [[l, h, s.beta, s.tau] + ([list(s.sinks)] if s.sinks is not None else [])
                    for (l, h), s in sorted(self.act_heads.items())],
            "ablations": [[l, h, m] for (l, h), m in sorted(self.ablations.items())],
            "var": {"heads": [[l, h, v] for (l, h), v in sorted(self.var_heads.items())], "sources": list(self.var_sources),
                    "targets": list(self.var_targets)},
            "tensors": sorted([f"mean.{l}.{h}" for l, h in self.means] + [f"patch.{l}.{h}" for l, h in self.patches]
                              + [f"shift.{l}.{h}" for l, h in self.shifts]),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> "InterventionPlan":
        if d.get("format") != "headlab.plan/1":
            raise PlanError(f"not a headlab plan (format {d.get('format')!r}, expected 'headlab.plan/1')")
        tensors = tensors or {}
        missing = [n for n in d.get("tensors", []) if n not in tensors]
        if missing:
            raise PlanError(f"plan needs tensors {missing}; load it with InterventionPlan.load(path) next to its .safetensors file")
        biases: dict[Head, dict[int, float]] = {}
        for l, h, p, b in d.get("key_biases", []):
            pos = _head((0, p))[1]
            biases.setdefault(_head((l, h)), {})[pos] = _number(b, f"key bias of head ({l}, {h})")
        modes = {}
        for l, h, m in d.get("ablations", []):
            if m not in ("zero", "mean"):
                raise PlanError(f"ablation mode of head ({l}, {h}) must be 'zero' or 'mean', got {m!r}")
            modes[_head((l, h))] = m
        var = d.get("var") or {}
        shape = d.get("model_shape")
        means = {_tensor_head(n): t for n, t in tensors.items() if n.startswith("mean.")}
        lacking = [h for h, m in modes.items() if m == "mean" and h not in means]
        if lacking:
            raise PlanError(f"mean ablation of heads {lacking} has no mean tensor (mean.<layer>.<head>) in the plan")
        return cls(
            head_scales={_head((l, h)): _number(s, f"output scale of head ({l}, {h})") for l, h, s in d.get("head_scales", [])},
            logit_scales={_head((l, h)): _number(s, f"logit scale of head ({l}, {h})", 0.0)
                          for l, h, s in d.get("logit_scales", [])},
            key_biases=biases,
            act_heads={_head((e[0], e[1])): _act_setting(e) for e in d.get("act", [])},
            ablations=modes,
            means=means,
            patches={_tensor_head(n): t for n, t in tensors.items() if n.startswith("patch.")},
            shifts={_tensor_head(n): t.float().flatten() for n, t in tensors.items() if n.startswith("shift.")},
            var_heads={_head((l, h)): _number(v, "VAR fraction p", 0.0, 1.0) for l, h, v in var.get("heads", [])},
            var_sources=tuple(_head((0, x))[1] for x in var.get("sources", [])),
            var_targets=tuple(_head((0, x))[1] for x in var.get("targets", [])),
            model_shape=tuple(_head((0, x))[1] for x in shape) if shape else None,
        )

    def save(self, path: str | Path) -> Path:
        """Write `<path>.json` (and `<path>.safetensors` when the plan holds tensors), atomically."""
        from headlab.io import atomic_write_json, atomic_save_safetensors

        path = Path(path).with_suffix(".json")
        tensors = {f"mean.{l}.{h}": t for (l, h), t in self.means.items()}
        tensors.update({f"patch.{l}.{h}": t for (l, h), t in self.patches.items()})
        tensors.update({f"shift.{l}.{h}": t for (l, h), t in self.shifts.items()})
        if tensors:
            atomic_save_safetensors(tensors, path.with_suffix(".safetensors"))
        atomic_write_json(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "InterventionPlan":
        """A plan saved by `save`: `<path>.json` (+ `<path>.safetensors` for mean/patch tensors).
        Anything else is an InputFileError naming the file and the problem."""
        from headlab.io import open_safetensors, parse, read_json

        path = Path(path).with_suffix(".json")
        what = "a headlab plan (InterventionPlan.save's .json)"
        d = read_json(path, what)
        tensors = None
        st = path.with_suffix(".safetensors")
        if st.exists():
            with open_safetensors(st, "the plan's tensors (InterventionPlan.save's .safetensors)") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        with parse(path, what):
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, got {type(d).__name__}")
            return cls.from_dict(d, tensors)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A CPU tensor goes to a GPU through pinned memory without blocking: a copy
    from pageable memory waits for all the work queued on the stream first, so plans and kernel
    caches built mid-forward (each layer's first call of a session) would stall the GPU pipeline."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class LayerPlan:
    """One layer's interventions as flat per-head tensors (what a kernel reads).

    Shapes: head_scale [H]; logit_scale [H] (1 = untouched); bias_positions [P] (sorted key positions); bias [H, P] (additive
    logits, 0 = none); act_heads [H] bool; act_beta, act_tau [H]; replace_mode [H] int8
    (0 none, 1 zero, 2 mean, 3 patch); mean_out [H, Dv] or None; patches: head -> [B, Q, Dv];
    shift_out [H, Dv] or None (added after the replacement, before the output scale).
    """

    layer: int
    head_scale: torch.Tensor
    logit_scale: torch.Tensor
    bias_positions: torch.Tensor
    bias: torch.Tensor
    act_heads: torch.Tensor
    act_beta: torch.Tensor
    act_tau: torch.Tensor
    replace_mode: torch.Tensor
    act_sinks: torch.Tensor | None = None
    """[H, M] long: the calibrated sink positions of heads with fixed ACT sink sets, −1 padded
    (rows of −1 for the other heads); None when every ACT head finds its sinks on the input."""
    mean_out: torch.Tensor | None = None
    patches: dict[int, torch.Tensor] = field(default_factory=dict)
    shift_out: torch.Tensor | None = None
    var_p: torch.Tensor | None = None
    """[H] VAR fraction (0 = none); var_sources [S] / var_targets [T] key positions."""
    var_sources: torch.Tensor | None = None
    var_targets: torch.Tensor | None = None

    facts: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """Host-side summary (which kinds of intervention are present, the largest biased key),
    computed once where the plan is built — on the CPU — and carried by `.to(device)`, so that
    kernels never read GPU tensors back (a device synchronization) to decide what to run."""

    def __post_init__(self) -> None:
        if self.facts is None:
            self.facts = {
                "logit_scaled": bool((self.logit_scale != 1).any()),
                "act": bool(self.act_heads.any()),
                "act_adaptive": bool((self.act_heads & ~self.act_fixed_heads).any()),
                "replaces": bool((self.replace_mode != REPLACE_NONE).any()),
                "shifts": self.shift_out is not None,
                "head_scaled": bool((self.head_scale != 1).any()),
                "max_bias_position": int(self.bias_positions.max()) if self.bias_positions.numel() else -1,
                "var": self.var_p is not None and bool((self.var_p > 0).any()),
                "bias_range": (float(self.bias.min()), float(self.bias.max())) if self.bias.numel() else (0.0, 0.0),
            }
            changed = self.head_scale != 1
            if self.bias.numel():
                changed = changed | (self.bias != 0).any(-1)
            self.facts["changed_heads"] = tuple(int(h) for h in changed.nonzero()[:, 0])
            if self.facts["var"]:
                self.facts["max_var_position"] = int(torch.cat([self.var_sources, self.var_targets]).max())
            adaptive = self.act_heads & ~self.act_fixed_heads
            if bool(adaptive.any()):  # bounds the size of a decode step's sink sets on the host
                self.facts["act_tau_min_adaptive"] = float(self.act_tau[adaptive].min())
            if self.act_sinks is not None:  # the calibrated sink positions, for host-side kernel setup
                self.facts["act_sinks_host"] = self.act_sinks.detach().cpu().clone()
                self.facts["act_max_sink"] = int(self.act_sinks.max())

    @property
    def has_bias(self) -> bool:
        return self.facts["max_bias_position"] >= 0

    @property
    def max_bias_position(self) -> int:
        """Largest key position the plan biases (−1 when none)."""
        return self.facts["max_bias_position"]

    @property
    def has_logit_scale(self) -> bool:
        return self.facts["logit_scaled"]

    @property
    def has_act(self) -> bool:
        return self.facts["act"]

    @property
    def act_fixed_heads(self) -> torch.Tensor:
        """[H] bool: heads whose ACT sink set is calibrated (fixed positions), not found on the input."""
        if self.act_sinks is None:
            return torch.zeros_like(self.act_heads)
        return (self.act_sinks >= 0).any(-1)

    @property
    def act_sinks_host(self) -> torch.Tensor | None:
        """`act_sinks` [H, S] (−1 padded) on the CPU, kept from where the plan was built: kernels
        set up from it without reading the device copy back (a synchronization per layer)."""
        return self.facts.get("act_sinks_host")

    @property
    def act_max_sink(self) -> int:
        """The largest calibrated sink position (−1 when none)."""
        return self.facts.get("act_max_sink", -1)

    def act_decode_sink_bound(self, k_len: int) -> int:
        """The most sink keys any head can have in a call with one query per row over `k_len`
        keys: a calibrated head its positions; an input-adaptive head at most ⌊1/τ⌋, since its r[j]
        is that row's A[0, j] and a row's probabilities sum to 1 (every key when τ = 0). Known on
        the host, so the call never reads the sets' size back from the GPU."""
        bound = 0 if self.act_sinks is None else self.act_sinks.shape[-1]
        tau = self.facts.get("act_tau_min_adaptive")
        if tau is not None:
            # 1 + 1e-3: room for the probabilities' rounding (and τ's in fp32: 0.1 is 0.100000001)
            bound = max(bound, k_len if tau <= 0 else int((1.0 + 1e-3) / tau))
        return min(bound, k_len)

    @property
    def has_adaptive_act(self) -> bool:
        """True when some ACT head finds its sink set on each input (needs the received attention)."""
        return self.facts["act_adaptive"]

    @property
    def has_var(self) -> bool:
        """True when some head redistributes attention (VAR)."""
        return self.facts["var"]

    @property
    def has_replacement(self) -> bool:
        """True when some head's output is replaced (zero / mean ablation, patching)."""
        return self.facts["replaces"]

    @property
    def edits_outputs(self) -> bool:
        """True when head outputs are edited after z = A·v (replaced or shifted): the step
        `apply_output_interventions` runs (the output scale alone runs inside the kernels)."""
        return self.facts["replaces"] or self.facts["shifts"]

    @property
    def has_head_scale(self) -> bool:
        return self.facts["head_scaled"]

    @property
    def biased_or_scaled_heads(self) -> tuple[int, ...]:
        """Heads (ascending) with a nonzero key bias or an output scale other than 1: the heads a
        key-bias plan's correction has to rewrite; every other head's output is the plain one."""
        changed = self.facts.get("changed_heads")
        return tuple(range(self.head_scale.shape[0])) if changed is None else changed

    @property
    def touches_probabilities(self) -> bool:
        """True when the attention probabilities themselves change (not only the outputs)."""
        return self.has_logit_scale or self.has_bias or self.has_act or self.has_var

    def to(self, device: torch.device | str) -> "LayerPlan":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.head_scale.device == device:
            return self  # plans are never mutated: sharing is safe, and keeps kernel caches warm

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else upload(t, device)

        return LayerPlan(
            layer=self.layer,
            head_scale=move(self.head_scale),
            logit_scale=move(self.logit_scale),
            bias_positions=move(self.bias_positions),
            bias=move(self.bias),
            act_heads=move(self.act_heads),
            act_beta=move(self.act_beta),
            act_tau=move(self.act_tau),
            act_sinks=move(self.act_sinks),
            replace_mode=move(self.replace_mode),
            mean_out=move(self.mean_out),
            patches={h: move(z) for h, z in self.patches.items()},
            shift_out=move(self.shift_out),
            var_p=move(self.var_p),
            var_sources=move(self.var_sources),
            var_targets=move(self.var_targets),
            facts=self.facts,
        )

    def patch_tensor(self, batch: int, q_len: int, n_heads: int, head_dim: int, device: torch.device) -> torch.Tensor | None:
        """Patched outputs as [B, H, Q, Dv] (zeros for unpatched heads), checked against the call."""
        if not self.patches:
            return None
        out = torch.zeros(batch, n_heads, q_len, head_dim, device=device)
        for h, z in self.patches.items():
            if z.shape[0] not in (1, batch) or z.shape[1] != q_len:
                raise PlanError(
                    f"patch for head ({self.layer}, {h}) has shape [batch={z.shape[0]}, queries={z.shape[1]}], "
                    f"but this forward has batch {batch} and {q_len} queries; cache the patch from an input of the same shape"
                )
            out[:, h] = z.to(device=device, dtype=torch.float32)
        return out
