"""--decoupled: PPO's clip held around pi_prox, the policy at the start of each update, with the advantages
weighted by pi_prox / pi_behaviour (Hilton et al. 2021). On-policy it is the plain update; with --overlap it
starts every update at ratio 1 while still correcting for the policy that acted."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import read_metrics

from fastppo import kernels
from fastppo.advantage import compute_advantages
from fastppo.cli import main
from fastppo.config import Config, resolve
from fastppo.envs import env_info, make_envs
from fastppo.kernels.reference import clip, masked_mean, normalize_advantages
from fastppo.loss import minibatch_loss
from fastppo.policy import Actor, kl, log_prob, make_policy
from fastppo.rollout import Collector, flatten
from fastppo.trainer import proximal_rollout, update

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def cartpole_rollout(behaviour: torch.nn.Module, num_envs: int = 3, num_steps: int = 17):
    """A CartPole rollout (odd shapes) acted by `behaviour`, its GAE computed."""
    info = env_info("CartPole-v1")
    envs = make_envs(info, num_envs, 0)
    collector = Collector(envs, info, torch.device("cpu"))
    buf = collector.allocate(num_steps, 1)[0]
    collector.collect(Actor(behaviour), buf)
    envs.close()
    compute_advantages(buf, kernels.select("torch", "cpu").gae, 0.99, 0.95)
    return info, buf


def perturbed(policy: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    other = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_proximal_rollout_is_the_current_policy_weighted_by_the_behaviour_one():
    torch.manual_seed(0)
    info = env_info("CartPole-v1")
    policy = make_policy(info)
    behaviour = perturbed(policy)
    _, buf = cartpole_rollout(behaviour)
    stored = {k: v.clone() for k, v in flatten(buf).items()}

    prox, lag = proximal_rollout(policy, buf, chunk=10)  # 51 states in chunks of 10: a ragged last chunk

    with torch.no_grad():
        dist, _ = policy(stored["obs"])
    logp = log_prob("categorical", dist, stored["actions"])
    torch.testing.assert_close(prox.dist.reshape(-1, dist.shape[-1]), dist)
    torch.testing.assert_close(prox.logprobs.reshape(-1), logp)
    expected = torch.where(stored["valid"], torch.exp(logp - stored["logprobs"]), 1.0)
    torch.testing.assert_close(prox.weights.reshape(-1), expected)
    assert not stored["valid"].all()  # CartPole's games end within 17 steps of 3 envs: autoreset steps included
    assert (prox.weights - 1).abs().max() > 0.05  # the perturbation is visible in the weights
    torch.testing.assert_close(lag, masked_mean(kl("categorical", stored["dist"], dist), stored["valid"]))
    assert lag > 0
    # the collector's storage keeps what acted; everything else is shared
    for k, v in flatten(buf).items():
        assert torch.equal(v, stored[k]), k
    assert prox.advantages is buf.advantages and prox.obs is buf.obs


def test_decoupled_minibatch_loss_is_the_weighted_clipped_objective():
    """float64: the loss and its gradient are those of E[max(-w Â r, -w Â clip(r))] with r = pi / pi_prox and Â
    normalised over the minibatch's valid samples before the weight w is applied (value and entropy terms off)."""
    torch.manual_seed(1)
    M, A = 37, 5
    info = env_info("CartPole-v1")
    cfg = resolve(Config(env_id="CartPole-v1", device="cpu", clip_coef=0.2, vf_coef=0.0, ent_coef=0.0, decoupled=True),
                  info)
    logits = torch.randn(M, A, dtype=torch.float64, requires_grad=True)
    values = torch.randn(M, dtype=torch.float64)
    actions = torch.randint(0, A, (M,))
    mb = {
        "actions": actions,
        "logprobs": log_prob("categorical", logits.detach(), actions) + torch.randn(M, dtype=torch.float64) * 0.3,
        "advantages": torch.randn(M, dtype=torch.float64) * 3 + 1,
        "values": torch.randn(M, dtype=torch.float64),
        "returns": torch.randn(M, dtype=torch.float64),
        "valid": torch.rand(M) > 0.2,
        "dist": torch.randn(M, A, dtype=torch.float64),
        "weights": torch.rand(M, dtype=torch.float64) + 0.5,
    }
    ops = kernels.select("torch", "cpu")

    loss, stats = minibatch_loss(ops, cfg, 0.0, logits, values, mb)
    ratio = torch.exp(log_prob("categorical", logits, actions) - mb["logprobs"])
    adv = normalize_advantages(mb["advantages"], mb["valid"]) * mb["weights"]
    expected = masked_mean(torch.maximum(-adv * ratio, -adv * clip(ratio, 0.8, 1.2)), mb["valid"])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["policy_loss"], expected.detach())
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])

    # weights of 1: the loss without --decoupled, where the op normalises the advantages itself
    off = resolve(Config(env_id="CartPole-v1", device="cpu", clip_coef=0.2, vf_coef=0.0, ent_coef=0.0), info)
    without = {k: v for k, v in mb.items() if k != "weights"}
    ones = dict(mb, weights=torch.ones(M, dtype=torch.float64))
    torch.testing.assert_close(minibatch_loss(ops, cfg, 0.0, logits, values, ones)[0],
                               minibatch_loss(ops, off, 0.0, logits, values, without)[0])


