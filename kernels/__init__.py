"""fastppo's hot ops: Triton kernels and their plain-torch references.

Installed as ``fastppo.kernels`` (the source lives in the top-level ``kernels/`` folder).
``reference`` holds the torch versions, which are the CPU path and the test oracle.
``select(kind, device)`` returns the (gae, ppo_loss) pair the trainer uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastppo.kernels import reference


class Ops(NamedTuple):
    """The op set the trainer calls; both members follow ``reference``'s signatures."""

    name: str
    gae: object
    ppo_loss: object


def select(kind: str, device: torch.device) -> Ops:
    """Pick the implementation: 'torch' (reference), 'triton', or 'auto' (Triton on CUDA).

    Only the reference exists so far; 'triton' is rejected with a clear message until the Triton
    kernels land.
    """
    if kind not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels must be one of auto, torch, triton; got {kind!r}")
    if kind == "triton":
        raise ValueError("--kernels triton: the Triton kernels are not available in this build")
    return Ops("torch", reference.gae, reference.ppo_loss)


__all__ = ["Ops", "reference", "select"]
