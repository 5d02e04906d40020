"""Command line: ``fastppo train [flags]``, ``fastppo bench [flags]`` (also ``python -m fastppo ...``).

Flags come from the Config dataclass (tyro), so --help shows each field's docstring. Bad input is
one line on stderr and exit code 2, before any environment or device memory is created.
"""

from __future__ import annotations

import sys

import tyro

from fastppo.bench import BenchConfig
from fastppo.checkpoint import CheckpointError
from fastppo.config import Config, ConfigError
from fastppo.envs import EnvError

USER_ERRORS = (ConfigError, EnvError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    args = tyro.extras.subcommand_cli_from_dict(
        {"train": Config, "bench": BenchConfig},
        prog="fastppo",
        description="fastppo: high-throughput PPO on EnvPool.",
        args=argv,
    )
    try:
        if isinstance(args, Config):
            from fastppo.trainer import TrainingDiverged, train

            try:
                train(args)
            except TrainingDiverged as e:
                print(f"fastppo: {e}", file=sys.stderr)
                return 1
        elif isinstance(args, BenchConfig):
            from fastppo.bench import run_bench

            run_bench(args)
    except USER_ERRORS as e:
        print(f"fastppo: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())
