"""The Triton kernels against the float64 torch reference: forward, every gradient, named edge cases.

Where CUDA is available the kernels run natively on it. Otherwise they run on CPU tensors under the
Triton interpreter: TRITON_INTERPRET=1 is set below, before anything imports the kernels (it is read
when @triton.jit builds them), and only when there is no CUDA, so a GPU run is never interpreted.

Every kernel output buffer is NaN-poisoned before its launch (``gae.POISON_OUTPUTS``), and every
compared output must be finite, so an element a kernel forgets to write fails.

Tolerances. The kernels compute in float32 and are compared with the reference run in float64 on
the same (float32) inputs, with rtol = 1e-5 and atol = 1e-5 * scale, scale being the output's own
size: the largest |entry| for a tensor, 1 for a scalar mean (its summands are O(1) by construction
of the data below). The atol is needed because rtol alone fails entries that are small differences
of O(scale) float32 terms (a softmax gradient near 0, the policy loss of mean-zero normalised
advantages), whose error is a few float32 ulps of the scale (6e-8 each), not of the entry. So the
check is: error <= 1e-5 relative to the output's scale. Low-precision logits: the loss is still
float32 (the reference gets the same rounded logits), the logit gradient is stored in the logits'
dtype, so it gets that dtype's precision (rtol = atol/scale = 2 ** -7 for bfloat16, 2 ** -10 fp16).
"""

from __future__ import annotations

import importlib.util
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

from fastppo import kernels  # noqa: E402
from fastppo.kernels import gae as gae_mod  # noqa: E402
from fastppo.kernels import gae_loss as gae_loss_mod  # noqa: E402
from fastppo.kernels import loss as loss_mod  # noqa: E402
from fastppo.kernels import reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and not gae_mod.INTERPRETED:
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set; on CPU they need "
                "the interpreter (run this file on its own)", allow_module_level=True)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

T, N = 37, 11
GAMMA, LAM = 0.99, 0.95
CLIP = dict(clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(gae_mod, "POISON_OUTPUTS", True)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str, *, tol: float = 1e-5,
                   scale: float | None = None) -> None:
    """|actual - expected| <= tol * (|expected| + scale), elementwise; actual must be finite."""
    assert torch.isfinite(actual).all(), f"{what}: not finite: {actual}"
    expected = expected.detach().to(actual.device, torch.float64)
    if scale is None:
        scale = 1.0 if expected.numel() == 1 else expected.abs().max().item()
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def away_from(x: torch.Tensor, points: tuple[float, ...], gap: float = 0.01) -> torch.Tensor:
    """Move entries within gap of a kink (a clip bound) past it, so float32 and float64 agree on
    which side of the kink every sample is."""
    for p in points:
        x = torch.where((x - p).abs() < gap, x + 2 * gap, x)
    return x


