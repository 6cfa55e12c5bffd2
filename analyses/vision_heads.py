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
the probe measures VHD on the unreinforced pass of that step, for all layers at once. At step 0
the planned pass is the prompt's prefill, so the prompt's cached keys and values carry step 0's
reinforcement (a head-output scale applies to every query of the call it is planned for).
"""

from __future__ import annotations

import random
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.checkpoint import cached
from headlab.errors import HeadlabError
from headlab.registry import analysis
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


def score(model: HeadModel, samples: Sequence[VisionSample], max_new_tokens: int = 8, progress: bool = True,
          cache: MutableMapping[str, Any] | None = None) -> tuple[HeadScores, torch.Tensor]:
    """Mean VHD of every head over all generated tokens of all samples, and each sample's mean
    VHD ([n_samples, L, H]). `cache` (a run's Checkpoint) keeps finished samples for a resume."""
    if not samples:
        raise HeadlabError("the VHD analysis needs at least one image + prompt sample")
    L, H = model.spec.shape
    sums, count, per_sample = torch.zeros(L, H, dtype=torch.float64), 0, []
    for i, sample in enumerate(tqdm(samples, desc="vhd", disable=not progress)):
        def compute(sample=sample):
            reading = vhd_sample(model, sample, max_new_tokens)
            return {"vhd": reading.vhd.tolist(), "generated": reading.generated}

        vhd = torch.tensor(cached(cache, str(i), compute)["vhd"], dtype=torch.float64).view(-1, L, H)
        sums += vhd.sum(0)
        count += vhd.shape[0]
        per_sample.append(vhd.mean(0))
    scores = HeadScores(sums=sums, counts=torch.full((L, H), float(count), dtype=torch.float64), analysis="vhd",
                        model=model.name, params={"max_new_tokens": max_new_tokens, "samples": len(samples)})
    return scores, torch.stack(per_sample)


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
                 layers: Sequence[int] | None = None, eos_token_id: int | None = None,
                 control: random.Random | None = None) -> VHRGeneration:
    """Greedy generation with VHR: per step, the top-k heads per layer by that step's VHD scaled by α.
    α = 1 is plain greedy generation. With `control` (a seeded generator), k heads per layer drawn
    from it at every step are scaled instead: the random-head control."""
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
    L, H = model.spec.shape
    for _ in range(max_new_tokens):
        if control is not None:
            heads = [(layer, h) for layer in (layers if layers is not None else range(L))
                     for h in sorted(control.sample(range(H), min(k, H)))]
        else:
            with model.patched(None, probe) as rec_text:
                model(**text_in, past_key_values=text_cache, use_cache=True)
            start = image_cache.get_seq_length()
            with model.patched(None, probe) as rec_image:
                model(**image_in, past_key_values=image_cache, use_cache=True)
            image_cache.crop(start - image_cache.get_seq_length())  # drop the probe's keys: the planned pass writes them
            vhd = (rec_image.stats.head_outputs[:, 0, :, -1].float()
                   - rec_text.stats.head_outputs[:, 0, :, -1].float()).norm(dim=-1)
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


# ---- datasets and evaluation -------------------------------------------------------------------
@dataclass
class ImageQuestion:
    """A question about an image, with its reference answer (POPE: "yes" / "no")."""

    prompt: str
    image: Any
    """A path, a PIL image, or an HxWx3 uint8 array."""
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


POPE_TEMPLATE = "USER: <image>\n{question} Answer with yes or no. ASSISTANT:"


