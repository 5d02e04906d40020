"""Plain-torch reference implementations of fastppo's hot ops.

These are at once the CPU path of the trainer, the oracle the Triton kernels are tested against,
and the baseline the kernel benchmark measures. Every function here has a Triton twin with the same
signature and semantics in this package.

Shapes: T = steps per rollout, N = envs, M = samples in a minibatch, A = number of actions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADV_EPS = 1e-8  # CleanRL's epsilon in (A - mean) / (std + eps)


def _as_float(flag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bool / uint8 / float flags -> 0.0 / 1.0 in like's dtype."""
    return (flag != 0).to(like.dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a time-major rollout.

    Args:
        rewards: (T, N) rewards r_t.
        values: (T + 1, N) value predictions; row T is the bootstrap value of the observation
            that follows the rollout.
        terminated: (T, N) bool/uint8/float, 1 where step t ended the episode for good (no
            bootstrap: the value after a terminal state is 0).
        truncated: (T, N) 1 where step t ended the episode by a time limit: the value of the final
            observation (values[t + 1], which EnvPool's autoreset puts in the next row) bootstraps.
        gamma, gae_lambda: discount and GAE lambda.

    Returns:
        (advantages, returns), both (T, N):
        delta_t = r_t + gamma * (1 - term_t) * V_{t+1} - V_t
        A_t = delta_t + gamma * lambda * (1 - (term_t or trunc_t)) * A_{t+1}
        returns = A + V[:T]
    """
    T, N = rewards.shape
    if values.shape != (T + 1, N):
        raise ValueError(f"values must have shape {(T + 1, N)} (T + 1 rows), got {tuple(values.shape)}")
    if terminated.shape != (T, N) or truncated.shape != (T, N):
        raise ValueError(
            f"terminated/truncated must have shape {(T, N)}, got {tuple(terminated.shape)} "
            f"and {tuple(truncated.shape)}"
        )
    term = _as_float(terminated, values)
    cut = _as_float(terminated.bool() | truncated.bool(), values)
    rewards = rewards.to(values.dtype)
    advantages = torch.empty_like(rewards)
    lastgaelam = torch.zeros(N, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        nextnonterminal = 1.0 - term[t]
        delta = rewards[t] + gamma * nextnonterminal * values[t + 1] - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - cut[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values[:T]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x over the entries where mask is true (all entries when mask is None).

    An all-false mask gives 0, not NaN: a minibatch with no valid transition contributes nothing.
    """
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def normalize_advantages(advantages: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(A - mean) / (std + 1e-8) over the valid entries, std with Bessel's correction (as CleanRL).

    With fewer than two valid entries the std is taken as 0 (torch's would be NaN), so the
    normalised advantages are 0 rather than NaN; zero-variance advantages likewise give 0.
    Invalid entries are set to 0.
    """
    m = torch.ones_like(advantages) if mask is None else mask.to(advantages.dtype)
    n = m.sum()
    mean = (advantages * m).sum() / n.clamp_min(1.0)
    # Corrected two-pass mean: the rounding error of the first pass is summed back, so constant
    # advantages give exactly zero deviations (else 1-ulp noise / (std ~ 1 ulp + 1e-8) is O(1)).
    mean = mean + ((advantages - mean) * m).sum() / n.clamp_min(1.0)
    var = (((advantages - mean) * m) ** 2).sum() / (n - 1.0).clamp_min(1.0)
    return (advantages - mean) / (var.sqrt() + ADV_EPS) * m


def ppo_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None = None,
    norm_adv: bool = True,
    kl_coef: float = 0.0,
    old_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss of one minibatch, PPO-clip or PPO-penalty, with CleanRL's formulas.

    Args:
        logits: (M, A) current policy logits (any float dtype; computed in float32 or wider).
        actions: (M,) integer actions taken by the behaviour policy.
        old_logp: (M,) log pi_old(a|s) recorded when the action was chosen.
        advantages: (M,) advantage estimates (normalised here when norm_adv).
        values: (M,) current value predictions.
        old_values: (M,) value predictions recorded at collection time (for value clipping).
        returns: (M,) value targets.
        clip_coef: epsilon of the clipped surrogate; None = no ratio clipping (PPO-penalty).
        vf_coef, ent_coef: weights of the value loss and of the entropy bonus.
        vf_clip_coef: clip range of the value update; None = unclipped value loss.
        norm_adv: normalise advantages over the valid entries of this minibatch.
        kl_coef: beta of PPO-penalty: the loss adds beta * mean KL(pi_old || pi). The KL is the
            exact one when old_logits is given, else the k3 estimate (ratio - 1) - log(ratio).
        old_logits: (M, A) behaviour-policy logits, for the exact KL.
        mask: (M,) bool, the valid transitions; everything is averaged over these only.

    Returns:
        loss: scalar = policy_loss - ent_coef * entropy + vf_coef * value_loss, where
            policy_loss = mean(max(-A r, -A clip(r))) (clip) or mean(-A r) + beta * KL (penalty).
        stats: detached scalars policy_loss, value_loss, entropy, approx_kl (k3), old_approx_kl
            (k1), clipfrac (0 without clipping) and kl (exact; only when old_logits is given).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp_all = F.log_softmax(logits, dim=-1)  # (M, A)
    newlogprob = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)  # (M,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (M,)

    logratio = newlogprob - old_logp.to(logp_all.dtype)
    ratio = logratio.exp()
    k3 = (ratio - 1.0) - logratio

    adv = advantages.to(logp_all.dtype)
    if norm_adv:
        adv = normalize_advantages(adv, mask)

    kl_exact = None
    if old_logits is not None:
        old_logp_all = F.log_softmax(old_logits.to(logp_all.dtype), dim=-1)
        kl_exact = (old_logp_all.exp() * (old_logp_all - logp_all)).sum(-1)  # KL(old || new), (M,)

    if clip_coef is None:
        pg_loss = masked_mean(-adv * ratio, mask)
        kl_term = kl_exact if kl_exact is not None else k3
        pg_loss = pg_loss + kl_coef * masked_mean(kl_term, mask)
        clipfrac = torch.zeros((), dtype=logp_all.dtype, device=logits.device)
    else:
        pg_loss1 = -adv * ratio
        pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
        pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
        if kl_coef:
            kl_term = kl_exact if kl_exact is not None else k3
            pg_loss = pg_loss + kl_coef * masked_mean(kl_term, mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1.0).abs() > clip_coef).to(logp_all.dtype), mask)

    values = values.to(logp_all.dtype)
    returns = returns.to(logp_all.dtype)
    v_loss_unclipped = (values - returns) ** 2
    if vf_clip_coef is None:
        v_loss = 0.5 * masked_mean(v_loss_unclipped, mask)
    else:
        old_values = old_values.to(logp_all.dtype)
        v_clipped = old_values + torch.clamp(values - old_values, -vf_clip_coef, vf_clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)

    entropy_loss = masked_mean(entropy, mask)
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss

    with torch.no_grad():
        stats = {
            "policy_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": entropy_loss.detach(),
            "approx_kl": masked_mean(k3, mask).detach(),
            "old_approx_kl": masked_mean(-logratio, mask).detach(),
            "clipfrac": clipfrac.detach(),
        }
        if kl_exact is not None:
            stats["kl"] = masked_mean(kl_exact, mask).detach()
    return loss, stats


def gae_ppo_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    *,
    gamma: float,
    gae_lambda: float,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None = None,
    norm_adv: bool = True,
    kl_coef: float = 0.0,
    old_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAE from the current value predictions, then the PPO loss, for a minibatch of whole env columns.

    Args:
        logits: (T, n, A) current policy logits of the n env columns of this minibatch.
        actions, old_logp, old_values: (T, n) as in ppo_loss.
        values: (T + 1, n) current value predictions; row T is the bootstrap value. GAE runs on them
            detached: advantages and returns are constants for the gradient (standard PPO), so the
            gradient reaches values[:T] only through the value loss, and values[T] gets none.
        rewards, terminated, truncated: (T, n) as in gae.
        old_logits, mask: (T, n, A) and (T, n), optional, as in ppo_loss.
        gamma, gae_lambda and the rest: as in gae and ppo_loss.

    Returns:
        (loss, stats) of ppo_loss on the T * n samples.
    """
    if logits.dim() != 3 or values.dim() != 2:
        raise ValueError(f"logits must be (T, n, A) and values (T + 1, n), got {tuple(logits.shape)} "
                         f"and {tuple(values.shape)}")
    T, n, A = logits.shape
    with torch.no_grad():
        advantages, returns = gae(rewards, values.detach(), terminated, truncated, gamma, gae_lambda)
    return ppo_loss(
        logits.reshape(T * n, A),
        actions.reshape(T * n),
        old_logp.reshape(T * n),
        advantages.reshape(T * n),
        values[:T].reshape(T * n),
        old_values.reshape(T * n),
        returns.reshape(T * n),
        clip_coef=clip_coef,
        vf_coef=vf_coef,
        ent_coef=ent_coef,
        vf_clip_coef=vf_clip_coef,
        norm_adv=norm_adv,
        kl_coef=kl_coef,
        old_logits=None if old_logits is None else old_logits.reshape(T * n, A),
        mask=None if mask is None else mask.reshape(T * n),
    )
