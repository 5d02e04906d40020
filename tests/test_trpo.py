"""fastppo.trpo against explicit float64 linear algebra on tiny policies, categorical and diagonal Gaussian.

The test's closures build torch.distributions objects (Categorical, Normal) and kl_divergence, so the
module sees only scalars and parameter lists: the same code serves both heads.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.distributions import Categorical, Normal, kl_divergence

from fastppo import trpo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: intra-op threads only add contention

OBS, HIDDEN, ACTIONS, ACTION_DIM, BATCH = 3, 5, 4, 2, 32
HEADS = ["categorical", "gaussian"]


class Problem:
    """A tiny policy obs 3 -> 5 tanh -> head, and one batch of states, behaviour actions and advantages.

    categorical: 4 logits. gaussian: a 2-dim state-dependent mean and a state-independent log-std
    parameter. theta_old is the parameters' values at construction; pi_old's outputs are detached.
    """

    def __init__(self, head: str, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        self.head = head
        out = ACTIONS if head == "categorical" else ACTION_DIM
        shapes = [(HIDDEN, OBS), (HIDDEN,), (out, HIDDEN), (out,)] + ([(ACTION_DIM,)] if head == "gaussian" else [])
        self.params = [(scale * torch.randn(s, generator=gen, dtype=dtype)).requires_grad_() for s in shapes]
        self.obs = torch.randn(BATCH, OBS, generator=gen, dtype=dtype)
        self.advantages = torch.randn(BATCH, generator=gen, dtype=dtype)
        with torch.no_grad():
            self.old = self.dist()
            if head == "categorical":
                self.actions = torch.multinomial(self.old.probs, 1, generator=gen).squeeze(-1)
            else:
                self.actions = self.old.mean + self.old.stddev * torch.randn(BATCH, ACTION_DIM, generator=gen,
                                                                             dtype=dtype)
            self.old_logp = self.log_prob(self.old)

    def dist(self, params: list[torch.Tensor] | None = None):
        w1, b1, w2, b2, *log_std = self.params if params is None else params
        out = torch.tanh(self.obs @ w1.T + b1) @ w2.T + b2
        if self.head == "categorical":
            return Categorical(logits=out, validate_args=False)
        return Normal(out, log_std[0].exp().expand_as(out), validate_args=False)

    def log_prob(self, dist) -> torch.Tensor:
        logp = dist.log_prob(self.actions)
        return logp if self.head == "categorical" else logp.sum(-1)

    def kl(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean over the batch's states of KL(pi_old(.|s) || pi(.|s))."""
        kl = kl_divergence(self.old, self.dist(params))
        return (kl if self.head == "categorical" else kl.sum(-1)).mean()

    def surrogate(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """mean(pi(a|s) / pi_old(a|s) * A), to maximise."""
        return ((self.log_prob(self.dist(params)) - self.old_logp).exp() * self.advantages).mean()

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [f.view_as(p) for f, p in zip(flat.split(sizes), self.params, strict=True)]

    def explicit_kl_hessian(self) -> torch.Tensor:
        """(P, P) Hessian of the mean KL at the params' current values, by torch.autograd.functional."""
        return hessian(lambda flat: self.kl(self.unflatten(flat)), trpo.flat_params(self.params))

    @functools.cached_property
    def top_kl_direction(self) -> torch.Tensor:
        """Unit eigenvector of the KL's largest curvature at theta_old: the direction where KL grows fastest."""
        return torch.linalg.eigh(self.explicit_kl_hessian()).eigenvectors[:, -1]

    def move(self, size: float, seed: int) -> None:
        """Move the params away from theta_old in place by a random step of norm `size` (pi_old stays)."""
        theta = trpo.flat_params(self.params)
        d = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=theta.dtype)
        trpo.set_flat_params_(self.params, theta + size * d / d.norm())

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [(p, p.detach().clone(), p.data_ptr()) for p in self.params]


def assert_unchanged(problem: Problem, snapshot) -> None:
    """Same tensor objects, same storage, bit-identical values."""
    for p, (q, values, ptr) in zip(problem.params, snapshot, strict=True):
        assert p is q and p.data_ptr() == ptr
        assert torch.equal(p.detach(), values)


