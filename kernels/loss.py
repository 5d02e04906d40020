"""PPO loss of a minibatch, forward and gradient in one pass over the logits.

Math (per sample i of M, CleanRL's formulas, as ``reference.ppo_loss``; all in float32):

    logp_i  = log_softmax(z_i)                      p_i = exp(logp_i)            (A actions)
    l_i     = logp_i[a_i]                           H_i = -sum_j p_ij logp_ij
    rho_i   = exp(l_i - old_logp_i)                 k3_i = (rho_i - 1) - log rho_i
    Â_i     = (A_i - mean) / (std + 1e-8)           mean, std (Bessel) over the valid samples
    pg_i    = max(-Â_i rho_i, -Â_i clip(rho_i, 1 - eps, 1 + eps))      (clip)   or  -Â_i rho_i (penalty)
    vl_i    = max((v_i - R_i)^2, (v_old_i + clip(v_i - v_old_i, -c, c) - R_i)^2)  or (v_i - R_i)^2
    KL_i    = sum_j q_ij (log q_ij - logp_ij)       q = softmax(old logits)  (exact KL(old || new))
    loss    = mean(pg) + beta mean(KL or k3) - c_ent mean(H) + c_v 0.5 mean(vl)

means are over the valid (mask) samples, n = their count (1 if none). The gradient is computed in
the same pass and stored, so backward is a scale by grad_output (s_i = valid_i / n):

    dloss/dz_ij = s_i [ g_i (1[j = a_i] - p_ij) + c_ent p_ij (logp_ij + H_i) + beta (p_ij sum_k q_ik - q_ij) ]
    g_i         = rho_i dpg_i/drho_i (+ beta (rho_i - 1) for the k3 penalty)
    dloss/dv_i  = s_i c_v (dvl_i/dv_i) / 2

with the reference's gradients at ties (max: half to each side; clip: passes at its bounds), so the
gradient matches autograd of the reference exactly, not only almost everywhere.

Launches: (1) when there is a mask or norm_adv, a pre-reduction of the advantages to per-block
(count, mean, M2) triples (a few dozen blocks); (2) the main kernel, BLOCK_M samples per program:
softmax, losses, gradients, and per-program partial sums of the eight statistics; (3) a one-program
finalize that sums the partials into the loss and the stats. Every program of (2) combines the
triples of (1) itself, so no launch waits on a host value and nothing syncs. The pieces of (2) that
do not depend on the policy's distribution (sample weights, surrogate, value loss, partial sums)
are @triton.jit helpers that ``gaussian_loss`` shares, as it shares (1) and (3).

Bytes moved, fp32 logits: read M*A*4 (logits) + M*(8 + 4*5 + 1) (action, old_logp, advantage,
value, old value, return, mask), write M*A*4 (dlogits) + M*4 (dvalues); old_logits add M*A*4.
The pre-reduction re-reads advantages and mask (M*5 B). The tile of logits is read once.

Gradients w.r.t. old_logp, advantages, old_values, returns and old_logits are None: they are data
collected with the behaviour policy, never trained through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastppo.kernels.gae import (
    MAX_STATS_BLOCKS,
    empty_output,
    reduce_stats,
    register_op,
    wrap,
)

# Globals a kernel reads must be tl.constexpr objects (compiled Triton rejects others; the
# interpreter does not, so tests/test_kernels.py also compiles every kernel for sm_90).
ADV_EPS = tl.constexpr(1e-8)  # CleanRL's epsilon in (A - mean) / (std + eps), as reference.ADV_EPS
NAN = tl.constexpr(tl.PropagateNan.ALL)  # min/max/clamp propagate NaN, as torch's do
N_STATS = 8  # partial sums: pg, vl, entropy, k3, -logratio, clipped, exact KL, count
STAT_KEYS = ("policy_loss", "value_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac", "kl")


@triton.jit
def _adv_stats_kernel(
    adv_ptr, mask_ptr, stats_ptr,
    M, stride_adv, stride_mask,
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Per-block (count, mean, M2) of the advantages over the valid samples -> stats[pid, 0:3]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    valid = rows < M
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows * stride_mask, mask=rows < M, other=0) != 0)
    x = tl.load(adv_ptr + rows * stride_adv, mask=valid, other=0.0).to(tl.float32)
    n, mean, m2 = reduce_stats(tl.where(valid, 1.0, 0.0), x, tl.zeros([BLOCK], dtype=tl.float32), 0)
    tl.store(stats_ptr + pid * 3, n)
    tl.store(stats_ptr + pid * 3 + 1, mean)
    tl.store(stats_ptr + pid * 3 + 2, m2)


@triton.jit
def _log_softmax(x_ptr, rows, cols, rmask, cmask, stride_m, stride_a):
    """Row-wise (logp, p) of a (BLOCK_M, BLOCK_A) tile in float32; padded columns get logp = p = 0."""
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_a,
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, -float("inf"))
    z = x - tl.max(x, axis=1)[:, None]
    ez = tl.exp(z)  # 0 on padded columns
    sumexp = tl.sum(ez, axis=1)
    logp = tl.where(cmask[None, :], z - tl.log(sumexp)[:, None], 0.0)
    return logp, ez / sumexp[:, None]


@triton.jit
def sample_weights(mask_ptr, adv_stats_ptr, rows, rmask, M, n_adv_stats, stride_mask,
                   BLOCK_G: tl.constexpr, HAS_MASK: tl.constexpr, NORM_ADV: tl.constexpr):
    """(valid, scale, n_valid, adv_mean, adv_m2) of a block of rows: the valid samples, n = their count
    (which every mean divides by), scale = valid / max(n, 1) = d(masked mean)/d(sample), and the
    advantages' (mean, M2) over the valid samples, combined from the pre-reduced (count, mean, M2)
    triples (0 when neither HAS_MASK nor NORM_ADV: then nothing was pre-reduced)."""
    valid = rmask
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows * stride_mask, mask=rmask, other=0) != 0)
    adv_mean = 0.0
    adv_m2 = 0.0
    if HAS_MASK or NORM_ADV:
        g = tl.arange(0, BLOCK_G)
        gm = g < n_adv_stats
        n_valid, adv_mean, adv_m2 = reduce_stats(
            tl.load(adv_stats_ptr + g * 3, mask=gm, other=0.0),
            tl.load(adv_stats_ptr + g * 3 + 1, mask=gm, other=0.0),
            tl.load(adv_stats_ptr + g * 3 + 2, mask=gm, other=0.0), 0)
    else:
        n_valid = M * 1.0
    scale = tl.where(valid, 1.0 / tl.maximum(n_valid, 1.0), 0.0)
    return valid, scale, n_valid, adv_mean, adv_m2


@triton.jit
def surrogate(logratio, adv_raw, valid, n_valid, adv_mean, adv_m2, clip_coef, kl_coef,
              NORM_ADV: tl.constexpr, CLIP: tl.constexpr, K3_PENALTY: tl.constexpr):
    """Per-sample (pg, dloss_i/dlogratio_i before the 1/n scale, k3, clipped) from the log-ratio and
    the raw advantage; K3_PENALTY adds the gradient of beta * k3 (the KL term without old params)."""
    ratio = tl.exp(logratio)
    k3 = (ratio - 1.0) - logratio
    adv = adv_raw
    if NORM_ADV:
        std = tl.sqrt(adv_m2 / tl.maximum(n_valid - 1.0, 1.0))
        adv = (adv - adv_mean) / (std + ADV_EPS)
    adv = tl.where(valid, adv, 0.0)

    if CLIP:
        pg_loss1 = -adv * ratio
        pg_loss2 = -adv * tl.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef, propagate_nan=NAN)
        pg = tl.maximum(pg_loss1, pg_loss2, propagate_nan=NAN)
        w1 = tl.where(pg_loss1 > pg_loss2, 1.0, tl.where(pg_loss1 == pg_loss2, 0.5, 0.0))
        inside = (ratio >= 1.0 - clip_coef) & (ratio <= 1.0 + clip_coef)  # clip passes the gradient (reference.clip)
        dpg_dratio = -adv * (w1 + tl.where(inside, 1.0 - w1, 0.0))
        clipped = tl.where(tl.abs(ratio - 1.0) > clip_coef, 1.0, 0.0)
    else:
        pg = -adv * ratio
        dpg_dratio = -adv
        clipped = tl.zeros_like(ratio)
    dlogratio = ratio * dpg_dratio
    if K3_PENALTY:
        dlogratio += kl_coef * (ratio - 1.0)  # d k3 / d logratio
    return pg, dlogratio, k3, clipped


@triton.jit
def value_loss(values_ptr, old_values_ptr, returns_ptr, grad_values_ptr, rows, rmask, adv_raw, scale,
               stride_v, stride_ov, stride_ret, vf_clip_coef, vf_coef,
               VF_CLIP: tl.constexpr, RET_FROM_ADV: tl.constexpr):
    """(Clipped) squared error per sample; stores dloss/dvalues (contiguous) and returns vl.
    Returns are constants; with RET_FROM_ADV they are the raw advantage + value (fused GAE)."""
    v = tl.load(values_ptr + rows * stride_v, mask=rmask, other=0.0).to(tl.float32)
    if RET_FROM_ADV:
        ret = adv_raw + v
    else:
        ret = tl.load(returns_ptr + rows * stride_ret, mask=rmask, other=0.0).to(tl.float32)
    dv = v - ret
    vl = dv * dv
    dvl = dv  # half of d vl / d v
    if VF_CLIP:
        old_v = tl.load(old_values_ptr + rows * stride_ov, mask=rmask, other=0.0).to(tl.float32)
        step = v - old_v
        dc = old_v + tl.clamp(step, -vf_clip_coef, vf_clip_coef, propagate_nan=NAN) - ret
        vl_clipped = dc * dc
        wu = tl.where(vl > vl_clipped, 1.0, tl.where(vl == vl_clipped, 0.5, 0.0))
        inside_v = (step >= -vf_clip_coef) & (step <= vf_clip_coef)
        dvl = wu * dv + tl.where(inside_v, (1.0 - wu) * dc, 0.0)
        vl = tl.maximum(vl, vl_clipped, propagate_nan=NAN)
    tl.store(grad_values_ptr + rows, (vf_coef * dvl * scale).to(grad_values_ptr.dtype.element_ty), mask=rmask)
    return vl


@triton.jit
def store_partials(partial_ptr, valid, pg, vl, entropy, k3, neg_logratio, clipped, kl):
    """This program's partial sums over the valid samples -> partial[:, pid] (N_STATS rows);
    invalid ones are dropped, NaN or not."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    tl.store(partial_ptr + 0 * n_prog + pid, tl.sum(tl.where(valid, pg, 0.0), axis=0))
    tl.store(partial_ptr + 1 * n_prog + pid, tl.sum(tl.where(valid, vl, 0.0), axis=0))
    tl.store(partial_ptr + 2 * n_prog + pid, tl.sum(tl.where(valid, entropy, 0.0), axis=0))
    tl.store(partial_ptr + 3 * n_prog + pid, tl.sum(tl.where(valid, k3, 0.0), axis=0))
    tl.store(partial_ptr + 4 * n_prog + pid, tl.sum(tl.where(valid, neg_logratio, 0.0), axis=0))
    tl.store(partial_ptr + 5 * n_prog + pid, tl.sum(tl.where(valid, clipped, 0.0), axis=0))
    tl.store(partial_ptr + 6 * n_prog + pid, tl.sum(tl.where(valid, kl, 0.0), axis=0))
    tl.store(partial_ptr + 7 * n_prog + pid, tl.sum(tl.where(valid, 1.0, 0.0), axis=0))


