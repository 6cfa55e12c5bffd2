"""`StatsRequest` (what to measure per head) and `HeadStats` (what was measured).

Stats are computed inside the patched attention without materializing the attention matrix of a
whole layer, on the attention the model actually used (after the plan's bias and ACT changes).

Query selection: `queries` indexes the queries of each forward call, like Python indexing of that
call's tokens — `slice(-8, None)` is the last 8 tokens of a prefill, and the single token of each
decode step in `generate()`. Span and argmax positions are key indices (positions in the padded
`input_ids` plus cache).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from headlab.errors import PlanError

SpanLike = tuple[int, int] | Sequence[int]


@dataclass(frozen=True)
class TokenMatch:
    """A query-dependent key set given by labels: for the query at position i, the keys j with
    key_labels[j] == query_labels[i] and j < i (`strict`) or j <= i.

    Labels are integer tensors over token positions, [T] (every batch row) or [B, T], covering
    every key position of the call (prompt + cache). A negative label is a convenient "never
    matches" when the two sides use different negatives. This is how a pattern that depends on the
    tokens — TransformerLens's previous-token, duplicate-token and induction detection patterns —
    is measured per (head, query) without any [queries, keys] matrix leaving the kernel's chunk.
    """

    query_labels: torch.Tensor
    key_labels: torch.Tensor
    strict: bool = True


@dataclass(frozen=True)
class StatsRequest:
    """Which per-head statistics to emit.

    argmax:        top-1 key and its probability per (head, query)
    spans:         name -> [start, end) key range or explicit list of key positions; emits the
                   attention mass on those keys per (head, query)
    entropy:       attention entropy (nats) per (head, query)
    received:      received attention per key, summed over the selected queries, with the count
                   of selected queries that can see each key (ACT's r[j] = sum / count)
    head_outputs:  per-head output z (before o_proj, after interventions) at the selected queries
    keys:          key positions P; emits per (head, query, key) the pre-softmax logit (q·k × the
                   model's scaling, after softcap; no mask, no plan bias — the QK-score of
                   select-and-copy heads) and the attention probability there (after interventions)
    matches:       name -> TokenMatch; emits the attention mass on each query's matching keys per
                   (head, query) (token-dependent patterns: induction, duplicate, previous token)
    queries:       None (all), a slice or a list of indices into each call's queries
    layers:        None (all) or the layers to measure
    """

    argmax: bool = False
    spans: Mapping[str, SpanLike] = field(default_factory=dict)
    entropy: bool = False
    received: bool = False
    head_outputs: bool = False
    keys: Sequence[int] | None = None
    matches: Mapping[str, TokenMatch] = field(default_factory=dict)
    queries: slice | Sequence[int] | None = None
    layers: Sequence[int] | None = None

    def wants_probabilities(self) -> bool:
        """True when a stat needs the attention probabilities (not only the outputs)."""
        return (self.argmax or bool(self.spans) or self.entropy or self.received or self.keys is not None
                or bool(self.matches))

    def is_empty(self) -> bool:
        return not (self.wants_probabilities() or self.head_outputs)

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def validate(self, spec) -> None:
        """Raise a PlanError naming the problem if the request does not fit the model."""
        for layer in self.layers or []:
            if not 0 <= layer < spec.n_layers:
                raise PlanError(f"stats request names layer {layer}; {spec.architecture} has layers 0..{spec.n_layers - 1}")
        for name, span in self.spans.items():
            _span_positions(name, span)  # checks the form
        if self.keys is not None:
            _span_positions("keys", list(self.keys))
        for name, match in self.matches.items():
            _match_labels(name, match)

    def compile(self, q_len: int, k_len: int, device: torch.device) -> "CompiledStats":
        """Resolve the query window and span positions for one call with `q_len` queries and `k_len` keys."""
        idx = torch.arange(q_len)
        if self.queries is not None:
            try:
                idx = idx[self.queries] if isinstance(self.queries, slice) else idx[list(self.queries)]
            except IndexError:
                raise PlanError(f"query window {self.queries!r} is outside this call's {q_len} queries") from None
        spans = {}
        for name, span in self.spans.items():
            pos = _span_positions(name, span)
            if pos.numel() and int(pos.max()) >= k_len:
                raise PlanError(
                    f"span {name!r} reaches key position {int(pos.max())}, but the sequence has only {k_len} keys "
                    f"(positions 0..{k_len - 1}); fix the span or the input"
                )
            spans[name] = pos.to(device)
        keys = None
        if self.keys is not None:
            keys = _span_positions("keys", list(self.keys))
            if keys.numel() == 0:
                raise PlanError("stats request `keys` is empty: name at least one key position")
            if int(keys.max()) >= k_len:
                raise PlanError(f"stats request `keys` names key position {int(keys.max())}, but the sequence has only "
                                f"{k_len} keys (positions 0..{k_len - 1})")
            keys = keys.to(device)
        matches = {}
        for name, match in self.matches.items():
            ql, kl = _match_labels(name, match)
            if ql.shape[-1] < k_len or kl.shape[-1] < k_len:
                raise PlanError(f"match {name!r} labels {min(ql.shape[-1], kl.shape[-1])} positions, but this call has "
                                f"{k_len} keys: label every position of the input (prompt + generated)")
            matches[name] = (ql.to(device), kl.to(device), match.strict)
        return CompiledStats(
            query_index=idx,
            argmax=self.argmax,
            spans=spans,
            entropy=self.entropy,
            received=self.received,
            head_outputs=self.head_outputs,
            keys=keys,
            matches=matches,
        )


def as_slice(index: torch.Tensor) -> slice | torch.Tensor:
    """A non-empty contiguous ascending CPU index as a slice, anything else unchanged.

    Indexing a GPU tensor with a CPU index tensor copies the index to the device and blocks the
    host; a slice does not — this keeps per-layer stats collection from stalling generation.
    """
    if index.numel() and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + index.numel())):
        return slice(int(index[0]), int(index[0]) + index.numel())
    return index


def _position(x: Any) -> int:
    """An integer key position: a Python / numpy int or an integer 0-d tensor; never a bool or a float."""
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, torch.Tensor) and (x.dim() != 0 or x.dtype == torch.bool)):
        raise TypeError(x)
    return operator.index(x)  # floats (and float tensors) raise TypeError


def _span_positions(name: str, span: SpanLike) -> torch.Tensor:
    """The key positions of a span, normalized in one place for every caller.

    A tuple of two integers (Python, numpy or 0-d torch ints) is a [start, end) range; anything
    else iterable (a list, a range, an array, a tensor, a longer tuple) lists positions, each once.
    Floats, bools, negative positions and repeated positions (which would count twice in the
    span's mass) are PlanErrors."""
    if isinstance(span, tuple) and len(span) == 2:
        try:
            start, end = _position(span[0]), _position(span[1])
        except TypeError:
            raise PlanError(f"span {name!r} = {span!r}: a (start, end) range needs two integer positions, "
                            f"got {type(span[0]).__name__} and {type(span[1]).__name__}") from None
        if start < 0 or end < start:
            raise PlanError(f"span {name!r} = {span}: need 0 <= start <= end (a [start, end) key range)")
        return torch.arange(start, end)
    if isinstance(span, (str, bytes)) or not hasattr(span, "__iter__"):
        raise PlanError(f"span {name!r} must be a (start, end) tuple or a list of key positions, got {span!r}")
    items = span.flatten().tolist() if isinstance(span, (torch.Tensor, np.ndarray)) else list(span)
    try:
        positions = [_position(x) for x in items]
    except TypeError:
        raise PlanError(f"span {name!r} lists a position that is not an integer: {span!r} (positions are key indices; "
                        "a (start, end) range is a tuple of two ints)") from None
    if positions and min(positions) < 0:
        raise PlanError(f"span {name!r} has negative key positions: {span!r}")
    if len(set(positions)) != len(positions):
        repeated = sorted({p for p in positions if positions.count(p) > 1})
        raise PlanError(f"span {name!r} repeats key positions {repeated}: each key counts once in a span's mass; "
                        "give each position once")
    return torch.tensor(positions, dtype=torch.long)


def _match_labels(name: str, match: TokenMatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A TokenMatch's labels as [1|B, T] long tensors, checked."""
    if not isinstance(match, TokenMatch):
        raise PlanError(f"match {name!r} must be a TokenMatch(query_labels, key_labels), got {type(match).__name__}")
    out = []
    for side, labels in (("query_labels", match.query_labels), ("key_labels", match.key_labels)):
        t = torch.as_tensor(labels)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() not in (1, 2):
            raise PlanError(f"match {name!r}: {side} must be an integer tensor [T] or [B, T], got {t.dtype} {tuple(t.shape)}")
        out.append(t.long().view(-1 if t.dim() == 1 else t.shape[0], t.shape[-1]) if t.dim() == 2 else t.long()[None])
    return out[0], out[1]


@dataclass
class CompiledStats:
    """A StatsRequest resolved for one call: query indices [Qs] (on the CPU, so that selecting
    rows never waits on the GPU) and span key positions (on the device)."""

    query_index: torch.Tensor
    argmax: bool
    spans: dict[str, torch.Tensor]
    entropy: bool
    received: bool
    head_outputs: bool
    keys: torch.Tensor | None = None
    matches: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict)
    """name -> (query labels [1|B, T], key labels [1|B, T], strict), on the device."""

    @property
    def wants_probabilities(self) -> bool:
        return (self.argmax or bool(self.spans) or self.entropy or self.received or self.keys is not None
                or bool(self.matches))

    def selection(self) -> slice | torch.Tensor:
        """`query_index` as a slice where it is contiguous (`as_slice`), computed once: every layer
        of every decode step asks for it."""
        cached = self.__dict__.get("_selection")
        if cached is None:
            cached = self.__dict__["_selection"] = as_slice(self.query_index)
        return cached

    def window(self) -> "CompiledStats":
        """This request for a call over its selected queries only (query_index 0…Qs−1, no head
        outputs): what the SDPA-first path measures. Built once per compiled request, so that the
        kernels' caches on it (the rows' slices, the key-set matrix) live as long as it does."""
        cached = self.__dict__.get("_window")
        if cached is None:
            cached = replace(self, query_index=torch.arange(self.query_index.numel()), head_outputs=False)
            self.__dict__["_window"] = cached
        return cached


@dataclass
class LayerStats:
    """Stats of one layer for one forward call. B batch, H query heads, Qs selected queries, K keys.

    query_positions [Qs] (token position of each selected query), argmax [B,H,Qs] long,
    argmax_prob [B,H,Qs], span_mass name -> [B,H,Qs], entropy [B,H,Qs], received [B,H,K],
    received_count [B,H,K], head_outputs [B,H,Qs,Dv], key_logits / key_probs [B,H,Qs,P].
    """

    query_positions: torch.Tensor
    argmax: torch.Tensor | None = None
    argmax_prob: torch.Tensor | None = None
    span_mass: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy: torch.Tensor | None = None
    received: torch.Tensor | None = None
    received_count: torch.Tensor | None = None
    head_outputs: torch.Tensor | None = None
    key_logits: torch.Tensor | None = None
    key_probs: torch.Tensor | None = None
    match_mass: dict[str, torch.Tensor] = field(default_factory=dict)



def _to_device(stats: LayerStats, device: torch.device) -> LayerStats:
    """The layer's stats on `device` (query positions stay on the CPU); unchanged when already there."""
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x if x.device == device else x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    moved = {f.name: (getattr(stats, f.name) if f.name == "query_positions" else move(getattr(stats, f.name)))
             for f in fields(stats)}
    return LayerStats(**moved)


class HeadStats:
    """Stats recorded inside one `patched(...)` context, per layer and per forward call.

    Per-query stats concatenate over calls along the query axis (so a `generate()` gives one
    column per decode step); received attention sums over calls (keys aligned at position 0).
    Tensors stay on the model's device (`.cpu()` them for plotting); query positions are on the CPU.
    All getters return tensors stacked over the recorded layers, in `self.layers` order.
    """

    def __init__(self) -> None:
        self._calls: dict[int, list[LayerStats]] = {}

    home: torch.device | None = None
    """Where stats are gathered (the model's first device): layers of a model split over several
    GPUs (`device_map`) send theirs here, so the getters stack one device's tensors."""

    def add(self, layer: int, stats: LayerStats) -> None:
        if self.home is not None:
            stats = _to_device(stats, self.home)
        self._calls.setdefault(layer, []).append(stats)

    @property
    def layers(self) -> list[int]:
        return sorted(self._calls)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def n_calls(self, layer: int | None = None) -> int:
        layer = self.layers[0] if layer is None else layer
        return len(self._calls.get(layer, []))

    def calls(self, layer: int) -> list[LayerStats]:
        """The raw per-call stats of one layer."""
        return self._calls[layer]

    def _need(self, name: str) -> None:
        if not self._calls:
            raise PlanError("no stats were recorded: run a forward inside `with model.patched(plan, stats) as rec:`")
        first = self._calls[self.layers[0]][0]
        kind, _, key = name.partition(":")
        if key:  # a named stat: "span:<name>" or "match:<name>"
            present = first.span_mass if kind == "span" else first.match_mass
            if key not in present:
                plural = {"span": "spans", "match": "matches"}[kind]
                raise PlanError(f"{kind} {key!r} was not requested; requested {plural}: {sorted(present)}")
        elif getattr(first, name) is None:
            raise PlanError(f"stat {name!r} was not requested in the StatsRequest")

    def _per_query(self, get) -> torch.Tensor:
        return torch.stack([torch.cat([get(s) for s in self._calls[layer]], dim=-1) for layer in self.layers])

    @property
    def query_positions(self) -> torch.Tensor:
        """[Q_total] token position of each recorded query (same for all layers)."""
        return torch.cat([s.query_positions for s in self._calls[self.layers[0]]])

    @property
    def argmax(self) -> torch.Tensor:
        """[L, B, H, Q] top-1 key position."""
        self._need("argmax")
        return self._per_query(lambda s: s.argmax)

    @property
    def argmax_prob(self) -> torch.Tensor:
        """[L, B, H, Q] probability of the top-1 key."""
        self._need("argmax_prob")
        return self._per_query(lambda s: s.argmax_prob)

    @property
    def entropy(self) -> torch.Tensor:
        """[L, B, H, Q] attention entropy in nats."""
        self._need("entropy")
        return self._per_query(lambda s: s.entropy)

    def span_mass(self, name: str) -> torch.Tensor:
        """[L, B, H, Q] attention mass on the named span."""
        self._need("span:" + name)
        return self._per_query(lambda s: s.span_mass[name])

    def match_mass(self, name: str) -> torch.Tensor:
        """[L, B, H, Q] attention mass on each query's matching keys (StatsRequest.matches)."""
        self._need("match:" + name)
        return self._per_query(lambda s: s.match_mass[name])

    @property
    def span_names(self) -> list[str]:
        return sorted(self._calls[self.layers[0]][0].span_mass) if self._calls else []

    @property
    def key_logits(self) -> torch.Tensor:
        """[L, B, H, Q, P] pre-softmax logit of each requested key (the QK-score)."""
        self._need("key_logits")
        return torch.stack([torch.cat([s.key_logits for s in self._calls[layer]], dim=2) for layer in self.layers])

    @property
    def key_probs(self) -> torch.Tensor:
        """[L, B, H, Q, P] attention probability of each requested key."""
        self._need("key_probs")
        return torch.stack([torch.cat([s.key_probs for s in self._calls[layer]], dim=2) for layer in self.layers])

    @property
    def head_outputs(self) -> torch.Tensor:
        """[L, B, H, Q, Dv] per-head outputs z at the recorded queries."""
        self._need("head_outputs")
        return torch.stack([torch.cat([s.head_outputs for s in self._calls[layer]], dim=2) for layer in self.layers])

    def _received(self, attr: str) -> torch.Tensor:
        self._need("received")
        out = []
        for layer in self.layers:
            calls = self._calls[layer]
            k = max(getattr(s, attr).shape[-1] for s in calls)
            first = getattr(calls[0], attr)
            total = torch.zeros(*first.shape[:-1], k, dtype=torch.float32, device=first.device)
            for s in calls:
                t = getattr(s, attr)
                total[..., : t.shape[-1]] += t.float()
            out.append(total)
        return torch.stack(out)

    @property
    def received(self) -> torch.Tensor:
        """[L, B, H, K] attention received by each key, summed over the recorded queries."""
        return self._received("received")

    @property
    def received_count(self) -> torch.Tensor:
        """[L, B, H, K] number of recorded queries that could see each key."""
        return self._received("received_count")

    @property
    def received_mean(self) -> torch.Tensor:
        """[L, B, H, K] ACT's received attention r[j] = Σ_i A[i,j] / #queries that see j (0 if none)."""
        count = self.received_count
        return torch.where(count > 0, self.received / count.clamp_min(1), torch.zeros_like(count))

    def mean_head_outputs(self) -> torch.Tensor:
        """[L, H, Dv] mean head output over batch and recorded queries (for mean ablation).

        Indexed by position in `self.layers`; when all layers were recorded that is the layer id.
        """
        z = self.head_outputs
        return z.float().mean(dim=(1, 3))

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __repr__(self) -> str:
        if not self._calls:
            return "HeadStats(empty)"
        first = self._calls[self.layers[0]][0]
        got = [n for n in ("argmax", "entropy", "received", "head_outputs", "key_logits") if getattr(first, n) is not None]
        got += [f"span:{n}" for n in first.span_mass]
        return f"HeadStats(layers={self.layers}, calls={self.n_calls()}, queries={self.query_positions.numel()}, stats={got})"
