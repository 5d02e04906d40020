"""kernels.reference against float64 oracles written independently here, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.kernels import reference

T, N = 37, 11


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------
def gae_oracle(rewards, values, terminated, truncated, gamma, lam):
    """Scalar loop, float64, straight from the definition."""
    T, N = rewards.shape
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        carry = 0.0
        for t in reversed(range(T)):
            term, trunc = bool(terminated[t, n]), bool(truncated[t, n])
            next_v = 0.0 if term else float(values[t + 1, n])
            delta = float(rewards[t, n]) + gamma * next_v - float(values[t, n])
            carry = delta + (0.0 if (term or trunc) else gamma * lam * carry)
            adv[t][n] = carry
    adv = torch.tensor(adv, dtype=torch.float64)
    return adv, adv + values[:T].double()


def flags(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    term = torch.zeros(T, N, dtype=torch.bool)
    trunc = torch.zeros(T, N, dtype=torch.bool)
    if kind == "random":
        term = torch.rand(T, N, generator=gen) < 0.1
        trunc = (torch.rand(T, N, generator=gen) < 0.05) & ~term
    elif kind == "done_t0":
        term[0] = True
        trunc[0, ::2] = True
    elif kind == "done_last":
        term[T - 1, 1::2] = True
        trunc[T - 1, ::2] = True
    elif kind == "all_done":
        term[:] = True
    elif kind == "all_truncated":
        trunc[:] = True
    elif kind == "consecutive":
        term[5:9] = True
        trunc[20:23] = True
    return term, trunc


@pytest.mark.parametrize("kind", ["none_done", "random", "done_t0", "done_last", "all_done", "all_truncated",
                                  "consecutive"])
@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.uint8, torch.float32])
def test_gae_matches_oracle(kind, flag_dtype):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(T, N, generator=gen)
    values = torch.randn(T + 1, N, generator=gen)
    term, trunc = flags(kind, gen)
    adv, ret = reference.gae(rewards, values, term.to(flag_dtype), trunc.to(flag_dtype), 0.99, 0.95)
    adv64, ret64 = gae_oracle(rewards.double(), values.double(), term, trunc, 0.99, 0.95)
    torch.testing.assert_close(adv.double(), adv64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(adv).all()


def test_gae_truncated_bootstraps_terminated_does_not():
    """One env, reward 1 every step, V = 10 everywhere; step 1 ends the episode."""
    rewards = torch.ones(3, 1)
    values = torch.full((4, 1), 10.0)
    none = torch.zeros(3, 1, dtype=torch.bool)
    at1 = torch.tensor([[False], [True], [False]])
    g, lam = 0.9, 0.8
    adv_term, _ = reference.gae(rewards, values, at1, none, g, lam)
    adv_trunc, _ = reference.gae(rewards, values, none, at1, g, lam)
    # terminated: delta_1 = 1 + 0 - 10, no carry from step 2
    assert adv_term[1, 0].item() == pytest.approx(1.0 - 10.0)
    # truncated: delta_1 = 1 + 0.9 * V(final obs) - 10, still no carry from step 2
    assert adv_trunc[1, 0].item() == pytest.approx(1.0 + g * 10.0 - 10.0)
    # both cut the carry: step 0 sees only delta_0 + g*lam*A_1
    delta0 = 1.0 + g * 10.0 - 10.0
    assert adv_term[0, 0].item() == pytest.approx(delta0 + g * lam * adv_term[1, 0].item())
    assert adv_trunc[0, 0].item() == pytest.approx(delta0 + g * lam * adv_trunc[1, 0].item())


def test_gae_rejects_bad_shapes():
    with pytest.raises(ValueError, match="T \\+ 1 rows"):
        reference.gae(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), 0.9, 0.9)


# ---------------------------------------------------------------------------------------------
# PPO loss
# ---------------------------------------------------------------------------------------------
def loss_oracle(logits, actions, old_logp, adv, values, old_values, returns, *, clip_coef, vf_coef, ent_coef,
                vf_clip_coef, norm_adv, kl_coef, old_logits, mask):
    """float64, written with explicit softmax and boolean selection of the valid rows."""
    keep = torch.ones(len(actions), dtype=torch.bool) if mask is None else mask.bool()
    logits, actions, old_logp, adv = logits[keep], actions[keep], old_logp[keep], adv[keep]
    values, old_values, returns = values[keep], old_values[keep], returns[keep]
    n = len(actions)
    if n == 0:
        zero = logits.sum() * 0.0 + values.sum() * 0.0
        return zero, {}
    p = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    logp = torch.log(p)
    newlogp = logp[torch.arange(n), actions]
    ratio = torch.exp(newlogp - old_logp)
    if norm_adv:
        std = adv.std() if n > 1 else torch.zeros((), dtype=adv.dtype)
        adv = (adv - adv.mean()) / (std + 1e-8)
    kl = None
    if old_logits is not None:
        q = torch.softmax(old_logits[keep], -1)
        kl = (q * (torch.log(q) - logp)).sum(-1)
    k3 = ratio - 1 - torch.log(ratio)
    if clip_coef is None:
        pg = (-adv * ratio).mean() + kl_coef * (kl if kl is not None else k3).mean()
    else:
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    if vf_clip_coef is None:
        v = 0.5 * ((values - returns) ** 2).mean()
    else:
        vc = old_values + (values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
        v = 0.5 * torch.maximum((values - returns) ** 2, (vc - returns) ** 2).mean()
    ent = -(p * logp).sum(-1).mean()
    stats = {"policy_loss": pg, "value_loss": v, "entropy": ent, "approx_kl": k3.mean(),
             "old_approx_kl": (-(newlogp - old_logp)).mean()}
    if clip_coef is not None:
        stats["clipfrac"] = ((ratio - 1).abs() > clip_coef).double().mean()
    if kl is not None:
        stats["kl"] = kl.mean()
    return pg - ent_coef * ent + vf_coef * v, stats


def make_batch(M, A, case, gen):
    logits = torch.randn(M, A, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, A, (M,), generator=gen)
    logp = torch.log_softmax(logits, -1)[torch.arange(M), actions]
    old_logp = logp + 0.3 * torch.randn(M, generator=gen, dtype=torch.float64)
    old_logits = logits + 0.3 * torch.randn(M, A, generator=gen, dtype=torch.float64)
    adv = torch.randn(M, generator=gen, dtype=torch.float64)
    values = torch.randn(M, generator=gen, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(M, generator=gen, dtype=torch.float64)
    returns = torch.randn(M, generator=gen, dtype=torch.float64)
    mask = None
    if case == "ratio_one":
        old_logp = logp.clone()
        old_logits = logits.clone()
    if case == "masked":
        mask = torch.rand(M, generator=gen) < 0.7
        # garbage where masked: it must not leak into the loss or the normalisation
        adv = torch.where(mask, adv, torch.full_like(adv, 1e6))
        returns = torch.where(mask, returns, torch.full_like(returns, -1e6))
    if case == "all_masked":
        mask = torch.zeros(M, dtype=torch.bool)
    if case == "zero_var_adv":
        adv = torch.full_like(adv, 0.7)
    return logits, actions, old_logp, adv, values, old_values, returns, old_logits, mask


LOSS_CASES = [
    # (case, M, A, variant)
    ("random", 37 * 11, 6, "clip"),
    ("random", 37 * 11, 4, "clip_no_vclip"),
    ("random", 101, 18, "clip_no_norm"),
    ("masked", 37 * 11, 6, "clip"),
    ("ratio_one", 53, 6, "clip"),
    ("zero_var_adv", 53, 6, "clip"),
    ("random", 1, 6, "clip"),
    ("random", 53, 6, "penalty_exact"),
    ("random", 53, 6, "penalty_k3"),
    ("masked", 53, 18, "penalty_exact"),
    ("all_masked", 29, 6, "clip"),
]


def variant_kwargs(variant: str):
    kw = dict(clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, vf_clip_coef=0.2, norm_adv=True, kl_coef=0.0,
              use_old_logits=True)
    if variant == "clip_no_vclip":
        kw["vf_clip_coef"] = None
    if variant == "clip_no_norm":
        kw["norm_adv"] = False
    if variant.startswith("penalty"):
        kw.update(clip_coef=None, kl_coef=0.7, use_old_logits=variant == "penalty_exact")
    return kw


@pytest.mark.parametrize("case,M,A,variant", LOSS_CASES, ids=[f"{c}-M{m}-A{a}-{v}" for c, m, a, v in LOSS_CASES])
def test_ppo_loss_matches_oracle(case, M, A, variant):
    gen = torch.Generator().manual_seed(M * 31 + A)
    logits, actions, old_logp, adv, values, old_values, returns, old_logits, mask = make_batch(M, A, case, gen)
    kw = variant_kwargs(variant)
    use_old = kw.pop("use_old_logits")
    old_logits = old_logits if use_old else None

    def run(fn, dtype):
        lg = logits.to(dtype).clone().requires_grad_(True)
        vl = values.to(dtype).clone().requires_grad_(True)
        loss, stats = fn(lg, actions, old_logp.to(dtype), adv.to(dtype), vl, old_values.to(dtype),
                         returns.to(dtype), old_logits=None if old_logits is None else old_logits.to(dtype),
                         mask=mask, **kw)
        loss.backward()
        return loss, stats, lg.grad, vl.grad

    loss, stats, g_logits, g_values = run(reference.ppo_loss, torch.float32)
    loss64, stats64, g_logits64, g_values64 = run(loss_oracle, torch.float64)

    assert torch.isfinite(loss) and torch.isfinite(g_logits).all() and torch.isfinite(g_values).all()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), loss64.detach(), **tol)
    torch.testing.assert_close(g_logits.double(), g_logits64, **tol)
    torch.testing.assert_close(g_values.double(), g_values64, **tol)
    for key, ref in stats64.items():
        torch.testing.assert_close(stats[key].double(), ref.detach(), **tol, msg=f"stat {key}")
    assert ("kl" in stats) == (old_logits is not None)
    if case == "ratio_one":
        assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
        assert stats["clipfrac"].item() == 0.0
    if case == "all_masked":
        assert loss.item() == 0.0 and (g_logits == 0).all()


def test_ppo_loss_clipping_active_above_and_below():
    """ratio > 1 + eps with A > 0 and ratio < 1 - eps with A < 0 are clipped: zero policy gradient."""
    logits = torch.zeros(2, 3, requires_grad=True)
    actions = torch.tensor([0, 1])
    logp = math.log(1 / 3)
    old_logp = torch.tensor([logp - 0.5, logp + 0.5])  # ratio e^0.5 > 1.2 and e^-0.5 < 0.8
    adv = torch.tensor([1.0, -1.0])
    zeros = torch.zeros(2)
    loss, stats = reference.ppo_loss(logits, actions, old_logp, adv, zeros, zeros, zeros, clip_coef=0.2,
                                     vf_coef=0.0, ent_coef=0.0, norm_adv=False)
    loss.backward()
    assert stats["clipfrac"].item() == 1.0
    assert torch.count_nonzero(logits.grad) == 0
    # the other side of each (ratio above with A < 0, below with A > 0) is not clipped
    logits.grad = None
    loss, _ = reference.ppo_loss(logits, actions, old_logp, -adv, zeros, zeros, zeros, clip_coef=0.2,
                                 vf_coef=0.0, ent_coef=0.0, norm_adv=False)
    loss.backward()
    assert torch.count_nonzero(logits.grad) > 0


def test_ppo_loss_gradcheck():
    gen = torch.Generator().manual_seed(3)
    logits, actions, old_logp, adv, values, old_values, returns, old_logits, mask = make_batch(23, 5, "masked", gen)

    def f(lg, vl):
        return reference.ppo_loss(lg, actions, old_logp, adv, vl, old_values, returns, clip_coef=0.2, vf_coef=0.5,
                                  ent_coef=0.01, vf_clip_coef=0.2, kl_coef=0.3, old_logits=old_logits, mask=mask)[0]

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(), values.clone().requires_grad_()))


@pytest.mark.parametrize("lo,hi", [(-0.25, 0.25), (1.0, 1.0)], ids=["interval", "single_point"])
def test_clip_passes_the_gradient_at_its_bounds(lo, hi):
    """clip's values are torch.clamp's; its gradient is 1 on the closed interval [lo, hi] and 0 outside
    (and at NaN) on every torch version, where torch.clamp's own is 0 at the bounds from torch 2.14 on."""
    x = torch.tensor([lo - 1.0, lo, (lo + hi) / 2, hi, hi + 1.0, math.nan], dtype=torch.float64, requires_grad=True)
    y = reference.clip(x, lo, hi)
    torch.testing.assert_close(y, x.detach().clamp(lo, hi), equal_nan=True)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_normalize_advantages_single_valid_entry_is_zero_not_nan():
    out = reference.normalize_advantages(torch.tensor([3.0, 5.0]), torch.tensor([True, False]))
    assert torch.equal(out, torch.zeros(2))