def pope_dataset(path: str | Path, images: str | Path, template: str = POPE_TEMPLATE) -> list[ImageQuestion]:
    """POPE-format JSONL/CSV (`image` file name, `text` question, `label` yes/no; `question_id`
    optional) with the images under `images`. `template` places the question ({question}) and the
    processor's image placeholder."""
    from headlab.datasets import records_to, text_field

    root = Path(images)
    if not root.is_dir():
        raise HeadlabError(f"image folder {images} does not exist; give the folder that holds the dataset's images")
    if "{question}" not in template:
        raise HeadlabError(f"the template {template!r} has no {{question}} field")

    def convert(r: dict[str, Any]) -> ImageQuestion:
        label = text_field(r, "label").strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"label must be 'yes' or 'no', got {r['label']!r}")
        image = (root / text_field(r, "image")).resolve()
        if not image.is_relative_to(root.resolve()):
            raise ValueError(f"image {r['image']!r} leads outside the image folder {images}; name a file inside it")
        if not image.is_file():
            raise ValueError(f"image {image} does not exist")
        return ImageQuestion(template.format(question=text_field(r, "text")), image, label,
                             {"question_id": r.get("question_id")})

    return records_to(path, convert)


def zoo_questions(kinds: Sequence[str], n: int, seed: int = 70_000, conflict: bool | None = None) -> list[ImageQuestion]:
    """Questions of the toy VLM's task (`headlab.zoo.shapes`), images drawn and seeded."""
    import random as _random

    from headlab.zoo import shapes

    out = []
    for kind in kinds:
        rng = _random.Random(seed + 17 * shapes.KINDS.index(kind))
        for ex in shapes.held_out(kind, n, seed=seed, conflict=conflict):
            out.append(ImageQuestion(ex.prompt, ex.scene.array(rng), ex.answer,
                                     {"kind": kind, "conflict": ex.conflict}))
    return out


def image_array(image: Any) -> Any:
    """An image (path, PIL or HxWx3 array) as an HxWx3 uint8 numpy array."""
    import numpy as np

    if isinstance(image, (str, Path)):
        from headlab.io import read_image

        return np.asarray(read_image(image))
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.uint8)


def to_sample(model: HeadModel, question: ImageQuestion) -> VisionSample:
    """Encode a question with the model's processor (a path is opened as an RGB image)."""
    from headlab.vision import encode

    enc = encode(model, question.prompt, image_array(question.image))
    return VisionSample(enc["input_ids"][0], enc["pixel_values"], question.answer, dict(question.meta))


def _decode(model: HeadModel, ids: Sequence[int]) -> str:
    tok = model.text_tokenizer
    return tok.decode(list(ids), skip_special_tokens=True).strip()


