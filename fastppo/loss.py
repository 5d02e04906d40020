"""The PPO objective of one minibatch, PPO-penalty's adaptive beta and the adaptive learning rate.

PPO-clip:    L = E[max(-A r, -A clip(r, 1 - eps, 1 + eps))]
PPO-penalty: L = E[-A r] + beta * E_s[KL(pi_old(.|s) || pi(.|s))]
with r = pi(a|s) / pi_old(a|s), the importance weight that lets data collected by the behaviour
policy pi_old train pi for several epochs. The KL is a distance between the two policies' action
distributions averaged over the batch's states, computed exactly from the stored behaviour
distribution (logits, or a diagonal Gaussian's mean and log-std); it is not a distance between
parameters. Both add vf_coef * value loss - ent_coef * entropy. The elementwise work is one op of
``fastppo.kernels``: ``ppo_loss`` (categorical) or ``gaussian_ppo_loss``, or their fused-GAE twins.

Decoupled PPO (--decoupled; Hilton et al. 2021, "Batch size-invariance for policy optimization"): pi_old
above is pi_prox, the policy at the start of the update, and A is w * A with w = pi_prox(a|s) /
pi_behaviour(a|s) the importance weight from the policy that acted (the advantages are normalised before
they are weighted). The clip then bounds how far one update moves the policy, however old the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastppo.config import Config
from fastppo.kernels.reference import masked_mean, normalize_advantages
from fastppo.policy import forward_in_chunks, split_gaussian
from fastppo.policy import kl as exact_kl


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
    ops,
    cfg: Config,
    kl_coef: float,
    dist: torch.Tensor,
    values: torch.Tensor,
    mb: dict[str, torch.Tensor],
    kind: str = "categorical",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one minibatch: ``ops.ppo_loss`` on logits, or ``ops.gaussian_ppo_loss`` on a diagonal
    Gaussian's [mean, log-std]. dist (M, P) and values (M,) are the current policy's; mb holds the
    flattened rollout fields at the minibatch's indices (its "dist" is the behaviour policy's)."""
    common = dict(mask=mb["valid"], **loss_kwargs(cfg, kl_coef))
    advantages = mb["advantages"]
    if "weights" in mb:  # --decoupled: normalise first (as without it), then weight pi_prox / pi_behaviour
        if common["norm_adv"]:
            advantages = normalize_advantages(advantages, mb["valid"])
        advantages, common["norm_adv"] = advantages * mb["weights"], False
    data = (mb["actions"], mb["logprobs"], advantages, values, mb["values"], mb["returns"])
    if kind == "gaussian":
        old_mean, old_log_std = split_gaussian(mb["dist"])
        return ops.gaussian_ppo_loss(*split_gaussian(dist), *data, old_mean=old_mean, old_log_std=old_log_std,
                                     **common)
    return ops.ppo_loss(dist, *data, old_logits=mb["dist"], **common)


def gae_minibatch_loss(
    ops,
    cfg: Config,
    kl_coef: float,
    dist: torch.Tensor,
    values: torch.Tensor,
    cols: dict[str, torch.Tensor],
    kind: str = "categorical",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAE from the current values fused with the loss, for whole env columns: dist (T, n, P), values
    (T + 1, n) the current policy's; cols holds the rollout's (T, n[, ...]) fields of those columns."""
    common = dict(gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, mask=cols["valid"], **loss_kwargs(cfg, kl_coef))
    data = (cols["actions"], cols["logprobs"], values, cols["values"], cols["rewards"], cols["terminated"],
            cols["truncated"])
    if kind == "gaussian":
        old_mean, old_log_std = split_gaussian(cols["dist"])
        return ops.gae_gaussian_ppo_loss(*split_gaussian(dist), *data, old_mean=old_mean, old_log_std=old_log_std,
                                         **common)
    return ops.gae_ppo_loss(dist, *data, old_logits=cols["dist"], **common)


def adapt_to_kl(value: float, kl: float, kl_min: float, kl_max: float, factor: float, low: float, high: float,
                raises_kl: bool) -> float:
    """The PPO paper's adaptive rule (section 4): after an update whose measured KL left [kl_min, kl_max],
    move `value` by `factor` towards the KL target; then clamp it to [low, high].

    raises_kl: whether a larger value makes the next update's KL larger (a step size: divided by factor
    when KL > kl_max, multiplied when KL < kl_min) or smaller (a penalty coefficient: the other way).
    A KL within the bounds, or NaN, leaves the value as it is (clamped)."""
    if kl > kl_max:
        value = value / factor if raises_kl else value * factor
    elif kl < kl_min:
        value = value * factor if raises_kl else value / factor
    return min(max(value, low), high)


@dataclass
class AdaptiveKLCoef:
    """PPO paper, section 4: after each update, beta *= 2 if d > kl_max, beta /= 2 if d < kl_min.

    beta stays within [beta_min, beta_max]. Unbounded, a long stretch of small KLs (CleanRL's learning
    rates keep PPO's KL far below the default d = 0.01) halves beta to 1e-289 within a thousand
    iterations and then to exactly 0, from where doubling never brings the penalty back."""

    beta: float
    kl_min: float
    kl_max: float
    beta_min: float = 1e-4
    beta_max: float = 1e4

    def __post_init__(self):
        self.set(self.beta)

    def set(self, beta: float) -> None:
        """beta, within [beta_min, beta_max] (a resumed checkpoint's beta too)."""
        self.beta = min(max(beta, self.beta_min), self.beta_max)

    def update(self, kl: float) -> float:
        self.beta = adapt_to_kl(self.beta, kl, self.kl_min, self.kl_max, 2.0, self.beta_min, self.beta_max,
                                raises_kl=False)
        return self.beta


@dataclass
class AdaptiveLR:
    """--lr-schedule adaptive: the rule of :class:`AdaptiveKLCoef` applied to the step size. After each
    update, lr /= factor if KL > kl_max, lr *= factor if KL < kl_min, within [lr_min, lr_max].

    The KL is the exact mean KL(pi_old || pi_new) over the batch after the update, as PPO-penalty
    measures it. rl_games' AdaptiveScheduler moves its learning rate by the same rule (factor 1.5,
    bounds 1e-6 and 1e-2, the band [d / 2, 2 d]), after every minibatch or epoch on the minibatches'
    KL; here it moves once per iteration, where the loop already reads the iteration's stats."""

    lr: float
    kl_min: float
    kl_max: float
    lr_min: float = 1e-6
    lr_max: float = 1e-2
    factor: float = 1.5

    def update(self, kl: float) -> float:
        """The learning rate of the next iteration, after an update whose KL was `kl`."""
        self.lr = adapt_to_kl(self.lr, kl, self.kl_min, self.kl_max, self.factor, self.lr_min, self.lr_max,
                              raises_kl=True)
        return self.lr


def policy_kl(
    policy: nn.Module, obs: torch.Tensor, old_dist: torch.Tensor, valid: torch.Tensor, chunk: int,
    kind: str = "categorical",
) -> torch.Tensor:
    """Mean over the valid states of KL(pi_old(.|s) || pi(.|s)), exact, under the current policy.

    obs (B, ...), old_dist (B, P) the behaviour distributions, valid (B,); evaluated in chunks of
    `chunk` states without gradients. Returns a 0-dim tensor (no host sync here).
    """
    dist = forward_in_chunks(policy, obs, chunk)[0]
    return masked_mean(exact_kl(kind, old_dist.float(), dist.float()), valid)
