"""headlab inside TransformerLens: a `TransformerBridge` whose attention is headlab's patched attention.

    bridge = headlab.integrations.transformer_lens.to_bridge(model)   # a HeadModel -> its bridge
    model = headlab.load_model(bridge)                                 # a bridge -> a HeadModel
    with model.patched(plan, stats) as rec:
        logits, cache = bridge.run_with_cache(tokens)                  # TL hooks see the intervened values

TransformerLens (4.3) wraps the Hugging Face model in place — the bridge's blocks and attention
components replace the model's own modules and share its weights — and reimplements attention
eagerly, with the whole N×N matrix, so its `hook_attn_scores` / `hook_pattern` can fire. Here each
attention component instead hands its input to the wrapped Hugging Face attention module, which
runs headlab's attention function: plans apply and stats are recorded as in `HeadModel.patched`,
and the bridge's hook points fire on the values that function produced — `hook_in`, `hook_q` /
`hook_k` / `hook_v` (the projections' outputs, before the rotary embedding), `hook_rot_q` /
`hook_rot_k` (after it), `hook_z` (the head outputs as they enter W_O, after the plan),
`hook_out`, and every block and residual hook.

`hook_attn_scores` (pre-softmax, with the plan's logit scale and key bias; masked keys −inf) and
`hook_pattern` (after ACT / VAR) are computed only for layers where a hook — or `run_with_cache`
without a names filter — asks for them: [batch, heads, queries, keys] fp32 each, O(N²) memory per
layer (4k tokens × 32 heads: 2 GiB a layer). Filter the cache (`names_filter`) to keep long inputs
linear. Patterns, scores and rotated q / k are observations: a hook that returns a changed one
raises (change attention with an InterventionPlan). `use_attn_result` (`hook_result`) and
`use_split_qkv_input` are not supported on this path and raise.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from headlab import attention
from headlab.errors import HeadlabError, PlanError, UnsupportedArchitectureError
from headlab.model import HeadModel, adopt, use_headlab_attention

BRIDGE_ATTR = "_headlab_bridge"


def _bridge_class() -> Any:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:  # pragma: no cover - the [tl] extra is part of [test]
        raise HeadlabError("TransformerLens is not installed: pip install 'headlab[tl]'") from exc
    return TransformerBridge


def is_bridge(obj: Any) -> bool:
    try:
        return isinstance(obj, _bridge_class())
    except HeadlabError:
        return False


def _has_hooks(hook_point: Any) -> bool:
    return hook_point is not None and bool(getattr(hook_point, "_forward_hooks", None))


def _observe(hook_point: Any, value: torch.Tensor, name: str) -> None:
    got = hook_point(value)
    if got is not value and not (isinstance(got, torch.Tensor) and got.shape == value.shape and torch.equal(got, value)):
        raise PlanError(f"a hook changed {name}; under headlab's attention patterns are observed, not edited — "
                        "change attention with an InterventionPlan (scale_logits, key_bias, act, ...) instead")


def _headlab_attention_forward(component: Any, *args: Any, **kwargs: Any) -> Any:
    """The bridge attention component's forward under headlab: hook_in → the wrapped Hugging Face
    attention (→ headlab's attention function) → hook_out, with the pattern hooks on demand."""
    if getattr(component.config, "use_attn_result", False) or getattr(component.config, "use_split_qkv_input", False):
        raise UnsupportedArchitectureError("use_attn_result / use_split_qkv_input are not supported under headlab's "
                                           "attention; read per-head outputs at hook_z (or a StatsRequest(head_outputs=True))")
    hf_attn = component.original_component
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = component.hook_in(kwargs["hidden_states"])
    else:
        args = (component.hook_in(args[0]), *args[1:])
    want = set()
    if _has_hooks(component.hook_pattern) or _has_hooks(component.hook_attn_scores):
        want.add("pattern")
    if _has_hooks(getattr(component, "hook_rot_q", None)) or _has_hooks(getattr(component, "hook_rot_k", None)):
        want.add("qk")
    setattr(hf_attn, attention.OBSERVE_ATTR, want)
    try:
        output = hf_attn(*args, **kwargs)
        observed = hf_attn.__dict__.pop(attention.OBSERVED_ATTR, {})
    finally:
        setattr(hf_attn, attention.OBSERVE_ATTR, None)
    if want and not observed:
        raise PlanError(f"{component.name}: a hook asks to see the attention's pattern or rotated q/k, but this call "
                        "produced none (per-row plans and attribution captures do not); remove that hook for it")
    if "qk" in want:
        _observe(component.hook_rot_q, observed["q"], "hook_rot_q")
        _observe(component.hook_rot_k, observed["k"], "hook_rot_k")
    if "pattern" in want:
        _observe(component.hook_attn_scores, observed["scores"], "hook_attn_scores")
        _observe(component.hook_pattern, observed["pattern"], "hook_pattern")
    attn_out, rest = (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, ())
    attn_out = component.hook_out(attn_out)
    return (attn_out, *rest) if isinstance(output, tuple) else attn_out


def _install(bridge: Any, model: HeadModel) -> None:
    """Point each of the bridge's attention components at headlab's attention, checking that each
    wraps an attention module `model` patches."""
    patched = {id(m) for m in model._modules}
    components = [getattr(block, "attn", None) for block in getattr(bridge, "blocks", [])]
    if not components or any(c is None for c in components):
        raise UnsupportedArchitectureError(f"the bridge of {model.spec.architecture} has no attention component per block")
    for component in components:
        original = getattr(component, "original_component", None)
        if original is None or id(original) not in patched:
            raise UnsupportedArchitectureError(
                f"{component.name} ({type(component).__name__}) wraps {type(original).__name__}, which is not an attention "
                f"module headlab patches in {model.spec.architecture}; its attention would run without headlab")
        # GeneralizedComponent.__setattr__ passes attributes through to the wrapped module: bypass it.
        object.__setattr__(component, "forward", types.MethodType(_headlab_attention_forward, component))
    use_headlab_attention(model.model)
    # Not a submodule: the bridge holds the model, so registering it would loop state_dict() / save_pretrained.
    object.__setattr__(model.model, BRIDGE_ATTR, bridge)


def to_bridge(model: HeadModel, **boot_kwargs: Any) -> Any:
    """The TransformerBridge of a HeadModel: built once over `model.model` (shared weights; the
    bridge's components replace the model's modules in place, so the HeadModel keeps working and
    its forwards fire the bridge's hooks), attention routed through headlab."""
    existing = getattr(model.model, BRIDGE_ATTR, None)
    if existing is not None:
        return existing
    if model.model.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        raise HeadlabError(f"{model.name} was loaded with attn_implementation={model.model.config._attn_implementation!r}; "
                           "load it with headlab's attention (the default) to bridge it")
    source = getattr(model.model.config, "_name_or_path", "") or ""
    if not source:
        raise HeadlabError(f"{model.name}'s config names no source (config._name_or_path); TransformerBridge needs one "
                           "to read the architecture from")
    bridge = _bridge_class().boot_transformers(source, hf_model=model.model, tokenizer=model.text_tokenizer,
                                               device=model.device, dtype=model.dtype, **boot_kwargs)
    _install(bridge, model)
    return bridge


def from_bridge(bridge: Any, name: str | None = None) -> HeadModel:
    """A HeadModel over a TransformerBridge's Hugging Face model (the same weights), with the
    bridge's attention routed through headlab: `headlab.load_model(bridge)` calls this."""
    existing = getattr(bridge.original_model, BRIDGE_ATTR, None)
    if existing is not None and existing is not bridge:
        raise HeadlabError("this Hugging Face model already belongs to another bridge")
    hf_model = bridge.original_model
    model = adopt(hf_model, getattr(bridge, "tokenizer", None),
                  name or getattr(bridge.cfg, "model_name", None) or getattr(hf_model.config, "_name_or_path", "bridge"),
                  "transformer_lens")
    _install(bridge, model)
    return model
