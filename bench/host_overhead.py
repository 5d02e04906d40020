"""Host overhead of the collectors per step, against num_envs, with free envs and a free policy.

    python bench/host_overhead.py                       # CPU, Atari-shaped and tiny observations
    python bench/host_overhead.py --device cuda         # the pinned staging + H2D path

The envs are a fake pool with EnvPool's API (sync ``step``, async ``send``/``recv`` returning
``batch_size = num_envs / 2`` envs in a shuffled order) whose steps cost nothing, and the actor
returns preallocated tensors, so what is timed is fastppo's own per-step work: the score
accounting, the staging and the index copies into the rollout, and Python. Two observation shapes
separate the fixed cost of a step from the bytes it moves: (4,) floats (almost nothing to copy) and
Pong's (4, 84, 84) uint8 (28 KB per env). Besides the host microseconds per step it counts the torch
operators the collector dispatches per step (every ATen call, kernels and views alike, counted by a
``TorchDispatchMode`` in one extra rollout that is not timed): on CUDA each costs a launch or at
least a trip through the dispatcher, so the count is the machine-independent measure of the
host work. Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastppo.bench import machine  # noqa: E402
from fastppo.envs import EnvInfo  # noqa: E402
from fastppo.policy import Actor, pack_acting  # noqa: E402
from fastppo.rollout import AsyncCollector, Collector  # noqa: E402


@dataclass
class Args:
    num_envs: tuple[int, ...] = (64, 256, 1024, 4096)
    """env counts to measure"""
    num_steps: int = 32
    """rollout length T"""
    rollouts: int = 3
    """timed rollouts per point, after one warm-up rollout"""
    device: str = "cpu"
    """cpu or cuda"""
    out: str = str(ROOT / "bench" / "results")
    """folder for the JSON file"""
    name: str | None = None
    """the JSON file's stem (None: host_overhead_<device>)"""


class FreePool:
    """EnvPool's sync and async API over envs that cost nothing; every 7th step of an env ends its episode."""

    def __init__(self, num_envs: int, batch_size: int, info: EnvInfo, seed: int = 0):
        self.num_envs, self.batch_size = num_envs, batch_size
        self.rng = np.random.default_rng(seed)
        n = max(num_envs, batch_size)
        self.obs = np.zeros((n, *info.obs_shape), dtype=info.obs_dtype)
        self.reward = np.zeros(n, dtype=np.float32)
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.queue = np.arange(0)

    def _result(self, ids: np.ndarray):
        self.steps[ids] += 1
        end = self.steps[ids] % 7 == 0
        b = len(ids)
        info = {"env_id": ids.astype(np.int32), "elapsed_step": self.steps[ids], "reward": self.reward[:b],
                "terminated": end.astype(np.int32), "lives": np.zeros(b, dtype=np.int32)}
        return self.obs[:b], self.reward[:b], end, np.zeros(b, dtype=bool), info

    def reset(self):
        return self.obs[: self.num_envs], {}

    def step(self, actions: np.ndarray):
        return self._result(np.arange(self.num_envs))

    def async_reset(self) -> None:
        self.queue = self.rng.permutation(self.num_envs)

    def send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self.queue = np.concatenate([self.queue, self.rng.permutation(env_ids)])

    def recv(self):
        ids, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return self._result(ids)


class FreeActor(Actor):
    """An Actor whose choice costs nothing: zero actions, log-probs, values and logits (its dist), and their
    packed acting row, preallocated."""

    def __init__(self, num_actions: int, device: torch.device):
        identity = torch.nn.Identity()
        identity.dist_kind = "categorical"
        super().__init__(identity)
        self.num_actions, self.device, self.out = num_actions, device, {}

    def _outputs(self, b: int) -> tuple[torch.Tensor, ...]:
        if b not in self.out:
            z = torch.zeros(b, device=self.device)
            outputs = (torch.zeros(b, dtype=torch.int64, device=self.device), z, z,
                       torch.zeros(b, self.num_actions, device=self.device))
            self.out[b] = (*outputs, pack_acting(*outputs))
        return self.out[b]

    def __call__(self, obs: torch.Tensor):
        return self._outputs(obs.shape[0])[:4]

    def row(self, obs: torch.Tensor):
        outputs = self._outputs(obs.shape[0])
        return outputs[4], outputs[0]

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self._outputs(obs.shape[0])[2]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def measure(mode: str, info: EnvInfo, num_envs: int, args: Args, device: torch.device) -> tuple[float, Counter]:
    """Seconds per env step (one step of every env in sync mode, one recv in async mode), and the torch
    operators dispatched per step, by name (from one more rollout, not timed)."""
    actor = FreeActor(info.num_actions, device)
    if mode == "sync":
        collector = Collector(FreePool(num_envs, num_envs, info), info, device)
        (buf,) = collector.allocate(args.num_steps)
        steps_per_rollout = args.num_steps
    else:
        collector = AsyncCollector(FreePool(num_envs, num_envs // 2, info), info, device, num_envs, num_envs // 2)
        (buf,) = collector.allocate(args.num_steps)
        steps_per_rollout = 2 * args.num_steps  # recvs of num_envs / 2 envs
    collector.collect(actor, buf)  # warm-up: allocations, pinned buffers
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.rollouts):
        collector.collect(actor, buf)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / (args.rollouts * steps_per_rollout)
    with OpCounter() as counter:
        collector.collect(actor, buf)
    return seconds, Counter({k: v / steps_per_rollout for k, v in counter.ops.items()})


def error(args: Args) -> str | None:
    """One line naming the first bad value, or None."""
    if not args.num_envs or any(n < 2 or n % 2 for n in args.num_envs):
        return f"--num-envs must be even counts >= 2, got {list(args.num_envs)}"
    if args.num_steps < 2 or args.rollouts < 1:
        return f"--num-steps must be >= 2 and --rollouts >= 1, got {args.num_steps} and {args.rollouts}"
    if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
        return f"--name must be a file name (no folder), got {args.name!r}"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        return f"--device {args.device!r} is not available here"
    return None


def main(args: Args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(1)
    shapes = {"tiny (4,) f32": EnvInfo("Free-v0", (4,), np.dtype(np.float32), 6, False),
              "Pong (4,84,84) u8": EnvInfo("FreeAtari-v5", (4, 84, 84), np.dtype(np.uint8), 6, True)}
    rows = []
    for name, info in shapes.items():
        for mode in ("sync", "async"):
            for n in args.num_envs:
                s, ops = measure(mode, info, n, args, device)
                envs_per_step = n if mode == "sync" else n // 2
                rows.append({"obs": name, "mode": mode, "num_envs": n, "envs_per_step": envs_per_step,
                             "us_per_step": s * 1e6, "ns_per_env_step": s * 1e9 / envs_per_step,
                             "ops_per_step": sum(ops.values()), "ops": dict(ops.most_common())})
    print(f"host overhead per step, free envs and a free policy, device {device} "
          f"(step = all envs in sync mode, one recv of num_envs / 2 in async mode)")
    print(f"{'obs':<18} {'mode':<6} {'num_envs':>8} {'us/step':>9} {'ns/env-step':>12} {'ops/step':>9}")
    for r in rows:
        print(f"{r['obs']:<18} {r['mode']:<6} {r['num_envs']:>8} {r['us_per_step']:>9.1f} "
              f"{r['ns_per_env_step']:>12.1f} {r['ops_per_step']:>9.1f}")
    result = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
              "machine": machine(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or f'host_overhead_{device.type}'}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    cli_args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if (message := error(cli_args)) is not None:
        print(f"host_overhead.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    main(cli_args)
