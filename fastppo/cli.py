"""Command line: ``fastppo train | eval | plot | bench [flags]`` (also ``python -m fastppo ...``).

Flags come from dataclasses (tyro), so --help shows each field's docstring. Bad input is one line
on stderr and exit code 2, before any environment or device memory is created.

Exit codes: 0 done, 1 the loss diverged (NaN) or the run folder could not be written, 2 bad input,
128 + signal number after SIGINT (130) or SIGTERM (143) stopped a run (it saved a checkpoint first;
``fastppo train --resume`` goes on).
"""

from __future__ import annotations

import sys
import typing

import tyro

from fastppo.bench import BenchConfig
from fastppo.checkpoint import CheckpointError, WriteFailed
from fastppo.config import Config, ConfigError, flags_given, mark_given
from fastppo.envs import EnvError
from fastppo.evaluate import EvalConfig
from fastppo.plot import PlotConfig

USER_ERRORS = (ConfigError, EnvError, CheckpointError)
SUBCOMMANDS = {"train": Config, "eval": EvalConfig, "plot": PlotConfig, "bench": BenchConfig}


def literal_choices(annotation) -> tuple[str, ...]:
    """The values of a Literal[...] (or Literal[...] | None) annotation; () for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(v for arg in typing.get_args(annotation) for v in literal_choices(arg))


def check_choices(cls: type, argv: list[str]) -> None:
    """ConfigError, on one line naming the allowed values, for a bad value of a choice flag.

    tyro catches these too, but in a box wrapped to the terminal's width; the rest of the parsing is
    tyro's.
    """
    hints = typing.get_type_hints(cls, include_extras=False)
    for i, token in enumerate(argv):
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        choices = literal_choices(hints.get(name.replace("-", "_")))
        if not choices or (not eq and i + 1 >= len(argv)):
            continue  # not a choice flag, or its value is missing (tyro says so)
        value = value if eq else argv[i + 1]
        if value not in choices:
            raise ConfigError(f"--{name} {value!r} is not one of {', '.join(map(str, choices))}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # tyro's subcommand parser has no version action
        from fastppo import __version__

        print(f"fastppo {__version__}")
        return 0
    try:
        if argv and argv[0] in SUBCOMMANDS:
            check_choices(SUBCOMMANDS[argv[0]], argv[1:])
            if argv[0] == "bench":  # its training options are Config's
                check_choices(Config, argv[1:])
    except ConfigError as e:
        print(f"fastppo: error: {e}", file=sys.stderr)
        return 2
    args = tyro.extras.subcommand_cli_from_dict(
        SUBCOMMANDS,
        prog="fastppo",
        description="fastppo: high-throughput PPO and TRPO on EnvPool. fastppo --version prints its version.",
        args=argv,
    )
    try:
        if isinstance(args, Config):
            from fastppo.distributed import RanksLost
            from fastppo.trainer import TrainingDiverged, TrainingInterrupted, train

            try:
                train(mark_given(args, flags_given(argv[1:])))
            except (TrainingDiverged, RanksLost, WriteFailed) as e:
                print(f"fastppo: {e}", file=sys.stderr)
                return 1
            except TrainingInterrupted as e:
                print(f"fastppo: {e}", file=sys.stderr)
                return 128 + e.signum
        elif isinstance(args, EvalConfig):
            from fastppo.evaluate import run_eval

            run_eval(args)
        elif isinstance(args, PlotConfig):
            from fastppo.plot import plot_runs

            print(f"wrote {plot_runs(args)}")
        elif isinstance(args, BenchConfig):
            from fastppo.bench import run_bench

            run_bench(args, flags_given(argv[1:]))
    except USER_ERRORS as e:
        print(f"fastppo: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())
