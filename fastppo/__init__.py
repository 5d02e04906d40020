"""fastppo: GPU-vectorized, high-throughput PPO on EnvPool.

Data flow, one module per stage: envs -> rollout (storage on the training device) -> advantage
(GAE) -> loss -> trainer (optimizer step) -> logger. ``fastppo.kernels`` holds the fused kernels
and their torch references.
"""

__version__ = "0.1.0"