# ---------------------------------------------------------------------------------------------
# flat_grad, flat_params, set_flat_params_
# ---------------------------------------------------------------------------------------------
def test_flat_grad_concatenates_in_order_with_zeros_for_unused_params():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)
    y = (a**2).sum() * b.sum()
    g = trpo.flat_grad(y, [a, unused, b])
    torch.testing.assert_close(g, torch.tensor([6.0, 12.0, 0.0, 0.0, 0.0, 0.0, 5.0], dtype=torch.float64))
    assert a.grad is None and b.grad is None


def test_flat_grad_create_graph_allows_a_second_derivative():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g = trpo.flat_grad((a**3).sum(), [a], create_graph=True)  # 3 a^2
    torch.testing.assert_close(trpo.flat_grad(g.sum(), [a]), 6.0 * a.detach())


def test_set_flat_params_keeps_identity_and_round_trips():
    problem = Problem("gaussian", seed=0)
    before = [(p, p.data_ptr()) for p in problem.params]
    theta = trpo.flat_params(problem.params)
    target = torch.randn_like(theta)
    trpo.set_flat_params_(problem.params, target)
    assert all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(problem.params, before, strict=True))
    assert all(p.requires_grad for p in problem.params)
    assert torch.equal(trpo.flat_params(problem.params), target)


# ---------------------------------------------------------------------------------------------
# Fisher-vector products
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [0.0, 0.1], ids=["undamped", "damped"])
@pytest.mark.parametrize("where", ["theta_old", "away"])
@pytest.mark.parametrize("head", HEADS)
def test_fvp_equals_explicit_kl_hessian_times_v(head, where, damping):
    problem = Problem(head, seed=1)
    if where == "away":
        problem.move(0.5, seed=2)
        assert problem.kl().item() > 1e-3
    H = problem.explicit_kl_hessian()
    P = H.shape[0]
    fvp = trpo.fisher_vector_product(problem.kl, problem.params, damping)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # the closure is reused: one KL graph serves every product
        v = torch.randn(P, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), H @ v + damping * v, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in problem.params)


