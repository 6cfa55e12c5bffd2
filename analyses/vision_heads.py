"""Vision-aware heads (VHD) and their reinforcement (VHR) — He et al., "Cracking the Code of
Hallucination in LVLMs with Vision-aware Head Divergence".

VHD of head (l, h) at generation step t: ‖z_{l,h}(t | image, text) − z_{l,h}(t | text)‖₂, the L2
distance between the head's output (before o_proj) with the image in context and without it, at
the query that predicts generated token t. High VHD: the head's output depends on the image.

The "without image" pass cannot share the image pass's KV cache: removing the n image tokens
shifts every later text position by n (their rotary phases differ), so no cached key of the text
after the image is valid for it. It runs as its own sequence — the prompt with the image tokens
removed, followed by the tokens the image pass generated (teacher-forced) — so both passes read
the same text at every step.

VHR: at every generation step, the top-k heads of each layer by that step's VHD have their output
scaled by α (> 1 reinforces). Per step: one incremental no-image forward, one with-image probe
forward without the plan (its cache entry is cropped off again), and the with-image forward under
the plan that produces the next token. Named difference from a layer-by-layer hook implementation:
the probe measures VHD on the unreinforced pass of that step, for all layers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.scores import HeadScores
from headlab.stats import StatsRequest
from headlab.vision import image_positions, without_image


@dataclass
class VisionSample:
    """One image + prompt. input_ids [T] holds the expanded image tokens; pixel_values [1, 3, H, W]."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class VHDReading:
    vhd: torch.Tensor
    """[steps, L, H] VHD per generated token."""
    generated: list[int]


def _check(model: HeadModel, sample: VisionSample) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(sample.input_ids).flatten().to(model.device)
    image_positions(model.spec, ids.cpu())  # a clear error for a prompt without an image
    pixels = torch.as_tensor(sample.pixel_values)
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4:
        raise HeadlabError(f"pixel_values must be [1, 3, H, W] (or [3, H, W]), got {tuple(sample.pixel_values.shape)}")
    return ids, pixels.to(model.device, model.dtype)


def vhd_sample(model: HeadModel, sample: VisionSample, max_new_tokens: int = 8) -> VHDReading:
    """Greedy-generate with the image, then read the same tokens without it; VHD per step and head."""
    ids, pixels = _check(model, sample)
    n = ids.numel()
    out_request = StatsRequest(head_outputs=True, queries=slice(-1, None))
    with model.patched(None, out_request) as rec:
        out = model.generate(input_ids=ids[None], pixel_values=pixels, attention_mask=torch.ones_like(ids)[None],
                             max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, n:]
    steps = generated.numel()
    z_image = rec.stats.head_outputs[:, 0, :, :steps].float()  # [L, H, steps, Dv]
    text = without_image(model.spec, ids)
    m = text.numel()
    seq = torch.cat([text, generated[:-1]])
    with model.patched(None, StatsRequest(head_outputs=True, queries=list(range(m - 1, m - 1 + steps)))) as rec_text:
        model(input_ids=seq[None])
    z_text = rec_text.stats.head_outputs[:, 0].float()
    vhd = (z_image - z_text).norm(dim=-1).permute(2, 0, 1).cpu()  # [steps, L, H]
    return VHDReading(vhd=vhd, generated=generated.tolist())


def score(model: HeadModel, samples: Sequence[VisionSample], max_new_tokens: int = 8, progress: bool = True) -> HeadScores:
    """Mean VHD of every head over all generated tokens of all samples."""
    if not samples:
        raise HeadlabError("the VHD analysis needs at least one image + prompt sample")
    L, H = model.spec.shape
    sums, count = torch.zeros(L, H, dtype=torch.float64), 0
    for sample in tqdm(samples, desc="vhd", disable=not progress):
        reading = vhd_sample(model, sample, max_new_tokens)
        sums += reading.vhd.double().sum(0)
        count += reading.vhd.shape[0]
    return HeadScores(sums=sums, counts=torch.full((L, H), float(count), dtype=torch.float64), analysis="vhd",
                      model=model.name, params={"max_new_tokens": max_new_tokens, "samples": len(samples)})


def _top_per_layer(vhd: torch.Tensor, k: int, layers: Sequence[int] | None) -> list[tuple[int, int]]:
    chosen = []
    for layer in layers if layers is not None else range(vhd.shape[0]):
        for head in torch.topk(vhd[layer], min(k, vhd.shape[1])).indices.tolist():
            chosen.append((layer, head))
    return chosen


@dataclass
class VHRGeneration:
    generated: list[int]
    reinforced: list[list[tuple[int, int]]]
    """Per step, the heads whose output was scaled by α."""


def vhr_generate(model: HeadModel, sample: VisionSample, alpha: float = 1.5, k: int = 2, max_new_tokens: int = 8,
                 layers: Sequence[int] | None = None, eos_token_id: int | None = None) -> VHRGeneration:
    """Greedy generation with VHR: per step, the top-k heads per layer by that step's VHD scaled by α.
    α = 1 is plain greedy generation."""
    from transformers import DynamicCache

    if alpha < 0:
        raise HeadlabError(f"VHR's alpha must be >= 0 (> 1 reinforces), got {alpha}")
    if k < 1:
        raise HeadlabError(f"VHR's k (heads per layer) must be >= 1, got {k}")
    for layer in layers or []:
        if not 0 <= layer < model.spec.n_layers:
            raise HeadlabError(f"VHR layer {layer} does not exist (layers 0..{model.spec.n_layers - 1})")
    ids, pixels = _check(model, sample)
    probe = StatsRequest(head_outputs=True, queries=slice(-1, None))
    image_cache, text_cache = DynamicCache(), DynamicCache()
    image_in: dict[str, Any] = {"input_ids": ids[None], "pixel_values": pixels}
    text_in: dict[str, Any] = {"input_ids": without_image(model.spec, ids)[None]}
    generated, reinforced = [], []
    for _ in range(max_new_tokens):
        with model.patched(None, probe) as rec_text:
            model(**text_in, past_key_values=text_cache, use_cache=True)
        start = image_cache.get_seq_length()
        with model.patched(None, probe) as rec_image:
            model(**image_in, past_key_values=image_cache, use_cache=True)
        image_cache.crop(start - image_cache.get_seq_length())  # drop the probe's keys: the planned pass writes them
        vhd = (rec_image.stats.head_outputs[:, 0, :, -1].float() - rec_text.stats.head_outputs[:, 0, :, -1].float()).norm(dim=-1)
        heads = _top_per_layer(vhd, k, layers)
        plan = InterventionPlan().scale_heads({h: alpha for h in heads})
        with model.patched(plan):
            logits = model(**image_in, past_key_values=image_cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        generated.append(token)
        reinforced.append(heads)
        if eos_token_id is not None and token == eos_token_id:
            break
        nxt = torch.tensor([[token]], device=model.device)
        image_in, text_in = {"input_ids": nxt}, {"input_ids": nxt}
    return VHRGeneration(generated=generated, reinforced=reinforced)


__all__ = ["VHDReading", "VHRGeneration", "VisionSample", "score", "vhd_sample", "vhr_generate"]
