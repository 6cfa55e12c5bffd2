"""Patched attention kernels (installed as `headlab.kernels`).

`reference.patched_attention` is the exact PyTorch implementation and the specification; faster
kernels (Triton, issue 4) must match it. `patched_attention` here is what the "headlab" attention
function calls; `active_kernel(device)` names the implementation used on a device.
"""

from __future__ import annotations

import os

from headlab.kernels.reference import patched_attention

KERNEL_ENV = "HEADLAB_KERNEL"


def active_kernel(device: str = "cpu") -> str:
    """Name of the implementation the patched attention uses on `device`.

    Only the exact PyTorch reference exists so far; HEADLAB_KERNEL may force it explicitly.
    """
    forced = os.environ.get(KERNEL_ENV)
    if forced not in (None, "", "reference"):
        raise ValueError(f"{KERNEL_ENV}={forced!r}: the only available kernel is 'reference'")
    return "reference (exact PyTorch, chunked)"


__all__ = ["patched_attention", "active_kernel"]
