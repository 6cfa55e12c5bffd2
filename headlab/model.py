"""`load_model` and `HeadModel`: a Hugging Face model with headlab's patched attention plugged in."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterator

import torch

from headlab import attention
from headlab.errors import HeadlabError, ModelNotFoundError, PlanError, UnsupportedArchitectureError
from headlab.plan import InterventionPlan
from headlab.spec import ModelSpec
from headlab.stats import StatsRequest

log = logging.getLogger("headlab")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a transformers model: those with a layer_idx and is_causal."""
    found = []
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal") and not getattr(module, "is_cross_attention", False):
            found.append(module)
    return found


@dataclass
class HeadModel:
    """A loaded model, its tokenizer/processor and its `ModelSpec`.

    Call it like the underlying model (no gradients); use `patched(plan, stats)` to apply
    interventions and record per-head stats.
    """

    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec
    name: str
    revision: str | None = None
    backend: str = "hf"

    def __post_init__(self) -> None:
        self._modules = attention_modules(self.model)
        if not self._modules:
            raise UnsupportedArchitectureError(
                f"{self.spec.architecture} has no attention modules headlab can patch (none with layer_idx routed "
                "through transformers' attention registry)"
            )
        if self.model.config._attn_implementation == attention.ATTN_IMPLEMENTATION:
            reason = unsupported_attention(self._modules)
            if reason:
                raise UnsupportedArchitectureError(
                    f"{self.spec.architecture}: {reason}; headlab's patched attention does not implement it yet, so "
                    "its numbers would be wrong. Load it with attn_implementation='eager' to compare without patching.")
        self._active: attention.PatchSession | None = None

    # ---- running ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def multi_device(self) -> bool:
        """True when the model's layers sit on several devices (loaded with a `device_map`)."""
        if not hasattr(self, "_multi_device"):
            self._multi_device = len({p.device for p in self.model.parameters()}) > 1
        return self._multi_device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass of the wrapped model without gradients."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`model.generate(...)` of the wrapped model (runs through the patched attention too)."""
        with torch.no_grad():
            return self.model.generate(*args, **kwargs)

    def greedy_decode(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Greedy generation with the decode step replayed from a CUDA graph where it can be
        (`headlab.decode.greedy_decode`): the tokens `generate(do_sample=False)` returns, at GPU speed."""
        from headlab.decode import greedy_decode

        return greedy_decode(self, input_ids, max_new_tokens, **kwargs)

    @property
    def text_tokenizer(self) -> Any:
        """The tokenizer of text: `tokenizer` itself, or a vision-language processor's `.tokenizer`."""
        return getattr(self.tokenizer, "tokenizer", self.tokenizer)

    def tokenize(self, text: str | list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Tokenize text to tensors on the model's device."""
        if self.tokenizer is None:
            raise HeadlabError(f"{self.name} was loaded without a tokenizer; pass input_ids directly")
        enc = self.text_tokenizer(text, return_tensors="pt", **kwargs)  # text alone: a VLM processor would read it as images
        return {k: v.to(self.device) for k, v in enc.items()}

    # ---- patching --------------------------------------------------------------------------
    @contextlib.contextmanager
    def patched(self, plan: InterventionPlan | None = None, stats: StatsRequest | None = None, *,
                row_plans: Sequence[InterventionPlan] | None = None,
                capture: attention.AttributionCapture | None = None) -> Iterator[attention.PatchSession]:
        """Apply `plan` and record `stats` in every forward run inside the context.

        Yields the session; after the forwards, `rec.stats` is a `HeadStats`.
        `row_plans` (one per batch row, each added to `plan`) lets the rows of one batch run
        different plans — several single-head ablations × the prompts in one pass; rows that share
        a plan object run their attention together. `capture` is `headlab.attribution`'s hook
        (an unpatched forward that records head outputs for gradients).
        """
        if self.model.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
            raise HeadlabError(
                f"{self.name} runs attention '{self.model.config._attn_implementation}', not 'headlab': load it with "
                "headlab.load_model(...) (default attn_implementation='headlab') to patch it"
            )
        if self._active is not None:
            raise PlanError("patched() contexts do not nest: combine the plans instead (plan_a + plan_b)")
        plan = plan or InterventionPlan()
        if not isinstance(plan, InterventionPlan):
            raise PlanError(f"plan must be an InterventionPlan, got {type(plan).__name__}")
        if stats is not None and not isinstance(stats, StatsRequest):
            raise PlanError(f"stats must be a StatsRequest, got {type(stats).__name__}")
        plan.validate(self.spec)
        if stats is not None:
            stats.validate(self.spec)
        rows = None
        if row_plans is not None:
            if stats is not None or capture is not None:
                raise PlanError("row_plans run plans only: record stats or attributions in a separate patched() call")
            combined: dict[int, InterventionPlan] = {}
            for i, p in enumerate(row_plans):
                if not isinstance(p, InterventionPlan):
                    raise PlanError(f"row_plans[{i}] must be an InterventionPlan, got {type(p).__name__}")
                if id(p) not in combined:
                    p.validate(self.spec)
                    combined[id(p)] = plan + p if not plan.is_empty() else p
            rows = [combined[id(p)] for p in row_plans]
        if capture is not None and (stats is not None or not plan.is_empty()):
            raise PlanError("an attribution capture runs the clean model: no plan or stats in the same patched() call")
        if capture is not None:
            capture.ablation.validate(self.spec)
        session = attention.PatchSession(plan=plan, request=stats, n_heads=self.spec.n_heads, head_dim=self.spec.head_dim,
                                         row_plans=rows, capture=capture)
        if self.multi_device:
            session.stats.home = self.device  # a model split over GPUs: stats gathered on its first device
        self._active = session
        for module in self._modules:
            setattr(module, attention.SESSION_ATTR, session)
        try:
            yield session
        finally:
            for module in self._modules:
                if hasattr(module, attention.SESSION_ATTR):
                    delattr(module, attention.SESSION_ATTR)
            self._active = None

    def plan(self) -> InterventionPlan:
        """An empty plan bound to this model's shape."""
        return InterventionPlan().for_model(self.spec)

    def info(self) -> str:
        from headlab.kernels import active_kernel

        return f"{self.spec}\nattention      {self.model.config._attn_implementation} -> {active_kernel(str(self.device))} on {self.device}"


def unsupported_attention(modules: Any) -> str | None:
    """Why these attention modules cannot run the patched attention, found from their parameters at load
    time (not at the first forward): learned per-head sinks (GPT-OSS's `sinks`, passed as `s_aux`) and
    relative position biases added to the logits (T5's `position_bias`)."""
    for module in modules:
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            return f"{type(module).__name__} has learned attention sinks (`sinks`, passed to the attention as `s_aux`)"
        if getattr(module, "has_relative_attention_bias", None) is not None or hasattr(module, "relative_attention_bias"):
            return f"{type(module).__name__} adds a relative position bias to its logits (`position_bias`)"
    return None


def _resolve_source(name_or_path: str | Path) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is_local)."""
    text = str(name_or_path)
    if text.startswith("zoo:"):
        from headlab import zoo

        return str(zoo.path(text[4:])), True
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but has no config.json: point to a directory saved with save_pretrained")
        return str(path), True
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    _check_hub_reachable(text)
    return text, False


def _check_hub_reachable(name: str, timeout: float = 2.0) -> None:
    """Fail fast for a hub name that cannot load: not cached locally and the hub offline or unreachable
    (transformers would otherwise retry for half a minute before saying so)."""
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: from_pretrained can load it offline
    where = (f"there is no local directory {name!r} here (write ./{name} for a local path), and {name!r} is not in "
             "the local Hugging Face cache")
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{where}; HF_HUB_OFFLINE is set, so the hub is not asked")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as exc:
        raise ModelNotFoundError(f"{where}; the hub ({endpoint.hostname}) is unreachable ({exc.strerror or exc})") from None


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(
    name_or_path: str | Path | Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = attention.ATTN_IMPLEMENTATION,
    load_tokenizer: bool = True,
    **from_pretrained_kwargs: Any,
) -> HeadModel:
    """Load a Hugging Face model (hub name, local directory or `zoo:<name>`) as a HeadModel.

    Weights load from safetensors only; `trust_remote_code` stays off unless asked.
    `attn_implementation` defaults to "headlab" (the patched attention); "eager" or "sdpa" load
    the model for comparison, without patching. `device_map=` (accelerate, e.g. "auto" or
    {"model.layers.0": 0, ...}) splits a model over GPUs instead of `device`: each layer's patched
    attention runs on its own GPU, plans apply there, and stats are gathered on the first. A TransformerLens `TransformerBridge` or an
    nnsight `LanguageModel` is taken as it is (same weights): its attention is routed through
    headlab (`headlab.integrations`).
    """
    if not isinstance(name_or_path, (str, Path)):
        return _from_object(name_or_path)
    attention.register()
    source, is_local = _resolve_source(name_or_path)
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    config = _load_config(source, is_local, common)
    spec = ModelSpec.from_config(config)
    cls = _model_class(config)
    try:
        model = cls.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True, **common, **from_pretrained_kwargs
        )
    except ValueError as exc:
        if "attn" in str(exc).lower() or "attention" in str(exc).lower():
            raise UnsupportedArchitectureError(
                f"{spec.architecture} cannot run the patched attention: {exc}"
            ) from exc
        raise
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load weights of {source}: {exc} (headlab loads safetensors only)") from exc
    if from_pretrained_kwargs.get("device_map") is None:
        model.to(device)
    model.eval()  # with a device_map (accelerate) the layers stay where it put them: each runs the patched attention there
    tokenizer = _load_tokenizer(source, spec, common) if load_tokenizer else None
    head_model = HeadModel(model=model, tokenizer=tokenizer, spec=spec, name=str(name_or_path), revision=revision)
    log.info("loaded %s: attention %s", name_or_path, attn_implementation)
    return head_model


def use_headlab_attention(hf_model: torch.nn.Module) -> None:
    """Route every attention module of an already loaded model through the "headlab" attention
    function: its config, a nested text config, and any per-layer config copy (TransformerLens
    stamps those "eager")."""
    attention.register()
    hf_model.config._attn_implementation = attention.ATTN_IMPLEMENTATION
    text_config = getattr(hf_model.config, "text_config", None)
    if text_config is not None:
        text_config._attn_implementation = attention.ATTN_IMPLEMENTATION
    for module in attention_modules(hf_model):
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = attention.ATTN_IMPLEMENTATION


def adopt(hf_model: torch.nn.Module, tokenizer: Any, name: str, backend: str, cls: type[HeadModel] = HeadModel,
          text_only: bool = False, **fields: Any) -> HeadModel:
    """A HeadModel (`cls`) over a Hugging Face model another tool loaded (the same weights). A model
    headlab cannot patch — or, with `text_only`, a vision-language one — is refused before anything
    is changed; then its attention is switched to headlab's."""
    reason = unsupported_attention(attention_modules(hf_model))
    if reason:
        raise UnsupportedArchitectureError(f"{type(hf_model).__name__}: {reason}; headlab's patched attention does not "
                                           "implement it yet, so its numbers would be wrong")
    spec = ModelSpec.from_config(hf_model.config)
    if text_only and spec.modality != "text":
        raise UnsupportedArchitectureError(f"{spec.architecture} is a vision-language model; the {backend} route covers "
                                           "text models")
    use_headlab_attention(hf_model)
    return cls(model=hf_model, tokenizer=tokenizer, spec=spec, name=name, backend=backend, **fields)


def _from_object(obj: Any) -> HeadModel:
    """A HeadModel over a model object another tool already loaded (TransformerLens, nnsight)."""
    from headlab.integrations import nnsight as nns
    from headlab.integrations import transformer_lens as tl

    if tl.is_bridge(obj):
        return tl.from_bridge(obj)
    if nns.is_nnsight_model(obj):
        return nns.from_nnsight(obj)
    raise HeadlabError(f"load_model takes a hub name, a local path, zoo:<name>, a TransformerLens TransformerBridge or an "
                       f"nnsight LanguageModel; got {type(obj).__name__}")


def _load_config(source: str, is_local: bool, common: dict[str, Any]) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        if is_local:
            raise ModelNotFoundError(f"cannot read the config of {source}: {exc}") from exc
        raise ModelNotFoundError(
            f"{source!r} is not a local directory and could not be loaded from the Hugging Face hub "
            f"(offline, or no such repo?): {exc}. Pass the path of a local model directory instead."
        ) from exc


def load_spec(name_or_path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """A model's ModelSpec from its config alone (no weights): to check arguments against the model's
    shape before loading it or opening a run."""
    source, is_local = _resolve_source(name_or_path)
    return ModelSpec.from_config(_load_config(source, is_local, dict(revision=revision, trust_remote_code=trust_remote_code)))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "processor_config.json")


def _load_tokenizer(source: str, spec: ModelSpec, common: dict[str, Any]) -> Any:
    import transformers

    loader = transformers.AutoProcessor if spec.modality == "vision-language" else transformers.AutoTokenizer
    local = Path(source)
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        return loader.from_pretrained(source, **common)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer/processor loaded for %s: %s", source, exc)
        return None