def _first_word(text: str) -> str:
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def evaluate(model: HeadModel, questions: Sequence[ImageQuestion], alpha: float | None = None, k: int = 2,
             max_new_tokens: int = 3, progress: bool = False, plans: Sequence[Any] | None = None,
             cache: MutableMapping[str, Any] | None = None, tag: str = "", control_seed: int | None = None) -> dict[str, Any]:
    """Greedy answers scored against the references: plain, with VHR (`alpha`), or under one plan per
    question (`plans[i]`, an InterventionPlan or None, e.g. VAR's). `cache` (a run's Checkpoint,
    keys prefixed by `tag`) keeps finished answers for a resume. With `alpha` and `control_seed`,
    VHR scales k random heads per layer instead (question i draws from seed control_seed + i).

    accuracy: the answer (its first word for yes/no questions) equals the reference;
    for yes/no questions also POPE's precision / recall / F1 / yes-ratio and the hallucination rate
    (a "yes" when the answer is "no"); for questions with `meta["conflict"]`, accuracy on them.
    """
    tok = model.text_tokenizer

    if plans is not None and len(plans) != len(questions):
        raise HeadlabError(f"{len(plans)} plans for {len(questions)} questions: give one plan (or None) per question")

    def generate(sample: VisionSample, plan: Any, i: int) -> str:
        if alpha is not None:
            rng = None if control_seed is None else random.Random(control_seed + i)
            return _decode(model, vhr_generate(model, sample, alpha, k, max_new_tokens, eos_token_id=tok.eos_token_id,
                                               control=rng).generated)
        ids, pixels = _check(model, sample)
        with model.patched(plan):
            out = model.generate(input_ids=ids[None], pixel_values=pixels, attention_mask=torch.ones_like(ids)[None],
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        return _decode(model, out[0, ids.numel():].tolist())

    rows = []
    for i, q in enumerate(tqdm(questions, desc="vhr" if alpha is not None else "evaluate", disable=not progress)):
        plan = plans[i] if plans is not None else None
        text = cached(cache, f"{tag}{i}", lambda q=q, plan=plan, i=i: generate(to_sample(model, q), plan, i))
        yes_no = q.answer in ("yes", "no")
        got = _first_word(text) if yes_no else text
        rows.append({"answer": q.answer, "generated": text, "correct": got == q.answer, "yes_no": yes_no,
                     "said_yes": yes_no and got == "yes", **q.meta})
    result: dict[str, Any] = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1)}
    yn = [r for r in rows if r["yes_no"]]
    if yn:
        tp = sum(r["said_yes"] and r["answer"] == "yes" for r in yn)
        fp = sum(r["said_yes"] and r["answer"] == "no" for r in yn)
        fn = sum(not r["said_yes"] and r["answer"] == "yes" for r in yn)
        negatives = sum(r["answer"] == "no" for r in yn)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        result["pope"] = {"accuracy": sum(r["correct"] for r in yn) / len(yn), "precision": precision, "recall": recall,
                          "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                          "yes_ratio": sum(r["said_yes"] for r in yn) / len(yn),
                          "hallucination_rate": fp / negatives if negatives else 0.0}
    conflict = [r for r in rows if r.get("conflict")]
    if conflict:
        result["conflict_accuracy"] = sum(r["correct"] for r in conflict) / len(conflict)
    result["rows"] = rows
    return result


def job_questions(model: str, data: str | None, images: str | None, template: str | None, n: int,
                  kinds: tuple[str, ...], conflict: bool | None = None) -> list[ImageQuestion]:
    """A vision job's questions: the user's POPE-format file with its images, or zoo:shapes-llava's own."""
    if data:
        if not images:
            raise HeadlabError("give --images (the folder of the dataset's images) with --data")
        return pope_dataset(data, images, template or POPE_TEMPLATE)
    if model == "zoo:shapes-llava":
        return zoo_questions(kinds, n, conflict=conflict)
    raise HeadlabError(f"give --data (POPE-format JSONL: image, text, label) and --images for {model}")


def answers_frame(before: dict, after: dict) -> Any:
    """One row per question: the plain answer's fields, and the answer under the intervention
    (the evaluations' per-question rows are moved out of them)."""
    import pandas as pd

    return pd.DataFrame([{**{f"before_{c}": v for c, v in b.items()}, "after_generated": a["generated"],
                          "after_correct": a["correct"]} for b, a in zip(before.pop("rows"), after.pop("rows"))])


VISION_HELP = {"data": "POPE-format JSONL/CSV: image (file name), text (question), label",
               "images": "folder holding the dataset's images",
               "template": "prompt with {question} and the image placeholder (default: LLaVA-1.5's)",
               "max_new_tokens": "tokens generated per answer", "draws": "random-head control runs (0: none)"}
VISION_DATASETS = "POPE-format questions on images (--data + --images); zoo:shapes-llava brings its own"


