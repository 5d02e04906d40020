"""Checkpoints: written atomically, read as data only; the RNG states that make a resume exact.

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save``. It is written
to a temporary file in the same folder, fsync'ed, then renamed over its final name, so a crash
mid-save leaves the previous checkpoint intact (a leftover ``*.tmp.<pid>`` file is never read and is
removed by the next save). It is loaded with ``weights_only=True``: a checkpoint file is data, never
code, so everything in it is a tensor, a number, a string, a list or a dict (numpy's and Python's RNG
states are converted, see :func:`rng_state`).
"""

from __future__ import annotations

import glob
import math
import os
import pickle
import random
import re
import signal
import threading

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A missing, truncated or foreign checkpoint; one line for the CLI."""


class WriteFailed(RuntimeError):
    """The run folder could not be written (disk full, a read-only or vanished folder); the run stops with
    one line and its last checkpoint intact."""


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def checkpoint_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"ckpt_{iteration:07d}.pt")


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoints, oldest first."""
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "ckpt_*.pt"))
    return sorted((p for p in paths if _CKPT_RE.search(p)), key=lambda p: int(_CKPT_RE.search(p).group(1)))


def last_checkpoint_note(run_dir: str, what: str = "last") -> str:
    """For an error line: "the last checkpoint is <path>" (what="last good": after a divergence), or that
    none was written."""
    found = list_checkpoints(run_dir)
    return f"the {what} checkpoint is {found[-1]}" if found else "no checkpoint was written"


STATISTICS = {"obs": "observation", "reward": "reward"}  # the normalisers' names in a checkpoint, in words


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def bad_value(state: dict) -> str | None:
    """What is wrong with the first value of a checkpoint's state that is not finite or out of its range
    ("parameter critic.1.weight is not finite", "reward statistics' m2 is negative"), or None.

    Covers everything a checkpoint carries as numbers: the model, the optimizer's moments, the
    normalisation statistics (count > 0, M2 >= 0) and each env's discounted return, the recent returns,
    the clock and beta (>= 0), a continuous action log, the scores (best_eval may be -inf: no evaluation
    yet). A part of the wrong type is skipped: the type checks name it.
    """
    named: list[tuple[str, object]] = [(f"parameter {n}", t) for n, t in _dict(state.get("model")).items()]
    for index, slots in _dict(_dict(state.get("optimizer")).get("state")).items():
        named += [(f"optimizer state {slot} of parameter {index}", t) for slot, t in _dict(slots).items()]
    statistics = {f"{STATISTICS.get(k, k)} statistics' ": _dict(v) for k, v in _dict(state.get("normalizer")).items()}
    named += [(which + key, t) for which, stats in statistics.items() for key, t in stats.items()]
    parts = state.get("collection")
    for rank, part in enumerate(parts if isinstance(parts, list) else []):
        named.append((f"discounted returns of rank {rank}'s envs", _dict(part).get("reward_returns")))
    returns = state.get("recent_returns")
    named += [("recent returns", r) for r in (returns if isinstance(returns, list) else [])]
    named += [(key, state.get(key)) for key in ("elapsed", "kl_coef", "eval_return")]
    named.append(("action log", state.get("actions")))
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return f"{name} is not finite"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} is not finite"
    for which, stats in statistics.items():  # variance = M2 / count
        count, m2 = stats.get("count"), stats.get("m2")
        if isinstance(count, torch.Tensor) and (count <= 0).any():
            return f"{which}count is not positive"
        if isinstance(m2, torch.Tensor) and (m2 < 0).any():
            return f"{which}m2 is negative"
    for key in ("elapsed", "kl_coef"):
        value = state.get(key)
        if isinstance(value, (int, float)) and value < 0:
            return f"{key} is negative ({value})"
    best = state.get("best_eval")
    if isinstance(best, float) and (math.isnan(best) or best == math.inf):
        return f"best_eval is {best}"
    return None


def bad_actions(actions, num_actions: int, continuous: bool) -> str | None:
    """What is wrong with an action log ((steps, envs) discrete, (steps, envs, D) continuous) for an action
    space of num_actions (discrete: 0 .. num_actions - 1; continuous: any finite value, clipped when sent),
    or None."""
    if actions is None or continuous:
        return None if actions is None or torch.isfinite(actions).all() else "action log is not finite"
    if actions.is_floating_point() or actions.dtype == torch.bool:
        return f"action log holds {actions.dtype} values, not action indices"
    if actions.numel() and not (0 <= int(actions.min()) and int(actions.max()) < num_actions):
        wrong = int(actions.min()) if int(actions.min()) < 0 else int(actions.max())
        return f"action log holds action {wrong}, outside the env's 0..{num_actions - 1}"
    return None


