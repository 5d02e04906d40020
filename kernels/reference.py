"""Plain-torch reference implementations of fastppo's hot ops.

These are at once the CPU path of the trainer, the oracle the Triton kernels are tested against,
and the baseline the kernel benchmark measures. Every function here has a Triton twin with the same
signature and semantics in this package (the small Gaussian helpers gaussian_log_prob,
gaussian_entropy and gaussian_kl are the building blocks of the Gaussian losses and have none, nor
has clip).

Gradients at ties, the convention the kernels follow too: a clipped term passes its gradient at the
clip bounds (``clip``: 1 on the closed interval), and max(a, b) splits it evenly at a == b (torch.max).
Where the clipped objective is differentiable at a bound (at ratio = 1 + eps with A < 0, say, the
max is -A ratio on both sides) this gives its true gradient.

Shapes: T = steps per rollout, N = envs, M = samples in a minibatch, A = number of actions,
D = dimensions of a continuous (diagonal-Gaussian) action.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ADV_EPS = 1e-8  # CleanRL's epsilon in (A - mean) / (std + eps)
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """torch.clamp(x, lo, hi) (NaN stays NaN) whose gradient is 1 on the closed interval [lo, hi], 0 outside.

    Not torch.clamp's own gradient: torch 2.14 changed that to 0 at the bounds (2.13 and before: 1).
    """
    return torch.where((x >= lo) & (x <= hi), x, x.detach().clamp(lo, hi))


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
    kl_exact = None
    if old_logits is not None:
        old_logp_all = F.log_softmax(old_logits.to(logp_all.dtype), dim=-1)
        kl_exact = (old_logp_all.exp() * (old_logp_all - logp_all)).sum(-1)  # KL(old || new), (M,)
    return _pg_value_loss(newlogprob, entropy, kl_exact, old_logp, advantages, values, old_values, returns,
                          clip_coef=clip_coef, vf_coef=vf_coef, ent_coef=ent_coef, vf_clip_coef=vf_clip_coef,
                          norm_adv=norm_adv, kl_coef=kl_coef, mask=mask)


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


# ----------------------------------------------------------------------------------------------
# Diagonal-Gaussian policies (continuous actions)
# ----------------------------------------------------------------------------------------------


def _gaussian_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64: half inputs are computed in float32."""
    dtype = torch.float32
    for x in xs:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(a; mu, diag(sigma^2)) = sum_d [ -(a - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi) ].

    mean, log_std, actions: (..., D) (broadcastable; log_std may be an expanded view). Returns (...,),
    in float32 or wider. Written with z = (a - mu) exp(-log sigma), so autograd gives
    dlogp/dmu = z / sigma and dlogp/dlog sigma = z^2 - 1.
    """
    dtype = _gaussian_dtype(mean, log_std, actions)
    mean, log_std, actions = mean.to(dtype), log_std.to(dtype), actions.to(dtype)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of N(mu, diag(sigma^2)) = sum_d [ log sigma + (1 + log 2 pi) / 2 ]; (..., D) -> (...,)."""
    log_std = log_std.to(_gaussian_dtype(log_std))
    return (log_std + (0.5 + LOG_SQRT_2PI)).sum(-1)


def gaussian_kl(old_mean: torch.Tensor, old_log_std: torch.Tensor, mean: torch.Tensor,
                log_std: torch.Tensor) -> torch.Tensor:
    """KL(old || new) of two diagonal Gaussians, (..., D) -> (...,):

        sum_d [ log s_new - log s_old + (s_old^2 + (mu_old - mu_new)^2) / (2 s_new^2) - 1/2 ]

    computed as log s_new - log s_old + (exp(2 (log s_old - log s_new)) + ((mu_old - mu_new) / s_new)^2) / 2
    - 1/2, in float32 or wider.
    """
    dtype = _gaussian_dtype(old_mean, old_log_std, mean, log_std)
    old_mean, old_log_std, mean, log_std = (x.to(dtype) for x in (old_mean, old_log_std, mean, log_std))
    dm = (old_mean - mean) * torch.exp(-log_std)
    var_ratio = torch.exp(2.0 * (old_log_std - log_std))
    return (log_std - old_log_std + 0.5 * (var_ratio + dm * dm) - 0.5).sum(-1)