@analysis("vision_heads", "score",
          summary="Vision-aware heads (He et al.): VHD, head output with vs without the image, per generated token.",
          paper="He et al. 2025, Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (VHD)",
          datasets=VISION_DATASETS, writes=("vhd", "per_sample", "examples", "summary"), files=("data",),
          folders=("images",), help={**VISION_HELP, "n": "zoo questions per kind when no --data"},
          modality="vision-language")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        images: str | None = None, template: str | None = None, n: int = 24, max_new_tokens: int = 4,
        progress: bool = True) -> Path:
    """VHD per head (He et al.): head output with vs without the image, per generated token."""
    from headlab import jobs

    questions = job_questions(model, data, images, template, n, ("color", "shape", "where"))
    params = {"data": data, "images": images, "template": template, "n": n, "max_new_tokens": max_new_tokens}
    with jobs.started(out, "vision_heads", model, params, run_id) as (run, hm):
        samples = [to_sample(hm, q) for q in questions]
        scores, per_sample = score(hm, samples, max_new_tokens, progress=progress, cache=jobs.checkpoint(run))
        run.save_per_sample({"vhd": per_sample}, [f"question {i}" for i in range(len(questions))])
        run.save_examples([{"text": q.prompt, "label": f"question {i}: answer {q.answer!r}", "image": image_array(q.image)}
                           for i, q in enumerate(questions)])
        summary = {"questions": len(questions), "top_heads": [[l, h, s] for l, h, s in scores.top(10)]}
        return jobs.finish(run, summary, {"vhd": scores})


@analysis("vhr", "intervene",
          summary="VHR: reinforce each step's top-k vision-aware heads per layer; accuracy / POPE metrics before and after.",
          paper="He et al. 2025, Vision-aware Head Reinforcement (VHR) — METHODS.md: VHD / VHR",
          datasets=VISION_DATASETS, writes=("answers", "vhr_setting", "summary"), files=("data",), folders=("images",),
          help={**VISION_HELP, "n": "zoo questions per set when no --data",
                "alpha": "output scale of the reinforced heads (> 1 reinforces)",
                "k": "heads reinforced per layer, chosen by VHD at every step",
                "seed": "seed of the random heads of the control"}, modality="vision-language")
def vhr_job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
            images: str | None = None, template: str | None = None, n: int = 48, alpha: float = 1.5, k: int = 2,
            max_new_tokens: int = 3, draws: int = 1, seed: int = 0, progress: bool = True) -> Path:
    """VHR: answers with and without reinforcing each step's top-k vision-aware heads per layer by
    alpha, and with k random heads per layer reinforced instead (the control)."""
    from headlab import jobs
    from headlab.model import load_spec

    jobs.check_count(k, "--k")
    jobs.check_count(max_new_tokens, "--max-new-tokens")
    jobs.check_count(draws, "--draws", 0)
    if not alpha > 0:
        raise HeadlabError(f"--alpha must be > 0 (the reinforced heads' output scale; > 1 reinforces), got {alpha}")
    questions = job_questions(model, data, images, template, n, ("object", "pope"), conflict=None)
    if model == "zoo:shapes-llava" and not data:
        questions += zoo_questions(("object",), n, seed=71_000, conflict=True)
    params = {"data": data, "images": images, "template": template, "n": n, "alpha": alpha, "k": k,
              "max_new_tokens": max_new_tokens, "draws": draws, "seed": seed}
    if k > load_spec(model).n_heads:
        raise HeadlabError(f"--k {k} is more than the {load_spec(model).n_heads} heads of a layer (VHR reinforces k heads "
                           "per layer)")
    with jobs.started(out, "vhr", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        before = evaluate(hm, questions, None, k, max_new_tokens, progress=progress, cache=cache, tag="before:")
        after = evaluate(hm, questions, alpha, k, max_new_tokens, progress=progress, cache=cache, tag="after:")
        randoms = [evaluate(hm, questions, alpha, k, max_new_tokens, progress=progress, cache=cache, tag=f"random{d}:",
                            control_seed=seed + 100_000 * d) for d in range(draws)]
        for r in randoms:
            r.pop("rows")
        run.save_samples(answers_frame(before, after), "answers")
        run.save_json({"alpha": alpha, "k": k, "per_step": True}, "vhr_setting")
        return jobs.finish(run, {"questions": len(questions), "before": before, "after": after, "random": randoms}, {})




__all__ = ["ImageQuestion", "POPE_TEMPLATE", "VHDReading", "VHRGeneration", "VisionSample", "evaluate", "pope_dataset",
           "score", "to_sample", "vhd_sample", "vhr_generate", "zoo_questions"]
