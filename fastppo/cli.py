"""Command line: ``fastppo train | eval | plot | bench [flags]`` (also ``python -m fastppo ...``).

Flags come from dataclasses (tyro), so --help shows each field's docstring. Bad input is one line
on stderr and exit code 2, before any environment or device memory is created: an unknown flag or a
value its field's type cannot take is caught here (tyro would print a box), everything else by the
command itself.

Exit codes: 0 done, 1 the loss diverged (NaN) or the run folder could not be written, 2 bad input,
128 + signal number after SIGINT (130) or SIGTERM (143) stopped a run (it saved a checkpoint first;
``fastppo train --resume`` goes on). A Ctrl-C while fastppo starts (importing torch takes seconds) is
one line and 130 too.

This module imports torch and the rest only inside :func:`main`, so that such a Ctrl-C lands there.
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from itertools import takewhile


def __getattr__(name: str):
    """USER_ERRORS (ConfigError, EnvError, CheckpointError: exit 2), imported on first use."""
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(f"module 'fastppo.cli' has no attribute {name!r}")


def _user_errors() -> tuple[type[Exception], ...]:
    from fastppo.checkpoint import CheckpointError
    from fastppo.config import ConfigError
    from fastppo.envs import EnvError

    return ConfigError, EnvError, CheckpointError


def _subcommands() -> dict[str, type]:
    from fastppo.bench import BenchConfig
    from fastppo.config import TrainFlags
    from fastppo.evaluate import EvalConfig
    from fastppo.plot import PlotConfig

    return {"train": TrainFlags, "eval": EvalConfig, "plot": PlotConfig, "bench": BenchConfig}


def flag_types(cls: type) -> dict[str, object]:
    """The flags of a subcommand's dataclass and their annotations, by field name: positional and suppressed
    fields left out, the fields of a nested dataclass marked OmitArgPrefixes (bench's training options) in."""
    import tyro

    out: dict[str, object] = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        markers = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        if tyro.conf.Suppress in markers or tyro.conf.Positional in markers:
            continue
        bare = typing.get_args(hint)[0] if markers else hint
        if tyro.conf.OmitArgPrefixes in markers:
            out.update(flag_types(bare))
        else:
            out[name] = bare
    return out


def _union_args(hint) -> tuple:
    """The members of a union annotation (int | None), or (hint,) for any other."""
    if typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _takes(hint) -> str:
    """What a flag of this annotation takes, in words: "an integer or None", "one of none, cleanrl, fast"."""
    words = []
    for arg in _union_args(hint):
        if typing.get_origin(arg) is typing.Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(arg))))
        else:
            words.append({int: "an integer", float: "a number", bool: "True or False", str: "text",
                          type(None): "None"}.get(arg, str(arg)))
    return " or ".join(words)


def _fits(hint, value: str) -> bool:
    """Whether tyro takes `value` for a flag of this annotation (a bool flag with a value: True or False)."""
    for arg in _union_args(hint):
        if typing.get_origin(arg) is typing.Literal:
            if value in map(str, typing.get_args(arg)):
                return True
        elif arg is type(None) or arg is bool:
            if value in (("None",) if arg is type(None) else ("True", "False")):
                return True
        else:
            try:
                {int: int, float: float}.get(arg, str)(value)
                return True
            except ValueError:
                pass
    return False


def check_flags(cls: type, argv: list[str], command: str) -> None:
    """ConfigError, on one line, for an unknown flag, a value its field's type cannot take (--num-envs abc,
    --total-timesteps 1e6, --preset nope), a missing value, or a word no flag takes (--track True), naming
    the flag and what it takes. Driven by the dataclass's annotations.

    tyro catches these too, but in a box wrapped to the terminal's width; the rest of the parsing is
    tyro's.
    """
    import tyro

    from fastppo.config import ConfigError

    flags = flag_types(cls)
    positional = any(tyro.conf.Positional in typing.get_args(h)[1:]
                     for h in typing.get_type_hints(cls, include_extras=True).values())
    values_at: set[int] = set()  # the tokens taken as a flag's value
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            if i not in values_at and not positional and token != "-h":
                after = f" (after {argv[i - 1]}, which takes no value)" if i and argv[i - 1].startswith("--") else ""
                raise ConfigError(f"fastppo {command} takes no {token!r}{after}")
            continue
        flag, eq, value = token[2:].partition("=")
        name = flag.replace("-", "_")
        if name == "help":
            continue
        if name not in flags:
            if name.startswith("no_") and flags.get(name[3:]) is bool:
                continue
            close = difflib.get_close_matches(name, list(flags), n=3)
            hint = f"; close names: {', '.join('--' + c.replace('_', '-') for c in close)}" if close else ""
            raise ConfigError(f"unknown flag --{flag} of fastppo {command}{hint}")
        hint = flags[name]
        if hint is bool:  # a switch (--track, --no-track): no value
            if eq:
                raise ConfigError(f"--{flag} is a switch (--{flag} or --no-{flag}); it takes no value")
            continue
        items = [a for a in _union_args(hint) if typing.get_origin(a) is tuple]
        if items:  # tuple[T, ...]: every value up to the next flag
            item = typing.get_args(items[0])[0]
            values = [value] if eq else list(takewhile(lambda t: not t.startswith("--"), argv[i + 1 :]))
            values_at.update(range(i + 1, i + 1 + (0 if eq else len(values))))
            wrong = [v for v in values if not _fits(item, v) and not (v == "None" and type(None) in _union_args(hint))]
            if wrong:
                raise ConfigError(f"--{flag} {wrong[0]!r} is not {_takes(item)}")
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{flag} needs a value ({_takes(hint)})")
            value = argv[i + 1]
            values_at.add(i + 1)
        if not _fits(hint, value):
            raise ConfigError(f"--{flag} {value!r} is not {_takes(hint)}")


