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

``fast`` aims at wall-clock time to score with many EnvPool envs: asynchronous envs, updates
overlapped with collection, fewer epochs. Its values are provisional, not yet tuned on a GPU, and on
Pong it does not yet learn as well as ``cleanrl`` per env step: neither these values nor 64 async envs
x 16 steps with CleanRL's own update (docs/presets.md has what was measured). For
Atari they come from rl_games' EnvPool Pong settings (24 envs x 256 steps, 3 epochs, clip 0.2, lr
3e-4) and EnvPool's speed alone on a 16-core machine (64 Pong envs with recv batches of 32 already
reached its ceiling); for continuous control, 64 envs x 64 steps in 4 minibatches of 1024 and 5
epochs trade CleanRL's 320 small gradient steps per 2048 env steps for 20 large ones per 4096.

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
_FAST_DISCRETE = dict(num_envs=64, async_envs=True, overlap=True, num_steps=128, num_minibatches=4, update_epochs=3,
                      learning_rate=3e-4, clip_coef=0.2, kernels="auto")

PRESETS: dict[str, dict[str, dict]] = {
    "cleanrl": {kind: {**_CLEANRL_COMMON, **values} for kind, values in KIND_DEFAULTS.items()},
    "fast": {
        "atari": _FAST_DISCRETE,
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