@pytest.mark.parametrize("head", HEADS)
def test_kl_hessian_at_theta_old_is_the_fisher_matrix(head):
    """At theta_old, d2 KL = mean_s J_s^T M_s J_s: J_s the Jacobian of the distribution's outputs w.r.t.
    theta and M_s their Fisher matrix (logits: diag(p) - p p^T; mean, log-std: diag(1 / sigma^2, 2))."""
    problem = Problem(head, seed=4)
    theta = trpo.flat_params(problem.params)

    def outputs(flat):
        dist = problem.dist(problem.unflatten(flat))
        return dist.logits if head == "categorical" else torch.cat([dist.mean, dist.stddev.log()], -1)

    J = jacobian(outputs, theta)  # (B, K, P)
    with torch.no_grad():
        if head == "categorical":
            p = problem.old.probs
            M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            M = torch.diag_embed(torch.cat([problem.old.stddev**-2, torch.full_like(problem.old.mean, 2.0)], -1))
    fisher = torch.einsum("bkp,bkl,blq->pq", J, M, J) / BATCH
    torch.testing.assert_close(problem.explicit_kl_hessian(), fisher, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Conjugate gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
def test_cg_matches_explicit_solve_and_reports_its_residual(head):
    damping = 0.1
    problem = Problem(head, seed=5)
    g = trpo.flat_grad(problem.surrogate(), problem.params)
    A = problem.explicit_kl_hessian() + damping * torch.eye(g.numel(), dtype=torch.float64)
    fvp = trpo.fisher_vector_product(problem.kl, problem.params, damping)

    x, residual = trpo.conjugate_gradient(fvp, g, iters=g.numel())
    torch.testing.assert_close(x, torch.linalg.solve(A, g), rtol=1e-7, atol=1e-9)
    assert residual <= 1e-8 * g.norm().item()
    assert (g - A @ x).norm().item() <= 1e-8 * g.norm().item()

    # Few iterations: an approximate solution, and the reported residual is its real one.
    x3, residual3 = trpo.conjugate_gradient(fvp, g, iters=3)
    true3 = (g - A @ x3).norm().item()
    assert residual3 == pytest.approx(true3, rel=1e-6)
    assert residual3 > 1e3 * residual
    assert g @ x3 > 0  # every CG iterate is an ascent direction for a positive-definite A


def test_cg_zero_rhs_returns_zero_without_a_product():
    calls = []
    x, residual = trpo.conjugate_gradient(lambda v: calls.append(v) or v, torch.zeros(5, dtype=torch.float64), 10)
    assert torch.equal(x, torch.zeros(5, dtype=torch.float64)) and residual == 0.0 and not calls


@pytest.mark.parametrize("A", ["negative-definite", "nan-product"])
def test_cg_stops_on_non_positive_curvature_instead_of_dividing(A):
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    product = (lambda v: -v) if A == "negative-definite" else (lambda v: torch.full_like(v, math.nan))
    x, residual = trpo.conjugate_gradient(product, b, iters=10)
    assert torch.equal(x, torch.zeros_like(b))
    assert residual == pytest.approx(b.norm().item())


def test_cg_stops_early_at_residual_tol():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    calls = []

    def product(v):
        calls.append(1)
        return A @ v

    x, residual = trpo.conjugate_gradient(product, torch.ones(3, dtype=torch.float64), iters=50, residual_tol=1e-8)
    assert len(calls) == 3 and residual <= 1e-8  # exact after n = 3 iterations, then it stops
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5, 1.0 / 3.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Line search
# ---------------------------------------------------------------------------------------------
STEP_KINDS = ["natural", "overshoot-x100", "downhill-surrogate", "max-kl-curvature", "random-large", "zero-step",
              "nan-step"]
MAX_KLS = [1e-8, 1e-4, 1e-2, 1.0]


def full_step(kind: str, problem: Problem, g: torch.Tensor, max_kl: float, gen: torch.Generator) -> torch.Tensor:
    """A full step for the line search: TRPO's own, or an adversarial one."""
    if kind in ("natural", "overshoot-x100", "downhill-surrogate"):
        fvp = trpo.fisher_vector_product(problem.kl, problem.params, 0.01)
        x, _ = trpo.conjugate_gradient(fvp, g, iters=10)
        natural = math.sqrt(2.0 * max_kl / (x @ fvp(x)).item()) * x
        return {"natural": 1.0, "overshoot-x100": 100.0, "downhill-surrogate": -1.0}[kind] * natural
    if kind == "max-kl-curvature":  # steepest KL ascent, signed so that the linear model promises improvement
        v = problem.top_kl_direction
        return 10.0 * (v if g @ v > 0 else -v)
    if kind == "random-large":
        d = torch.randn(g.shape, generator=gen, dtype=g.dtype)
        return 5.0 * d / d.norm()
    if kind == "zero-step":
        return torch.zeros_like(g)
    assert kind == "nan-step"
    return torch.full_like(g, math.nan)


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_line_search_accepts_only_kl_feasible_improving_steps(kind):
    """Property over random tiny policies, advantages and trust regions: every accepted point has measured
    KL <= max_kl and a strictly better surrogate; a rejected search leaves theta_old bit for bit."""
    gen = torch.Generator().manual_seed(6)
    accepted = rejected = 0
    for seed in range(24):
        problem = Problem(HEADS[seed % 2], seed=100 + seed, scale=float(torch.empty(1).uniform_(0.3, 2.0,
                                                                                                 generator=gen)))
        g = trpo.flat_grad(problem.surrogate(), problem.params)
        for max_kl in MAX_KLS:
            step = full_step(kind, problem, g, max_kl, gen)
            snapshot = problem.snapshot()
            with torch.no_grad():
                surrogate_old = problem.surrogate().item()
            result = trpo.line_search(problem.params, problem.surrogate, problem.kl, step, g, max_kl=max_kl,
                                      max_backtracks=10)
            assert 1 <= result.steps <= 10
            if result.accepted:
                accepted += 1
                with torch.no_grad():
                    kl, surrogate = problem.kl().item(), problem.surrogate().item()
                assert kl <= max_kl and surrogate > surrogate_old
                assert result.kl == kl and result.actual_improvement == surrogate - surrogate_old
                assert result.fraction == 0.5 ** (result.steps - 1)
                expected = trpo.flat_params(problem.params) - torch.cat([v.reshape(-1) for _, v, _ in snapshot])
                torch.testing.assert_close(expected, result.fraction * step, rtol=1e-12, atol=1e-15)
                assert result.expected_improvement == pytest.approx((g @ (result.fraction * step)).item())
                trpo.set_flat_params_(problem.params, torch.cat([v.reshape(-1) for _, v, _ in snapshot]))
            else:
                rejected += 1
                assert result.steps == 10
                assert_unchanged(problem, snapshot)
    total = 24 * len(MAX_KLS)
    if kind in ("zero-step", "nan-step"):  # no change is not an improvement; NaN is never feasible
        assert rejected == total
    elif kind in ("natural", "overshoot-x100"):  # TRPO's own direction is taken (after backtracking)
        assert accepted >= total * 3 // 4
    else:  # the adversarial directions exercise both outcomes
        assert rejected > 0


def test_line_search_restores_theta_old_when_a_closure_raises():
    problem = Problem("gaussian", seed=12)
    g = trpo.flat_grad(problem.surrogate(), problem.params)
    snapshot = problem.snapshot()
    calls = []

    def kl():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("closure-raises")
        return torch.tensor(math.inf)  # never feasible: the search goes on to a second point

    with pytest.raises(RuntimeError, match="closure-raises"):
        trpo.line_search(problem.params, problem.surrogate, kl, g, g, max_kl=1e-2, max_backtracks=10)
    assert_unchanged(problem, snapshot)


# ---------------------------------------------------------------------------------------------
# trpo_step
# ---------------------------------------------------------------------------------------------
STEP = dict(max_kl=1e-3, damping=0.1, cg_iters=10, max_backtracks=10)
NO_STEP_KEYS = ("kl", "step_fraction", "expected_improvement", "actual_improvement", "line_search_steps", "accepted")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head", HEADS)
def test_trpo_step_goes_to_the_trust_region_edge_and_improves(head, dtype):
    """A small trust region, where the quadratic KL model and the linear surrogate model hold: the full step is
    taken, its KL is below max_kl but of its order (damping and CG's truncation keep it under the edge)."""
    for seed in range(5):
        problem = Problem(head, seed=seed, dtype=dtype)
        before = [(p, p.data_ptr()) for p in problem.params]
        with torch.no_grad():
            surrogate_old = problem.surrogate().item()
        stats = trpo.trpo_step(problem.params, problem.surrogate, problem.kl, **STEP)

        assert all(type(v) is float for v in stats.values())
        assert stats["accepted"] == 1.0 and stats["step_fraction"] == 1.0 and stats["line_search_steps"] == 1.0
        with torch.no_grad():
            kl, surrogate = problem.kl().item(), problem.surrogate().item()
        assert stats["kl"] == kl and 0.3 * STEP["max_kl"] <= kl <= STEP["max_kl"]
        assert surrogate > surrogate_old
        assert stats["actual_improvement"] == pytest.approx(surrogate - surrogate_old)
        assert 0.8 <= stats["actual_improvement"] / stats["expected_improvement"] <= 1.2
        assert stats["curvature"] > 0 and stats["grad_norm"] > 0
        assert stats["cg_residual"] < 0.5 * stats["grad_norm"]
        assert all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(problem.params, before, strict=True))
        assert all(p.grad is None for p in problem.params)


