"""PPO loss of a diagonal-Gaussian (continuous-action) policy, forward and gradient in one pass.

Math (per sample i of M, D action dimensions d, as ``reference.gaussian_ppo_loss``; all in float32):

    z_id    = (a_id - mu_id) exp(-ls_id)                 ls = log sigma, sigma = exp(ls)
    l_i     = sum_d [ -z_id^2 / 2 - ls_id ] - D log sqrt(2 pi)                   (log pi(a_i | s_i))
    H_i     = sum_d ls_id + D (1/2 + log sqrt(2 pi))                             (entropy)
    KL_i    = sum_d [ ls_id - ols_id + (r_id + dm_id^2) / 2 - 1/2 ]              (exact KL(old || new))
              r_id = exp(2 (ols_id - ls_id)) = s_old^2 / s_new^2,  dm_id = (omu_id - mu_id) exp(-ls_id)
    rho_i, k3_i, Â_i, pg_i, vl_i and the loss: exactly as in ``loss.py`` (clip or penalty surrogate,
    (clipped) value loss, masked means over the n valid samples, advantages normalised over them).

The gradient is computed in the same pass and stored, so backward is a scale by grad_output. With
s_i = valid_i / n and g_i = rho_i dpg_i/drho_i (+ beta (rho_i - 1) for the k3 penalty), as in loss.py:

    dl/dmu = z / sigma         dl/dls = z^2 - 1         dH/dls = 1
    dKL/dmu = (mu - omu) / sigma^2 = -dm / sigma         dKL/dls = 1 - (r + dm^2)

    dloss/dmu_id = s_i [ g_i z_id / sigma_id + beta dKL_i/dmu_id ]
    dloss/dls_id = s_i [ g_i (z_id^2 - 1) - c_ent + beta dKL_i/dls_id ]      (beta terms: exact KL only)
    dloss/dv_i   = s_i c_v (dvl_i/dv_i) / 2

with the reference's gradients at ties (max: half to each side; clip: passes at its bounds), so the
gradient matches autograd of the reference exactly, not only almost everywhere. A state-independent
log-std arrives as an expanded (M, D) view (stride 0 on dim 0): it is read through its strides, its
gradient is written per sample, and autograd's expand backward sums it over the samples.

Launches, as loss.py and sharing its pieces: (1) when there is a mask or norm_adv, the pre-reduction
of the advantages to per-block (count, mean, M2) triples (``loss.launch_adv_stats``); (2) the main
kernel below, BLOCK_M samples x BLOCK_D dimensions per program: log-prob, entropy, exact KL, the
gradients, and per-program partial sums of the eight statistics, with loss.py's @triton.jit helpers
for the sample weights, the surrogate, the value loss and the partial sums; (3) loss.py's one-program
finalize (``loss.launch_finalize``). The fused GAE variant replaces (1) by the GAE kernel of gae.py,
which writes the raw advantages and their per-block statistics in the same pass (as gae_loss.py).

Bytes moved, fp32: read mean, log_std and actions 3 * M*D*4 (a stride-0 log_std: D*4, the rest hits
in cache) + M*(4*5 + 1) (old_logp, advantage, value, old value, return, mask), write dmean and
dlog_std 2 * M*D*4 + dvalues M*4; old_mean/old_log_std add 2 * M*D*4. The pre-reduction re-reads
advantages and mask (M*5 B). For a shared log-std, autograd's sum of dlog_std re-reads M*D*4 more
outside the op. BLOCK_M = 2048 / BLOCK_D (min 16) was chosen without a GPU measurement.

Gradients w.r.t. actions, old_logp, advantages, old_values, returns, old_mean and old_log_std are
None: they are data collected with the behaviour policy, never trained through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo.kernels.gae import (
    DEFAULT_IMPL,
    IMPLS,
    check_gae_inputs,
    empty_output,
    register_op,
    wrap,
)
from fastppo.kernels.gae_loss import gae_for_the_loss
from fastppo.kernels.loss import (
    N_STATS,
    check_adv_stats_blocks,
    check_float,
    check_mask,
    launch_adv_stats,
    launch_finalize,
    sample_weights,
    scale_saved_grads,
    setup_context_saving_grads,
    stats_dict,
    store_partials,
    surrogate,
    value_loss,
)
from fastppo.kernels.reference import LOG_SQRT_2PI

# A global a kernel reads must be a tl.constexpr (see loss.py).
HALF_LOG_2PI = tl.constexpr(LOG_SQRT_2PI)  # log sqrt(2 pi)


@triton.jit
def _load_tile(ptr, rows, cols, tile, stride_m, stride_d):
    """A (BLOCK_M, BLOCK_D) tile in float32; 0 outside the tile mask."""
    return tl.load(ptr + rows[:, None] * stride_m + cols[None, :] * stride_d, mask=tile, other=0.0).to(tl.float32)


@triton.jit
def _gaussian_ppo_loss_kernel(
    mean_ptr, log_std_ptr, actions_ptr, old_mean_ptr, old_log_std_ptr, old_logp_ptr, adv_ptr,
    values_ptr, old_values_ptr, returns_ptr, mask_ptr, adv_stats_ptr,
    grad_mean_ptr, grad_log_std_ptr, grad_values_ptr, partial_ptr,  # outputs: (M, D) x 2, (M,), (N_STATS, programs)
    M, D, n_adv_stats,
    stride_mm, stride_md, stride_sm, stride_sd, stride_am, stride_ad, stride_omm, stride_omd, stride_osm, stride_osd,
    stride_olp, stride_adv, stride_v, stride_ov, stride_ret, stride_mask,
    clip_coef, vf_clip_coef, vf_coef, ent_coef, kl_coef,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= n_adv_stats
    HAS_MASK: tl.constexpr,
    NORM_ADV: tl.constexpr,
    CLIP: tl.constexpr,  # clip_coef is not None (else PPO-penalty)
    VF_CLIP: tl.constexpr,
    HAS_OLD: tl.constexpr,  # old_mean and old_log_std given: the exact KL
    USE_KL: tl.constexpr,  # kl_coef != 0: the loss carries beta * KL
    RET_FROM_ADV: tl.constexpr,  # returns = raw advantage + value (fused GAE); returns_ptr unused
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    tile = rmask[:, None] & cmask[None, :]
    valid, scale, n_valid, adv_mean, adv_m2 = sample_weights(
        mask_ptr, adv_stats_ptr, rows, rmask, M, n_adv_stats, stride_mask, BLOCK_G, HAS_MASK, NORM_ADV)

    # Policy: log-prob of the taken action, entropy (padded entries load as 0 and add 0).
    mu = _load_tile(mean_ptr, rows, cols, tile, stride_mm, stride_md)
    ls = _load_tile(log_std_ptr, rows, cols, tile, stride_sm, stride_sd)
    act = _load_tile(actions_ptr, rows, cols, tile, stride_am, stride_ad)
    inv_std = tl.exp(-ls)
    z = (act - mu) * inv_std
    newlogprob = tl.sum(-0.5 * z * z - ls, axis=1) - D * HALF_LOG_2PI
    entropy = tl.sum(ls, axis=1) + D * (0.5 + HALF_LOG_2PI)
    old_logp = tl.load(old_logp_ptr + rows * stride_olp, mask=rmask, other=0.0).to(tl.float32)
    logratio = newlogprob - old_logp
    adv_raw = tl.load(adv_ptr + rows * stride_adv, mask=rmask, other=0.0).to(tl.float32)
    pg, dlogratio, k3, clipped = surrogate(logratio, adv_raw, valid, n_valid, adv_mean, adv_m2, clip_coef,
                                           kl_coef, NORM_ADV, CLIP, USE_KL and not HAS_OLD)

    grad_mu = dlogratio[:, None] * z * inv_std
    grad_ls = dlogratio[:, None] * (z * z - 1.0) - ent_coef
    if HAS_OLD:
        old_mu = _load_tile(old_mean_ptr, rows, cols, tile, stride_omm, stride_omd)
        old_ls = _load_tile(old_log_std_ptr, rows, cols, tile, stride_osm, stride_osd)
        dm = (old_mu - mu) * inv_std
        var_ratio = tl.exp(2.0 * (old_ls - ls))
        kl = tl.sum(tl.where(tile, ls - old_ls + 0.5 * (var_ratio + dm * dm) - 0.5, 0.0), axis=1)  # KL(old || new)
        if USE_KL:
            grad_mu += kl_coef * (-dm * inv_std)
            grad_ls += kl_coef * (1.0 - (var_ratio + dm * dm))
    else:
        kl = tl.zeros([BLOCK_M], dtype=tl.float32)
    out_offs = rows[:, None] * D + cols[None, :]
    tl.store(grad_mean_ptr + out_offs, (grad_mu * scale[:, None]).to(grad_mean_ptr.dtype.element_ty), mask=tile)
    tl.store(grad_log_std_ptr + out_offs, (grad_ls * scale[:, None]).to(grad_log_std_ptr.dtype.element_ty),
             mask=tile)

    vl = value_loss(values_ptr, old_values_ptr, returns_ptr, grad_values_ptr, rows, rmask, adv_raw, scale,
                    stride_v, stride_ov, stride_ret, vf_clip_coef, vf_coef, VF_CLIP, RET_FROM_ADV)
    store_partials(partial_ptr, valid, pg, vl, entropy, k3, -logratio, clipped, kl)


# ----------------------------------------------------------------------------------------------
# Checks and launcher (shared by the plain and the fused op)
# ----------------------------------------------------------------------------------------------


def check_gaussian_inputs(
    mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor, old_mean: torch.Tensor | None,
    old_log_std: torch.Tensor | None, mask: torch.Tensor | None, lead: tuple[int, ...],
    floats: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Validate the policy inputs (mean (*lead, D) etc.) and the float (*lead) vectors; returns log_std
    expanded to mean's shape (a (D,) or (1, D) state-independent log-std broadcasts, as in the reference)."""
    if mean.dim() != len(lead) + 1 or tuple(mean.shape[:-1]) != lead:
        raise ValueError(f"mean must have shape {(*lead, 'D')}, got {tuple(mean.shape)}")
    D = mean.shape[-1]
    if D < 1 or min(lead) < 1:
        raise ValueError(f"mean must be non-empty, got shape {tuple(mean.shape)}")
    shape, device = tuple(mean.shape), mean.device
    check_float("mean", mean, shape, device, "mean")
    try:
        log_std = log_std.expand(shape)  # a view: autograd sums the gradient back to a broadcast log_std
    except RuntimeError:
        raise ValueError(f"log_std must have shape {shape} or broadcast to it, got {tuple(log_std.shape)}") from None
    check_float("log_std", log_std, shape, device, "mean")
    check_float("actions", actions, shape, device, "mean")
    if (old_mean is None) != (old_log_std is None):
        raise ValueError("old_mean and old_log_std must be given together (both or neither)")
    if old_mean is not None:
        check_float("old_mean", old_mean, shape, device, "mean")
        check_float("old_log_std", old_log_std, shape, device, "mean")
    for name, x in floats.items():
        check_float(name, x, lead, device, "mean")
    check_mask(mask, lead, device)
    return log_std