def test_on_policy_the_decoupled_update_is_the_plain_one():
    """Without --overlap the behaviour policy is the policy at the start of the update: weights 1, no lag,
    and the update lands on the same weights as without --decoupled."""
    torch.manual_seed(2)
    info = env_info("CartPole-v1")
    policy = make_policy(info)
    _, buf = cartpole_rollout(copy.deepcopy(policy).requires_grad_(False), num_envs=4, num_steps=16)
    ops = kernels.select("torch", "cpu")
    ends = []
    for decoupled in (False, True):
        cfg = resolve(Config(env_id="CartPole-v1", num_envs=4, num_steps=16, device="cpu", decoupled=decoupled), info)
        learner = copy.deepcopy(policy)
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2, eps=1e-5)
        data = buf
        if decoupled:
            data, lag = proximal_rollout(learner, buf, cfg.minibatch_size)
            torch.testing.assert_close(data.weights, torch.ones_like(data.weights))
            assert abs(lag.item()) < 1e-6
        torch.manual_seed(3)  # the same minibatches
        update(learner, optimizer, data, cfg, ops, 0.0)
        ends.append(torch.nn.utils.parameters_to_vector(learner.parameters()).detach())
    assert (ends[0] - torch.nn.utils.parameters_to_vector(policy.parameters())).abs().max() > 1e-3
    torch.testing.assert_close(ends[1], ends[0])


def test_decoupled_overlap_run_logs_the_policy_lag(tmp_path):
    """With --overlap the data is one update old: losses/lag_kl > 0 from the second update; the first
    minibatch of an update starts at ratio 1, so the clip fraction stays small."""
    run_dir = tmp_path / "r"
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--total-timesteps", "2048", "--num-envs",
                 "4", "--num-steps", "64", "--async-envs", "--overlap", "--decoupled", "--learning-rate", "0.01",
                 "--run-dir", str(run_dir)])
    assert code == 0
    metrics = read_metrics(run_dir)
    assert len(metrics) == 8
    assert all(m["losses/lag_kl"] > 1e-6 for m in metrics[2:])
    off = tmp_path / "off"
    assert main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--total-timesteps", "512", "--num-envs", "4",
                 "--num-steps", "64", "--run-dir", str(off)]) == 0
    assert all("losses/lag_kl" not in m for m in read_metrics(off))


@pytest.mark.parametrize("flags, message", [
    (["--advantages", "epoch", "--minibatch-by", "env"],
     "--decoupled does not go with --advantages epoch --minibatch-by env"),
    (["--algo", "trpo"], "--decoupled"),
])
def test_decoupled_refuses_what_it_cannot_weight(tmp_path, capsys, flags, message):
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--decoupled", *flags,
                 "--run-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cartpole_learns_to_450_decoupled_with_overlap(tmp_path, capsys):
    run_dir = tmp_path / "d"
    code = main(["train", "--env-id", "CartPole-v1", "--total-timesteps", "500000", "--device", "cpu", "--seed", "3",
                 "--run-dir", str(run_dir), "--target-return", "450", "--overlap", "--decoupled"])
    assert code == 0
    assert "target return 450.0 reached" in capsys.readouterr().out
    assert read_metrics(run_dir)[-1]["global_step"] < 500_000


def test_a_presets_decoupled_is_dropped_for_trpo():
    """fast sets --decoupled for Atari; with --algo trpo (no clip to centre, and no weights in its loss) the
    resolved config has it off, where --decoupled given is refused (above)."""
    from fastppo.config import env_kind
    from fastppo.presets import apply_preset

    info = env_info("Pong-v5")
    ppo = resolve(apply_preset(Config(env_id="Pong-v5", preset="fast", device="cpu"), env_kind(info)), info)
    trpo = resolve(apply_preset(Config(env_id="Pong-v5", preset="fast", device="cpu", algo="trpo"), env_kind(info)),
                   info)
    assert ppo.decoupled and not trpo.decoupled
