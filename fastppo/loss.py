"""The PPO objective of one minibatch, and PPO-penalty's adaptive beta.

PPO-clip:    L = E[max(-A r, -A clip(r, 1 - eps, 1 + eps))]
PPO-penalty: L = E[-A r] + beta * E_s[KL(pi_old(.|s) || pi(.|s))]
with r = pi(a|s) / pi_old(a|s), the importance weight that lets data collected by the behaviour
policy pi_old train pi for several epochs. The KL is a distance between the two policies' action
distributions averaged over the batch's states, computed exactly from the stored behaviour logits;
it is not a distance between parameters. Both add vf_coef * value loss - ent_coef * entropy.
The elementwise work is ``ppo_loss`` from ``fastppo.kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastppo.config import Config


def loss_kwargs(cfg: Config, kl_coef: float) -> dict:
    """The keyword arguments of ``ppo_loss`` / ``gae_ppo_loss`` that come from the config."""
    penalty = cfg.loss == "penalty"
    return dict(
        clip_coef=None if penalty else cfg.clip_coef,
        vf_coef=cfg.vf_coef,
        ent_coef=cfg.ent_coef,
        vf_clip_coef=cfg.clip_coef if cfg.clip_vloss else None,
        norm_adv=cfg.norm_adv,
        kl_coef=kl_coef if penalty else 0.0,
    )


def minibatch_loss(
    ppo_loss,
    cfg: Config,
    kl_coef: float,
    logits: torch.Tensor,
    values: torch.Tensor,
    mb: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one minibatch; mb holds the flattened rollout fields at the minibatch's indices."""
    return ppo_loss(
        logits,
        mb["actions"],
        mb["logprobs"],
        mb["advantages"],
        values,
        mb["values"],
        mb["returns"],
        old_logits=mb["logits"],
        mask=mb["valid"],
        **loss_kwargs(cfg, kl_coef),
    )


@dataclass
class AdaptiveKLCoef:
    """PPO paper, section 4: after each update, beta *= 2 if d > kl_max, beta /= 2 if d < kl_min."""

    beta: float
    kl_min: float
    kl_max: float

    def update(self, kl: float) -> float:
        if kl > self.kl_max:
            self.beta *= 2.0
        elif kl < self.kl_min:
            self.beta /= 2.0
        return self.beta


def policy_kl(
    policy: nn.Module, obs: torch.Tensor, old_logits: torch.Tensor, valid: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean over the valid states of KL(pi_old(.|s) || pi(.|s)), exact, under the current policy.

    obs (B, ...), old_logits (B, A), valid (B,); evaluated in chunks of `chunk` states without
    gradients. Returns a 0-dim tensor (no host sync here).
    """
    total = torch.zeros((), device=old_logits.device)
    with torch.no_grad():
        for start in range(0, obs.shape[0], chunk):
            sl = slice(start, start + chunk)
            logp = F.log_softmax(policy(obs[sl])[0].float(), -1)
            old_logp = F.log_softmax(old_logits[sl].float(), -1)
            kl = (old_logp.exp() * (old_logp - logp)).sum(-1)
            total += (kl * valid[sl]).sum()
    return total / valid.sum().clamp_min(1)
