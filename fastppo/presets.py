"""Named settings for ``fastppo train --preset NAME``; the fields a caller sets override a preset's values.

``cleanrl`` is CleanRL's hyperparameters exactly (``ppo_atari_envpool.py`` for Atari, ``ppo.py`` for
vector observations, i.e. fastppo's defaults) with every throughput option off; its update is
CleanRL's to float rounding (tests/test_cleanrl_parity.py; the README lists the three deliberate
differences in the data). ``fast`` aims at wall-clock time to score on one GPU: many
asynchronous envs, updates overlapped with collection, larger rollouts, fewer epochs. Its values
are provisional: taken from rl_games' EnvPool Pong settings (24 envs x 256 steps, 3 epochs, clip
0.2, lr 3e-4) and EnvPool's speed alone on a 16-core machine (64 Pong envs with recv batches
of 32 already reached its ceiling), and not yet tuned on a GPU.
"""

from __future__ import annotations

import dataclasses

PRESETS: dict[str, dict] = {
    "cleanrl": dict(
        learning_rate=2.5e-4, anneal_lr=True, num_steps=128, gamma=0.99, gae_lambda=0.95, num_minibatches=4,
        update_epochs=4, norm_adv=True, loss="clip", clip_vloss=True, ent_coef=0.01, vf_coef=0.5,
        max_grad_norm=0.5, target_kl=None, minibatch_by="sample", advantages="rollout", async_envs=False,
        overlap=False, compile=False, cudagraphs=False, bf16=False,
    ),
    "fast": dict(
        num_envs=64, async_envs=True, overlap=True, num_steps=128, num_minibatches=4,
        update_epochs=3, learning_rate=3e-4, clip_coef=0.2, kernels="auto",
    ),
}


def apply_preset(cfg):
    """cfg with its preset's values in the fields its caller did not set (``config.given_fields``).

    The same rule for the command line (the flags given win) and for Python
    (``Config(preset="fast", update_epochs=4)`` keeps its 4 epochs).
    """
    from fastppo.config import given_fields

    if cfg.preset == "none":
        return cfg
    explicit = given_fields(cfg)
    values = {k: v for k, v in PRESETS[cfg.preset].items() if k not in explicit}
    return dataclasses.replace(cfg, **values)
