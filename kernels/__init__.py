"""fastppo's hot ops: Triton kernels and their plain-torch references.

Installed as ``fastppo.kernels`` (the source lives in the top-level ``kernels/`` folder).
``reference`` holds the torch versions, which are the CPU path and the test oracle; ``gae``,
``loss`` and ``gae_loss`` (categorical policies) and ``gaussian_loss`` (diagonal-Gaussian policies,
continuous actions) hold the Triton twins (imported lazily: ``import fastppo.kernels`` works
without triton). ``select(kind, device)`` returns the op set the trainer uses.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fastppo.kernels import reference


class Ops(NamedTuple):
    """The op set the trainer calls; every member follows ``reference``'s signature of its name.

    ppo_loss / gae_ppo_loss take categorical logits; gaussian_ppo_loss / gae_gaussian_ppo_loss take
    the mean and log-std of a diagonal-Gaussian policy (continuous actions).
    """

    name: str
    gae: object
    ppo_loss: object
    gae_ppo_loss: object
    gaussian_ppo_loss: object
    gae_gaussian_ppo_loss: object


def _reference_ops() -> Ops:
    return Ops("torch", reference.gae, reference.ppo_loss, reference.gae_ppo_loss, reference.gaussian_ppo_loss,
               reference.gae_gaussian_ppo_loss)


def _triton_ops() -> Ops:
    from fastppo.kernels.gae import gae
    from fastppo.kernels.gae_loss import gae_ppo_loss
    from fastppo.kernels.gaussian_loss import gae_gaussian_ppo_loss, gaussian_ppo_loss
    from fastppo.kernels.loss import ppo_loss

    return Ops("triton", gae, ppo_loss, gae_ppo_loss, gaussian_ppo_loss, gae_gaussian_ppo_loss)


def _interpreted() -> bool:
    """Whether the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import).

    Imports triton; raises ImportError when it is missing or broken.
    """
    from fastppo.kernels import gae as triton_gae

    return triton_gae.INTERPRETED


def select(kind: str, device: torch.device | str) -> Ops:
    """Pick the implementation of the ops for tensors on device.

    'torch': the reference, anywhere. 'triton': the Triton kernels; ValueError if triton is not
    importable, or on CPU unless they run under the interpreter (TRITON_INTERPRET=1 set before they
    were imported), or on a device other than CPU/CUDA (interpreted kernels also run on CUDA
    tensors, slowly: set TRITON_INTERPRET only where there is no GPU). 'auto': Triton on CUDA when triton imports
    and the kernels are compiled (not interpreted), else the reference.
    """
    if kind not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels must be one of auto, torch, triton; got {kind!r}")
    device = torch.device(device)
    reference_ops = _reference_ops()
    if kind == "torch":
        return reference_ops
    if kind == "auto":
        if device.type != "cuda":
            return reference_ops
        try:
            interpreted = _interpreted()
        except ImportError:
            return reference_ops
        return reference_ops if interpreted else _triton_ops()
    try:
        interpreted = _interpreted()
    except ImportError as e:
        raise ValueError(f"kernels='triton': triton is not importable ({e}); install fastppo[triton] "
                         f"or use 'torch'") from None
    if device.type == "cpu":
        if not interpreted:
            interp = os.environ.get("TRITON_INTERPRET", "unset")
            raise ValueError(
                f"kernels='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                f"fastppo.kernels' Triton modules are imported (TRITON_INTERPRET is {interp}); or use 'torch'"
            )
    elif device.type != "cuda":
        raise ValueError(f"kernels='triton' runs on cuda (or cpu under TRITON_INTERPRET=1), not {device.type}")
    return _triton_ops()


__all__ = ["Ops", "reference", "select"]