def save_checkpoint(run_dir: str, iteration: int, state: dict, keep: int = 3) -> str:
    """Write state atomically as checkpoints/ckpt_<iteration>.pt; keep the newest `keep`.

    Refuses (ValueError) a state holding a value that is not finite or out of its range (bad_value): a
    diverged run never overwrites or rotates away its last good checkpoint. A failed write (disk full, say) raises
    WriteFailed and leaves the previous checkpoints as they were.
    """
    path = checkpoint_path(run_dir, iteration)
    _write(run_dir, path, state)
    try:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            os.remove(old)
    except OSError as e:
        raise WriteFailed(f"cannot remove an old checkpoint of {run_dir!r} ({_why(e)}); the last checkpoint is "
                          f"{path}") from e
    return path


BEST = "best.pt"


def save_best(run_dir: str, state: dict) -> str:
    """Write state (the model, config and normalisation of the best evaluation so far) atomically as
    checkpoints/best.pt, replacing the previous best; its path. Never rotated away."""
    path = os.path.join(run_dir, CKPT_DIR, BEST)
    _write(run_dir, path, state)
    return path


def best_score(run_dir: str, folder_config: dict) -> float:
    """The evaluation score checkpoints/best.pt holds; -inf when there is none.

    A resume starts from the best of this and its checkpoint's score: a best.pt written after that
    checkpoint, by iterations the resume redoes, is kept and still has to be beaten. best.pt is checked
    as every checkpoint is (load_checkpoint) and must belong to the run (check_belongs against the
    folder's config.json, `folder_config`) and hold a finite score: CheckpointError (one line) otherwise.
    """
    path = os.path.join(run_dir, CKPT_DIR, BEST)
    if not os.path.lexists(path):
        return -math.inf
    state = load_checkpoint(path)
    check_belongs(state, folder_config, os.path.join(run_dir, "config.json"))
    score = state.get("eval_return")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise CheckpointError(f"{path!r} is damaged: its eval_return is {score!r}, not a score")
    return float(score)


def check_belongs(state: dict, folder_config: dict, config_path: str) -> None:
    """CheckpointError unless a checkpoint's config agrees with its run folder's config.json (read from
    config_path) on every field that defines the run (config.config_difference), naming the first that
    differs: a foreign checkpoint, or a config.json edited where a resume cannot change it."""
    from fastppo.config import CONFIG_EDITABLE, config_difference

    differs = config_difference(state["config"], folder_config)
    if differs is not None:
        raise CheckpointError(
            f"{state['path']!r} and {config_path!r} disagree on {differs} ({state['config'].get(differs)!r} in the "
            f"checkpoint, {folder_config.get(differs)!r} in config.json): the checkpoint belongs to another run, or "
            f"config.json was edited where a resume cannot change it (it may change only "
            f"{', '.join(CONFIG_EDITABLE)})")


def run_folder(path: str) -> str:
    """The run folder of a run folder or of one of its checkpoint files (<run>/checkpoints/*.pt)."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == CKPT_DIR else parent


def _write(run_dir: str, path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename over `path`, fsync the folder.

    ValueError when a value of state is not finite or out of its range (bad_value; nothing is written);
    WriteFailed (one line naming the last checkpoint) when the file system refuses.
    """
    bad = bad_value(state)
    if bad is not None:
        raise ValueError(bad)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if not os.path.isdir(os.path.dirname(path)):
            os.mkdir(os.path.dirname(path))  # not makedirs: a run folder removed under the run is never re-created
        for stale in glob.glob(os.path.join(run_dir, CKPT_DIR, "*.pt.tmp.*")):
            os.remove(stale)  # left by a process killed mid-save; never a checkpoint
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise WriteFailed(f"cannot write checkpoint {path} ({_why(e)}); {last_checkpoint_note(run_dir)}") from e