def make_flags(T: int, N: int, pattern: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    term = torch.zeros(T, N, dtype=torch.bool)
    trunc = torch.zeros(T, N, dtype=torch.bool)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    if pattern == "random":
        term = torch.rand(T, N, generator=g) < 0.08
        trunc = torch.rand(T, N, generator=g) < 0.08
    elif pattern == "done_t0":
        term[0, even] = True
        trunc[0, odd] = True
    elif pattern == "done_last":
        term[T - 1, even] = True
        trunc[T - 1, odd] = True
    elif pattern == "consecutive_dones":
        term[5:9] = True
        trunc[20:24] = True
    elif pattern == "all_terminated":
        term[:] = True
    elif pattern == "all_truncated":
        trunc[:] = True
    elif pattern == "term_and_trunc_same_step":
        term[10] = True
        trunc[10] = True
        trunc[11, even] = True
    elif pattern != "none_done":
        raise ValueError(pattern)
    return term, trunc


def make_ratio(shape: tuple[int, ...], pattern: str, g: torch.Generator) -> torch.Tensor:
    """pi/pi_old per sample: 'spread' over [0.5, 1.6] away from the clip bounds 0.8 and 1.2,
    'one' exactly 1, 'clip_both' cycling 0.5, 0.5, 1.5, 1.5 (clipped below and above)."""
    numel = math.prod(shape)
    if pattern == "one":
        return torch.ones(shape, dtype=torch.float64)
    if pattern == "clip_both":
        return torch.tensor([0.5, 0.5, 1.5, 1.5], dtype=torch.float64).repeat(numel // 4 + 1)[:numel].view(shape)
    return away_from(0.5 + 1.1 * torch.rand(shape, generator=g, dtype=torch.float64), (0.8, 1.2))


def make_policy(lead: tuple[int, ...], A: int, ratio: str, g: torch.Generator, dtype=torch.float32):
    logits = (1.5 * torch.randn(*lead, A, generator=g)).to(dtype)
    actions = torch.randint(0, A, lead, generator=g)
    logp64 = torch.log_softmax(logits.double(), -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    old_logp = (logp64 - make_ratio(lead, ratio, g).log()).float()
    return logits, actions, old_logp


def make_mask(shape: tuple[int, ...], pattern: str | None, g: torch.Generator) -> torch.Tensor | None:
    if pattern is None:
        return None
    if pattern == "random":
        return torch.rand(shape, generator=g) < 0.7
    if pattern == "none_valid":
        return torch.zeros(shape, dtype=torch.bool)
    if pattern == "first_only":
        m = torch.zeros(shape, dtype=torch.bool)
        m.view(-1)[0] = True
        return m
    raise ValueError(pattern)


def make_old_values(values: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """values - step, step in [-0.5, 0.5] away from the value clip bounds +-0.2."""
    step = away_from(torch.rand(values.shape, generator=g) - 0.5, (-0.2, 0.2))
    return values - step


def to_device(d: dict) -> dict:
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------

GAE_PATTERNS = ["random", "done_t0", "done_last", "consecutive_dones", "all_terminated", "all_truncated",
                "none_done", "term_and_trunc_same_step"]


def gae_data(T: int, N: int, pattern: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    term, trunc = make_flags(T, N, pattern, g)
    return to_device(dict(rewards=torch.randn(T, N, generator=g), values=torch.randn(T + 1, N, generator=g),
                          terminated=term, truncated=trunc))


def check_gae(d: dict, impl: str) -> None:
    adv_ref, ret_ref = reference.gae(d["rewards"].double(), d["values"].double(), d["terminated"],
                                     d["truncated"], GAMMA, LAM)
    adv, ret = gae_mod.gae(d["rewards"], d["values"], d["terminated"], d["truncated"], GAMMA, LAM, impl=impl)
    assert adv.shape == ret.shape == d["rewards"].shape and adv.dtype == ret.dtype == torch.float32
    assert_close64(adv, adv_ref, "advantages")
    assert_close64(ret, ret_ref, "returns")


@pytest.mark.parametrize("impl", gae_mod.IMPLS)
@pytest.mark.parametrize("pattern", GAE_PATTERNS)
def test_gae(pattern: str, impl: str) -> None:
    check_gae(gae_data(T, N, pattern), impl)


@pytest.mark.parametrize("impl", gae_mod.IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (64, 5)], ids=lambda s: f"T{s[0]}_N{s[1]}")
def test_gae_small_and_pow2_shapes(shape: tuple[int, int], impl: str) -> None:
    check_gae(gae_data(*shape, "random", seed=1), impl)


@pytest.mark.parametrize("flag_dtype", [torch.uint8, torch.float32, torch.int64], ids=str)
def test_gae_flag_dtypes(flag_dtype: torch.dtype) -> None:
    d = gae_data(T, N, "random", seed=2)
    d_cast = dict(d, terminated=d["terminated"].to(flag_dtype), truncated=d["truncated"].to(flag_dtype))
    for impl in gae_mod.IMPLS:
        adv, ret = gae_mod.gae(d_cast["rewards"], d_cast["values"], d_cast["terminated"], d_cast["truncated"],
                               GAMMA, LAM, impl=impl)
        adv_ref, _ = reference.gae(d["rewards"].double(), d["values"].double(), d["terminated"],
                                   d["truncated"], GAMMA, LAM)
        assert_close64(adv, adv_ref, f"advantages ({flag_dtype}, {impl})")


def test_gae_strided_and_low_precision_rewards() -> None:
    d = gae_data(T, N, "random", seed=3)
    wide = torch.full((T + 1, 2 * N), math.nan, device=DEVICE)
    values = wide[:, ::2]  # column stride 2; the NaN gaps catch a wrong stride
    values.copy_(d["values"])
    rewards = d["rewards"].t().contiguous().t()  # column-major
    rewards16 = rewards.to(torch.bfloat16)
    for impl in gae_mod.IMPLS:
        check_gae(dict(d, values=values, rewards=rewards), impl)
        adv, _ = gae_mod.gae(rewards16, values, d["terminated"], d["truncated"], GAMMA, LAM, impl=impl)
        adv_ref, _ = reference.gae(rewards16.double(), values.double(), d["terminated"], d["truncated"], GAMMA, LAM)
        assert_close64(adv, adv_ref, f"advantages, bf16 rewards ({impl})")


def test_gae_truncation_bootstraps_termination_does_not() -> None:
    """At a terminal step A = r - V; at a truncated one A = r + gamma V_{t+1} - V (no carry either way)."""
    d = gae_data(T, 2, "none_done", seed=4)
    d["terminated"][10, 0] = True
    d["truncated"][10, 1] = True
    r, v = d["rewards"], d["values"]
    for impl in gae_mod.IMPLS:
        adv, _ = gae_mod.gae(r, v, d["terminated"], d["truncated"], GAMMA, LAM, impl=impl)
        torch.testing.assert_close(adv[10, 0], r[10, 0] - v[10, 0])
        torch.testing.assert_close(adv[10, 1], r[10, 1] + GAMMA * v[11, 1] - v[10, 1])


@pytest.mark.parametrize("impl", gae_mod.IMPLS)
def test_gae_blocks_chunks_and_stats(impl: str) -> None:
    """Several column blocks (and, for the scan, several time chunks); the per-block (count, mean, M2)
    of the advantages over the masked entries, as the fused loss uses them."""
    d = gae_data(T, N, "random", seed=5)
    mask = (torch.rand(T, N, generator=torch.Generator().manual_seed(5)) < 0.6).to(DEVICE)
    adv, ret, stats = gae_mod.launch_gae(d["rewards"], d["values"], d["terminated"], d["truncated"], GAMMA, LAM,
                                         impl, mask=mask, stats=True, block_n=4, block_t=8)
    adv_ref, ret_ref = reference.gae(d["rewards"].double(), d["values"].double(), d["terminated"],
                                     d["truncated"], GAMMA, LAM)
    assert_close64(adv, adv_ref, "advantages")
    assert_close64(ret, ret_ref, "returns")
    assert stats.shape == (math.ceil(N / 4), 3)
    for b in range(stats.shape[0]):
        cols = slice(4 * b, 4 * b + 4)
        x = adv_ref[:, cols][mask[:, cols]]
        expected = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.mean(),
                                ((x - x.mean()) ** 2).sum()])
        assert_close64(stats[b], expected, f"stats of block {b}", scale=expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# PPO loss
# ---------------------------------------------------------------------------------------------

# name -> (M, data options, loss kwargs)
LOSS_CASES = {
    "clip": (T * N, {}, CLIP),
    "clip_masked": (T * N, dict(mask="random"), CLIP),
    "all_masked": (T * N, dict(mask="none_valid"), CLIP),
    "ratio_exactly_1": (T * N, dict(ratio="one"), CLIP),
    "clipping_above_and_below": (T * N, dict(ratio="clip_both", adv="signs"), CLIP),
    "adv_zero_variance": (T * N, dict(adv="constant"), CLIP),
    "adv_zero_variance_over_valid": (T * N, dict(adv="constant_valid", mask="random"), CLIP),
    "no_norm_adv": (T * N, dict(mask="random"), dict(CLIP, norm_adv=False)),
    "M1": (1, {}, CLIP),
    "M1_no_norm_adv": (1, {}, dict(CLIP, norm_adv=False)),
    "M1_masked_out": (1, dict(mask="none_valid"), CLIP),
    "one_valid_sample": (T * N, dict(mask="first_only"), CLIP),
    "value_clip": (T * N, {}, dict(CLIP, vf_clip_coef=0.2)),
    "value_clip_masked_k3_kl": (T * N, dict(mask="random"), dict(CLIP, vf_clip_coef=0.2, kl_coef=0.1)),
    "clip_old_logits_kl_stat_only": (T * N, dict(old_logits=True), CLIP),
    "clip_exact_kl_term": (T * N, dict(old_logits=True, mask="random"), dict(CLIP, kl_coef=0.1)),
    "penalty_k3": (T * N, {}, dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_exact_kl": (T * N, dict(old_logits=True, mask="random"), dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_no_kl": (T * N, {}, dict(CLIP, clip_coef=None)),
    "strided_inputs": (T * N, dict(strided=True, old_logits=True, mask="random"),
                       dict(CLIP, vf_clip_coef=0.2, kl_coef=0.1)),
}


def strided_copy(x: torch.Tensor) -> torch.Tensor:
    """The same values with every stride doubled, NaN in the gaps."""
    wide = torch.full([2 * s for s in x.shape], math.nan, dtype=x.dtype) if x.is_floating_point() else \
        torch.zeros([2 * s for s in x.shape], dtype=x.dtype)
    view = wide[tuple(slice(0, None, 2) for _ in x.shape)]
    view.copy_(x)
    return view


def loss_data(M: int, A: int, *, seed: int = 0, ratio: str = "spread", adv: str = "normal",
              mask: str | None = None, old_logits: bool = False, strided: bool = False,
              logits_dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits, actions, old_logp = make_policy((M,), A, ratio, g, logits_dtype)
    m = make_mask((M,), mask, g)
    if adv == "constant":
        advantages = torch.full((M,), 0.7)
    elif adv == "constant_valid":
        advantages = torch.where(m, 0.7, torch.randn(M, generator=g))
    elif adv == "signs":  # +, -, +, - with the 'clip_both' ratios: every (ratio side, sign) pair
        advantages = torch.tensor([1.0, -1.0]).repeat(M // 2 + 1)[:M] * (1.0 + torch.rand(M, generator=g))
    else:
        advantages = 2.0 * torch.randn(M, generator=g) + 0.3
    values = torch.randn(M, generator=g)
    d = dict(logits=logits, actions=actions, old_logp=old_logp, advantages=advantages, values=values,
             old_values=make_old_values(values, g), returns=values + torch.randn(M, generator=g), mask=m,
             old_logits=(1.5 * torch.randn(M, A, generator=g)).to(logits_dtype) if old_logits else None)
    if strided:
        d = {k: (strided_copy(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    return to_device(d)


LOSS_ARGS = ("actions", "old_logp", "advantages", "values", "old_values", "returns")


def run_loss(fn, d: dict, kw: dict, dtype: torch.dtype | None):
    """fn's (loss, stats, dloss/dlogits, dloss/dvalues); dtype=float64 runs it in float64."""
    cast = (lambda x: x.to(dtype) if x is not None and x.is_floating_point() else x) if dtype else (lambda x: x)
    logits = cast(d["logits"]).detach().requires_grad_()
    values = cast(d["values"]).detach().requires_grad_()
    args = [cast(d[k]) for k in LOSS_ARGS]
    args[3] = values
    loss, stats = fn(logits, *args, old_logits=cast(d["old_logits"]), mask=d["mask"], **kw)
    loss.backward()
    return loss, stats, logits.grad, values.grad


def compare_loss(got, ref, *, grad_tol: float = 1e-5) -> None:
    loss, stats, g_logits, g_values = got
    loss_ref, stats_ref, g_logits_ref, g_values_ref = ref
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert set(stats) == set(stats_ref), f"stats keys {sorted(stats)} != {sorted(stats_ref)}"
    assert_close64(loss, loss_ref, "loss")
    for k in stats_ref:
        assert not stats[k].requires_grad
        assert_close64(stats[k], stats_ref[k], f"stats[{k!r}]")
    assert_close64(g_logits, g_logits_ref, "dloss/dlogits", tol=grad_tol)
    assert_close64(g_values, g_values_ref, "dloss/dvalues")


@pytest.mark.parametrize("A", [4, 6, 18])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_ppo_loss(case: str, A: int) -> None:
    M, data_opts, kw = LOSS_CASES[case]
    d = loss_data(M, A, **data_opts)
    got = run_loss(loss_mod.ppo_loss, d, kw, None)
    compare_loss(got, run_loss(reference.ppo_loss, d, kw, torch.float64))
    if data_opts.get("mask") == "none_valid":
        assert float(got[0].detach()) == 0.0 and not got[2].any() and not got[3].any()
    if case.startswith("adv_zero_variance"):  # normalised advantages are exactly 0: no policy gradient
        assert float(got[1]["policy_loss"]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ppo_loss_low_precision_logits(dtype: torch.dtype) -> None:
    d = loss_data(T * N, 6, old_logits=True, mask="random", logits_dtype=dtype)
    kw = dict(CLIP, kl_coef=0.1, vf_clip_coef=0.2)
    got = run_loss(loss_mod.ppo_loss, d, kw, None)
    assert got[2].dtype == dtype
    compare_loss(got, run_loss(reference.ppo_loss, d, kw, torch.float64),
                 grad_tol=2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)


def test_ppo_loss_bad_action_gives_nan() -> None:
    d = loss_data(16, 4)
    d["actions"][3] = 4
    loss, _ = loss_mod.ppo_loss(d["logits"], *[d[k] for k in LOSS_ARGS], **CLIP)
    assert torch.isnan(loss)


def test_ppo_loss_backward_scales_by_grad_output() -> None:
    d = loss_data(64, 6, mask="random")
    _, _, g_logits, g_values = run_loss(loss_mod.ppo_loss, d, CLIP, None)
    logits = d["logits"].detach().requires_grad_()
    values = d["values"].detach().requires_grad_()
    args = [d[k] for k in LOSS_ARGS]
    args[3] = values
    loss, stats = loss_mod.ppo_loss(logits, *args, mask=d["mask"], **CLIP)
    (-3.0 * loss + stats["entropy"]).backward()  # stats are detached: they add no gradient
    torch.testing.assert_close(logits.grad, -3.0 * g_logits)
    torch.testing.assert_close(values.grad, -3.0 * g_values)


# ---------------------------------------------------------------------------------------------
# Fused GAE + loss
# ---------------------------------------------------------------------------------------------

# name -> (T, n, data options, loss kwargs)
GAE_LOSS_CASES = {
    "clip": (T, N, {}, CLIP),
    "clip_masked_scan": (T, N, dict(mask="random", impl="scan"), CLIP),
    "all_masked": (T, N, dict(mask="none_valid"), CLIP),
    "ratio_exactly_1_all_done": (T, N, dict(ratio="one", dones="all_terminated"), CLIP),
    "consecutive_dones_value_clip": (T, N, dict(dones="consecutive_dones"), dict(CLIP, vf_clip_coef=0.2)),
    "no_norm_adv_masked": (T, N, dict(mask="random"), dict(CLIP, norm_adv=False)),
    "penalty_exact_kl_masked": (T, N, dict(old_logits=True, mask="random"), dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "penalty_k3_scan": (T, N, dict(impl="scan", dones="done_last"), dict(CLIP, clip_coef=None, kl_coef=0.2)),
    "clipping_above_and_below": (T, N, dict(ratio="clip_both"), CLIP),
    "M1": (1, 1, {}, CLIP),
}


def gae_loss_data(T: int, n: int, A: int, *, seed: int = 0, ratio: str = "spread", dones: str = "random",
                  mask: str | None = None, old_logits: bool = False, impl: str = "loop") -> dict:
    g = torch.Generator().manual_seed(seed)
    logits, actions, old_logp = make_policy((T, n), A, ratio, g)
    term, trunc = make_flags(T, n, dones, g)
    values = torch.randn(T + 1, n, generator=g)
    d = dict(logits=logits, actions=actions, old_logp=old_logp, values=values,
             old_values=make_old_values(values[:T], g), rewards=torch.randn(T, n, generator=g),
             terminated=term, truncated=trunc, mask=make_mask((T, n), mask, g),
             old_logits=1.5 * torch.randn(T, n, A, generator=g) if old_logits else None)
    return to_device(d), impl


GAE_LOSS_ARGS = ("actions", "old_logp", "values", "old_values", "rewards", "terminated", "truncated")


def run_gae_loss(fn, d: dict, kw: dict, dtype: torch.dtype | None):
    cast = (lambda x: x.to(dtype) if x is not None and x.is_floating_point() else x) if dtype else (lambda x: x)
    logits = cast(d["logits"]).detach().requires_grad_()
    values = cast(d["values"]).detach().requires_grad_()
    args = [cast(d[k]) for k in GAE_LOSS_ARGS]
    args[2] = values
    loss, stats = fn(logits, *args, gamma=GAMMA, gae_lambda=LAM, old_logits=cast(d["old_logits"]),
                     mask=d["mask"], **kw)
    loss.backward()
    return loss, stats, logits.grad, values.grad


@pytest.mark.parametrize("A", [4, 6, 18])
@pytest.mark.parametrize("case", list(GAE_LOSS_CASES))
def test_gae_ppo_loss(case: str, A: int) -> None:
    T_, n, data_opts, kw = GAE_LOSS_CASES[case]
    d, impl = gae_loss_data(T_, n, A, **data_opts)
    got = run_gae_loss(gae_loss_mod.gae_ppo_loss, d, dict(kw, impl=impl), None)
    compare_loss(got, run_gae_loss(reference.gae_ppo_loss, d, kw, torch.float64))
    assert not got[3][-1].any(), "the bootstrap row gets no gradient"


# ---------------------------------------------------------------------------------------------
# torch.compile, errors, select
# ---------------------------------------------------------------------------------------------


def test_ops_trace_under_torch_compile() -> None:
    """fullgraph torch.compile sees the ops (fake shapes + autograd formula) and gets eager's numbers.

    On CUDA the ops are triton_op and Inductor compiles around them. Under the interpreter they are
    opaque custom_op and the backend is aot_eager (Dynamo + AOTAutograd, no C++ codegen), which keeps
    this test fast; Inductor on CPU runs them too, it only takes ~20 s to build.
    """
    backend = "inductor" if CUDA else "aot_eager"
    d = loss_data(T * N, 6, mask="random", old_logits=True)
    kw = dict(CLIP, kl_coef=0.1)
    eager = run_loss(loss_mod.ppo_loss, d, kw, None)
    compiled = run_loss(torch.compile(loss_mod.ppo_loss, backend=backend, fullgraph=True), d, kw, None)
    for a, b in zip((eager[0], eager[2], eager[3]), (compiled[0], compiled[2], compiled[3]), strict=True):
        torch.testing.assert_close(a, b)
    assert set(compiled[1]) == set(eager[1])
    d2, _ = gae_loss_data(T, N, 6, mask="random")
    eager = run_gae_loss(gae_loss_mod.gae_ppo_loss, d2, CLIP, None)
    compiled = run_gae_loss(torch.compile(gae_loss_mod.gae_ppo_loss, backend=backend, fullgraph=True), d2, CLIP, None)
    for a, b in zip((eager[0], eager[2], eager[3]), (compiled[0], compiled[2], compiled[3]), strict=True):
        torch.testing.assert_close(a, b)
    g = gae_data(T, N, "random")
    args = (g["rewards"], g["values"], g["terminated"], g["truncated"], GAMMA, LAM)
    for x, y in zip(gae_mod.gae(*args), torch.compile(gae_mod.gae, backend=backend, fullgraph=True)(*args),
                    strict=True):
        torch.testing.assert_close(x, y)


# torch.compile(backend="inductor") of the compiled (not interpreted) ops on CPU tensors, as far as a
# machine without a GPU can take it: Dynamo, AOTAutograd decomposing each triton_op into its kernel
# launches, Inductor's decompositions, post-grad passes and lowering of every node; it stops where
# code generation starts, which needs a GPU driver. Triton's driver is a stub naming sm_90, so the
# kernels' mutation analysis runs as on the H200. Inductor up to torch 2.11 lowered a dtype view
# (aten.view.dtype) by sizing both dtypes with torch.iinfo/finfo, and torch.iinfo rejects torch.bool:
# the GPU run's "LoweringException: TypeError: torch.bool is not supported by torch.iinfo" when a
# launcher viewed bool flags as uint8. Later Inductor sizes bool itself, so here the view.dtype
# lowering is held to the 2.11 rule, and a bool view fails on every torch version.
# Runs in a fresh process without TRITON_INTERPRET; each check's body calls lower(name, fn, *args).
_INDUCTOR_LOWERING_CHECK = """
import torch
import torch._inductor.config
import triton
from torch._inductor import lowering
from torch._inductor.graph import GraphLowering
from triton.backends.compiler import GPUTarget
from fastppo.kernels import gae as G
assert not G.INTERPRETED
torch._inductor.config.force_disable_caches = True  # a cached graph would skip the lowering


class Sm90Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Sm90Driver())
view_dtype = lowering.lowerings[torch.ops.aten.view.dtype]


def view_dtype_as_in_torch_2_11(x, dtype):
    for dt in (x.get_dtype(), dtype):
        (torch.finfo if dt.is_floating_point else torch.iinfo)(dt).bits
    return view_dtype(x, dtype)


lowering.lowerings[torch.ops.aten.view.dtype] = view_dtype_as_in_torch_2_11
lowered = []


def stop_before_codegen(graph):
    lowered.append(graph)
    raise RuntimeError("lowered; code generation needs a GPU")


GraphLowering.compile_to_module = stop_before_codegen


def lower(name, fn, *args, **kwargs):
    n = len(lowered)
    try:
        torch.compile(fn, backend="inductor", fullgraph=True)(*args, **kwargs)
    except Exception:
        if len(lowered) == n:
            raise
    print("lowered", name)


def flags(*shape):
    return torch.rand(shape) < 0.3
"""


def run_inductor_lowering(body: str) -> str:
    """Run _INDUCTOR_LOWERING_CHECK then body in a fresh process; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _INDUCTOR_LOWERING_CHECK + body], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_inductor_lowers_the_compiled_ops() -> None:
    """gae, ppo_loss and gae_ppo_loss with bool flags and masks through Inductor's lowering (see above)."""
    out = run_inductor_lowering("""
from fastppo.kernels import gae_loss as GL, loss as L
T, n, A = 5, 3, 4
lower("gae", G.gae, torch.randn(T, n), torch.randn(T + 1, n), flags(T, n), flags(T, n), 0.99, 0.95)
M = T * n
lower("ppo_loss", L.ppo_loss, torch.randn(M, A, requires_grad=True), torch.randint(0, A, (M,)), torch.randn(M),
      torch.randn(M), torch.randn(M, requires_grad=True), torch.randn(M), torch.randn(M), mask=flags(M),
      clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)
lower("gae_ppo_loss", GL.gae_ppo_loss, torch.randn(T, n, A, requires_grad=True), torch.randint(0, A, (T, n)),
      torch.randn(T, n), torch.randn(T + 1, n, requires_grad=True), torch.randn(T, n), torch.randn(T, n),
      flags(T, n), flags(T, n), mask=flags(T, n), gamma=0.99, gae_lambda=0.95, clip_coef=0.2, vf_coef=0.5,
      ent_coef=0.01)
""")
    assert out.split("\n")[:-1] == ["lowered gae", "lowered ppo_loss", "lowered gae_ppo_loss"], out


def _error_cases():
    g = gae_data(4, 3, "random")
    r, v, te, tr = g["rewards"], g["values"], g["terminated"], g["truncated"]
    d = loss_data(8, 4)
    lx = [d[k] for k in LOSS_ARGS]
    f, _ = gae_loss_data(4, 3, 4)
    fx = [f[k] for k in GAE_LOSS_ARGS]
    fkw = dict(CLIP, gamma=GAMMA, gae_lambda=LAM)
    return {
        "gae_values_rows": (lambda: gae_mod.gae(r, v[:-1], te, tr, GAMMA, LAM), "values must have shape"),
        "gae_values_dtype": (lambda: gae_mod.gae(r, v.double(), te, tr, GAMMA, LAM), "values must be float32"),
        "gae_flag_shape": (lambda: gae_mod.gae(r, v, te[:-1], tr, GAMMA, LAM), "terminated must have shape"),
        "gae_impl": (lambda: gae_mod.gae(r, v, te, tr, GAMMA, LAM, impl="magic"), "impl must be one of"),
        "loss_logits_dim": (lambda: loss_mod.ppo_loss(d["logits"][0], *lx, **CLIP), "logits must be 2-D"),
        "loss_logits_dtype": (lambda: loss_mod.ppo_loss(d["logits"].double(), *lx, **CLIP),
                              "logits must be float16/bfloat16/float32"),
        "loss_actions_float": (lambda: loss_mod.ppo_loss(d["logits"], lx[0].float(), *lx[1:], **CLIP),
                               "actions must be an integer tensor"),
        "loss_returns_shape": (lambda: loss_mod.ppo_loss(d["logits"], *lx[:-1], lx[-1][:-1], **CLIP),
                               "returns must have shape"),
        "loss_mask_float": (lambda: loss_mod.ppo_loss(d["logits"], *lx, mask=lx[3], **CLIP), "mask must be"),
        "fused_values_rows": (lambda: gae_loss_mod.gae_ppo_loss(f["logits"], *fx[:2], fx[2][:-1], *fx[3:], **fkw),
                              "values must have shape"),
        "fused_not_contiguous": (lambda: gae_loss_mod.gae_ppo_loss(f["logits"], fx[0].t().contiguous().t(), *fx[1:],
                                                                   **fkw), "actions must be contiguous"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_launchers_reject_bad_inputs(case: str) -> None:
    fn, match = _error_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_select() -> None:
    assert kernels.select("torch", DEVICE)[:4] == ("torch", reference.gae, reference.ppo_loss,
                                                   reference.gae_ppo_loss)
    ops = kernels.select("triton", DEVICE)
    assert ops[:4] == ("triton", gae_mod.gae, loss_mod.ppo_loss, gae_loss_mod.gae_ppo_loss)
    assert len(ops) == 6  # + the Gaussian losses, checked in tests/test_gaussian_kernels.py
    assert kernels.select("auto", "cpu").name == "torch"
    assert kernels.select("auto", DEVICE).name == ("triton" if CUDA else "torch")
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.select("fast", DEVICE)
    with pytest.raises(ValueError, match="not meta"):
        kernels.select("triton", "meta")


def test_select_errors_without_interpreter_or_triton(monkeypatch) -> None:
    monkeypatch.setattr(gae_mod, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    if not CUDA:
        with pytest.raises(ValueError, match="needs the Triton interpreter"):
            kernels.select("triton", "cpu")
    monkeypatch.setattr(gae_mod, "INTERPRETED", True)
    assert kernels.select("auto", "cuda").name == "torch"  # interpreted kernels are never picked on CUDA

    def no_triton() -> bool:
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(kernels, "_interpreted", no_triton)
    with pytest.raises(ValueError, match="triton is not importable"):
        kernels.select("triton", DEVICE)
    assert kernels.select("auto", "cuda").name == "torch"


# Compiles every kernel, in variants that set each constexpr flag both ways, through the real Triton
# compiler for sm_90 (Hopper) down to a cubin: no GPU needed. The interpreter is laxer than the
# compiler (it let a non-constexpr global through), so this is the CPU machine's check that the
# kernels build for the GPU at all. Runs in a fresh process without TRITON_INTERPRET.
_COMPILE_CHECK = """
import warnings
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastppo.kernels import gae as G, loss as L
assert not G.INTERPRETED
FLOATS = {"gamma", "gae_lambda", "clip_coef", "vf_clip_coef", "vf_coef", "ent_coef", "kl_coef"}

def build(fn, constexprs, ptrs={}):
    sig = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "*fp32") if p.name.endswith("_ptr")
           else "fp32" if p.name in FLOATS else "i32" for p in fn.params}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm, fn
    print("built", fn.__name__, constexprs)

# flags and masks: bool tensors arrive as *i1 (the usual case), uint8 ones as *u8
for ret, stats, flag in ((True, False, "*i1"), (False, True, "*u8")):
    ptrs = {"term_ptr": flag, "trunc_ptr": flag, "mask_ptr": flag}
    build(G._gae_loop_kernel, dict(BLOCK_N=32, STORE_RET=ret, STATS=stats, HAS_MASK=stats), ptrs)
    build(G._gae_scan_kernel, dict(BLOCK_T=64, BLOCK_N=16, STORE_RET=ret, STATS=stats, HAS_MASK=stats), ptrs)
build(L._adv_stats_kernel, dict(BLOCK=1024, HAS_MASK=True), {"mask_ptr": "*i1"})
flags = ("HAS_MASK", "NORM_ADV", "CLIP", "VF_CLIP", "HAS_OLD_LOGITS", "USE_KL", "RET_FROM_ADV")
bf16 = {"logits_ptr": "*bf16", "old_logits_ptr": "*bf16", "grad_logits_ptr": "*bf16"}
for on, ptrs in (((0, 1, 2), {}), ((3, 4, 5, 6), bf16)):
    build(L._ppo_loss_kernel, dict({f: i in on for i, f in enumerate(flags)}, BLOCK_M=128, BLOCK_A=32, BLOCK_G=64),
          dict(ptrs, actions_ptr="*i64", mask_ptr="*i1"))
for on in (True, False):
    build(L._finalize_kernel, dict(BLOCK_G=1024, HAS_OLD_LOGITS=on, USE_KL=on))
"""


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("built") == 9


def test_bench_smoke(tmp_path: Path) -> None:
    """bench/bench_kernels.py --smoke: tiny shapes, every row of the table, a JSON result file."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.main(["--smoke", "--out", str(tmp_path)])
    text = path.read_text()
    assert '"rows"' in text and "ppo_loss" in text and "gae_ppo_loss" in text and "gae" in text


# ---------------------------------------------------------------------------------------------
# GPU: large shapes (the small ones above already run natively on CUDA)
# ---------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", gae_mod.IMPLS)
def test_gpu_gae_large(impl: str) -> None:
    check_gae(gae_data(128, 4096, "random", seed=7), impl)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("A", [6, 18])
def test_gpu_ppo_loss_large(A: int, dtype: torch.dtype) -> None:
    d = loss_data(131072, A, mask="random", old_logits=True, logits_dtype=dtype)
    kw = dict(CLIP, vf_clip_coef=0.2, kl_coef=0.1)
    compare_loss(run_loss(loss_mod.ppo_loss, d, kw, None), run_loss(reference.ppo_loss, d, kw, torch.float64),
                 grad_tol=2.0**-7 if dtype == torch.bfloat16 else 1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", gae_mod.IMPLS)
def test_gpu_gae_ppo_loss_large(impl: str) -> None:
    d, _ = gae_loss_data(128, 1024, 18, mask="random")
    compare_loss(run_gae_loss(gae_loss_mod.gae_ppo_loss, d, dict(CLIP, impl=impl), None),
                 run_gae_loss(reference.gae_ppo_loss, d, CLIP, torch.float64))