def given_flags(parsed, argv: list[str]) -> set[str]:
    """The fields (leaf names, nested dataclasses included) that argv set in `parsed`, tyro's parse of argv.

    tyro returns values only, so a flag given with its default value looks like no flag at all
    (brentyi/tyro#254); a preset and --resume need the difference. So argv is parsed a second time
    against a default instance in which every field holds another value of its type (_elsewhere): a
    field comes out the same both times exactly when argv set it.
    """
    import tyro

    from fastppo.config import same_value

    other = tyro.cli(type(parsed), args=argv, default=_elsewhere(type(parsed)()), console_outputs=False)
    theirs = _leaves(other)
    return {name for name, value in _leaves(parsed).items() if same_value(value, theirs[name])}


def _leaves(obj, out: dict | None = None) -> dict:
    """A dataclass's fields by name, the fields of nested dataclasses in place of the dataclass."""
    import dataclasses

    out = {} if out is None else out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _leaves(value, out)
        else:
            out.setdefault(f.name, value)  # a nested field hidden by an outer one of the same name is never a flag
    return out


def _elsewhere(obj):
    """A copy of dataclass `obj` in which every field (nested ones too) holds a value of its type other than obj's."""
    import dataclasses

    hints = typing.get_type_hints(type(obj))
    values = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        values[f.name] = _elsewhere(value) if dataclasses.is_dataclass(value) else _other(value, hints[f.name])
    return type(obj)(**values)


def _other(value, hint):
    """A value of type `hint` that differs from `value` (TypeError for an annotation it does not know)."""
    args = _union_args(hint)
    if len(args) > 1:  # X | None
        (inner,) = [a for a in args if a is not type(None)]
        return _some(inner) if value is None else None
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value)
    if hint is bool:
        return not value
    if hint is int:
        return value + 1
    if hint is float:
        return value + 1.0 if math.isfinite(value) else 0.0
    if hint is str:
        return value + "~"
    if typing.get_origin(hint) is tuple:
        return (*value, _some(typing.get_args(hint)[0]))
    raise TypeError(f"given_flags: no other value for a field of type {hint}")


def _some(hint):
    """A value of type `hint`."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)[0]
    if typing.get_origin(hint) is tuple:
        return (_some(typing.get_args(hint)[0]),)
    return {bool: True, int: 1, float: 1.0, str: "~"}[hint]


def main(argv: list[str] | None = None) -> int:
    import tyro

    from fastppo.checkpoint import WriteFailed
    from fastppo.config import ConfigError, TrainFlags, mark_given
    from fastppo.evaluate import EvalConfig
    from fastppo.plot import PlotConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # tyro's subcommand parser has no version action
        from fastppo import __version__

        print(f"fastppo {__version__}")
        return 0
    subcommands = _subcommands()
    try:
        if argv and argv[0] in subcommands:
            check_flags(subcommands[argv[0]], argv[1:], argv[0])
    except ConfigError as e:
        print(f"fastppo: error: {e}", file=sys.stderr)
        return 2
    args = tyro.extras.subcommand_cli_from_dict(
        subcommands,
        prog="fastppo",
        description="fastppo: high-throughput PPO and TRPO on EnvPool. fastppo --version prints its version.",
        args=argv,
    )
    try:
        if isinstance(args, TrainFlags):
            from fastppo.distributed import RanksLost
            from fastppo.trainer import TrainingDiverged, TrainingInterrupted, train

            try:
                train(mark_given(args.config(), given_flags(args, argv[1:])))
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
        else:
            from fastppo.bench import run_bench

            run_bench(args, given_flags(args, argv[1:]))
    except _user_errors() as e:
        print(f"fastppo: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while starting (imports) or a second Ctrl-C in training (see StopOnSignal)
        print("fastppo: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
