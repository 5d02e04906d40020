"""fastppo: GPU-vectorized, high-throughput PPO (and TRPO) on EnvPool.

Data flow, one module per stage: envs -> rollout (storage on the training device) -> advantage
(GAE) -> loss -> trainer (optimizer step) -> logger. ``fastppo.kernels`` holds the fused kernels
and their torch references.

The Python API (imported on first use, so ``import fastppo`` stays light):

    fastppo.Config          the training options (the fields of ``fastppo train --help``)
    fastppo.train(cfg)      train; returns the last metrics line (see trainer.train); env=: your own env's
                            factory (a Gymnasium env, a Gymnasium vector env or a device env: gymenv)
    fastppo.load(path)      an Agent from a run folder or checkpoint: act(obs), value(obs)
    fastppo.make_env(run)   the env the run trained on, for playing full games
"""

__version__ = "0.1.0"
__all__ = ["Agent", "Config", "load", "make_env", "train"]

_API = {"Config": "fastppo.config", "train": "fastppo.trainer", "Agent": "fastppo.agent", "load": "fastppo.agent",
        "make_env": "fastppo.agent"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fastppo' has no attribute {name!r}")