@pytest.mark.parametrize("head", HEADS)
def test_trpo_step_is_the_explicit_natural_gradient_step(head):
    """With cg_iters = P in float64, the update is sqrt(2 delta / x^T A x) x, x = A^-1 g, A = F + damping I."""
    problem = Problem(head, seed=8)
    theta_old = trpo.flat_params(problem.params)
    g = trpo.flat_grad(problem.surrogate(), problem.params)
    A = problem.explicit_kl_hessian() + STEP["damping"] * torch.eye(g.numel(), dtype=torch.float64)
    x = torch.linalg.solve(A, g)
    step = math.sqrt(2.0 * STEP["max_kl"] / (x @ A @ x).item()) * x

    stats = trpo.trpo_step(problem.params, problem.surrogate, problem.kl, **{**STEP, "cg_iters": g.numel()})
    assert stats["accepted"] == 1.0 and stats["step_fraction"] == 1.0
    torch.testing.assert_close(trpo.flat_params(problem.params) - theta_old, step, rtol=1e-6, atol=1e-10)
    assert stats["expected_improvement"] == pytest.approx((g @ step).item(), rel=1e-6)
    assert stats["curvature"] == pytest.approx((x @ A @ x).item(), rel=1e-6)
    assert stats["cg_residual"] <= 1e-8 * g.norm().item()