@triton.jit
def _ppo_loss_kernel(
    logits_ptr, old_logits_ptr, actions_ptr, old_logp_ptr, adv_ptr,
    values_ptr, old_values_ptr, returns_ptr, mask_ptr, adv_stats_ptr,
    grad_logits_ptr, grad_values_ptr, partial_ptr,  # outputs: (M, A), (M,), (N_STATS, programs)
    M, A, n_adv_stats,
    stride_lm, stride_la, stride_om, stride_oa, stride_act, stride_olp, stride_adv,
    stride_v, stride_ov, stride_ret, stride_mask,
    clip_coef, vf_clip_coef, vf_coef, ent_coef, kl_coef,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= n_adv_stats
    HAS_MASK: tl.constexpr,
    NORM_ADV: tl.constexpr,
    CLIP: tl.constexpr,  # clip_coef is not None (else PPO-penalty)
    VF_CLIP: tl.constexpr,
    HAS_OLD_LOGITS: tl.constexpr,
    USE_KL: tl.constexpr,  # kl_coef != 0: the loss carries beta * KL
    RET_FROM_ADV: tl.constexpr,  # returns = raw advantage + value (fused GAE); returns_ptr unused
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_A)
    rmask = rows < M
    cmask = cols < A
    valid, scale, n_valid, adv_mean, adv_m2 = sample_weights(
        mask_ptr, adv_stats_ptr, rows, rmask, M, n_adv_stats, stride_mask, BLOCK_G, HAS_MASK, NORM_ADV)

    # Policy: log-softmax, taken action, entropy.
    logp, p = _log_softmax(logits_ptr, rows, cols, rmask, cmask, stride_lm, stride_la)
    entropy = -tl.sum(p * logp, axis=1)
    act = tl.load(actions_ptr + rows * stride_act, mask=rmask, other=0).to(tl.int32)
    onehot = cols[None, :] == act[:, None]
    newlogprob = tl.sum(tl.where(onehot, logp, 0.0), axis=1)
    newlogprob = tl.where((act >= 0) & (act < A), newlogprob, float("nan"))  # bad action -> NaN loss
    old_logp = tl.load(old_logp_ptr + rows * stride_olp, mask=rmask, other=0.0).to(tl.float32)
    logratio = newlogprob - old_logp
    adv_raw = tl.load(adv_ptr + rows * stride_adv, mask=rmask, other=0.0).to(tl.float32)
    pg, dlogratio, k3, clipped = surrogate(logratio, adv_raw, valid, n_valid, adv_mean, adv_m2, clip_coef,
                                           kl_coef, NORM_ADV, CLIP, USE_KL and not HAS_OLD_LOGITS)

    grad = dlogratio[:, None] * (tl.where(onehot, 1.0, 0.0) - p) + ent_coef * p * (logp + entropy[:, None])
    if HAS_OLD_LOGITS:
        old_logq, q = _log_softmax(old_logits_ptr, rows, cols, rmask, cmask, stride_om, stride_oa)
        kl = tl.sum(q * (old_logq - logp), axis=1)  # KL(old || new)
        if USE_KL:
            grad += kl_coef * (p * tl.sum(q, axis=1)[:, None] - q)
    else:
        kl = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad = grad * scale[:, None]
    tl.store(grad_logits_ptr + rows[:, None] * A + cols[None, :],
             grad.to(grad_logits_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    vl = value_loss(values_ptr, old_values_ptr, returns_ptr, grad_values_ptr, rows, rmask, adv_raw, scale,
                    stride_v, stride_ov, stride_ret, vf_clip_coef, vf_coef, VF_CLIP, RET_FROM_ADV)
    store_partials(partial_ptr, valid, pg, vl, entropy, k3, -logratio, clipped, kl)


@triton.jit
def _finalize_kernel(
    partial_ptr, out_ptr,  # (N_STATS, G) partial sums -> out (8,): loss then STAT_KEYS
    G, vf_coef, ent_coef, kl_coef,
    BLOCK_G: tl.constexpr,
    HAS_OLD_LOGITS: tl.constexpr,
    USE_KL: tl.constexpr,
):
    s_pg = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_vl = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_ent = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_k3 = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_nlr = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_clip = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK_G], dtype=tl.float32)
    s_n = tl.zeros([BLOCK_G], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        offs = start + tl.arange(0, BLOCK_G)
        m = offs < G
        s_pg += tl.load(partial_ptr + 0 * G + offs, mask=m, other=0.0)
        s_vl += tl.load(partial_ptr + 1 * G + offs, mask=m, other=0.0)
        s_ent += tl.load(partial_ptr + 2 * G + offs, mask=m, other=0.0)
        s_k3 += tl.load(partial_ptr + 3 * G + offs, mask=m, other=0.0)
        s_nlr += tl.load(partial_ptr + 4 * G + offs, mask=m, other=0.0)
        s_clip += tl.load(partial_ptr + 5 * G + offs, mask=m, other=0.0)
        s_kl += tl.load(partial_ptr + 6 * G + offs, mask=m, other=0.0)
        s_n += tl.load(partial_ptr + 7 * G + offs, mask=m, other=0.0)
    inv_n = 1.0 / tl.maximum(tl.sum(s_n, axis=0), 1.0)
    policy_loss = tl.sum(s_pg, axis=0) * inv_n
    approx_kl = tl.sum(s_k3, axis=0) * inv_n
    kl = tl.sum(s_kl, axis=0) * inv_n
    if USE_KL:
        if HAS_OLD_LOGITS:
            policy_loss += kl_coef * kl
        else:
            policy_loss += kl_coef * approx_kl
    value_loss = 0.5 * tl.sum(s_vl, axis=0) * inv_n
    entropy = tl.sum(s_ent, axis=0) * inv_n
    tl.store(out_ptr + 0, policy_loss - ent_coef * entropy + vf_coef * value_loss)
    tl.store(out_ptr + 1, policy_loss)
    tl.store(out_ptr + 2, value_loss)
    tl.store(out_ptr + 3, entropy)
    tl.store(out_ptr + 4, approx_kl)
    tl.store(out_ptr + 5, tl.sum(s_nlr, axis=0) * inv_n)
    tl.store(out_ptr + 6, tl.sum(s_clip, axis=0) * inv_n)
    tl.store(out_ptr + 7, kl)


# ----------------------------------------------------------------------------------------------
# Launcher (shared with gae_loss)
# ----------------------------------------------------------------------------------------------


def check_float(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device,
                ref: str = "logits") -> None:
    """x must have this shape, a float16/bfloat16/float32 dtype, and be on device (ref's)."""
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16/bfloat16/float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, {ref} on {device}")


def check_mask(mask: torch.Tensor | None, lead: tuple[int, ...], device: torch.device) -> None:
    """mask must be None or a bool/integer tensor of shape lead on device."""
    if mask is not None and (tuple(mask.shape) != lead or mask.device != device or mask.is_floating_point()):
        raise ValueError(f"mask must be a bool/integer tensor of shape {lead} on {device}, got "
                         f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")


def check_loss_inputs(
    logits: torch.Tensor, actions: torch.Tensor, old_logits: torch.Tensor | None, mask: torch.Tensor | None,
    lead: tuple[int, ...], floats: dict[str, torch.Tensor],
) -> int:
    """Validate the policy inputs (logits (*lead, A) etc.) and the float (*lead) vectors; returns A."""
    if logits.dim() != len(lead) + 1 or tuple(logits.shape[:-1]) != lead:
        raise ValueError(f"logits must have shape {(*lead, 'A')}, got {tuple(logits.shape)}")
    A = logits.shape[-1]
    if A < 1 or min(lead) < 1:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    device = logits.device
    check_float("logits", logits, tuple(logits.shape), device)
    if old_logits is not None:
        check_float("old_logits", old_logits, tuple(logits.shape), device)
    if tuple(actions.shape) != lead or actions.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
        raise ValueError(f"actions must be an integer tensor of shape {lead}, got {actions.dtype} "
                         f"{tuple(actions.shape)}")
    if actions.device != device:
        raise ValueError(f"actions is on {actions.device}, logits on {device}")
    for name, x in floats.items():
        check_float(name, x, lead, device)
    check_mask(mask, lead, device)
    return A


def launch_adv_stats(advantages: torch.Tensor, mask_arg: torch.Tensor, has_mask: bool) -> torch.Tensor:
    """Pre-reduce the (M,) advantages to per-block (count, mean, M2) triples over the valid samples
    (mask_arg: the mask, any (M,) tensor when has_mask is False). Returns (G, 3) fp32."""
    M = advantages.shape[0]
    block_s = max(1024, triton.next_power_of_2(triton.cdiv(M, 64)))
    block_s = min(block_s, triton.next_power_of_2(M))
    adv_stats = empty_output((triton.cdiv(M, block_s), 3), torch.float32, advantages.device)
    wrap(_adv_stats_kernel)[(adv_stats.shape[0],)](
        advantages, mask_arg, adv_stats, M, advantages.stride(0), mask_arg.stride(0),
        BLOCK=block_s, HAS_MASK=has_mask, num_warps=4)
    return adv_stats


def check_adv_stats_blocks(adv_stats: torch.Tensor | None) -> int:
    """The number of (count, mean, M2) blocks the main kernel combines (1 when there are none)."""
    n_stats = adv_stats.shape[0] if adv_stats is not None else 1
    if n_stats > 4 * MAX_STATS_BLOCKS:
        raise ValueError(f"advantage statistics come in {n_stats} blocks, more than {4 * MAX_STATS_BLOCKS}")
    return n_stats


def launch_finalize(partial: torch.Tensor, vf_coef: float, ent_coef: float, kl_coef: float,
                    has_old: bool) -> torch.Tensor:
    """Sum the main kernel's (N_STATS, programs) partial sums into out (8,) fp32: loss then STAT_KEYS.
    has_old: the exact KL was computed (old policy parameters given)."""
    G = partial.shape[1]
    out = empty_output((8,), torch.float32, partial.device)
    wrap(_finalize_kernel)[(1,)](
        partial, out, G, vf_coef, ent_coef, kl_coef,
        BLOCK_G=min(1024, triton.next_power_of_2(G)), HAS_OLD_LOGITS=has_old,
        USE_KL=kl_coef != 0.0, num_warps=4,
    )
    return out


def launch_ppo_loss(
    logits: torch.Tensor,  # (M, A)
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,  # raw (un-normalised); with returns=None the fused GAE's output
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor | None,  # None: returns = advantages + values (fused GAE)
    old_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    adv_stats: torch.Tensor | None,  # (G, 3) (count, mean, M2) blocks; None: computed here
    grad_values: torch.Tensor,  # (M,) output buffer, a view that may be part of a larger one
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the (pre-reduction,) main and finalize kernels on validated 1-D/2-D inputs.

    Returns (out (8,) fp32 = loss then STAT_KEYS' values, grad_logits (M, A) in logits' dtype);
    grad_values is filled in place.
    """
    M, A = logits.shape
    device = logits.device
    has_mask = mask is not None
    mask_arg = mask if has_mask else actions  # dummy pointer if unused
    if adv_stats is None and (has_mask or norm_adv):
        adv_stats = launch_adv_stats(advantages, mask_arg, has_mask)
    n_stats = check_adv_stats_blocks(adv_stats)

    block_a = triton.next_power_of_2(A)
    block_m = max(16, min(triton.next_power_of_2(M), 4096 // block_a))
    grid = (triton.cdiv(M, block_m),)
    grad_logits = empty_output((M, A), logits.dtype, device)
    partial = empty_output((N_STATS, grid[0]), torch.float32, device)
    ol = old_logits if old_logits is not None else logits  # dummy pointer if unused
    ret = returns if returns is not None else values  # dummy pointer if unused
    use_kl = kl_coef != 0.0
    wrap(_ppo_loss_kernel)[grid](
        logits, ol, actions, old_logp, advantages, values, old_values, ret, mask_arg,
        adv_stats if adv_stats is not None else advantages,  # dummy pointer if unused (read-only)
        grad_logits, grad_values, partial,
        M, A, n_stats,
        logits.stride(0), logits.stride(1), ol.stride(0), ol.stride(1), actions.stride(0), old_logp.stride(0),
        advantages.stride(0), values.stride(0), old_values.stride(0), ret.stride(0), mask_arg.stride(0),
        0.0 if clip_coef is None else clip_coef, 0.0 if vf_clip_coef is None else vf_clip_coef,
        vf_coef, ent_coef, kl_coef,
        BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_G=triton.next_power_of_2(n_stats),
        HAS_MASK=has_mask, NORM_ADV=norm_adv, CLIP=clip_coef is not None, VF_CLIP=vf_clip_coef is not None,
        HAS_OLD_LOGITS=old_logits is not None, USE_KL=use_kl, RET_FROM_ADV=returns is None,
        num_warps=4,
    )
    out = launch_finalize(partial, vf_coef, ent_coef, kl_coef, old_logits is not None)
    return out, grad_logits


def stats_dict(out: torch.Tensor, has_old_logits: bool) -> dict[str, torch.Tensor]:
    """The reference's stats dict from the finalize output (views, detached)."""
    keys = STAT_KEYS if has_old_logits else STAT_KEYS[:-1]
    out = out.detach()
    return {k: out[i + 1] for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------
# Op with autograd, and the public function
# ----------------------------------------------------------------------------------------------


def _ppo_loss_op(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    old_logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    clip_coef: float | None,
    vf_coef: float,
    ent_coef: float,
    vf_clip_coef: float | None,
    norm_adv: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_values = empty_output(tuple(values.shape), values.dtype, values.device)
    out, grad_logits = launch_ppo_loss(
        logits, actions, old_logp, advantages, values, old_values, returns, old_logits, mask, None,
        grad_values, clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef)
    return out, grad_logits, grad_values


def _ppo_loss_fake(logits, actions, old_logp, advantages, values, old_values, returns, old_logits, mask,
                   clip_coef, vf_coef, ent_coef, vf_clip_coef, norm_adv, kl_coef):
    return logits.new_empty((8,), dtype=torch.float32), torch.empty_like(logits), torch.empty_like(values)


_ppo_loss = register_op("ppo_loss", _ppo_loss_op, _ppo_loss_fake)


def setup_context_saving_grads(ctx, inputs, output) -> None:
    """Save the gradients the forward computed (every output after out); they are outputs, but not
    differentiable ones."""
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)


def scale_saved_grads(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Backward of the loss: the saved gradients times d(outer)/d(loss); only out[0] is the loss
    (the stats it carries are handed out detached)."""
    g = grad_out[0]
    return tuple(grad * g.to(grad.dtype) for grad in ctx.saved_tensors)


def _ppo_loss_backward(ctx, grad_out, _grad_logits_out, _grad_values_out):
    gl, gv = scale_saved_grads(ctx, grad_out)
    # inputs: logits, actions, old_logp, advantages, values, old_values, returns, old_logits, mask, + 6 scalars
    return gl, None, None, None, gv, None, None, None, None, None, None, None, None, None, None


_ppo_loss.register_autograd(_ppo_loss_backward, setup_context=setup_context_saving_grads)


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
    """Triton twin of ``reference.ppo_loss``; same arguments, loss and stats keys (see there).

    logits/old_logits (M, A) float16/bfloat16/float32 (computed in float32), the (M,) vectors float
    of any of those dtypes, actions integer, mask bool/integer; any strides. The loss and stats are
    float32. The loss is differentiable w.r.t. logits and values only (gradients computed in the
    forward, backward is a scale); old_logp, advantages, old_values, returns and old_logits are data
    and get no gradient. Actions outside [0, A) make the loss NaN. Not twice differentiable.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (M, A), got shape {tuple(logits.shape)}")
    check_loss_inputs(logits, actions, old_logits, mask, (logits.shape[0],),
                      dict(old_logp=old_logp, advantages=advantages, values=values, old_values=old_values,
                           returns=returns))
    out, _, _ = _ppo_loss(
        logits, actions, old_logp.detach(), advantages.detach(), values, old_values.detach(), returns.detach(),
        None if old_logits is None else old_logits.detach(), mask,
        None if clip_coef is None else float(clip_coef), float(vf_coef), float(ent_coef),
        None if vf_clip_coef is None else float(vf_clip_coef), bool(norm_adv), float(kl_coef))
    return out[0], stats_dict(out, old_logits is not None)
