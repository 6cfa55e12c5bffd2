"""Visual attention sinks and VAR — Kang et al. (ICLR 2025), "See What You Are Told: Visual
Attention Sink in Large Multimodal Models".

1. Sink dimensions: the hidden-state dimensions where the text sink (the first token) is massive;
   here the `n_dims` largest |h_d| of the first token at `layer`.
2. Visual sink tokens: image tokens whose hidden state is massive in those dimensions,
   φ(x) = max_{d ∈ sink dims} |x_d| / RMS(x) ≥ τ (the paper's τ = 20).
3. Image-centric heads: heads that look at the image (mass on image tokens ≥ `min_image_mass`
   from the last prompt token) and mostly at its non-sink tokens (visual non-sink ratio
   Σ_{image \\ sinks} A / Σ_{image} A ≥ ρ = 0.6).
4. VAR: in the image-centric heads, a fraction p of the attention on the visual sink tokens moves
   to the other image tokens in proportion to their attention (`InterventionPlan.redistribute`,
   applied inside the patched attention; the Triton kernels defer it to the exact reference).

Named differences: the paper selects sink dimensions from the model's known massive-activation
dimensions across many inputs and measures image-centric heads over all text queries; here both
come from the one input (first token; last prompt token), which is what a per-prompt
intervention can use.
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass

import torch

from headlab.errors import HeadlabError
from headlab.registry import analysis
from headlab.mask import Head
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest
from headlab.vision import image_positions

from .vision_heads import VISION_DATASETS, VISION_HELP, VisionSample, _check, answers_frame, evaluate, job_questions, to_sample


@dataclass
class VisualSinks:
    layer: int
    sink_dims: list[int]
    phi: torch.Tensor
    """[T] φ of every token at `layer`."""
    image: list[int]
    sinks: list[int]
    """Image-token positions with φ ≥ τ."""
    image_mass: torch.Tensor
    """[L, H] attention of the last prompt token on the image tokens."""
    non_sink_ratio: torch.Tensor
    """[L, H] share of that image attention on non-sink image tokens."""
    image_centric: list[Head]

    def plan(self, p: float = 0.6, heads: list[Head] | None = None) -> InterventionPlan:
        """VAR: redistribute a fraction p from the visual sinks to the other image tokens in the
        image-centric heads (or in `heads`: the random-head control uses as many other heads)."""
        if not self.sinks:
            raise HeadlabError("no visual sink tokens were found (no image token reaches φ ≥ τ): VAR has nothing to "
                               "redistribute; lower tau or check the sink layer")
        if not self.image_centric:
            raise HeadlabError("no image-centric heads were found: lower rho or min_image_mass")
        targets = [j for j in self.image if j not in set(self.sinks)]
        return InterventionPlan().redistribute(self.image_centric if heads is None else heads, self.sinks, targets, p)


@torch.no_grad()
def find(model: HeadModel, sample: VisionSample, layer: int | None = None, tau: float = 20.0, n_dims: int = 2,
         rho: float = 0.6, min_image_mass: float = 0.2) -> VisualSinks:
    """Sink dimensions, visual sink tokens and image-centric heads of one image + prompt."""
    ids, pixels = _check(model, sample)
    L = model.spec.n_layers
    layer = L // 2 if layer is None else layer
    if not 0 <= layer <= L:
        raise HeadlabError(f"layer {layer} is outside the hidden states 0..{L} (0 = embeddings)")
    image = image_positions(model.spec, ids.cpu()).tolist()
    out = model(input_ids=ids[None], pixel_values=pixels, output_hidden_states=True)
    h = out.hidden_states[layer][0].float()  # [T, d]
    rms = h.pow(2).mean(-1).sqrt().clamp_min(1e-12)
    dims = h[0].abs().topk(n_dims).indices
    phi = (h[:, dims].abs().max(-1).values / rms).cpu()
    sinks = [j for j in image if float(phi[j]) >= tau]
    non_sinks = [j for j in image if j not in set(sinks)]
    spans = {"image": image, "image_non_sink": non_sinks or [image[0]]}
    with model.patched(None, StatsRequest(spans=spans, queries=slice(-1, None))) as rec:
        model(input_ids=ids[None], pixel_values=pixels)
    mass = rec.stats.span_mass("image")[:, 0, :, 0].float().cpu()
    non_sink = rec.stats.span_mass("image_non_sink")[:, 0, :, 0].float().cpu() if non_sinks else torch.zeros_like(mass)
    ratio = torch.where(mass > 0, non_sink / mass.clamp_min(1e-12), torch.zeros_like(mass))
    centric = [(l, h_) for l, h_ in ((mass >= min_image_mass) & (ratio >= rho)).nonzero().tolist()]
    return VisualSinks(layer=layer, sink_dims=dims.tolist(), phi=phi, image=image, sinks=sinks, image_mass=mass,
                       non_sink_ratio=ratio, image_centric=centric)


__all__ = ["VisualSinks", "find"]


@analysis("var", "intervene",
          summary="VAR (Kang et al.): visual sink tokens, image-centric heads, attention redistributed; answers before and after.",
          paper="Kang et al. 2025, See What You Are Told: Visual Attention Sink in Large Multimodal Models (VAR)",
          datasets=VISION_DATASETS, writes=("answers", "visual_sinks", "summary"), files=("data",), folders=("images",),
          help={**VISION_HELP, "n": "zoo questions per kind when no --data",
                "p": "fraction of the visual sinks' attention redistributed",
                "tau": "phi threshold of a visual sink token", "rho": "visual non-sink ratio of an image-centric head",
                "layer": "hidden-state layer of the sink test (default: the middle)",
                "seed": "seed of the random heads of the control"}, modality="vision-language")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        images: str | None = None, template: str | None = None, n: int = 24, p: float = 0.6, tau: float = 20.0,
        rho: float = 0.6, layer: int | None = None, max_new_tokens: int = 3, draws: int = 1, seed: int = 0,
        progress: bool = True) -> Path:
    """VAR: per question, find the visual sink tokens and image-centric heads, redistribute; answers
    before/after, and with the same redistribution in as many random heads (the control)."""
    from headlab import jobs

    questions = job_questions(model, data, images, template, n, ("color", "where", "object", "pope"))
    jobs.check_fraction(p, "--p")
    jobs.check_count(draws, "--draws", 0)
    if not 0.0 <= rho <= 1.0 or not tau > 0:
        raise HeadlabError(f"--rho must be in [0, 1] and --tau > 0, got rho={rho}, tau={tau}")
    params = {"data": data, "images": images, "template": template, "n": n, "p": p, "tau": tau, "rho": rho,
              "layer": layer, "max_new_tokens": max_new_tokens, "draws": draws, "seed": seed}
    with jobs.started(out, "var", model, params, run_id) as (run, hm):
        found, plans, controls = [], [], [[] for _ in range(draws)]
        for i, q in enumerate(questions):  # two forwards each: recorded for every question, resumed or not
            sinks = find(hm, to_sample(hm, q), layer=layer, tau=tau, rho=rho)
            found.append({"sinks": sinks.sinks, "image_centric": [list(h) for h in sinks.image_centric],
                          "max_phi_on_image": float(sinks.phi[sinks.image].max())})
            active = bool(sinks.sinks and sinks.image_centric)
            plans.append(sinks.plan(p) if active else None)  # nothing to move: as is
            sets = jobs.random_head_sets(hm.spec.shape, sinks.image_centric, draws, seed + 1000 * i) if active else []
            for d in range(draws):
                controls[d].append(sinks.plan(p, sets[d]) if d < len(sets) else None)
        cache = jobs.checkpoint(run)
        before = evaluate(hm, questions, max_new_tokens=max_new_tokens, progress=progress, cache=cache, tag="before:")
        after = evaluate(hm, questions, max_new_tokens=max_new_tokens, progress=progress, plans=plans,
                         cache=cache, tag="after:")
        randoms = [evaluate(hm, questions, max_new_tokens=max_new_tokens, progress=progress, plans=controls[d], cache=cache,
                            tag=f"random{d}:") for d in range(draws)]
        for r in randoms:
            r.pop("rows")
        run.save_samples(answers_frame(before, after), "answers")
        with_sinks = sum(bool(f["sinks"]) for f in found)
        summary = {"questions": len(questions), "questions_with_visual_sinks": with_sinks, "before": before, "after": after,
                   "random": randoms,
                   "note": None if with_sinks else f"no image token reached phi >= {tau}: VAR changed nothing"}
        run.save_json(found, "visual_sinks")
        return jobs.finish(run, summary, {})
