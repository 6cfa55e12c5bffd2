"""Image tokens of vision-language models (LLaVA-style: the processor expands one image
placeholder into `n` copies of `spec.image_token_id` in `input_ids`, and the model writes the
projected vision features at those positions).

    pos = image_positions(model.spec, input_ids[0])      # key positions of the image
    StatsRequest(spans={"image": pos.tolist()})          # mass on image tokens per head, query
    text_only = without_image(model.spec, input_ids[0])  # the same text, image tokens removed
"""

from __future__ import annotations

from typing import Any

import torch

from headlab.errors import HeadlabError
from headlab.spec import ModelSpec


def _check_vlm(spec: ModelSpec) -> int:
    if spec.modality != "vision-language" or spec.image_token_id is None:
        raise HeadlabError(f"{spec.architecture} is a text model: image analyses need a vision-language model "
                           "(LLaVA-style, with an image_token_id in its config)")
    return int(spec.image_token_id)


def image_positions(spec: ModelSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """[n_image_tokens] positions of the image tokens in one row of `input_ids` ([T])."""
    token = _check_vlm(spec)
    if input_ids.dim() != 1:
        raise HeadlabError(f"image_positions takes one row of input_ids ([T]), got shape {tuple(input_ids.shape)}")
    pos = (input_ids == token).nonzero().flatten()
    if pos.numel() == 0:
        raise HeadlabError(f"the prompt has no image tokens (id {token}): put the processor's image placeholder "
                           "(e.g. '<image>') in the text and pass the image to the processor")
    return pos.cpu()


def without_image(spec: ModelSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """The row `input_ids` ([T]) with its image tokens removed: the same text, no image."""
    token = _check_vlm(spec)
    return input_ids[input_ids != token]


def encode(model: Any, text: str, image: Any) -> dict[str, torch.Tensor]:
    """The processor's inputs (input_ids, attention_mask, pixel_values) for one text + image, on the
    model's device, with clear errors for a missing image, a text without the placeholder, or an
    image the processor rejects."""
    _check_vlm(model.spec)
    processor = model.tokenizer
    if processor is None or not hasattr(processor, "image_processor"):
        raise HeadlabError(f"{model.name} was loaded without its processor (image processor + tokenizer): "
                           "save one with the model (processor.save_pretrained) or pass input_ids and pixel_values")
    if image is None:
        raise HeadlabError("no image given: vision analyses need an image with every prompt")
    try:
        enc = processor(text=text, images=image, return_tensors="pt")
    except (ValueError, TypeError, OSError) as exc:
        raise HeadlabError(f"the processor rejected the input ({exc}); give an RGB image (PIL, numpy HxWx3 or a "
                           "[3, H, W] tensor) and a text with one image placeholder") from exc
    image_positions(model.spec, enc["input_ids"][0])  # the text must hold the placeholder
    return {k: v.to(model.device) for k, v in enc.items()}


__all__ = ["encode", "image_positions", "without_image"]
