"""What one update costs with PPO-clip, PPO-clip with --decoupled, PPO-penalty and TRPO: the same rollout,
the same starting weights, the four updates interleaved in one process, so their ratios hold on a busy
machine too.

    python bench/update_cost.py --env-id CartPole-v1 --device cpu
    python bench/update_cost.py --env-id Hopper-v4 --device cpu --repeats 10
    python bench/update_cost.py --env-id Pong-v5 --preset fast --device cpu --repeats 5 --algos clip decoupled

Each algorithm's run is built as fastppo train builds it (prepare.prepare + trainer.build, --preset
cleanrl unless another is given: its rollout size, epochs and minibatches). One rollout is collected
by the first run and its advantages computed; then, --repeats times and in rotating order, every
algorithm starts from the same weights and optimizer state and runs what the loop's "update" phase
runs: with --decoupled the forward pass that makes pi_prox (proximal_rollout), then update (or
trpo_update), the batch statistics (rollout_stats: penalty's and TRPO's KL over the whole batch) and
the one host read of the stats. Prints the median milliseconds per update and the
ratio to clip's; writes bench/results/update_cost_<env>_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastppo.advantage import compute_advantages  # noqa: E402
from fastppo.bench import machine  # noqa: E402
from fastppo.config import Config  # noqa: E402
from fastppo.distributed import World  # noqa: E402
from fastppo.prepare import prepare  # noqa: E402
from fastppo.trainer import build, host_values, proximal_rollout, rollout_stats, update  # noqa: E402
from fastppo.trpo import trpo_update  # noqa: E402

# --decoupled given either way (fast sets it for Atari): "clip" and "penalty" are the plain updates
ALGOS = {
    "clip": dict(algo="ppo", loss="clip", decoupled=False),
    "decoupled": dict(algo="ppo", loss="clip", decoupled=True),
    "penalty": dict(algo="ppo", loss="penalty", decoupled=False),
    "trpo": dict(algo="trpo"),
}


def one_update(name: str, session, prepared, buf) -> float:
    """Seconds of one update as the loop runs it (the stats read back to the host included)."""
    cfg, ops = prepared.cfg, prepared.ops
    t = time.perf_counter()
    if cfg.decoupled:
        buf, _ = proximal_rollout(session.train_forward, buf, cfg.minibatch_size)
    if name == "trpo":
        stats = trpo_update(session.policy, session.forward, session.optimizer, buf, cfg)
    else:
        stats = update(session.train_forward, session.optimizer, buf, cfg, ops, session.kl_ctl.beta)
    stats.update(rollout_stats(buf, session.forward, cfg))
    host_values(stats, prepared.device)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--preset", default="cleanrl", choices=["none", "cleanrl", "fast"])
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS), metavar="NAME",
                   help=f"which updates to time ({', '.join(ALGOS)}); clip is always one, the ratios' base")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be positive")

    runs = {}
    for name, algo in ALGOS.items():
        if name != "clip" and name not in args.algos:
            continue
        prepared = prepare(Config(env_id=args.env_id, preset=args.preset, device=args.device, seed=1, **algo))
        runs[name] = (prepared, build(prepared, World()))
    try:
        first_prepared, first = runs["clip"]
        buf = first.collection.next()
        compute_advantages(buf, first_prepared.ops.gae, first_prepared.cfg.gamma, first_prepared.cfg.gae_lambda)
        weights = copy.deepcopy(first.policy.state_dict())
        optimizer_states = {name: copy.deepcopy(s.optimizer.state_dict()) for name, (_, s) in runs.items()}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for rep in range(args.repeats + 1):  # the first round warms up (allocations, lazy inits): not counted
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                prepared, session = runs[name]
                session.policy.load_state_dict(weights)
                session.optimizer.load_state_dict(optimizer_states[name])
                elapsed = one_update(name, session, prepared, buf)
                if rep:
                    seconds[name].append(elapsed)
    finally:
        for _, session in runs.values():
            session.collection.close()

    cfg = first_prepared.cfg
    median = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    print(f"{args.env_id}, --preset {args.preset}, {cfg.num_envs} envs x {cfg.num_steps} steps, device {args.device}: "
          f"median ms per update over {args.repeats} rounds")
    print("| algorithm | ms per update | ratio to clip |")
    print("| --- | --- | --- |")
    for name, ms in median.items():
        print(f"| {name} | {ms:,.1f} | {ms / median['clip']:.2f} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"update_cost_{args.env_id}_{args.device}.json"
    path.write_text(json.dumps({
        "env_id": args.env_id, "preset": args.preset, "device": args.device, "repeats": args.repeats,
        "num_envs": cfg.num_envs, "num_steps": cfg.num_steps, "update_epochs": cfg.update_epochs,
        "num_minibatches": cfg.num_minibatches, "ms_per_update_median": median,
        "ms_per_update": {name: [x * 1e3 for x in s] for name, s in seconds.items()},
        "ratio_to_clip": {name: ms / median["clip"] for name, ms in median.items()}, "machine": machine(),
    }, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
