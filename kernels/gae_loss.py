"""GAE from the current value predictions fused with the PPO loss, for a minibatch of whole env columns.

Math: ``reference.gae_ppo_loss``, i.e. for the n env columns of the minibatch

    A, R = gae(rewards, stopgrad(V), terminated, truncated)      V: (T + 1, n) current predictions
    loss, stats = ppo_loss(logits, ..., advantages=A, values=V[:T], returns=R)   on the M = T * n samples

Advantages and returns are constants for the gradient (standard PPO), so the value gradient reaches
V[:T] through the value loss only and the bootstrap row V[T] gets exactly zero (the trainer detaches
that row anyway). Gradients w.r.t. logits (T, n, A) and values (T + 1, n); everything else is data.

Launches: (1) the GAE kernel of ``gae.py`` (loop or scan, parallel over column blocks) writes the raw
advantages A (T, n) and each column block's (count, mean, M2) of A over the valid samples: the
advantage normalisation's pre-reduction comes free with the GAE pass, so there is no separate
statistics launch; (2) the loss kernel of ``loss.py`` reads A, recomputes R = A + V[t] from the value it loads
anyway, and writes the gradients and partial sums; (3) the finalize kernel.

Bytes moved per sample, fp32, bool flags: (1) reads r, V, term, trunc, mask (4 + 4 + 1 + 1 + 1) and
writes A (4); (2) is ``loss.py``'s traffic with A in place of the advantage and no returns read.
Against ``gae`` then ``ppo_loss`` this saves writing and re-reading the returns and the separate
pre-reduction's re-read of A and mask, and one launch.
"""

from __future__ import annotations

import torch

from fastppo.kernels.gae import DEFAULT_IMPL, IMPLS, check_gae_inputs, empty_output, register_op
from fastppo.kernels.gae import launch_gae as _launch_gae
from fastppo.kernels.loss import (
    check_loss_inputs,
    launch_ppo_loss,
    scale_saved_grads,
    setup_context_saving_grads,
    stats_dict,
)


def gae_for_the_loss(rewards, values, terminated, truncated, gamma: float, gae_lambda: float, impl: str,
                     mask: torch.Tensor | None, norm_adv: bool):
    """The fused ops' first part: advantages (T, n) from the current values (returns not stored), their
    statistics when the loss needs them, and the (T + 1, n) values gradient to fill, its bootstrap row 0."""
    T, n = rewards.shape
    adv, _, adv_stats = _launch_gae(rewards, values, terminated, truncated, gamma, gae_lambda, impl,
                                    store_returns=False, mask=mask, stats=norm_adv or mask is not None)
    grad_values = empty_output((T + 1, n), values.dtype, values.device)
    grad_values[T].zero_()  # the bootstrap row only feeds the detached GAE
    return adv, adv_stats, grad_values


def _gae_ppo_loss_op(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    old_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    gamma: float,
    gae_lambda: float,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, n, A = logits.shape
    M = T * n
    adv, adv_stats, grad_values = gae_for_the_loss(rewards, values, terminated, truncated, gamma, gae_lambda, impl,
                                                   mask, norm_adv)
    # All (T, n[, A]) inputs are contiguous (checked), so sample m = t * n + i is a flat row.
    out, grad_logits = launch_ppo_loss(
        logits.view(M, A), actions.view(M), old_logp.view(M), adv.view(M), values.view(-1)[:M],
        old_values.view(M), None, None if old_logits is None else old_logits.view(M, A),
        None if mask is None else mask.view(M), adv_stats, grad_values.view(-1)[:M],
        clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef)
    return out, grad_logits.view(T, n, A), grad_values


def _gae_ppo_loss_fake(logits, actions, old_logp, values, old_values, rewards, terminated, truncated,
                       old_logits, mask, gamma, gae_lambda, clip_coef, vf_coef, ent_coef, vf_clip_coef,
                       norm_adv, kl_coef, impl):
    return logits.new_empty((8,), dtype=torch.float32), torch.empty_like(logits), torch.empty_like(values)


_gae_ppo_loss = register_op("gae_ppo_loss", _gae_ppo_loss_op, _gae_ppo_loss_fake)


def _gae_ppo_loss_backward(ctx, grad_out, _grad_logits_out, _grad_values_out):
    gl, gv = scale_saved_grads(ctx, grad_out)
    # inputs: logits, actions, old_logp, values, then 15 data tensors and scalars
    return (gl, None, None, gv) + (None,) * 15


_gae_ppo_loss.register_autograd(_gae_ppo_loss_backward, setup_context=setup_context_saving_grads)


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
    impl: str = DEFAULT_IMPL,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Triton twin of ``reference.gae_ppo_loss`` (see there for the arguments); impl picks the GAE
    kernel ("loop" or "scan").

    logits/old_logits (T, n, A) float16/bfloat16/float32; values (T + 1, n) float32; rewards,
    old_logp, old_values (T, n) float; flags and mask as in gae/ppo_loss. All must be contiguous
    (the samples are read as flat rows). Differentiable w.r.t. logits and values (values[T] gets a
    zero gradient); not twice differentiable.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D (T, n, A), got shape {tuple(logits.shape)}")
    T, n = check_gae_inputs(rewards, values, terminated, truncated)
    check_loss_inputs(logits, actions, old_logits, mask, (T, n),
                      dict(old_logp=old_logp, old_values=old_values))
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("logits", logits), ("actions", actions), ("old_logp", old_logp), ("values", values),
                    ("old_values", old_values), ("old_logits", old_logits), ("mask", mask)):
        if x is not None and not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() on the minibatch gather)")
    out, _, _ = _gae_ppo_loss(
        logits, actions, old_logp.detach(), values, old_values.detach(), rewards.detach(), terminated,
        truncated, None if old_logits is None else old_logits.detach(), mask, float(gamma), float(gae_lambda),
        None if clip_coef is None else float(clip_coef), float(vf_coef), float(ent_coef),
        None if vf_clip_coef is None else float(vf_clip_coef), bool(norm_adv), float(kl_coef), impl)
    return out[0], stats_dict(out, old_logits is not None)
