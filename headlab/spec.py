"""`ModelSpec`: the shape facts of a model that every plan, stat and score is checked against."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

Modality = Literal["text", "vision-language"]


def _first(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a model's attention, derived from its Hugging Face config.

    `n_heads` counts query heads; `n_kv_heads` key/value heads (GQA when smaller).
    `causal` is False for encoders (BERT-style bidirectional attention).
    `image_token_id` is set for vision-language models: image tokens are the positions of
    `input_ids` equal to it (see `image_span`).
    """

    architecture: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    modality: Modality = "text"
    causal: bool = True
    image_token_id: int | None = None
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """Read the spec off a `transformers.PretrainedConfig` (text config for VLMs)."""
        architectures = getattr(config, "architectures", None) or []
        architecture = architectures[0] if architectures else type(config).__name__.replace("Config", "")
        vision = getattr(config, "vision_config", None) is not None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = _first(text, "num_attention_heads", "n_head", "num_heads")
        if n_heads is None:
            from headlab.errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"{architecture} has no attention heads headlab can patch (its config has no num_attention_heads); "
                "headlab supports transformer models whose attention goes through transformers' attention registry"
            )
        n_heads = int(n_heads)
        hidden = _first(text, "hidden_size", "n_embd", "d_model")
        head_dim = _first(text, "head_dim")
        if head_dim is None:
            head_dim = int(hidden) // n_heads
        is_encoder = not getattr(text, "is_decoder", False) and getattr(text, "model_type", "") in _ENCODER_TYPES
        return cls(
            architecture=str(architecture),
            model_type=str(getattr(config, "model_type", "")),
            n_layers=int(_first(text, "num_hidden_layers", "n_layer", "num_layers")),
            n_heads=n_heads,
            n_kv_heads=int(_first(text, "num_key_value_heads", default=n_heads)),
            head_dim=int(head_dim),
            vocab_size=int(_first(text, "vocab_size", default=0)),
            max_positions=_first(text, "max_position_embeddings", "n_positions"),
            modality="vision-language" if vision else "text",
            causal=not is_encoder,
            image_token_id=_first(config, "image_token_id", "image_token_index") if vision else None,
            sliding_window=_first(text, "sliding_window"),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads): the shape of every per-head score."""
        return (self.n_layers, self.n_heads)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def check_head(self, layer: int, head: int, what: str = "head") -> None:
        """Raise a PlanError unless (layer, head) exists in this model."""
        from headlab.errors import PlanError

        if not (0 <= layer < self.n_layers):
            raise PlanError(
                f"{what} ({layer}, {head}): layer {layer} does not exist; "
                f"{self.architecture} has layers 0..{self.n_layers - 1}"
            )
        if not (0 <= head < self.n_heads):
            raise PlanError(
                f"{what} ({layer}, {head}): head {head} does not exist; "
                f"{self.architecture} has query heads 0..{self.n_heads - 1} per layer"
            )

    def image_span(self, input_ids: Any) -> list[tuple[int, int]]:
        """Contiguous [start, end) runs of image tokens in a 1-D `input_ids` (VLMs only)."""
        if self.image_token_id is None:
            return []
        ids = [int(t) for t in input_ids]
        spans, start = [], None
        for i, t in enumerate(ids + [None]):
            if t == self.image_token_id and start is None:
                start = i
            elif t != self.image_token_id and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kv = f"{self.n_kv_heads} kv heads (GQA x{self.n_heads // self.n_kv_heads})" if self.n_kv_heads != self.n_heads else f"{self.n_kv_heads} kv heads"
        lines = [
            f"architecture   {self.architecture} ({self.model_type})",
            f"modality       {self.modality}" + ("" if self.causal else ", bidirectional encoder"),
            f"layers         {self.n_layers}",
            f"query heads    {self.n_heads} per layer ({self.n_total_heads} in all)",
            f"kv heads       {kv}",
            f"head_dim       {self.head_dim}",
            f"vocab          {self.vocab_size}",
            f"max positions  {self.max_positions}",
        ]
        if self.sliding_window:
            lines.append(f"sliding window {self.sliding_window}")
        if self.image_token_id is not None:
            lines.append(f"image token id {self.image_token_id}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "camembert"}
