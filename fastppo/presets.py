"""Named settings for ``fastppo train --preset NAME``; the fields a caller sets override a preset's values.

A preset's values depend on the kind of env (``config.env_kind``): Atari frames, other observations
with discrete actions, or continuous (Box) actions.

``cleanrl`` is CleanRL's hyperparameters exactly, with every throughput option off:
``ppo_atari_envpool.py`` for Atari, ``ppo.py`` for discrete actions, ``ppo_continuous_action.py``
for continuous ones (1 env x 2048 steps, 32 minibatches, 10 epochs, lr 3e-4, clip 0.2, no entropy
bonus, observation and reward normalisation); always the annealed learning rate and no value
normalisation. These are also fastppo's defaults (``config.KIND_DEFAULTS``). The Atari update is
CleanRL's to float rounding (tests/test_cleanrl_parity.py; the README lists the three deliberate
differences in the data).

``fast`` aims at wall-clock time to score with many EnvPool envs: asynchronous envs and updates
overlapped with collection. For Atari: 32 async envs x 128 steps, CleanRL's update per sample
(minibatches of 256, 4 epochs, lr 2.5e-4 annealed) with clip 0.2 centred on the update's start
(``--decoupled``), chosen from runs on Pong (the comment above ``_FAST_ATARI`` has the numbers); not yet
timed on a GPU; on Pong seed 1 it was at -3.6 at 500k steps and 5.4 at 1M where ``cleanrl`` was at -11.3
and 2.1 (docs/presets.md). For other
discrete-action envs: 64 async envs x 128 steps, 4 minibatches, 3 epochs, lr 3e-4, clip 0.2 (on
Acrobot-v1, --overlap and 3 epochs at 3e-4 cost no steps to -100: docs/presets.md); for continuous
control, 64 envs x 64 steps in 4 minibatches of 1024 and 5 epochs trade CleanRL's 320 small gradient
steps per 2048 env steps for 20 large ones per 4096.

A preset may set any Config field, ``lr_schedule`` and ``norm_value`` included; a preset's
``lr_schedule`` yields to an ``--anneal-lr`` / ``--no-anneal-lr`` given on the command line
(``config.lr_schedule``).
"""

from __future__ import annotations

from fastppo.config import KIND_DEFAULTS

_CLEANRL_COMMON = dict(
    anneal_lr=True, lr_schedule="anneal", gamma=0.99, gae_lambda=0.95, norm_adv=True, loss="clip", clip_vloss=True,
    vf_coef=0.5, max_grad_norm=0.5, target_kl=None, minibatch_by="sample", advantages="rollout", async_envs=False,
    overlap=False, compile=False, cudagraphs=False, bf16=False,
)
# Atari: measured on Pong-v5 (seed 1, CPU, recent return = mean of the last 10 games; docs/presets.md has
# every run). CleanRL's update per sample is kept: 128 steps per env (64 envs x 16 steps were at -20.1 at
# 500k steps with async envs and at -21.0 at 310k with sync ones: with lambda = 0.95 an untrained critic's
# bootstrap 16 frames on carries no point), minibatches of 256 and 4 epochs (16 gradient steps per 1,024
# samples), lr 2.5e-4 annealed.
# Clip 0.2, not CleanRL's 0.1: with async envs and --overlap the rollout's first ratios are already off 1
# (collected by the weights before the last update), and at 0.1 the clipped fraction's 90th percentile
# was 0.28 and the median KL of an update 0.0017 over the first 500k steps (16 envs): -16.6 at 500k.
# At 0.2: 0.15 and 0.0062, -12.3 at 500k with 16 envs (0.15, 0.0070 and -16.0 with 32; CleanRL's
# settings: -11.3).
# 32 envs, not 16: a GPU needs envs to keep busy, and per env step the two were within Pong's seed
# spread (32 was ahead from 300k to 450k steps, 16 at 500k). 64 x 128 in 32 minibatches with clip 0.1
# was still at -19.9 at 450k steps. Without --decoupled these values went on to 2.0 at 1M steps (CleanRL's:
# 2.1), about 50-100k steps behind CleanRL's settings.
# --decoupled (the clip centred on the weights at the start of each update; the lag to the weights that
# acted corrected by the advantages' importance weight): with everything above and seed 1, -3.6 at 500k
# steps and 5.4 at 1M, against -16.0 and 2.0 without it (CleanRL's settings: -11.3 and 2.1); seed 2, -8.8
# at 500k against CleanRL's -15.8. The mean of all games from 400k to 500k: -4.6 (seed 1) and -10.0 (seed
# 2) against -15.7 without it and CleanRL's -14.1 and -17.6. With --overlap the data is one update old
# (median KL 0.008 from the weights that acted to the update's start): coupled, an update starts that far
# from its clip's centre and 8% of the samples were clipped (median), decoupled 6%. On Breakout (seed 1)
# it changed little: 20 first reached at 549k steps against 541k without it, 27.2 at 1M against 25.3.
_FAST_ATARI = dict(num_envs=32, async_envs=True, overlap=True, num_steps=128, num_minibatches=16, update_epochs=4,
                   learning_rate=2.5e-4, clip_coef=0.2, decoupled=True, kernels="auto")
_FAST_DISCRETE = dict(num_envs=64, async_envs=True, overlap=True, num_steps=128, num_minibatches=4, update_epochs=3,
                      learning_rate=3e-4, clip_coef=0.2, kernels="auto")

PRESETS: dict[str, dict[str, dict]] = {
    "cleanrl": {kind: {**_CLEANRL_COMMON, **values} for kind, values in KIND_DEFAULTS.items()},
    "fast": {
        "atari": _FAST_ATARI,
        "discrete": _FAST_DISCRETE,
        "continuous": dict(num_envs=64, async_envs=True, overlap=True, num_steps=64, num_minibatches=4,
                           update_epochs=5, learning_rate=3e-4, clip_coef=0.2, kernels="auto"),
    },
}


def apply_preset(cfg, kind: str):
    """cfg with its preset's values for this kind of env in the fields its caller did not set
    (``config.given_fields``).

    The same rule for the command line (the flags given win) and for Python
    (``Config(preset="fast", update_epochs=4)`` keeps its 4 epochs).
    """
    from fastppo.config import given_fields, replace

    if cfg.preset == "none":
        return cfg
    explicit = given_fields(cfg)
    values = {k: v for k, v in PRESETS[cfg.preset][kind].items() if k not in explicit}
    return replace(cfg, given=False, **values)