REQUIRED_KEYS = ("model", "config", "iteration", "global_step")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a fastppo checkpoint file, or a run folder's newest one.

    Raises CheckpointError with one line for a missing, truncated or foreign file, or one holding a value
    that is not finite or out of its range (bad_value): eval, the Python API and a resume never use one.
    """
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint in {path!r} (looked for {CKPT_DIR}/ckpt_*.pt)")
        path = found[-1]
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of tensors and plain data at all
            raise CheckpointError(f"cannot read checkpoint {path!r}: not a torch checkpoint") from None
        # torch's message suggests loading with weights_only=False, i.e. running the file's code: never relay that
        raise CheckpointError(f"cannot read checkpoint {path!r}: it holds Python objects other than tensors "
                              f"and plain data, and fastppo reads checkpoints as data only") from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated or not a torch checkpoint "
                              f"({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path!r} is not a fastppo checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    _check_parts(state, path, CHECKPOINT_PARTS)
    if not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        raise CheckpointError(f"{path!r} is damaged: its model holds values that are not tensors")
    bad = bad_value(state)
    if bad is not None:
        raise CheckpointError(f"{path!r} cannot be used: its {bad} (a diverged run or a damaged file); use an "
                              f"earlier checkpoint")
    state["path"] = path
    return state


# Each part of a checkpoint and the types it may have (None: the part may be None).
CHECKPOINT_PARTS = {
    "model": (dict,), "config": (dict,), "iteration": (int,), "global_step": (int,),
}
RESUME_PARTS = {
    "optimizer": (dict,), "rng": (dict,), "kl_coef": (float, int), "elapsed": (float, int),
    "actions": (torch.Tensor, type(None)), "recent_returns": (list,), "best_eval": (float, int),
}


def _check_parts(state: dict, path: str, parts: dict) -> None:
    for key, types in parts.items():
        if key in state and (not isinstance(state[key], types) or isinstance(state[key], bool)):
            raise CheckpointError(f"{path!r} is damaged: its {key!r} is a {type(state[key]).__name__}")
    for key in ("iteration", "global_step"):
        if key in state and state[key] < 0:
            raise CheckpointError(f"{path!r} is damaged: its {key!r} is {state[key]}")
    if not isinstance(state["config"].get("env_id"), str):
        raise CheckpointError(f"{path!r} is damaged: its config names no env_id")


RESUME_KEYS = ("optimizer", "rng", "actions", "kl_coef", "elapsed", "recent_returns")


def load_resumable(run_dir: str) -> dict:
    """The newest checkpoint of a run folder, checked to hold everything a resume needs.

    Raises CheckpointError (one line) for a missing folder, or a missing, truncated, damaged or
    foreign file.
    """
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--resume {run_dir!r}: no such run folder")
    state = load_checkpoint(run_dir)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{state['path']!r} cannot be resumed from: it has no {', '.join(missing)}")
    _check_parts(state, state["path"], RESUME_PARTS)
    if not all(isinstance(r, (int, float)) for r in state["recent_returns"]):
        raise CheckpointError(f"{state['path']!r} is damaged: its 'recent_returns' are not numbers")
    if state["actions"] is not None and state["actions"].dim() not in (2, 3):
        raise CheckpointError(f"{state['path']!r} is damaged: its actions have shape {tuple(state['actions'].shape)}")
    try:
        check_rng_state(state.get("rank_rng", [state["rng"]]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state['path']!r} is damaged: its RNG states do not read ({e})") from None
    return state


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and Python RNG states as weights_only-safe data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def check_rng_state(states: list) -> None:
    """Raise KeyError/TypeError/ValueError unless each of states has rng_state()'s structure."""
    if not isinstance(states, (list, tuple)) or not states:
        raise TypeError("not a list of states")
    for state in states:
        if not isinstance(state["torch"], torch.Tensor) or not isinstance(state["cuda"], (list, tuple)):
            raise TypeError("torch states are not tensors")
        n, p = state["numpy"], state["python"]
        if not isinstance(n["keys"], torch.Tensor) or n["keys"].numel() != 624 or not isinstance(n["kind"], str):
            raise ValueError("numpy state")
        int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])
        if not isinstance(p["internal"], torch.Tensor) or p["internal"].numel() != 625:
            raise ValueError("python state")


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


class StopOnSignal:
    """Turn SIGINT / SIGTERM (Ctrl-C, cluster preemption) into a request the training loop polls.

    The loop finishes the iteration it is in, writes a checkpoint and stops. A second signal acts at
    once (Ctrl-C raises KeyboardInterrupt, SIGTERM kills); the last checkpoint stays intact either way.
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before install()."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
