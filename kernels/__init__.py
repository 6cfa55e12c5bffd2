"""Patched attention kernels (installed as `headlab.kernels`).

`reference.patched_attention` is the exact PyTorch implementation and the specification;
`fused.patched_attention` runs the same computation on the Triton kernels of `triton_attention`.
`patched_attention` here is what the "headlab" attention function calls: it picks the Triton
kernels for CUDA tensors they support and the reference otherwise (CPU, float32, unusual head
sizes — with a one-time warning naming why when the tensors are on a GPU).

HEADLAB_KERNEL chooses: `auto` (default, as above), `reference` (always the reference), or
`triton` (always the kernels; on CPU tensors this needs TRITON_INTERPRET=1, Triton's interpreter,
which is how the parity tests run without a GPU; an unsupported call is an error).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

import torch
from headlab.kernels.reference import patched_attention as reference_attention

KERNEL_ENV = "HEADLAB_KERNEL"
CHOICES = ("auto", "reference", "triton")
_warned: set[str] = set()
_announced: set[str] = set()
log = logging.getLogger("headlab.kernels")


class KernelUnavailableError(RuntimeError):
    """HEADLAB_KERNEL=triton was asked for a call the Triton kernels cannot run."""


def kernel_choice() -> str:
    """The HEADLAB_KERNEL setting, checked."""
    choice = os.environ.get(KERNEL_ENV, "") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton cannot be used here (None when it can be imported). Asked on every patched
    call: a failed import is not retried (it would search the filesystem each time)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"
    return None


def _kernel_for(query, key, value, attention_mask, stats, query_positions, plan=None) -> tuple[str, str | None]:
    """('triton' | 'reference', why not triton)."""
    choice = kernel_choice()
    if choice == "reference":
        return "reference", f"{KERNEL_ENV}=reference"
    if choice == "auto" and query.device.type != "cuda":
        return "reference", f"tensors on {query.device.type}"
    reason = triton_import_error()
    if reason is None and plan is not None and plan.has_var:
        reason = "VAR attention redistribution (the Triton kernels do not implement it)"
    if reason is None:
        from headlab.kernels.fused import unsupported_reason

        reason = unsupported_reason(query, key, value, attention_mask, stats, query_positions)
    if reason is None:
        return "triton", None
    if choice == "triton":
        raise KernelUnavailableError(f"{KERNEL_ENV}=triton, but this call cannot run on the Triton kernels: {reason}. "
                                     f"Unset {KERNEL_ENV} (or set it to 'auto') to fall back to the exact reference.")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"headlab: patched attention falls back to the PyTorch reference kernel: {reason}", stacklevel=3)
    return "reference", reason


def uses_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None, stats=None,
                query_positions=None) -> bool:
    """True when `patched_attention` would run this call on the Triton kernels."""
    return _kernel_for(query, key, value, attention_mask, stats, query_positions)[0] == "triton"


def patched_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
    """`reference.patched_attention`'s signature and results, on the kernel `active_kernel` names."""
    name, _ = _kernel_for(query, key, value, kwargs.get("attention_mask"), kwargs.get("stats"),
                          kwargs.get("query_positions"), kwargs.get("plan"))
    if name == "triton":
        from headlab.kernels.fused import patched_attention as fused_attention

        if str(query.device) not in _announced:  # the choice, once per device, in the log
            _announced.add(str(query.device))
            log.info("patched attention on %s: %s", query.device, active_kernel(query.device))
        return fused_attention(query, key, value, **kwargs)
    return reference_attention(query, key, value, **kwargs)


def active_kernel(device: str | torch.device = "cpu") -> str:
    """Name of the implementation the patched attention uses on `device` (for `headlab info`)."""
    choice = kernel_choice()
    device = torch.device(device)
    ref = "reference (exact PyTorch, chunked)"
    if choice == "reference":
        return f"{ref} [{KERNEL_ENV}=reference]"
    reason = triton_import_error()
    if choice == "auto" and device.type != "cuda":
        return ref
    if reason is None and device.type != "cuda":
        from headlab.kernels.fused import interpreting

        if not interpreting():
            reason = f"tensors on {device.type} need TRITON_INTERPRET=1"
    if reason is not None:
        if choice == "triton":
            return f"none: {KERNEL_ENV}=triton, but {reason} (every patched call will raise)"
        return f"{ref} [{reason}]"
    from headlab.kernels.fused import HEAD_DIMS, dispatch_note

    return (f"triton fused kernels ({dispatch_note()}; fp16/bf16, head_dim {'/'.join(map(str, HEAD_DIMS))}; "
            f"other calls use the {ref})")


__all__ = [
    "KernelUnavailableError",
    "active_kernel",
    "kernel_choice",
    "patched_attention",
    "reference_attention",
    "uses_triton",
]
