"""`--preset cleanrl` updates exactly as CleanRL's ppo_atari_envpool.py does.

`cleanrl_iteration` below transcribes CleanRL's advantage computation and update from the
algorithm it implements (not its code): the `dones` row of a step is the done flag returned by the
step before it, GAE runs backwards with `nextnonterminal = 1 - dones[t + 1]`, the rollout is
flattened, each epoch shuffles it into minibatches, each minibatch normalises its advantages with
the unbiased std + 1e-8, takes the clipped surrogate, the clipped value loss (0.5 * max of the two
squared errors), the entropy bonus, clips the gradient norm and steps Adam (eps 1e-5); with
target_kl the epochs stop after the first whose last minibatch has approx_kl above it.

On a rollout CleanRL and fastppo see alike (every step valid: no EnvPool reset step, no time-limit
truncation; those are the two places where fastppo deliberately differs, see the README), the
advantages, the logged statistics and the parameters after the update must match to float
rounding, minibatch permutations included. Both run in float64: 16 Adam steps amplify the
rounding differences between two float32 implementations (or two CPUs' float32 kernels) to ~1e-3
in the policy loss, which no tolerance can tell from a real difference; in float64 they stay ~1e-12,
so a tolerance of 1e-7 is robust and still fails a CleanRL transcription that normalises with the
biased std (a 3% change; tested below).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastppo import kernels
from fastppo.advantage import compute_advantages
from fastppo.config import Config, resolve
from fastppo.envs import env_info
from fastppo.policy import make_policy
from fastppo.presets import apply_preset
from fastppo.rollout import Rollout
from fastppo.trainer import update

T, N = 16, 4  # 64 transitions, 4 minibatches of 16


def cleanrl_iteration(agent: nn.Module, optimizer, data: dict, args: Config, seed: int,
                      unbiased_std: bool = True) -> tuple[dict, dict]:
    """CleanRL's GAE and update on one rollout; returns (advantages/returns, last-minibatch stats).

    unbiased_std=False is the mistake the test must catch (CleanRL's torch.std is Bessel-corrected)."""
    obs, actions, logprobs, rewards, values = (data[k] for k in ("obs", "actions", "logprobs", "rewards", "values"))
    dones, next_done, next_value = data["dones"], data["next_done"], data["next_value"]
    with torch.no_grad():
        advantages = torch.zeros_like(rewards)
        lastgaelam = 0
        for t in reversed(range(args.num_steps)):
            if t == args.num_steps - 1:
                nextnonterminal = 1.0 - next_done
                nextvalues = next_value
            else:
                nextnonterminal = 1.0 - dones[t + 1]
                nextvalues = values[t + 1]
            delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
            advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
        returns = advantages + values

    b_obs = obs.reshape((-1, *obs.shape[2:]))
    b_logprobs, b_actions = logprobs.reshape(-1), actions.reshape(-1)
    b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

    torch.manual_seed(seed)
    clipfracs = []
    for _epoch in range(args.update_epochs):
        b_inds = torch.randperm(args.batch_size)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb_inds = b_inds[start : start + args.minibatch_size]
            logits, newvalue = agent(b_obs[mb_inds])
            dist = torch.distributions.Categorical(logits=logits)
            newlogprob, entropy = dist.log_prob(b_actions[mb_inds]), dist.entropy()
            logratio = newlogprob - b_logprobs[mb_inds]
            ratio = logratio.exp()
            with torch.no_grad():
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())

            mb_advantages = b_advantages[mb_inds]
            if args.norm_adv:
                std = mb_advantages.std(unbiased=unbiased_std)
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (std + 1e-8)
            pg_loss1 = -mb_advantages * ratio
            pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = torch.max(pg_loss1, pg_loss2).mean()

            newvalue = newvalue.view(-1)
            if args.clip_vloss:
                v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                v_clipped = b_values[mb_inds] + torch.clamp(
                    newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef)
                v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
            else:
                v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    stats = dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy_loss, approx_kl=approx_kl,
                 old_approx_kl=old_approx_kl, clipfrac=torch.stack(clipfracs).mean(), epochs=_epoch + 1)
    return {"advantages": advantages, "returns": returns}, stats


