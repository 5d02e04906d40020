"""The diagonal-Gaussian loss kernels against the float64 torch reference: forward, every gradient,
named edge cases; and the reference's Gaussian helpers against torch.distributions.

Same rules as tests/test_kernels.py, whose data helpers and tolerance check this file imports: on a
machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before
anything imports them); every kernel output is NaN-poisoned before its launch and every compared
output must be finite; the kernels (float32) are compared with the reference run in float64 on the
same inputs, error <= 1e-5 relative to the output's scale (its largest |entry|, 1 for a scalar mean).
Low-precision mean/log_std: the gradient is stored in the input's dtype and gets its precision.

log_std comes two ways: "full", an (M, D) tensor, and "shared", a state-independent (1, D) parameter
passed as param.expand(M, D) (stride 0 on dim 0), whose gradient autograd sums over the samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_kernels import (  # noqa: E402  (tests/ is on sys.path under pytest)
    CLIP,
    DEVICE,
    GAMMA,
    LAM,
    assert_close64,
    away_from,
    make_flags,
    make_mask,
    make_old_values,
    run_inductor_lowering,
    strided_copy,
    to_device,
)
from torch.distributions import Normal, kl_divergence  # noqa: E402

from fastppo import kernels  # noqa: E402
from fastppo.kernels import gae as gae_mod  # noqa: E402
from fastppo.kernels import gaussian_loss as gl_mod  # noqa: E402
from fastppo.kernels import reference  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA and not gae_mod.INTERPRETED:
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set; on CPU they need "
                "the interpreter (run this file on its own)", allow_module_level=True)

T, N = 37, 11
DIMS = [1, 3, 6]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(gae_mod, "POISON_OUTPUTS", True)


# ---------------------------------------------------------------------------------------------
# Reference helpers against torch.distributions (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_std_kind", ["full", "shared"])
@pytest.mark.parametrize("D", DIMS)
def test_reference_helpers_match_torch_distributions(D: int, log_std_kind: str) -> None:
    """log_prob summed over the dims, entropy and KL(old || new), values and gradients."""
    g = torch.Generator().manual_seed(D)
    M = 23
    f64 = dict(dtype=torch.float64)
    mean = torch.randn(M, D, generator=g, **f64).requires_grad_()
    ls_param = (0.5 * torch.randn(M if log_std_kind == "full" else 1, D, generator=g, **f64)).requires_grad_()
    actions = torch.randn(M, D, generator=g, **f64)
    old_mean = torch.randn(M, D, generator=g, **f64)
    old_log_std = 0.5 * torch.randn(M, D, generator=g, **f64)

    def pair(ours, theirs, what):
        ours_v, theirs_v = ours(), theirs()
        assert ours_v.shape == (M,) and ours_v.dtype == torch.float64
        torch.testing.assert_close(ours_v, theirs_v, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
        w = torch.randn(M, generator=g, **f64)  # a random cotangent
        grads = torch.autograd.grad((ours_v * w).sum(), (mean, ls_param), allow_unused=True)
        grads_ref = torch.autograd.grad((theirs_v * w).sum(), (mean, ls_param), allow_unused=True)
        for a, b, name in zip(grads, grads_ref, ("mean", "log_std"), strict=True):
            assert (a is None) == (b is None), f"{what}: d/d{name}"
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{what} d/d{n}: {m}")

    log_std = ls_param.expand(M, D)

    def new() -> Normal:  # a fresh graph per call
        return Normal(mean, log_std.exp())

    pair(lambda: reference.gaussian_log_prob(mean, log_std, actions), lambda: new().log_prob(actions).sum(-1),
         "log_prob")
    pair(lambda: reference.gaussian_entropy(log_std), lambda: new().entropy().sum(-1), "entropy")
    old = Normal(old_mean, old_log_std.exp())
    pair(lambda: reference.gaussian_kl(old_mean, old_log_std, mean, log_std),
         lambda: kl_divergence(old, new()).sum(-1), "kl")


def test_reference_helpers_compute_half_inputs_in_float32() -> None:
    x = torch.randn(5, 3).to(torch.bfloat16)
    assert reference.gaussian_log_prob(x, x, x).dtype == torch.float32
    assert reference.gaussian_entropy(x).dtype == torch.float32
    assert reference.gaussian_kl(x, x, x, x).dtype == torch.float32
    loss, stats = reference.gaussian_ppo_loss(x, x, x, *torch.randn(5, 5).unbind(0), **CLIP)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in stats.values())


def test_reference_loss_matches_cleanrl_continuous() -> None:
    """reference.gaussian_ppo_loss is CleanRL's ppo_continuous_action loss (clip, normalised advantages,
    clipped value loss), and its penalty form is mean(-A rho) + beta mean(KL) with the exact KL."""
    g = torch.Generator().manual_seed(0)
    M, D = 64, 3
    mean, actions = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    log_std = (0.3 * torch.randn(1, D, generator=g)).expand(M, D)
    old_logp = reference.gaussian_log_prob(mean, log_std, actions) + 0.3 * torch.randn(M, generator=g)
    adv, values, old_values, returns = (torch.randn(M, generator=g) for _ in range(4))

    # CleanRL ppo_continuous_action.py, written out.
    probs = Normal(mean, log_std.exp())
    newlogprob, entropy = probs.log_prob(actions).sum(1), probs.entropy().sum(1)
    logratio = newlogprob - old_logp
    ratio = logratio.exp()
    mb_adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 0.8, 1.2)).mean()
    v_clipped = old_values + torch.clamp(values - old_values, -0.2, 0.2)
    v_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    expected = pg_loss - 0.01 * entropy.mean() + 0.5 * v_loss

    loss, stats = reference.gaussian_ppo_loss(mean, log_std, actions, old_logp, adv, values, old_values, returns,
                                              vf_clip_coef=0.2, **CLIP)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["approx_kl"], ((ratio - 1) - logratio).mean())
    torch.testing.assert_close(stats["clipfrac"], ((ratio - 1.0).abs() > 0.2).float().mean())
    assert "kl" not in stats

    old_mean, old_log_std = mean + 0.1, log_std - 0.2
    kl = kl_divergence(Normal(old_mean, old_log_std.exp()), probs).sum(1)
    loss, stats = reference.gaussian_ppo_loss(mean, log_std, actions, old_logp, adv, values, old_values, returns,
                                              **dict(CLIP, clip_coef=None, kl_coef=0.3), old_mean=old_mean,
                                              old_log_std=old_log_std)
    v_loss = 0.5 * ((values - returns) ** 2).mean()
    expected = (-mb_adv * ratio).mean() + 0.3 * kl.mean() - 0.01 * entropy.mean() + 0.5 * v_loss
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["kl"], kl.mean())
    with pytest.raises(ValueError, match="old_mean and old_log_std must be given together"):
        reference.gaussian_ppo_loss(mean, log_std, actions, old_logp, adv, values, old_values, returns,
                                    old_mean=old_mean, **CLIP)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_gaussian_policy(lead: tuple[int, ...], D: int, log_std_kind: str, ratio: str, g: torch.Generator,
                         dtype: torch.dtype = torch.float32, log_std_dtype: torch.dtype | None = None) -> dict:
    """mean, log-std (the (*lead, D) tensor or the shared (1, D) parameter), actions ~ pi, and old_logp
    with pi/pi_old = 'spread' over [0.5, 1.6] away from 0.8 and 1.2, or 'clip_both' 0.5, 0.5, 1.5, 1.5."""
    mean = torch.randn(*lead, D, generator=g).to(dtype)
    ls_shape = (*lead, D) if log_std_kind == "full" else (1, D)
    log_std = (0.5 * torch.randn(ls_shape, generator=g)).to(log_std_dtype or dtype)
    actions = (mean.float() + log_std.float().exp() * torch.randn(*lead, D, generator=g)).to(dtype)
    logp64 = reference.gaussian_log_prob(mean.double(), log_std.double(), actions.double())
    numel = math.prod(lead)
    if ratio == "clip_both":
        r = torch.tensor([0.5, 0.5, 1.5, 1.5], dtype=torch.float64).repeat(numel // 4 + 1)[:numel].view(lead)
    else:
        r = away_from(0.5 + 1.1 * torch.rand(lead, generator=g, dtype=torch.float64), (0.8, 1.2))
    return dict(mean=mean, log_std=log_std, actions=actions, old_logp=(logp64 - r.log()).float())


def gloss_data(M: int, D: int, *, log_std_kind: str = "full", seed: int = 0, ratio: str = "spread",
               adv: str = "normal", mask: str | None = None, old: bool = False, strided: bool = False,
               dtype: torch.dtype = torch.float32, log_std_dtype: torch.dtype | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = make_gaussian_policy((M,), D, log_std_kind, ratio, g, dtype, log_std_dtype)
    m = make_mask((M,), mask, g)
    if adv == "signs":  # +, -, +, - with the 'clip_both' ratios: every (ratio side, sign) pair
        advantages = torch.tensor([1.0, -1.0]).repeat(M // 2 + 1)[:M] * (1.0 + torch.rand(M, generator=g))
    else:
        advantages = 2.0 * torch.randn(M, generator=g) + 0.3
    values = torch.randn(M, generator=g)
    d.update(advantages=advantages, values=values, old_values=make_old_values(values, g),
             returns=values + torch.randn(M, generator=g), mask=m, old_mean=None, old_log_std=None)
    if old:
        d["old_mean"] = (d["mean"].float() + 0.3 * torch.randn(M, D, generator=g)).to(dtype)
        d["old_log_std"] = (d["log_std"].float().expand(M, D) + 0.2 * torch.randn(M, D, generator=g)).to(dtype)
    if strided:
        d = {k: (strided_copy(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    return to_device(d)


LOSS_ARGS = ("actions", "old_logp", "advantages", "values", "old_values", "returns")


def run_gloss(fn, d: dict, kw: dict, dtype: torch.dtype | None):
    """fn's (loss, stats, dloss/dmean, dloss/dlog_std, dloss/dvalues); dtype=float64 runs it in float64.
    A shared (1, D) log-std is passed as param.expand(M, D); its gradient is the parameter's."""
    cast = (lambda x: x.to(dtype) if x is not None and x.is_floating_point() else x) if dtype else (lambda x: x)
    mean = cast(d["mean"]).detach().requires_grad_()
    log_std = cast(d["log_std"]).detach().requires_grad_()
    values = cast(d["values"]).detach().requires_grad_()
    args = [cast(d[k]) for k in LOSS_ARGS]
    args[3] = values
    loss, stats = fn(mean, log_std.expand_as(mean), *args, old_mean=cast(d["old_mean"]),
                     old_log_std=cast(d["old_log_std"]), mask=d["mask"], **kw)
    loss.backward()
    return loss, stats, mean.grad, log_std.grad, values.grad