def test_trpo_step_backtracks_when_the_quadratic_model_overshoots():
    """A trust region far beyond where the quadratic KL model holds: the full step breaks it, a fraction is taken."""
    problem = Problem("categorical", seed=9)
    stats = trpo.trpo_step(problem.params, problem.surrogate, problem.kl, **{**STEP, "max_kl": 0.5, "damping": 1e-3})
    assert stats["accepted"] == 1.0 and stats["line_search_steps"] > 1.0
    assert stats["step_fraction"] == 0.5 ** (stats["line_search_steps"] - 1)
    with torch.no_grad():
        assert problem.kl().item() == stats["kl"] <= 0.5


def differentiable_flat(params: list[torch.Tensor]) -> torch.Tensor:
    """The params as one differentiable flat vector (trpo.flat_params detaches)."""
    return torch.cat([p.reshape(-1) for p in params])


def no_step_case(case: str, problem: Problem):
    """(surrogate, kl, damping) closures of a problem where trpo_step must not move."""
    theta_old = trpo.flat_params(problem.params)
    if case == "zero-advantages":  # g = 0: nothing to do
        problem.advantages.zero_()
        return problem.surrogate, problem.kl, 0.0
    if case == "nan-gradient":
        problem.advantages[3] = math.nan
        return problem.surrogate, problem.kl, 0.0
    if case == "negative-curvature":  # not a KL: concave in theta, so s^T F s < 0
        return problem.surrogate, lambda: -((differentiable_flat(problem.params) - theta_old) ** 2).sum(), 0.0
    if case == "nan-fisher":
        return problem.surrogate, lambda: problem.kl() * math.nan, 0.1
    raise ValueError(case)


def test_trpo_step_reports_a_rejected_line_search_as_no_step():
    """The full step overshoots (as in the test above) and only one point may be tried: nothing is taken."""
    problem = Problem("categorical", seed=9)
    snapshot = problem.snapshot()
    stats = trpo.trpo_step(problem.params, problem.surrogate, problem.kl,
                           **{**STEP, "max_kl": 0.5, "damping": 1e-3, "max_backtracks": 1})
    assert_unchanged(problem, snapshot)
    assert stats["line_search_steps"] == 1.0
    assert all(stats[k] == 0.0 for k in NO_STEP_KEYS if k != "line_search_steps")
    assert stats["curvature"] > 0 and stats["grad_norm"] > 0


@pytest.mark.parametrize("case", ["zero-advantages", "nan-gradient", "negative-curvature", "nan-fisher"])
@pytest.mark.parametrize("head", HEADS)
def test_trpo_step_without_a_usable_step_leaves_params_untouched(head, case):
    problem = Problem(head, seed=10)
    surrogate, kl, damping = no_step_case(case, problem)
    snapshot = problem.snapshot()
    stats = trpo.trpo_step(problem.params, surrogate, kl, **{**STEP, "damping": damping})
    assert_unchanged(problem, snapshot)
    assert all(stats[k] == 0.0 for k in NO_STEP_KEYS)
    if case == "zero-advantages":
        assert stats["grad_norm"] == 0.0 and stats["curvature"] == 0.0 and stats["cg_residual"] == 0.0
    elif case == "nan-gradient":
        assert math.isnan(stats["grad_norm"])
    elif case == "negative-curvature":  # CG stops at its first direction, g: x = 0, so x^T A x = 0
        assert stats["curvature"] == 0.0
    else:
        assert math.isnan(stats["curvature"])


@pytest.mark.parametrize("bad", [dict(max_kl=0.0), dict(damping=-1.0), dict(cg_iters=0), dict(max_backtracks=0)],
                         ids=["max_kl-zero", "damping-negative", "cg_iters-zero", "max_backtracks-zero"])
