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
import os
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


def checkpoint_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, CKPT_DIR, f"ckpt_{iteration:07d}.pt")


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoints, oldest first."""
    paths = glob.glob(os.path.join(run_dir, CKPT_DIR, "ckpt_*.pt"))
    return sorted((p for p in paths if _CKPT_RE.search(p)), key=lambda p: int(_CKPT_RE.search(p).group(1)))


def save_checkpoint(run_dir: str, iteration: int, state: dict, keep: int = 3) -> str:
    """Write state atomically as checkpoints/ckpt_<iteration>.pt; keep the newest `keep`."""
    path = checkpoint_path(run_dir, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for stale in glob.glob(os.path.join(run_dir, CKPT_DIR, "ckpt_*.pt.tmp.*")):
        os.remove(stale)  # left by a process killed mid-save; never a checkpoint
    tmp = f"{path}.tmp.{os.getpid()}"
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
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


REQUIRED_KEYS = ("model", "config", "iteration", "global_step")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a fastppo checkpoint file, or a run folder's newest one.

    Raises CheckpointError with one line for a missing, truncated or foreign file.
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
    except Exception as e:  # truncated zip, pickle of foreign objects, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path!r}: {first}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path!r} is not a fastppo checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    state["path"] = path
    return state


RESUME_KEYS = ("optimizer", "rng", "actions", "kl_coef", "elapsed")


def load_resumable(run_dir: str) -> dict:
    """The newest checkpoint of a run folder, checked to hold everything a resume needs.

    Raises CheckpointError (one line) for a missing folder, or a missing, truncated or foreign file.
    """
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--resume {run_dir!r}: no such run folder")
    state = load_checkpoint(run_dir)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{state['path']!r} cannot be resumed from: it has no {', '.join(missing)}")
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
