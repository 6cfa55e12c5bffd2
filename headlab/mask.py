"""`HeadMask`: a set of (layer, head) with weights; exports and conversion to plans."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from headlab.errors import HeadlabError, InputFileError

Head = tuple[int, int]
FORMAT = "headlab.mask/1"


@dataclass(frozen=True)
class HeadMask:
    """Selected heads of a model with [n_layers, n_heads] shape, each with a weight (default 1)."""

    heads: dict[Head, float]
    n_layers: int
    n_heads: int
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for l, h in self.heads:
            if not (0 <= l < self.n_layers and 0 <= h < self.n_heads):
                raise HeadlabError(f"mask head ({l}, {h}) is outside a {self.n_layers} x {self.n_heads} model")

    @classmethod
    def from_heads(cls, heads: list[Head], n_layers: int, n_heads: int, **kw: Any) -> "HeadMask":
        return cls(heads={(int(l), int(h)): 1.0 for l, h in heads}, n_layers=n_layers, n_heads=n_heads, **kw)

    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, head: object) -> bool:
        return head in self.heads

    def __iter__(self):
        return iter(sorted(self.heads))

    def dense(self) -> torch.Tensor:
        """[n_layers, n_heads] float tensor of weights (0 for unselected heads)."""
        t = torch.zeros(self.n_layers, self.n_heads)
        for (l, h), w in self.heads.items():
            t[l, h] = w
        return t

    def jaccard(self, other: "HeadMask") -> float:
        a, b = set(self.heads), set(other.heads)
        return len(a & b) / len(a | b) if a | b else 1.0

    PLAN_KINDS = ("prune", "scale", "first_token", "act", "mean", "shift")

    def to_plan(self, kind: Literal["prune", "scale", "first_token", "act", "mean", "shift"] = "prune", value: float = 0.0,
                means: Any = None, tau: float = 0.1, directions: Any = None, sigma: Any = None):
        """An InterventionPlan over the mask's heads.

        prune: output × 0; scale: output × `value` (α > 1 reinforces, as VHR does); first_token:
        ZeroTuning with γ = `value` on key 0; act: ACT sink calibration with β = `value` (and `tau`);
        mean: mean ablation with `means` ([L, H, Dv] from a reference run); shift: ITI, z += α·σ·θ with
        α = `value`, `directions` θ ([L, H, Dv] unit vectors) and `sigma` ([L, H]) from a probes run.
        """
        from headlab.plan import InterventionPlan

        plan = InterventionPlan()
        if kind == "prune":
            return plan.prune_heads(self.heads)
        if kind == "scale":
            return plan.scale_heads({h: value for h in self.heads})
        if kind == "first_token":
            return plan.scale_first_token({h: value for h in self.heads})
        if kind == "act":
            return plan.act(list(self.heads), beta=value, tau=tau)
        if kind == "mean":
            return plan.ablate_heads(self.heads, mode="mean", means=means)
        if kind == "shift":
            if directions is None or sigma is None:
                raise HeadlabError("a shift plan needs `directions` [L, H, Dv] and `sigma` [L, H] (a probes run's "
                                   "probe_directions.safetensors)")
            return plan.shift_heads({h: value * float(sigma[h[0]][h[1]]) * torch.as_tensor(directions[h[0]][h[1]])
                                     for h in self.heads})
        raise HeadlabError(f"unknown plan kind {kind!r}: use one of {', '.join(self.PLAN_KINDS)}")

    # ---- exports -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "n_layers": self.n_layers, "n_heads": self.n_heads, "source": self.source,
                "heads": [[l, h, w] for (l, h), w in sorted(self.heads.items())]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadMask":
        if d.get("format") != FORMAT:
            raise HeadlabError(f"not a headlab mask (format {d.get('format')!r}, expected {FORMAT!r})")
        def count(x: Any, what: str) -> int:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise HeadlabError(f"mask {what} must be a non-negative integer, got {x!r}")
            return x

        heads = {}
        for l, h, w in d["heads"]:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise HeadlabError(f"mask weight of head ({l}, {h}) must be a finite number, got {w!r}")
            heads[(count(l, "layer"), count(h, "head"))] = float(w)
        source = d.get("source", {})
        return cls(heads=heads, n_layers=count(d["n_layers"], "n_layers"), n_heads=count(d["n_heads"], "n_heads"),
                   source=source if isinstance(source, dict) else {})

    def save_json(self, path: str | Path) -> Path:
        from headlab.io import atomic_write_json

        return atomic_write_json(self.to_dict(), path)

    def save_safetensors(self, path: str | Path) -> Path:
        """`weights` [L, H] float and `mask` [L, H] bool, with the JSON header as metadata."""
        from headlab.io import atomic_save_safetensors

        d = self.dense()
        meta = {"headlab": json.dumps({k: v for k, v in self.to_dict().items() if k != "heads"}, default=str)}
        return atomic_save_safetensors({"weights": d, "mask": d != 0}, path, metadata=meta)

    def save_duo_attention(self, path: str | Path, n_kv_heads: int | None = None) -> Path:
        """A DuoAttention-style pattern file: tab-separated, one row per layer, one column per head.

        1 marks a retrieval (full-attention) head, 0 a streaming head. DuoAttention gates KV
        heads: with `n_kv_heads`, a KV head is full when any of its query heads is selected.
        """
        from headlab.io import atomic_write_text

        d = (self.dense() != 0).float()
        if n_kv_heads is not None:
            if self.n_heads % n_kv_heads:
                raise HeadlabError(f"{self.n_heads} query heads do not group into {n_kv_heads} kv heads")
            d = d.view(self.n_layers, n_kv_heads, -1).amax(dim=-1)
        text = "\n".join("\t".join(str(int(x)) for x in row) for row in d.tolist()) + "\n"
        return atomic_write_text(text, path)

    EXPORT_FORMATS = {"json": ".json", "safetensors": ".safetensors", "duo_attention": ".tsv"}

    def export(self, path: str | Path, fmt: Literal["json", "safetensors", "duo_attention"] = "json",
               n_kv_heads: int | None = None) -> Path:
        """Write the mask in one of `EXPORT_FORMATS` (atomically)."""
        if fmt == "json":
            return self.save_json(path)
        if fmt == "safetensors":
            return self.save_safetensors(path)
        if fmt == "duo_attention":
            return self.save_duo_attention(path, n_kv_heads)
        raise HeadlabError(f"unknown mask format {fmt!r}: use one of {', '.join(self.EXPORT_FORMATS)}")

    @classmethod
    def load(cls, path: str | Path) -> "HeadMask":
        """A mask saved as JSON (`save_json`) or safetensors (`save_safetensors`); anything else is an
        InputFileError naming the file and the problem."""
        from headlab.io import open_safetensors, parse, read_json, safetensors_header

        path = Path(path)
        if path.suffix == ".safetensors":
            what = "a headlab mask (HeadMask.save_safetensors)"
            with open_safetensors(path, what) as f:
                header = safetensors_header(f, path, what)
                if "weights" not in f.keys():
                    raise InputFileError(f"{path}: not {what}: it has no 'weights' tensor (it has {sorted(f.keys())[:5]})")
                weights = f.get_tensor("weights")
            with parse(path, what):
                if weights.dim() != 2 or not weights.is_floating_point() or not bool(torch.isfinite(weights).all()):
                    raise ValueError(f"'weights' must be a finite [n_layers, n_heads] float tensor, got {weights.dtype} "
                                     f"{tuple(weights.shape)}")
                heads = {(l, h): float(weights[l, h]) for l, h in (weights != 0).nonzero().tolist()}
                source = header.get("source", {})
                return cls(heads=heads, n_layers=weights.shape[0], n_heads=weights.shape[1],
                           source=source if isinstance(source, dict) else {})
        what = "a headlab mask (HeadMask.save_json)"
        d = read_json(path, what)
        with parse(path, what):
            if not isinstance(d, dict):
                raise ValueError(f"expected a JSON object, got {type(d).__name__}")
            return cls.from_dict(d)

    def __repr__(self) -> str:
        shown = ", ".join(f"L{l}H{h}" for l, h in sorted(self.heads)[:8])
        more = "" if len(self.heads) <= 8 else f", … +{len(self.heads) - 8}"
        return f"HeadMask({len(self.heads)} of {self.n_layers}x{self.n_heads}: {shown}{more})"