def test_trpo_step_rejects_invalid_arguments(bad):
    problem = Problem("categorical", seed=11)
    with pytest.raises(ValueError, match="trpo_step needs"):
        trpo.trpo_step(problem.params, problem.surrogate, problem.kl, **{**STEP, **bad})


# --- --algo trpo in the trainer -------------------------------------------------------------------


def test_trpo_runs_keep_every_update_in_the_trust_region(tmp_path, one_torch_thread):
    """CartPole (categorical MLP), Pendulum (Gaussian, normalised) and Pong (the Nature CNN's shared
    torso, moved by the natural-gradient step; the critic's Adam moves the value head only): every
    logged KL after a step is within --max-kl, and the trpo/* diagnostics are logged."""
    from helpers import read_metrics

    from fastppo.checkpoint import load_checkpoint
    from fastppo.cli import main

    runs = {"CartPole-v1": ["--total-timesteps", "2048"],
            "Pendulum-v1": ["--num-steps", "256", "--num-minibatches", "4", "--total-timesteps", "1024"],
            "Pong-v5": ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "128"]}
    for env_id, extra in runs.items():
        run_dir = tmp_path / env_id
        assert main(["train", "--env-id", env_id, "--device", "cpu", "--algo", "trpo", "--max-kl", "0.005",
                     "--run-dir", str(run_dir), *extra]) == 0
        metrics = read_metrics(run_dir)
        for m in metrics:
            assert 0 <= m["losses/kl"] <= 0.005, (env_id, m["losses/kl"])
            assert 1 <= m["trpo/line_search_steps"] <= 10 and m["trpo/cg_residual"] >= 0
            assert {"trpo/expected_improvement", "trpo/actual_improvement", "trpo/accepted"} <= set(m)
        assert any(m["trpo/accepted"] == 1.0 for m in metrics), env_id
        state = load_checkpoint(str(run_dir))
        assert len(state["optimizer"]["state"]) == (2 if env_id == "Pong-v5" else 6)  # the critic's parameters


@pytest.mark.parametrize("extra,message", [
    (["--loss", "penalty"], "--loss is for --algo ppo"),
    (["--target-kl", "0.01"], "--target-kl is for --algo ppo"),
    (["--minibatch-by", "env"], "--minibatch-by env is for --algo ppo"),
    (["--max-kl", "0"], "--max-kl must be positive, got 0.0"),
    (["--cg-damping", "-1"], "--cg-damping must be >= 0, got -1.0"),
], ids=["penalty", "target-kl", "env-minibatches", "max-kl", "damping"])
def test_trpo_bad_flags_are_one_line(tmp_path, capsys, extra, message):
    from fastppo.cli import main

    assert main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--algo", "trpo", "--run-dir",
                 str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_trpo_run_resumes_exactly(tmp_path, monkeypatch, capsys, one_torch_thread):
    import signal

    from helpers import read_metrics, without_timings
    from test_runs import interrupt_at_iteration

    from fastppo.checkpoint import load_checkpoint
    from fastppo.cli import main

    args = ["train", "--env-id", "CartPole-v1", "--device", "cpu", "--algo", "trpo", "--total-timesteps", "2048",
            "--seed", "4"]
    assert main([*args, "--run-dir", str(tmp_path / "straight")]) == 0
    interrupt_at_iteration(monkeypatch, 2)
    assert main([*args, "--run-dir", str(tmp_path / "stopped")]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    capsys.readouterr()
    assert without_timings(read_metrics(tmp_path / "stopped")) == without_timings(read_metrics(tmp_path / "straight"))
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_trpo_learns_cartpole_to_450(tmp_path, capsys):
    from helpers import read_metrics

    from fastppo.cli import main

    run_dir = tmp_path / "trpo"
    assert main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--algo", "trpo", "--seed", "1",
                 "--total-timesteps", "500000", "--target-return", "450", "--run-dir", str(run_dir)]) == 0
    assert "target return 450.0 reached" in capsys.readouterr().out
    assert read_metrics(run_dir)[-1]["global_step"] < 500_000