def _pg_value_loss(
    newlogprob: torch.Tensor,
    entropy: torch.Tensor,
    kl_exact: torch.Tensor | None,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distribution-free half of ppo_loss and gaussian_ppo_loss: from the policy's per-sample
    log-prob, entropy and exact KL (or None), CleanRL's surrogate, value loss, entropy bonus and stats."""
    dtype = newlogprob.dtype
    logratio = newlogprob - old_logp.to(dtype)
    ratio = logratio.exp()
    k3 = (ratio - 1.0) - logratio

    adv = advantages.to(dtype)
    if norm_adv:
        adv = normalize_advantages(adv, mask)

    if clip_coef is None:
        pg_loss = masked_mean(-adv * ratio, mask)
        kl_term = kl_exact if kl_exact is not None else k3
        pg_loss = pg_loss + kl_coef * masked_mean(kl_term, mask)
        clipfrac = torch.zeros((), dtype=dtype, device=newlogprob.device)
    else:
        pg_loss1 = -adv * ratio
        pg_loss2 = -adv * clip(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
        pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
        if kl_coef:
            kl_term = kl_exact if kl_exact is not None else k3
            pg_loss = pg_loss + kl_coef * masked_mean(kl_term, mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1.0).abs() > clip_coef).to(dtype), mask)

    values = values.to(dtype)
    returns = returns.to(dtype)
    v_loss_unclipped = (values - returns) ** 2
    if vf_clip_coef is None:
        v_loss = 0.5 * masked_mean(v_loss_unclipped, mask)
    else:
        old_values = old_values.to(dtype)
        v_clipped = old_values + clip(values - old_values, -vf_clip_coef, vf_clip_coef)
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


def gaussian_ppo_loss(
    mean: torch.Tensor,
    log_std: torch.Tensor,
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
    old_mean: torch.Tensor | None = None,
    old_log_std: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss of one minibatch for a diagonal-Gaussian policy: ``ppo_loss`` with the Gaussian's
    log-prob, entropy and exact KL in place of the categorical ones.

    Args:
        mean: (M, D) policy means mu (any float dtype; computed in float32 or wider).
        log_std: (M, D) log sigma; a state-independent log-std arrives as an expanded (1, D) or (D,)
            parameter (stride 0 on dim 0), which autograd sums back.
        actions: (M, D) float actions taken by the behaviour policy (before any clipping to the
            action space: the log-prob is of the sampled action).
        old_logp: (M,) log pi_old(a|s), summed over the D dimensions.
        advantages, values, old_values, returns: (M,) as in ppo_loss.
        clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef, mask: as in ppo_loss. The
            penalty uses the exact KL when old_mean/old_log_std are given, else the k3 estimate.
        old_mean, old_log_std: (M, D) behaviour-policy parameters, for the exact KL (both or neither).

    Returns:
        (loss, stats) with ppo_loss's keys and meaning; entropy = gaussian_entropy(log_std),
        kl = gaussian_kl(old_mean, old_log_std, mean, log_std) (only when the old parameters are given).
    """
    if (old_mean is None) != (old_log_std is None):
        raise ValueError("old_mean and old_log_std must be given together (both or neither)")
    log_std = log_std.expand_as(mean)
    newlogprob = gaussian_log_prob(mean, log_std, actions)  # (M,)
    entropy = gaussian_entropy(log_std.to(newlogprob.dtype))  # (M,)
    kl_exact = None
    if old_mean is not None:
        kl_exact = gaussian_kl(old_mean.to(newlogprob.dtype), old_log_std.to(newlogprob.dtype), mean, log_std)
    return _pg_value_loss(
        newlogprob, entropy, kl_exact, old_logp, advantages, values, old_values, returns,
        clip_coef=clip_coef, vf_coef=vf_coef, ent_coef=ent_coef, vf_clip_coef=vf_clip_coef, norm_adv=norm_adv,
        kl_coef=kl_coef, mask=mask,
    )


def gae_gaussian_ppo_loss(
    mean: torch.Tensor,
    log_std: torch.Tensor,
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
    old_mean: torch.Tensor | None = None,
    old_log_std: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAE from the current value predictions, then ``gaussian_ppo_loss``, for a minibatch of whole
    env columns: the Gaussian twin of ``gae_ppo_loss``.

    Args:
        mean, log_std, actions: (T, n, D) (log_std may be an expanded (D,) parameter).
        old_logp, old_values, rewards, terminated, truncated: (T, n); values: (T + 1, n), row T the
            bootstrap value; GAE runs on them detached (values[T] gets no gradient).
        old_mean, old_log_std, mask: (T, n, D), (T, n, D), (T, n), optional.
        gamma, gae_lambda and the rest: as in gae and gaussian_ppo_loss.

    Returns:
        (loss, stats) of gaussian_ppo_loss on the T * n samples.
    """
    if mean.dim() != 3 or values.dim() != 2:
        raise ValueError(f"mean must be (T, n, D) and values (T + 1, n), got {tuple(mean.shape)} "
                         f"and {tuple(values.shape)}")
    T, n, D = mean.shape
    with torch.no_grad():
        advantages, returns = gae(rewards, values.detach(), terminated, truncated, gamma, gae_lambda)

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(T * n, D)

    return gaussian_ppo_loss(
        mean.reshape(T * n, D),
        log_std.expand(T, n, D).reshape(T * n, D),
        actions.reshape(T * n, D),
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
        old_mean=rows(old_mean),
        old_log_std=rows(old_log_std),
        mask=None if mask is None else mask.reshape(T * n),
    )