def compare_gloss(got, ref, *, grad_tol: float = 1e-5, log_std_grad_tol: float | None = None) -> None:
    loss, stats, g_mean, g_log_std, g_values = got
    loss_ref, stats_ref, g_mean_ref, g_log_std_ref, g_values_ref = ref
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert set(stats) == set(stats_ref), f"stats keys {sorted(stats)} != {sorted(stats_ref)}"
    assert_close64(loss, loss_ref, "loss")
    for k in stats_ref:
        assert not stats[k].requires_grad
        assert_close64(stats[k], stats_ref[k], f"stats[{k!r}]")
    assert_close64(g_mean, g_mean_ref, "dloss/dmean", tol=grad_tol)
    assert_close64(g_log_std, g_log_std_ref, "dloss/dlog_std", tol=log_std_grad_tol or grad_tol)
    assert_close64(g_values, g_values_ref, "dloss/dvalues")


# ---------------------------------------------------------------------------------------------
# Gaussian PPO loss
# ---------------------------------------------------------------------------------------------

# name -> (M, data options, loss kwargs); CLIP has no value clipping
LOSS_CASES = {
    "clip_no_value_clip": (T * N, {}, CLIP),
    "clip_value_clip": (T * N, {}, dict(CLIP, vf_clip_coef=0.2)),
    "clip_mask_invalid_rows": (T * N, dict(mask="random"), dict(CLIP, vf_clip_coef=0.2)),
    "all_masked": (T * N, dict(mask="none_valid"), CLIP),
    "one_valid_sample": (T * N, dict(mask="first_only"), CLIP),
    "no_norm_adv": (T * N, dict(mask="random"), dict(CLIP, norm_adv=False)),
    "clipping_above_and_below": (T * N, dict(ratio="clip_both", adv="signs"), CLIP),
    "clip_old_params_kl_stat_only": (T * N, dict(old=True), CLIP),
    "clip_exact_kl_term": (T * N, dict(old=True, mask="random"), dict(CLIP, kl_coef=0.1)),
    "clip_k3_kl_term": (T * N, dict(mask="random"), dict(CLIP, kl_coef=0.1)),
    "penalty_old_params_exact_kl": (T * N, dict(old=True, mask="random"), dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_no_old_params_k3": (T * N, {}, dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_no_kl": (T * N, {}, dict(CLIP, clip_coef=None)),
    "M1": (1, {}, CLIP),
    "strided_inputs": (T * N, dict(strided=True, old=True, mask="random"), dict(CLIP, vf_clip_coef=0.2, kl_coef=0.1)),
}


@pytest.mark.parametrize("log_std_kind", ["full", "shared"])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_gaussian_ppo_loss(case: str, D: int, log_std_kind: str) -> None:
    M, data_opts, kw = LOSS_CASES[case]
    d = gloss_data(M, D, log_std_kind=log_std_kind, **data_opts)
    got = run_gloss(gl_mod.gaussian_ppo_loss, d, kw, None)
    compare_gloss(got, run_gloss(reference.gaussian_ppo_loss, d, kw, torch.float64))
    assert got[3].shape == d["log_std"].shape
    if data_opts.get("mask") == "none_valid":
        assert float(got[0].detach()) == 0.0 and not got[2].any() and not got[3].any() and not got[4].any()


@pytest.mark.parametrize("D", DIMS)
def test_gaussian_ppo_loss_exact_ties_at_clip_bounds(D: int) -> None:
    """Ties that float32 and float64 both hit exactly, where the tie convention decides (see
    kernels/reference.py: a clip passes its gradient at its bounds, max splits a tie evenly).

    Policy, rows 0 and 1 mod 4: actions = mean and log_std = 0, so logp = -D log sqrt(2 pi) exactly in
    each precision; old_logp is that value in the precision of the implementation under test, so the
    ratio is exactly 1, and with clip_coef = 0 it sits on both clip bounds. The other rows are ordinary
    samples, all clipped.
    Value (vf_clip_coef = 1/4, dyadic values): rows 0/1 step exactly +-1/4 (on a clip bound); rows 2/3
    step +-1/2 with the return halfway between the value and the clipped value, so
    (v - R)^2 == (v_clipped - R)^2 while only the unclipped branch has a gradient.
    The kernel must match the reference, and the reference's gradients at the ties are checked against
    the convention written out, so neither follows whatever torch's clamp does at its bounds.
    """
    M = T * N
    g = torch.Generator().manual_seed(10 + D)
    d = gloss_data(M, D, seed=10 + D, mask="random")
    dev = d["mean"].device  # everything built below lives there too; the generator draws on the CPU
    tie = (torch.arange(M, device=dev) % 4) < 2
    d["mean"] = torch.where(tie[:, None], d["actions"], d["mean"])
    d["log_std"] = torch.where(tie[:, None], 0.0, d["log_std"])
    r = away_from(0.5 + 1.1 * torch.rand(M, generator=g, dtype=torch.float64), (1.0,)).to(dev)
    logp64 = reference.gaussian_log_prob(d["mean"].double(), d["log_std"].double(), d["actions"].double())
    logp32_tie = -(torch.tensor(float(D), device=dev) * torch.tensor(reference.LOG_SQRT_2PI, dtype=torch.float32,
                                                                     device=dev))
    d32 = dict(d, old_logp=torch.where(tie, logp32_tie, (logp64 - r.log()).float()))
    d64 = dict(d, old_logp=torch.where(tie, logp64, d32["old_logp"].double()))  # ratio exactly 1 in float64
    values = (torch.randint(-16, 17, (M,), generator=g) / 8.0).to(dev)
    step = torch.tensor([0.25, -0.25, 0.5, -0.5], device=dev).repeat(M // 4 + 1)[:M]
    old_values = values - step
    v_clipped = old_values + step.clamp(-0.25, 0.25)
    returns = torch.where(tie, (torch.randint(-16, 17, (M,), generator=g) / 8.0).to(dev), (values + v_clipped) / 2)
    for x in (d32, d64):
        x.update(values=values, old_values=old_values, returns=returns)
    kw = dict(CLIP, clip_coef=0.0, vf_clip_coef=0.25)
    got = run_gloss(gl_mod.gaussian_ppo_loss, d32, kw, None)
    ref = run_gloss(reference.gaussian_ppo_loss, d64, kw, torch.float64)
    compare_gloss(got, ref)
    valid = d["mask"]
    assert float(got[1]["clipfrac"]) == pytest.approx(float((~tie & valid).sum() / valid.sum()))

    # The convention, written out. s = d(masked mean)/d(sample), A_hat the normalised advantage. At the
    # policy ties dloss/dratio = -A_hat (both branches' gradient: half from each side of the max, the
    # clipped one passing it at its bound), so with z = 0: dloss/dmean = 0, dloss/dlog_std = s (A_hat - c_ent).
    # Value: rows 0/1 get both branches' (equal) gradient, rows 2/3 half of the unclipped one.
    s = valid.double() / valid.sum()
    adv_hat = reference.normalize_advantages(d["advantages"].double(), valid)
    _, _, g_mean, g_log_std, g_values = ref
    assert not g_mean[tie].any()
    torch.testing.assert_close(g_log_std[tie], (s * (adv_hat - kw["ent_coef"]))[tie, None].expand(-1, D))
    torch.testing.assert_close(g_values, kw["vf_coef"] * s * torch.where(tie, 1.0, 0.5) * (values - returns).double())


@pytest.mark.parametrize("variant", ["all_low", "low_mean_shared_fp32_log_std"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gaussian_ppo_loss_low_precision_inputs(dtype: torch.dtype, variant: str) -> None:
    """mean/actions (and old params, and the full log-std for all_low) in float16/bfloat16; the loss is
    float32, each gradient is stored in its input's dtype (the shared float32 log-std's stays float32)."""
    if variant == "all_low":
        d = gloss_data(T * N, 6, old=True, mask="random", dtype=dtype)
    else:
        d = gloss_data(T * N, 6, log_std_kind="shared", old=True, mask="random", dtype=dtype,
                       log_std_dtype=torch.float32)
    kw = dict(CLIP, kl_coef=0.1, vf_clip_coef=0.2)
    got = run_gloss(gl_mod.gaussian_ppo_loss, d, kw, None)
    assert got[2].dtype == dtype and got[3].dtype == d["log_std"].dtype
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    compare_gloss(got, run_gloss(reference.gaussian_ppo_loss, d, kw, torch.float64), grad_tol=tol,
                  log_std_grad_tol=tol if variant == "all_low" else 1e-5)


@pytest.mark.parametrize("log_std_kind", ["full", "shared"])
def test_gaussian_ppo_loss_backward_scales_by_grad_output(log_std_kind: str) -> None:
    d = gloss_data(64, 3, log_std_kind=log_std_kind, mask="random", old=True)
    kw = dict(CLIP, kl_coef=0.1)
    _, _, g_mean, g_log_std, g_values = run_gloss(gl_mod.gaussian_ppo_loss, d, kw, None)
    mean = d["mean"].detach().requires_grad_()
    log_std = d["log_std"].detach().requires_grad_()
    values = d["values"].detach().requires_grad_()
    args = [d[k] for k in LOSS_ARGS]
    args[3] = values
    loss, stats = gl_mod.gaussian_ppo_loss(mean, log_std.expand_as(mean), *args, old_mean=d["old_mean"],
                                           old_log_std=d["old_log_std"], mask=d["mask"], **kw)
    (-3.0 * loss + stats["entropy"]).backward()  # stats are detached: they add no gradient
    torch.testing.assert_close(mean.grad, -3.0 * g_mean)
    torch.testing.assert_close(log_std.grad, -3.0 * g_log_std)
    torch.testing.assert_close(values.grad, -3.0 * g_values)


def test_data_inputs_get_no_gradient() -> None:
    """actions, old_logp, advantages, old_values, returns and the old params are data: no gradient."""
    d = gloss_data(32, 3, old=True)
    data = {k: d[k].detach().clone().requires_grad_() for k in (*LOSS_ARGS, "old_mean", "old_log_std")}
    mean = d["mean"].detach().requires_grad_()
    loss, _ = gl_mod.gaussian_ppo_loss(mean, d["log_std"], *[data[k] for k in LOSS_ARGS],
                                       old_mean=data["old_mean"], old_log_std=data["old_log_std"],
                                       **dict(CLIP, kl_coef=0.1))
    loss.backward()
    assert mean.grad is not None and data["values"].grad is not None
    assert all(data[k].grad is None for k in data if k != "values")


# ---------------------------------------------------------------------------------------------
# Fused GAE + Gaussian loss
# ---------------------------------------------------------------------------------------------

# name -> (T, n, data options, loss kwargs)
GAE_LOSS_CASES = {
    "clip": (T, N, {}, CLIP),
    "clip_shared_log_std_masked_scan": (T, N, dict(log_std_kind="shared", mask="random", impl="scan"), CLIP),
    "all_masked": (T, N, dict(mask="none_valid"), CLIP),
    "consecutive_dones_value_clip": (T, N, dict(dones="consecutive_dones"), dict(CLIP, vf_clip_coef=0.2)),
    "no_norm_adv_masked_shared_log_std": (T, N, dict(mask="random", log_std_kind="shared"), dict(CLIP, norm_adv=False)),
    "penalty_old_params_exact_kl_masked": (T, N, dict(old=True, mask="random"),
                                           dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_k3_scan_shared_log_std": (T, N, dict(impl="scan", dones="done_last", log_std_kind="shared"),
                                       dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "clipping_above_and_below": (T, N, dict(ratio="clip_both"), CLIP),
    "M1": (1, 1, {}, CLIP),
}


def gae_gloss_data(T: int, n: int, D: int, *, seed: int = 0, log_std_kind: str = "full", ratio: str = "spread",
                   dones: str = "random", mask: str | None = None, old: bool = False, impl: str = "loop"):
    g = torch.Generator().manual_seed(seed)
    d = make_gaussian_policy((T, n), D, log_std_kind, ratio, g)
    term, trunc = make_flags(T, n, dones, g)
    values = torch.randn(T + 1, n, generator=g)
    d.update(values=values, old_values=make_old_values(values[:T], g), rewards=torch.randn(T, n, generator=g),
             terminated=term, truncated=trunc, mask=make_mask((T, n), mask, g), old_mean=None, old_log_std=None)
    if old:
        d["old_mean"] = d["mean"] + 0.3 * torch.randn(T, n, D, generator=g)
        d["old_log_std"] = d["log_std"].expand(T, n, D) + 0.2 * torch.randn(T, n, D, generator=g)
    return to_device(d), impl


GAE_LOSS_ARGS = ("actions", "old_logp", "values", "old_values", "rewards", "terminated", "truncated")


def run_gae_gloss(fn, d: dict, kw: dict, dtype: torch.dtype | None):
    cast = (lambda x: x.to(dtype) if x is not None and x.is_floating_point() else x) if dtype else (lambda x: x)
    mean = cast(d["mean"]).detach().requires_grad_()
    log_std = cast(d["log_std"]).detach().requires_grad_()
    values = cast(d["values"]).detach().requires_grad_()
    args = [cast(d[k]) for k in GAE_LOSS_ARGS]
    args[2] = values
    loss, stats = fn(mean, log_std.expand_as(mean), *args, gamma=GAMMA, gae_lambda=LAM, old_mean=cast(d["old_mean"]),
                     old_log_std=cast(d["old_log_std"]), mask=d["mask"], **kw)
    loss.backward()
    return loss, stats, mean.grad, log_std.grad, values.grad


@pytest.mark.parametrize("D", [1, 6])
@pytest.mark.parametrize("case", list(GAE_LOSS_CASES))
def test_gae_gaussian_ppo_loss(case: str, D: int) -> None:
    T_, n, data_opts, kw = GAE_LOSS_CASES[case]
    d, impl = gae_gloss_data(T_, n, D, **data_opts)
    got = run_gae_gloss(gl_mod.gae_gaussian_ppo_loss, d, dict(kw, impl=impl), None)
    compare_gloss(got, run_gae_gloss(reference.gae_gaussian_ppo_loss, d, kw, torch.float64))
    assert not got[4][-1].any(), "the bootstrap row gets no gradient"


# ---------------------------------------------------------------------------------------------
# torch.compile, errors, select, sm_90 build
# ---------------------------------------------------------------------------------------------


def test_ops_trace_under_torch_compile() -> None:
    """fullgraph torch.compile sees both ops (fake shapes + autograd formula), with a shared stride-0
    log-std, and gets eager's numbers (aot_eager under the interpreter, as in test_kernels.py)."""
    backend = "inductor" if CUDA else "aot_eager"
    d = gloss_data(T * N, 6, log_std_kind="shared", mask="random", old=True)
    kw = dict(CLIP, kl_coef=0.1)
    eager = run_gloss(gl_mod.gaussian_ppo_loss, d, kw, None)
    compiled = run_gloss(torch.compile(gl_mod.gaussian_ppo_loss, backend=backend, fullgraph=True), d, kw, None)
    for a, b in zip((eager[0], *eager[2:]), (compiled[0], *compiled[2:]), strict=True):
        torch.testing.assert_close(a, b)
    assert set(compiled[1]) == set(eager[1])
    d2, _ = gae_gloss_data(T, N, 3, log_std_kind="shared", mask="random")
    eager = run_gae_gloss(gl_mod.gae_gaussian_ppo_loss, d2, CLIP, None)
    compiled = run_gae_gloss(torch.compile(gl_mod.gae_gaussian_ppo_loss, backend=backend, fullgraph=True), d2, CLIP,
                             None)
    for a, b in zip((eager[0], *eager[2:]), (compiled[0], *compiled[2:]), strict=True):
        torch.testing.assert_close(a, b)


def test_inductor_lowers_the_compiled_gaussian_ops() -> None:
    """Both Gaussian ops, with a bool mask and flags and a shared stride-0 log-std, through Inductor's
    lowering on CPU (tests/test_kernels.py's _INDUCTOR_LOWERING_CHECK says how far and why)."""
    out = run_inductor_lowering("""
from fastppo.kernels import gaussian_loss as GS
T, n, D = 5, 3, 2
M = T * n
log_std = torch.zeros(1, D, requires_grad=True)
lower("gaussian_ppo_loss", GS.gaussian_ppo_loss, torch.randn(M, D, requires_grad=True), log_std.expand(M, D),
      torch.randn(M, D), torch.randn(M), torch.randn(M), torch.randn(M, requires_grad=True), torch.randn(M),
      torch.randn(M), mask=flags(M), clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)
lower("gae_gaussian_ppo_loss", GS.gae_gaussian_ppo_loss, torch.randn(T, n, D, requires_grad=True), log_std,
      torch.randn(T, n, D), torch.randn(T, n), torch.randn(T + 1, n, requires_grad=True), torch.randn(T, n),
      torch.randn(T, n), flags(T, n), flags(T, n), mask=flags(T, n), gamma=0.99, gae_lambda=0.95, clip_coef=0.2,
      vf_coef=0.5, ent_coef=0.01)
""")
    assert out.split("\n")[:-1] == ["lowered gaussian_ppo_loss", "lowered gae_gaussian_ppo_loss"], out


def _error_cases():
    d = gloss_data(8, 3, log_std_kind="shared")
    mean, ls, lx = d["mean"], d["log_std"].expand(8, 3), [d[k] for k in LOSS_ARGS]
    f, _ = gae_gloss_data(4, 3, 2)
    fx = [f[k] for k in GAE_LOSS_ARGS]
    fkw = dict(CLIP, gamma=GAMMA, gae_lambda=LAM)
    loss = gl_mod.gaussian_ppo_loss
    fused = gl_mod.gae_gaussian_ppo_loss
    return {
        "mean_dim": (lambda: loss(mean[0], ls[0], *lx, **CLIP), "mean must be 2-D"),
        "mean_dtype": (lambda: loss(mean.double(), ls, *lx, **CLIP), "mean must be float16/bfloat16/float32"),
        "empty": (lambda: loss(mean[:, :0], ls[:, :0], lx[0][:, :0], *lx[1:], **CLIP), "mean must be non-empty"),
        "log_std_shape": (lambda: loss(mean, ls[:, :2], *lx, **CLIP), r"log_std must have shape \(8, 3\) or broadcast"),
        "actions_integer": (lambda: loss(mean, ls, lx[0].long(), *lx[1:], **CLIP), "actions must be float16"),
        "actions_device": (lambda: loss(mean, ls, lx[0].to("meta"), *lx[1:], **CLIP), "actions is on meta"),
        "returns_shape": (lambda: loss(mean, ls, *lx[:-1], lx[-1][:-1], **CLIP), "returns must have shape"),
        "old_mean_alone": (lambda: loss(mean, ls, *lx, old_mean=mean, **CLIP), "must be given together"),
        "old_log_std_shape": (lambda: loss(mean, ls, *lx, old_mean=mean, old_log_std=ls[:, :2], **CLIP),
                              "old_log_std must have shape"),
        "mask_float": (lambda: loss(mean, ls, *lx, mask=lx[2], **CLIP), "mask must be"),
        "fused_mean_dim": (lambda: fused(f["mean"][0], f["log_std"], *fx, **fkw), "mean must be 3-D"),
        "fused_values_rows": (lambda: fused(f["mean"], f["log_std"].expand(4, 3, 2), *fx[:2], fx[2][:-1], *fx[3:],
                                            **fkw), "values must have shape"),
        "fused_not_mergeable": (lambda: fused(f["mean"], f["log_std"].expand(4, 3, 2),
                                              f["actions"].transpose(0, 1).contiguous().transpose(0, 1), *fx[1:],
                                              **fkw), r"actions must merge its \(T, n\) dims"),
        "fused_impl": (lambda: fused(f["mean"], f["log_std"].expand(4, 3, 2), *fx, impl="magic", **fkw),
                       "impl must be one of"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_launchers_reject_bad_inputs(case: str) -> None:
    fn, match = _error_cases()[case]
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_a_broadcast_log_std_is_the_reference_s_too() -> None:
    """The (1, D) parameter itself, unexpanded, as the reference takes it: the same loss and its gradient
    summed back to the parameter."""
    d = gloss_data(9, 3, log_std_kind="shared")
    out = {}
    for name, fn in (("triton", gl_mod.gaussian_ppo_loss), ("reference", reference.gaussian_ppo_loss)):
        log_std = d["log_std"].detach().clone().requires_grad_()
        loss, _ = fn(d["mean"], log_std, *[d[k] for k in LOSS_ARGS], **CLIP)
        loss.backward()
        out[name] = (loss.detach(), log_std.grad)
    assert out["triton"][1].shape == d["log_std"].shape
    assert_close64(out["triton"][0], out["reference"][0], "loss")
    assert_close64(out["triton"][1], out["reference"][1], "dloss/dlog_std")


def test_select_has_gaussian_ops() -> None:
    ops = kernels.select("torch", DEVICE)
    assert (ops.gaussian_ppo_loss, ops.gae_gaussian_ppo_loss) == (reference.gaussian_ppo_loss,
                                                                  reference.gae_gaussian_ppo_loss)
    assert ops[:4] == ("torch", reference.gae, reference.ppo_loss, reference.gae_ppo_loss)
    ops = kernels.select("triton", DEVICE)
    assert (ops.gaussian_ppo_loss, ops.gae_gaussian_ppo_loss) == (gl_mod.gaussian_ppo_loss,
                                                                  gl_mod.gae_gaussian_ppo_loss)


# The Gaussian kernel through the real Triton compiler for sm_90, in variants that set each constexpr
# flag both ways (the shared loss.py pieces are built by tests/test_kernels.py too). No GPU needed.
_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastppo.kernels import gae as G, gaussian_loss as GL
assert not G.INTERPRETED
FLOATS = {"clip_coef", "vf_clip_coef", "vf_coef", "ent_coef", "kl_coef"}

def build(fn, constexprs, ptrs={}):
    sig = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "*fp32") if p.name.endswith("_ptr")
           else "fp32" if p.name in FLOATS else "i32" for p in fn.params}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm, fn
    print("built", fn.__name__, constexprs)

flags = ("HAS_MASK", "NORM_ADV", "CLIP", "VF_CLIP", "HAS_OLD", "USE_KL", "RET_FROM_ADV")
bf16 = {k: "*bf16" for k in ("mean_ptr", "log_std_ptr", "actions_ptr", "old_mean_ptr", "old_log_std_ptr",
                             "grad_mean_ptr", "grad_log_std_ptr")}
for on, ptrs, block_d in (((0, 1, 2), {}, 8), ((3, 4, 5, 6), bf16, 1), ((4,), {}, 32)):
    build(GL._gaussian_ppo_loss_kernel,
          dict({f: i in on for i, f in enumerate(flags)}, BLOCK_M=2048 // block_d, BLOCK_D=block_d, BLOCK_G=64),
          dict(ptrs, mask_ptr="*i1"))
"""


def test_gaussian_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("built") == 3


def test_bench_smoke_has_gaussian_rows(tmp_path: Path) -> None:
    """bench/bench_kernels.py --smoke times gaussian_ppo_loss for every provider it has."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = json.loads(bench.main(["--smoke", "--out", str(tmp_path)]).read_text())["rows"]
    gaussian = [r for r in rows if r["op"] == "gaussian_ppo_loss"]
    assert {r["provider"] for r in gaussian} >= {"triton", "torch"}
    assert all(r["both_us"] > 0 and r["gbps"] > 0 for r in gaussian)


# ---------------------------------------------------------------------------------------------
# GPU: large shapes (the small ones above already run natively on CUDA)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("log_std_kind", ["full", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [6, 17])
def test_gpu_gaussian_ppo_loss_large(D: int, dtype: torch.dtype, log_std_kind: str) -> None:
    d = gloss_data(131072, D, log_std_kind=log_std_kind, mask="random", old=True, dtype=dtype,
                   log_std_dtype=torch.float32 if log_std_kind == "shared" else None)
    kw = dict(CLIP, vf_clip_coef=0.2, kl_coef=0.1)
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    compare_gloss(run_gloss(gl_mod.gaussian_ppo_loss, d, kw, None),
                  run_gloss(reference.gaussian_ppo_loss, d, kw, torch.float64), grad_tol=tol,
                  log_std_grad_tol=tol if log_std_kind == "full" else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", gae_mod.IMPLS)
def test_gpu_gae_gaussian_ppo_loss_large(impl: str) -> None:
    d, _ = gae_gloss_data(128, 1024, 6, log_std_kind="shared", mask="random")
    compare_gloss(run_gae_gloss(gl_mod.gae_gaussian_ppo_loss, d, dict(CLIP, impl=impl), None),
                  run_gae_gloss(reference.gae_gaussian_ppo_loss, d, CLIP, torch.float64))
