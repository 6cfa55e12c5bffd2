"""headlab inside nnsight: plans and stats on `LanguageModel.trace(...)` and `.generate(...)`.

nnsight wraps the same Hugging Face model (no copy) and runs its forward, so a trace inside
`HeadModel.patched(plan, stats)` goes through headlab's attention: the plan applies and the stats
are recorded for every invoke of the trace (the invokes run as one batch: stats have one row per
prompt, in invoke order), and nnsight's own edits of module outputs compose with the plan in the
same forward.

    lm = headlab.integrations.nnsight.language_model(model)     # HeadModel -> nnsight LanguageModel
    with model.patched(plan, headlab.StatsRequest(entropy=True)) as rec:
        with lm.trace() as tracer:
            with tracer.invoke("def f(x):"):
                z = head_outputs(lm, 3).save()                   # [B, T, H, D]: per-head outputs after the plan
            with tracer.invoke(["import os", "x = 1"]):
                lm.model.layers[0].mlp.output[:] = 0             # nnsight's own intervention, same forward
    rec.stats.entropy                                          # [L, 3, H, T]: both invokes

`headlab.load_model(lm)` (→ `from_nnsight`) gives the reverse: a HeadModel whose forwards and
generations run through `lm.trace` / `lm.generate`, so every analysis can run the nnsight way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from headlab.errors import HeadlabError, UnsupportedArchitectureError
from headlab.model import HeadModel, adopt

LM_ATTR = "_headlab_nnsight"


def _nnsight() -> Any:
    try:
        import nnsight
    except ImportError as exc:  # pragma: no cover - the [nnsight] extra is part of [test]
        raise HeadlabError("nnsight is not installed: pip install 'headlab[nnsight]'") from exc
    return nnsight


def is_nnsight_model(obj: Any) -> bool:
    """True for an nnsight model over a Hugging Face model (LanguageModel, TransformersModel)."""
    try:
        nnsight = _nnsight()
    except HeadlabError:
        return False
    kinds = tuple(k for k in (getattr(nnsight, "LanguageModel", None), getattr(nnsight, "TransformersModel", None)) if k)
    return isinstance(obj, kinds)


def language_model(model: HeadModel) -> Any:
    """An nnsight LanguageModel over `model.model` (shared weights), built once per model."""
    existing = getattr(model.model, LM_ATTR, None)
    if existing is not None:
        return existing
    if model.spec.modality != "text":
        raise UnsupportedArchitectureError(f"{model.name} is a vision-language model; the nnsight route covers text models")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight 0.8 marks LanguageModel deprecated in favour of a hub-only constructor
        lm = _nnsight().LanguageModel(model.model, tokenizer=model.text_tokenizer)
    setattr(model.model, LM_ATTR, lm)
    return lm


def head_outputs(lm: Any, layer: int) -> Any:
    """Inside a trace: the per-head outputs z of `layer` as they enter the output projection
    (after the headlab plan), [B, T, H, D] — the input of `model.layers[layer].self_attn.o_proj`."""
    proj = lm.model.layers[layer].self_attn.o_proj.input
    n_heads = lm.config.num_attention_heads
    return proj.view(*proj.shape[:-1], n_heads, -1)


@dataclass(eq=False)
class NNsightHeadModel(HeadModel):
    """A HeadModel whose forwards and generations run through nnsight (`lm.trace` / `lm.generate`)."""

    lm: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model_inputs, rest = _split(args, kwargs)
        with torch.no_grad(), self.lm.trace(model_inputs, **rest):
            out = self.lm.output.save()
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        model_inputs, rest = _split(args, kwargs)
        with torch.no_grad(), self.lm.generate(model_inputs, **rest):
            out = self.lm.generator.output.save()
        return out


def _split(args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the token inputs nnsight batches — input_ids, attention_mask — , every other keyword) of a
    model-style call (input_ids may come first, positionally)."""
    rest = dict(kwargs)
    if args:
        rest["input_ids"] = args[0]
    return {k: rest.pop(k) for k in ("input_ids", "attention_mask") if k in rest}, rest


def from_nnsight(lm: Any, name: str | None = None) -> HeadModel:
    """A HeadModel over an nnsight LanguageModel's Hugging Face model (the same weights), running
    its forwards through the LanguageModel; attention is switched to headlab's (`load_model(lm)`)."""
    hf_model = getattr(lm, "_module", None)
    if hf_model is None or not hasattr(hf_model, "config"):
        raise HeadlabError(f"{type(lm).__name__} wraps no Hugging Face model headlab can read (no ._module.config); "
                           "load it with its weights (not dispatch=False / meta)")
    model = adopt(hf_model, getattr(lm, "tokenizer", None), name or getattr(hf_model.config, "_name_or_path", "") or "nnsight",
                  "nnsight", cls=NNsightHeadModel, text_only=True, lm=lm)
    setattr(hf_model, LM_ATTR, lm)
    return model
