"""Advantages: GAE over the whole rollout, once per rollout (CleanRL's schedule).

The op itself (``gae``) comes from ``fastppo.kernels``: the torch reference on CPU, a one-launch
Triton kernel on CUDA. The rules for terminated vs truncated steps are documented there.
"""

from __future__ import annotations

import torch

from fastppo.rollout import Rollout


def compute_advantages(buf: Rollout, gae, gamma: float, gae_lambda: float) -> None:
    """Fill buf.advantages and buf.returns (T, N) from buf's rewards, values and flags."""
    advantages, returns = gae(buf.rewards, buf.values, buf.terminated, buf.truncated, gamma, gae_lambda)
    buf.advantages.copy_(advantages)
    buf.returns.copy_(returns)


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[y_true - y_pred] / Var[y_true] over the valid entries.

    A 0-dim tensor, NaN when Var[y_true] is 0 (as CleanRL). Masked by weights rather than boolean
    indexing, which would sync with the host to size its output.
    """
    w = mask.to(y_true.dtype)
    n = w.sum().clamp_min(1.0)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * w).sum() / n
        return (((x - mean) * w) ** 2).sum() / n

    var_y = var(y_true)
    return torch.where(var_y > 0, 1.0 - var(y_true - y_pred) / var_y, torch.full_like(var_y, float("nan")))