def launch_gaussian_ppo_loss(
    mean: torch.Tensor,  # (M, D)
    log_std: torch.Tensor,  # (M, D), any strides (stride 0 on dim 0 for a shared log-std)
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,  # raw (un-normalised); with returns=None the fused GAE's output
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor | None,  # None: returns = advantages + values (fused GAE)
    old_mean: torch.Tensor | None,
    old_log_std: torch.Tensor | None,
    mask: torch.Tensor | None,
    adv_stats: torch.Tensor | None,  # (G, 3) (count, mean, M2) blocks; None: computed here
    grad_values: torch.Tensor,  # (M,) output buffer, a view that may be part of a larger one
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the (pre-reduction,) main and finalize kernels on validated 1-D/2-D inputs.

    Returns (out (8,) fp32 = loss then STAT_KEYS' values, grad_mean (M, D) in mean's dtype,
    grad_log_std (M, D) contiguous in log_std's dtype); grad_values is filled in place.
    """
    M, D = mean.shape
    device = mean.device
    has_mask = mask is not None
    has_old = old_mean is not None
    mask_arg = mask if has_mask else old_logp  # dummy pointer if unused
    if adv_stats is None and (has_mask or norm_adv):
        adv_stats = launch_adv_stats(advantages, mask_arg, has_mask)
    n_stats = check_adv_stats_blocks(adv_stats)

    block_d = triton.next_power_of_2(D)
    block_m = max(16, min(triton.next_power_of_2(M), 2048 // block_d))
    grid = (triton.cdiv(M, block_m),)
    grad_mean = empty_output((M, D), mean.dtype, device)
    grad_log_std = empty_output((M, D), log_std.dtype, device)
    partial = empty_output((N_STATS, grid[0]), torch.float32, device)
    om = old_mean if has_old else mean  # dummy pointers if unused (read-only)
    ols = old_log_std if has_old else log_std
    ret = returns if returns is not None else values
    wrap(_gaussian_ppo_loss_kernel)[grid](
        mean, log_std, actions, om, ols, old_logp, advantages, values, old_values, ret, mask_arg,
        adv_stats if adv_stats is not None else advantages,
        grad_mean, grad_log_std, grad_values, partial,
        M, D, n_stats,
        mean.stride(0), mean.stride(1), log_std.stride(0), log_std.stride(1), actions.stride(0), actions.stride(1),
        om.stride(0), om.stride(1), ols.stride(0), ols.stride(1),
        old_logp.stride(0), advantages.stride(0), values.stride(0), old_values.stride(0), ret.stride(0),
        mask_arg.stride(0),
        0.0 if clip_coef is None else clip_coef, 0.0 if vf_clip_coef is None else vf_clip_coef,
        vf_coef, ent_coef, kl_coef,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_G=triton.next_power_of_2(n_stats),
        HAS_MASK=has_mask, NORM_ADV=norm_adv, CLIP=clip_coef is not None, VF_CLIP=vf_clip_coef is not None,
        HAS_OLD=has_old, USE_KL=kl_coef != 0.0, RET_FROM_ADV=returns is None,
        num_warps=4,
    )
    out = launch_finalize(partial, vf_coef, ent_coef, kl_coef, has_old)
    return out, grad_mean, grad_log_std


# ----------------------------------------------------------------------------------------------
# gaussian_ppo_loss: op with autograd, and the public function
# ----------------------------------------------------------------------------------------------


def _gaussian_ppo_loss_op(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    old_mean: torch.Tensor | None,
    old_log_std: torch.Tensor | None,
    mask: torch.Tensor | None,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_values = empty_output(tuple(values.shape), values.dtype, values.device)
    out, grad_mean, grad_log_std = launch_gaussian_ppo_loss(
        mean, log_std, actions, old_logp, advantages, values, old_values, returns, old_mean, old_log_std, mask,
        None, grad_values, clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef)
    return out, grad_mean, grad_log_std, grad_values


def _gaussian_ppo_loss_fake(mean, log_std, actions, old_logp, advantages, values, old_values, returns, old_mean,
                            old_log_std, mask, clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef):
    return (mean.new_empty((8,), dtype=torch.float32), mean.new_empty(mean.shape),
            log_std.new_empty(log_std.shape), values.new_empty(values.shape))


_gaussian_ppo_loss = register_op("gaussian_ppo_loss", _gaussian_ppo_loss_op, _gaussian_ppo_loss_fake)


def _gaussian_ppo_loss_backward(ctx, grad_out, *_grad_grads):
    gm, gs, gv = scale_saved_grads(ctx, grad_out)
    # inputs: mean, log_std, actions, old_logp, advantages, values, old_values, returns, old_mean,
    # old_log_std, mask, + 6 scalars
    return (gm, gs, None, None, None, gv) + (None,) * 11


_gaussian_ppo_loss.register_autograd(_gaussian_ppo_loss_backward, setup_context=setup_context_saving_grads)


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


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
    """Triton twin of ``reference.gaussian_ppo_loss``; same arguments, loss and stats keys (see there).

    mean, log_std, actions, old_mean, old_log_std (M, D) and the (M,) vectors float16/bfloat16/float32
    (computed in float32), mask bool/integer; any strides, so a state-independent log-std can be
    passed as ``param.expand_as(mean)`` (stride 0 on dim 0) or as the (D,) / (1, D) parameter itself.
    The loss and stats are float32. The loss is differentiable w.r.t. mean, log_std and values only
    (gradients computed in the forward, stored in each input's dtype; backward is a scale); everything
    else is data and gets no gradient. Not twice differentiable.
    """
    if mean.dim() != 2:
        raise ValueError(f"mean must be 2-D (M, D), got shape {tuple(mean.shape)}")
    log_std = check_gaussian_inputs(mean, log_std, actions, old_mean, old_log_std, mask, (mean.shape[0],),
                          dict(old_logp=old_logp, advantages=advantages, values=values, old_values=old_values,
                               returns=returns))
    out, _, _, _ = _gaussian_ppo_loss(
        mean, log_std, actions.detach(), old_logp.detach(), advantages.detach(), values, old_values.detach(),
        returns.detach(), _detached(old_mean), _detached(old_log_std), mask,
        None if clip_coef is None else float(clip_coef), float(vf_coef), float(ent_coef),
        None if vf_clip_coef is None else float(vf_clip_coef), bool(norm_adv), float(kl_coef))
    return out[0], stats_dict(out, old_mean is not None)


# ----------------------------------------------------------------------------------------------
# gae_gaussian_ppo_loss: GAE fused with the loss for whole env columns
# ----------------------------------------------------------------------------------------------


def _gae_gaussian_ppo_loss_op(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    old_mean: torch.Tensor | None,
    old_log_std: torch.Tensor | None,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, n, D = mean.shape
    M = T * n
    adv, adv_stats, grad_values = gae_for_the_loss(rewards, values, terminated, truncated, gamma, gae_lambda, impl,
                                                   mask, norm_adv)
    # Every (T, n[, D]) input merges its T and n dims (checked), so sample m = t * n + i is row m.
    out, grad_mean, grad_log_std = launch_gaussian_ppo_loss(
        mean.view(M, D), log_std.view(M, D), actions.view(M, D), old_logp.view(M), adv.view(M),
        values[:T].view(M), old_values.view(M), None,
        None if old_mean is None else old_mean.view(M, D), None if old_log_std is None else old_log_std.view(M, D),
        None if mask is None else mask.view(M), adv_stats, grad_values.view(-1)[:M],
        clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef)
    return out, grad_mean.view(T, n, D), grad_log_std.view(T, n, D), grad_values


def _gae_gaussian_ppo_loss_fake(mean, log_std, actions, old_logp, values, old_values, rewards, terminated,
                                truncated, old_mean, old_log_std, mask, gamma, gae_lambda, clip_coef, vf_coef,
                                ent_coef, vf_clip_coef, norm_adv, kl_coef, impl):
    return (mean.new_empty((8,), dtype=torch.float32), mean.new_empty(mean.shape),
            log_std.new_empty(log_std.shape), values.new_empty(values.shape))


_gae_gaussian_ppo_loss = register_op("gae_gaussian_ppo_loss", _gae_gaussian_ppo_loss_op,
                                     _gae_gaussian_ppo_loss_fake)


def _gae_gaussian_ppo_loss_backward(ctx, grad_out, *_grad_grads):
    gm, gs, gv = scale_saved_grads(ctx, grad_out)
    # inputs: mean, log_std, actions, old_logp, values, then 16 data tensors and scalars
    return (gm, gs, None, None, gv) + (None,) * 16


_gae_gaussian_ppo_loss.register_autograd(_gae_gaussian_ppo_loss_backward, setup_context=setup_context_saving_grads)


def _check_rows(name: str, x: torch.Tensor | None, T: int, n: int) -> None:
    """x (T, n, ...) must merge its T and n dims into one of T * n rows without a copy."""
    if x is None:
        return
    try:
        x.view(T * n, *x.shape[2:])
    except RuntimeError:
        raise ValueError(f"{name} must merge its (T, n) dims into T * n rows (contiguous, or expanded over both), "
                         f"got strides {tuple(x.stride())}") from None


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
    impl: str = DEFAULT_IMPL,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Triton twin of ``reference.gae_gaussian_ppo_loss`` (see there for the arguments); impl picks the
    GAE kernel ("loop" or "scan").

    mean, log_std, actions, old_mean, old_log_std (T, n, D) float16/bfloat16/float32; values (T + 1, n)
    float32; rewards, old_logp, old_values (T, n) float; flags and mask as in gae/gaussian_ppo_loss.
    The (T, n[, D]) inputs (and values[:T]) must merge their T and n dims into T * n rows without a
    copy: contiguous, or expanded over both (a state-independent log-std as ``param.expand_as(mean)`` or
    the (D,) parameter itself);
    rewards and the flags may have any strides. Differentiable w.r.t. mean, log_std and values
    (values[T] gets a zero gradient); not twice differentiable.
    """
    if mean.dim() != 3:
        raise ValueError(f"mean must be 3-D (T, n, D), got shape {tuple(mean.shape)}")
    T, n = check_gae_inputs(rewards, values, terminated, truncated)
    log_std = check_gaussian_inputs(mean, log_std, actions, old_mean, old_log_std, mask, (T, n),
                          dict(old_logp=old_logp, old_values=old_values))
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("mean", mean), ("log_std", log_std), ("actions", actions), ("old_logp", old_logp),
                    ("values[:T]", values[:T]), ("old_values", old_values), ("old_mean", old_mean),
                    ("old_log_std", old_log_std), ("mask", mask)):
        _check_rows(name, x, T, n)
    out, _, _, _ = _gae_gaussian_ppo_loss(
        mean, log_std, actions.detach(), old_logp.detach(), values, old_values.detach(), rewards.detach(),
        terminated, truncated, _detached(old_mean), _detached(old_log_std), mask, float(gamma), float(gae_lambda),
        None if clip_coef is None else float(clip_coef), float(vf_coef), float(ent_coef),
        None if vf_clip_coef is None else float(vf_clip_coef), bool(norm_adv), float(kl_coef), impl)
    return out[0], stats_dict(out, old_mean is not None)