def rollout(agent: nn.Module, info, gen: torch.Generator) -> tuple[Rollout, dict]:
    """A random Pong-shaped rollout acted by `agent`, in fastppo's layout and in CleanRL's."""
    buf = Rollout.allocate(info, T, N, torch.device("cpu"), dtype=torch.float64)
    buf.obs.copy_(torch.randint(0, 256, buf.obs.shape, generator=gen, dtype=torch.uint8))
    buf.next_obs.copy_(torch.randint(0, 256, buf.next_obs.shape, generator=gen, dtype=torch.uint8))
    with torch.no_grad():
        logits, values = agent(buf.obs.flatten(0, 1))
        _, next_value = agent(buf.next_obs)
    dist = torch.distributions.Categorical(logits=logits)
    actions = dist.sample()
    buf.actions.copy_(actions.view(T, N))
    buf.logprobs.copy_(dist.log_prob(actions).view(T, N))
    buf.dist.copy_(logits.view(T, N, -1))
    buf.values[:T] = values.view(T, N)
    buf.values[T] = next_value.view(N)
    buf.rewards.copy_(torch.randint(-1, 2, (T, N), generator=gen).double())
    buf.terminated.copy_(torch.rand((T, N), generator=gen) < 0.1)
    buf.terminated[3:5, 1] = True  # consecutive ends
    buf.terminated[T - 1, 2] = True  # an end on the last row: CleanRL's next_done
    buf.valid.fill_(True)
    # CleanRL stores, with each step's observation, the done flag the previous step returned.
    dones = torch.zeros(T, N, dtype=torch.float64)
    dones[1:] = buf.terminated[:-1].double()
    data = dict(obs=buf.obs.clone(), actions=buf.actions.clone(), logprobs=buf.logprobs.clone(),
                rewards=buf.rewards.clone(), values=buf.values[:T].clone(), dones=dones,
                next_done=buf.terminated[T - 1].double(), next_value=buf.values[T].clone())
    return buf, data


def run_both(target_kl: float | None, unbiased_std: bool = True):
    """One Pong-shaped rollout, updated by fastppo (--preset cleanrl) and by the CleanRL transcription,
    from the same float64 weights and minibatch permutations; returns both sides' results."""
    info = env_info("Pong-v5")
    cfg = Config(env_id="Pong-v5", preset="cleanrl", num_envs=N, num_steps=T, device="cpu", kernels="torch",
                 target_kl=target_kl)
    cfg = resolve(apply_preset(cfg, "atari"), info)
    assert (cfg.clip_coef, cfg.update_epochs, cfg.num_minibatches, cfg.minibatch_by, cfg.advantages) == (
        0.1, 4, 4, "sample", "rollout")

    torch.manual_seed(0)
    ours = make_policy(info).double()
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=cfg.learning_rate, eps=1e-5)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=cfg.learning_rate, eps=1e-5)
    buf, data = rollout(ours, info, torch.Generator().manual_seed(1))

    expected, their_stats = cleanrl_iteration(theirs, opt_theirs, data, cfg, seed=7, unbiased_std=unbiased_std)
    ops = kernels.select("torch", torch.device("cpu"))
    compute_advantages(buf, ops.gae, cfg.gamma, cfg.gae_lambda)
    torch.manual_seed(7)
    our_stats = update(ours, opt_ours, buf, cfg, ops, kl_coef=0.0)
    return cfg, buf, expected, (ours, our_stats), (theirs, their_stats)


def assert_same_update(ours, our_stats, theirs, their_stats) -> None:
    assert int(our_stats["epochs"]) == their_stats["epochs"]
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "old_approx_kl", "clipfrac"):
        torch.testing.assert_close(our_stats[name].double(), their_stats[name].double(), rtol=1e-7, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("target_kl", [None, 1e-4])
def test_cleanrl_preset_update_is_cleanrls(one_torch_thread, target_kl):
    cfg, buf, expected, (ours, our_stats), (theirs, their_stats) = run_both(target_kl)
    torch.testing.assert_close(buf.advantages, expected["advantages"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf.returns, expected["returns"], rtol=1e-12, atol=1e-12)
    if target_kl is None:
        assert float(their_stats["clipfrac"]) > 0  # the clipped branches were exercised
    else:
        assert their_stats["epochs"] < cfg.update_epochs  # the early stop was exercised
    assert_same_update(ours, our_stats, theirs, their_stats)


def test_a_biased_std_fails_the_comparison(one_torch_thread):
    """The tolerance is tight enough to tell CleanRL's unbiased advantage std from a biased one."""
    _, _, _, (ours, our_stats), (theirs, their_stats) = run_both(None, unbiased_std=False)
    with pytest.raises(AssertionError, match="policy_loss|value_loss|entropy|approx_kl|clipfrac"):
        assert_same_update(ours, our_stats, theirs, their_stats)
