"""Checkpoints: written atomically, read as data only.

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save``. It is written
to a temporary file in the same folder, fsync'ed, then renamed over its final name, so a crash
mid-save leaves the previous checkpoint intact. It is loaded with ``weights_only=True``: a
checkpoint file is data, never code.
"""

from __future__ import annotations

import glob
import os
import re

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
