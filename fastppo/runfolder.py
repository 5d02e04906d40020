"""The run folder a training process owns: locked while it trains, left as it was when a start fails.

* Lock. A run folder holds one writer at a time: the trainer takes an advisory lock (``flock``) on
  ``<run>/.lock`` before it reads or changes anything in the folder and keeps it until it exits
  (the kernel drops it when the process dies, ``kill -9`` included). The holder's PID is written in
  the file, so a second ``fastppo train --resume`` on the same folder stops with one line naming it.
* A new run's folder is claimed (checked, made, locked) before the envs exist, but nothing that
  makes it a run (config.json, metrics.jsonl, checkpoints, W&B files) is written until training
  starts. If the start fails or a SIGINT/SIGTERM arrives first, :meth:`RunFolder.abandon` removes
  what the start made (the folder itself when it made it, else only the entries that were not in it
  before), so the same command can simply be run again.
* Identity. The folder and its lock file are known by their (device, inode) from the moment they are
  locked. :meth:`RunFolder.check` (before each write of the training loop, and at its end) stops the
  run with one line when either is gone or is another file now (``rm -rf``, a lazy unmount, a ``mv``
  and a new folder of the same name): the run never reports success, re-creates the folder, or writes
  into one that is not its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time

from fastppo.checkpoint import WriteFailed
from fastppo.config import ConfigError, check_run_dir

LOCK_FILE = ".lock"


class RunFolder:
    """A locked run folder; ``committed`` once training started (until then abandon() undoes the start)."""

    def __init__(self, path: str, fd: int, made: bool, new: bool, before: frozenset[str] = frozenset()):
        self.path = path
        self.fd = fd
        self.made = made  # the folder did not exist before this process
        self.new = new  # a new run (not a resume)
        self.before = before  # what a folder that existed held before this start (the user's: kept)
        self.committed = not new
        self.identity = _identity(os.stat(path)), _identity(os.fstat(fd))  # the folder's and its lock file's

    @classmethod
    def claim_new(cls, path: str, flag: str = "--run-dir") -> RunFolder:
        """Check (config.check_run_dir), make and lock the folder of a new run. ConfigError on failure."""
        check_run_dir(path, flag)
        made = not os.path.exists(path)
        before = frozenset() if made else frozenset(os.listdir(path)) - {LOCK_FILE}
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--run-dir {path!r}: cannot make the folder ({e.strerror})") from None
        try:
            fd = _lock(path)
            check_run_dir(path, flag)  # a process that claimed the folder meanwhile has written its config
        except BaseException:
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, fd, made, new=True, before=before)

    @classmethod
    def lock_existing(cls, path: str) -> RunFolder:
        """Lock the folder of a run to resume; ConfigError when another process holds it."""
        if not os.path.isdir(path):
            raise ConfigError(f"--resume {path!r}: no such run folder")
        return cls(path, _lock(path), made=False, new=False)

    def check(self) -> None:
        """WriteFailed when the folder or its lock file was removed or replaced since it was locked."""
        try:
            now = _identity(os.stat(self.path)), _identity(os.stat(os.path.join(self.path, LOCK_FILE)))
        except OSError:
            now = None
        if now != self.identity:
            raise WriteFailed(f"the run folder {self.path!r} was removed or replaced while this run used it; "
                              f"stopping without writing there")

    def commit(self) -> None:
        """Training starts: from here on the folder holds a run and is never removed."""
        self.committed = True

    def abandon(self) -> None:
        """Undo an uncommitted start: remove the folder it made, or what it added to one that existed
        (its lock file included); then unlock."""
        if not self.committed:
            if self.made:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                for name in set(os.listdir(self.path)) - self.before:
                    target = os.path.join(self.path, name)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    elif os.path.lexists(target):
                        with contextlib.suppress(OSError):
                            os.remove(target)
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


def _holder(fd: int, wait: float = 2.0) -> str:
    """The PID of the process holding the lock on fd, from the lock file.

    A process that has just taken the lock writes its PID a moment later; until then the file is empty or
    names an earlier holder that has ended (two launches at the same instant). So the file is read again
    until it names a live process, for up to `wait` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if (text.isdigit() and _alive(int(text))) or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lock(path: str) -> int:
    """Take the folder's lock (non-blocking) and write this PID in it; ConfigError naming the holder."""
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot lock the run folder {path!r} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(f"the run folder {path!r} is in use by process {holder} (another fastppo train); "
                          f"wait for it to end or stop it first") from None
    try:
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)  # then cut what is left of a longer PID: the file never reads empty
        os.ftruncate(fd, len(pid))
    except OSError as e:  # a full disk, say: one line, and the lock goes with the descriptor
        os.close(fd)
        raise ConfigError(f"cannot lock the run folder {path!r}: writing {lock_path!r} failed ({e.strerror})") from None
    return fd
