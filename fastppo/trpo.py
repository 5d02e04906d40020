"""The policy update of TRPO: a natural-gradient step to the edge of a KL trust region, then a line search.

Trust region policy optimisation (Schulman et al. 2015), as the PPO paper (section 2.2) states it:

    maximise_theta  L(theta)  = E[pi_theta(a|s) / pi_old(a|s) * A]
    subject to      KL(theta) = E_s[KL(pi_old(.|s) || pi_theta(.|s))] <= delta

The KL is the exact one between the two policies' action distributions, averaged over the batch's
states: a distance between behaviours, not between parameters. Around theta_old, L is linearised,
L(theta_old + s) ~ L(theta_old) + g^T s, and the KL, which is 0 with a zero gradient there, is taken
to second order, KL ~ 1/2 s^T F s, where F, the Hessian of the mean KL at theta_old, is the Fisher
information matrix of the policy. The model problem's solution is the natural gradient scaled to
the trust region's edge:

    x = F^-1 g,    s* = sqrt(2 delta / (x^T F x)) x,    expected improvement g^T s*.

F is never formed: conjugate gradient solves F x = g from products F v = grad_theta (grad_theta KL . v)
(a double backward through the KL), with F damped to F + damping * I so that directions the policy
does not depend on (F singular) stay bounded. The quadratic model is only a model, so the update
backtracks, theta_old + 2^-k s* for k = 0, 1, ..., and keeps the first point whose measured KL is
within delta and whose measured surrogate improved; if none qualifies, theta stays at theta_old.

Everything here is generic over the policy's distribution: the caller passes closures that compute
the surrogate and the mean KL from the current parameters (categorical, diagonal Gaussian, ...).
Parameters are updated in place, so an optimizer or a CUDA graph that holds them stays valid.
TRPO updates the policy once per rollout, so the host syncs of the CG loop and of the line search's
decisions (one per iteration / try) are not on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def flat_grad(
    y: torch.Tensor,
    params: list[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> torch.Tensor:
    """Gradient of the scalar y w.r.t. params, concatenated into one flat vector (P,), P = total numel.

    Parameters that y does not depend on get zeros. With create_graph the result is itself
    differentiable (for a double backward); retain_graph defaults to create_graph, as in
    torch.autograd.grad. The parameters' .grad fields are not touched.
    """
    grads = torch.autograd.grad(
        y, params, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True, materialize_grads=True
    )
    return torch.cat([g.reshape(-1) for g in grads])


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    """A detached copy of params as one flat vector (P,)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params_(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the flat vector (P,) into params, in place: each tensor keeps its identity and storage.

    (torch.nn.utils.vector_to_parameters rebinds param.data to a view of the vector instead, which
    changes data_ptr under an optimizer or a captured CUDA graph.)
    """
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def fisher_vector_product(
    kl: Callable[[], torch.Tensor], params: list[torch.Tensor], damping: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (H + damping * I) v, H the Hessian of the mean KL w.r.t. params at their current values.

    kl() returns the scalar mean over states of KL(pi_old(.|s) || pi_params(.|s)) with pi_old fixed
    (detached); at params = theta_old, H is the Fisher information matrix. The KL and its gradient are
    computed once, here, with create_graph=True; each product is one backward of grad_KL . v through
    that graph (retained for the next product; the product's own graph is freed when it returns).
    The closure holds that graph until it is dropped, and is meant for use before params move: an
    in-place change to a parameter the graph saved makes the next product raise (autograd's version
    check). trpo_step drops it before its line search moves them.

    v and the result: (P,), P = total numel of params; the result carries no graph. reduce (e.g. a
    mean over data-parallel ranks, each with its own states) is applied to H v before the damping.
    """
    grad_kl = flat_grad(kl(), params, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = reduce(flat_grad(grad_kl @ v.detach(), params, retain_graph=True))
        return hv + damping * v.detach()

    return fvp


def conjugate_gradient(
    Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """Solve A x = b by conjugate gradient, A symmetric positive definite, given only v -> A v.

    Runs at most `iters` iterations (one product each) from x = 0, stopping early once the residual
    norm is <= residual_tol. Exact arithmetic solves an n x n system in n iterations; TRPO runs ~10
    and keeps the approximate solution. If a search direction p has p^T A p <= 0 or not finite (A not
    positive definite there, or a broken product), the iteration stops and keeps the last iterate
    rather than divide by it (the first iterate is x = 0).

    b and x: (P,). Returns (x, ||r||) with r the residual of the CG recurrence
    (r_{k+1} = r_k - alpha_k A p_k), not recomputed as b - A x: no extra product. In exact arithmetic
    the two are equal; with rounding (float32 products) they drift apart, and a caller that has
    A x anyway can measure ||b - A x|| itself (trpo_step does).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = float(r @ r)
    for _ in range(iters):
        if math.sqrt(rr) <= residual_tol:
            break
        Ap = Avp(p)
        pAp = float(p @ Ap)
        if not (math.isfinite(pAp) and pAp > 0.0):
            break
        alpha = rr / pAp
        x += alpha * p
        r -= alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, math.sqrt(rr)


@dataclass
class LineSearchResult:
    """Outcome of line_search; fraction, kl and the improvements are of the accepted step, or of the
    last one tried when none was accepted (all 0 when none was tried)."""

    steps: int  # points tried
    accepted: bool
    fraction: float  # of the full step
    kl: float  # measured mean KL(pi_old || pi) at the point
    actual_improvement: float  # surrogate(point) - surrogate(theta_old)
    expected_improvement: float  # the linear model's g . (fraction * full_step)


def line_search(
    params: list[torch.Tensor],
    surrogate: Callable[[], torch.Tensor],
    kl: Callable[[], torch.Tensor],
    full_step: torch.Tensor,
    grad: torch.Tensor,
    *,
    max_kl: float,
    max_backtracks: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> LineSearchResult:
    """Backtracking line search from theta_old (the params' values on entry) along full_step (P,).

    Tries theta_old + f * full_step for f = 1, 1/2, 1/4, ... (max_backtracks points at most), setting
    params in place, and accepts the first point whose measured mean KL is <= max_kl and whose
    surrogate is strictly greater than at theta_old. The params are left at the accepted point, or,
    if none is accepted (or a closure raises), restored bit for bit to theta_old.
    surrogate() is the objective to maximise and kl() the mean KL(pi_old || pi_params), both scalars,
    called here under no_grad; grad (P,) is the surrogate's gradient at theta_old, for the expected
    improvement. reduce is applied to both measurements before they are compared (data-parallel
    ranks then all take the same decision).
    """
    theta_old = flat_params(params)
    expected_full = float(grad @ full_step)
    result = LineSearchResult(0, False, 0.0, 0.0, 0.0, 0.0)
    try:
        with torch.no_grad():
            surrogate_old = float(reduce(surrogate()))
            for k in range(max_backtracks):
                fraction = 0.5**k
                set_flat_params_(params, theta_old + fraction * full_step)
                kl_new, surrogate_new = float(reduce(kl())), float(reduce(surrogate()))
                improvement = surrogate_new - surrogate_old
                result = LineSearchResult(k + 1, False, fraction, kl_new, improvement, fraction * expected_full)
                # NaN compares false on both tests, so a point with a non-finite KL or surrogate is never taken.
                if kl_new <= max_kl and improvement > 0.0:
                    result.accepted = True
                    break
    finally:
        # No point accepted, or a closure raised: the params must not stay at a trial point.
        if not result.accepted:
            set_flat_params_(params, theta_old)
    return result


def trpo_step(
    params: list[torch.Tensor],
    surrogate: Callable[[], torch.Tensor],
    kl: Callable[[], torch.Tensor],
    *,
    max_kl: float,
    damping: float,
    cg_iters: int,
    max_backtracks: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> dict[str, float]:
    """One TRPO policy update of params, in place: natural-gradient step, then line search.

    Args:
        params: the policy's parameters (leaf tensors with requires_grad), updated in place.
        surrogate: () -> scalar L = mean(pi(a|s) / pi_old(a|s) * A) under the current params, to be
            maximised (not a loss); its gradient at theta_old is the policy gradient g.
        kl: () -> scalar mean over states of KL(pi_old(.|s) || pi(.|s)) under the current params,
            pi_old's outputs detached. Both closures are called with and without grad mode.
        max_kl: delta, the trust region's radius in mean KL.
        damping: added to the Fisher matrix's diagonal for CG (F + damping * I).
        cg_iters: conjugate-gradient iterations; max_backtracks: line-search points at most.
        reduce: applied to the surrogate's gradient, to each Fisher-vector product and to the line
            search's measurements: under torchrun a mean over the ranks (each holds its own states),
            so every rank computes the same step and the parameters stay identical.

    Returns plain floats:
        kl: measured mean KL after the update (0 when no step was taken);
        step_fraction, expected_improvement (g . step), actual_improvement (surrogate change):
            of the step taken, all 0 when none was;
        line_search_steps: points tried; accepted: 1.0 if a step was taken, else 0.0;
        cg_residual: ||g - (F + damping I) x|| recomputed for the CG solution x (0 if CG did not run);
        grad_norm: ||g||; curvature: x^T (F + damping I) x (0 if CG did not run).
    line_search_steps = 0 means no step was attempted: grad_norm is 0 (nothing to do) or not finite,
    or curvature is not finite and positive (the step length would be undefined); params are then
    untouched. Invalid arguments raise ValueError and a closure's own exception propagates (params
    restored); no numerical case (NaN, inf, zero or negative curvature) raises or leaves a non-finite
    value in params.
    """
    if max_kl <= 0.0 or damping < 0.0 or cg_iters < 1 or max_backtracks < 1:
        raise ValueError(
            f"trpo_step needs max_kl > 0, damping >= 0, cg_iters >= 1 and max_backtracks >= 1; got max_kl={max_kl}, "
            f"damping={damping}, cg_iters={cg_iters}, max_backtracks={max_backtracks}"
        )
    stats = dict(kl=0.0, step_fraction=0.0, expected_improvement=0.0, actual_improvement=0.0, line_search_steps=0.0,
                 accepted=0.0, cg_residual=0.0, grad_norm=0.0, curvature=0.0)
    g = reduce(flat_grad(surrogate(), params))
    stats["grad_norm"] = float(g.norm())
    if not (math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0.0):
        return stats

    fvp = fisher_vector_product(kl, params, damping, reduce)
    x, _ = conjugate_gradient(fvp, g, cg_iters)
    Fx = fvp(x)  # also gives the honest residual: one product, not a second one for the log
    del fvp  # frees the KL's double-backward graph before the line search moves params
    stats["curvature"] = float(x @ Fx)
    stats["cg_residual"] = float((g - Fx).norm())
    if not (math.isfinite(stats["curvature"]) and stats["curvature"] > 0.0):
        return stats

    full_step = math.sqrt(2.0 * max_kl / stats["curvature"]) * x
    ls = line_search(params, surrogate, kl, full_step, g, max_kl=max_kl, max_backtracks=max_backtracks, reduce=reduce)
    stats["line_search_steps"] = float(ls.steps)
    if ls.accepted:
        stats.update(kl=ls.kl, step_fraction=ls.fraction, expected_improvement=ls.expected_improvement,
                     actual_improvement=ls.actual_improvement, accepted=1.0)
    return stats


# --- the update of --algo trpo ------------------------------------------------------------------


def trpo_update(policy: torch.nn.Module, forward: torch.nn.Module, value_optimizer: torch.optim.Optimizer, buf,
                cfg) -> dict[str, torch.Tensor]:
    """One iteration's update with --algo trpo: the policy by :func:`trpo_step`, then the critic by Adam.

    Policy: over the rollout's valid transitions, the surrogate is mean(pi(a|s) / mu(a|s) * A), with mu
    the behaviour policy whose log-probs the rollout stored (importance sampling, as in PPO) and A the
    GAE advantages (normalised over the batch with --norm-adv); the trust region is the mean exact
    KL(pi_k(.|s) || pi(.|s)) <= --max-kl, pi_k the policy before this update (the behaviour policy,
    except with --overlap, where the behaviour is one update older). No entropy bonus. The step
    moves ``policy.policy_parameters()``: with the Nature CNN's shared torso, the torso and the
    policy head. Critic: --update-epochs epochs of --num-minibatches shuffled minibatches of Adam on
    ``policy.value_parameters()`` (the value head only, for the CNN) minimising 0.5 (V(s) - R)^2 (R as
    buf holds it: normalised with --norm-value), its gradient clipped to --max-grad-norm; the learning
    rate is the optimizer's (--lr-schedule anneal or constant).

    Under torchrun every reduction (surrogate gradient, Fisher-vector products, line-search
    measurements, critic gradients) is a mean over the ranks, so the parameters stay identical.
    Returns 0-dim tensors with the keys of the PPO update's stats, plus the trpo/* diagnostics.
    """
    from fastppo import distributed
    from fastppo.kernels.reference import masked_mean, normalize_advantages
    from fastppo.policy import entropy, kl, log_prob
    from fastppo.rollout import dist_kind, flatten, gather_rows

    b, kind = flatten(buf), dist_kind(buf)
    obs, actions, valid = b["obs"], b["actions"], b["valid"]
    adv = normalize_advantages(b["advantages"], valid) if cfg.norm_adv else b["advantages"]
    with torch.no_grad():
        old = forward(obs)[0].float()  # pi_k, fixed for this update

    def logratio() -> tuple[torch.Tensor, torch.Tensor]:
        dist = forward(obs)[0].float()
        return log_prob(kind, dist, actions) - b["logprobs"], dist

    def surrogate() -> torch.Tensor:
        return masked_mean(logratio()[0].exp() * adv, valid)

    def mean_kl() -> torch.Tensor:
        return masked_mean(kl(kind, old, forward(obs)[0].float()), valid)

    step = trpo_step(policy.policy_parameters(), surrogate, mean_kl, max_kl=cfg.max_kl, damping=cfg.cg_damping,
                     cg_iters=cfg.cg_iters, max_backtracks=cfg.line_search_steps, reduce=distributed.all_reduce_mean)

    value_params = policy.value_parameters()
    n = b["returns"].shape[0]
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(n, device=valid.device)
        for start in range(0, n, cfg.minibatch_size):
            idx = perm[start : start + cfg.minibatch_size]
            value = forward(gather_rows(obs, idx))[1].float()
            value_loss = 0.5 * masked_mean((value - b["returns"][idx]) ** 2, valid[idx])
            value_optimizer.zero_grad(set_to_none=True)
            value_loss.backward(inputs=value_params)  # not into a shared CNN torso: the policy step moves it
            distributed.all_reduce_grads(value_params)
            torch.nn.utils.clip_grad_norm_(value_params, cfg.max_grad_norm)
            value_optimizer.step()

    with torch.no_grad():
        lr, dist = logratio()
        out = {
            "policy_loss": -masked_mean(lr.exp() * adv, valid),
            "value_loss": value_loss.detach(),
            "entropy": masked_mean(entropy(kind, dist), valid),
            "approx_kl": masked_mean((lr.exp() - 1) - lr, valid),  # k3 against the behaviour policy, as PPO's
            "old_approx_kl": masked_mean(-lr, valid),
            "clipfrac": torch.zeros((), device=valid.device),
            "epochs": torch.tensor(cfg.update_epochs),
        }
    out["loss"] = out["policy_loss"] + out["value_loss"]
    # trpo_step's floats (already on the host) go in as one tensor: one copy to the device, not seven
    keys = ("line_search_steps", "accepted", "step_fraction", "cg_residual", "expected_improvement",
            "actual_improvement")
    host = torch.tensor([step["kl"], *(step[k] for k in keys)], dtype=torch.float64).to(valid.device)
    out["kl"] = host[0]
    out.update({f"trpo/{k}": host[i + 1] for i, k in enumerate(keys)})
    return out
