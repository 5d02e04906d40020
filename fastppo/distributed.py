"""Data-parallel training under torchrun: one process (rank) per device, each with its own EnvPool.

    torchrun --nproc_per_node G -m fastppo train ...

torchrun starts G processes and sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and the
rendezvous address in their environment. Every rank runs the same loop as a plain run on its own
slice of the work:

* its own EnvPool of ``num_envs`` envs (env i of rank r is seeded ``seed + r * num_envs + i``, so
  the ranks together play the envs of one pool of ``world_size * num_envs``), its own rollout and
  GAE, and its own shuffles (torch is seeded ``seed + r``);
* the same K epochs x M minibatches; DistributedDataParallel averages the gradients of each
  minibatch across ranks during backward, so each optimizer step is the step of the global
  minibatch, and the parameters (broadcast from rank 0 when DDP wraps the model) stay identical;
* host decisions (the --target-kl early stop, PPO-penalty's beta) and logged values are taken on
  all-reduced numbers, identical on every rank (a collective delivers the same result to all).

Backend: NCCL when the device is CUDA (rank -> cuda:LOCAL_RANK), gloo on CPU. Without torchrun's
variables nothing here does anything, and a plain run is exactly the single-process trainer. A
one-rank torchrun run takes the distributed path (process group, DDP, all-reduces) with the seeds of
the plain run, and matches it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastppo.config import ConfigError

T = TypeVar("T")


class RanksLost(RuntimeError):
    """A collective failed: another rank died, or stalled longer than --dist-timeout; one line for the CLI."""


# How gloo and NCCL word a lost peer or a timed-out collective (they raise plain RuntimeErrors).
_COMM_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "gloo/transport",
                  "NCCL")


def _is_comm_failure(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or any(marker in str(e) for marker in _COMM_FAILURES)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks; ``launched`` is False for a plain run."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> World:
        """Read torchrun's variables; a plain run (no WORLD_SIZE) gives the one-process World."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
            local_rank = int(environ.get("LOCAL_RANK", "0"))
            local_size = int(environ.get("LOCAL_WORLD_SIZE", str(size)))
        except (KeyError, ValueError):
            got = ", ".join(f"{n}={environ.get(n)!r}" for n in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
            raise ConfigError(f"WORLD_SIZE is set but the torchrun environment is incomplete ({got}); "
                              f"launch with torchrun") from None
        if not 0 <= rank < size or not 0 <= local_rank < local_size:
            raise ConfigError(f"bad torchrun environment: RANK {rank} of WORLD_SIZE {size}, "
                              f"LOCAL_RANK {local_rank} of LOCAL_WORLD_SIZE {local_size}")
        return cls(rank, local_rank, size, local_size, launched=True)


def rank_seeds(seed: int, num_envs: int, rank: int, restart: int = 0) -> tuple[int, int]:
    """(torch seed, first env seed) of a rank: seed + rank, and seed + rank * num_envs.

    Env seeds never overlap across ranks; rank 0 gets exactly the plain run's seeds. restart: the
    iteration an async/overlap run resumes after; its envs start over from a fresh base seed derived
    from (seed, restart) instead of seed (EnvPool takes seeds below 2^31; make_envs wraps them).
    """
    base = seed if restart == 0 else int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])
    return seed + rank, base + rank * num_envs


def env_threads(requested: int, num_envs: int, world: World, cpus: int | None = None) -> int:
    """EnvPool threads of one rank: the user's value, else the cores split across the local ranks.

    0 (EnvPool's default, as in a plain run) when one rank runs on this machine; with several, each
    gets cpus // local ranks (at least 1, at most its num_envs) so the pools do not oversubscribe.
    """
    if requested or world.local_size == 1:
        return requested
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(num_envs, cpus // world.local_size))


def rank_device(device: torch.device, world: World) -> torch.device:
    """The rank's device: cuda:LOCAL_RANK for CUDA under torchrun, else device unchanged."""
    if device.type != "cuda" or not world.launched:
        return device
    visible = torch.cuda.device_count()
    # Every rank of a node computes the same answer, so a bad launch fails on all of them at once.
    if world.local_size > visible:
        raise ConfigError(f"torchrun starts {world.local_size} ranks on this node but {visible} CUDA device(s) "
                          f"are visible; use --nproc-per-node {visible} or less")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the other ranks for the duration of the block (nothing for a plain run).

    NCCL for CUDA, gloo on CPU. ``timeout_s`` bounds the rendezvous and every collective: a rank
    that stops answering makes the others fail with an error after that long instead of hanging.
    With gloo such a failure is re-raised as RanksLost, one line naming this rank; with NCCL,
    PyTorch's watchdog aborts the process itself (TORCH_NCCL_ASYNC_ERROR_HANDLING's default). The
    group is destroyed on the way out, error or not.
    """
    if not world.launched:
        yield
        return
    # Imported before the group exists, on purpose: torch._dynamo imported while a group is up (the first
    # optimizer and DDP import it) keeps that group, and its gloo worker threads, alive past
    # destroy_process_group. Such a thread may then free a finished collective's tensors while the
    # interpreter shuts down, and the process aborts after a finished run ("terminate called without an
    # active exception"). tests/test_distributed.py checks that no gloo thread is left.
    import torch._dynamo  # noqa: F401
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the rank to its GPU and creates the NCCL communicator now
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    except dist.DistError as e:
        raise RanksLost(f"rank {world.rank} of {world.size} could not meet the other ranks: {_first_line(e)} "
                        f"(were all {world.size} started? --dist-timeout {timeout_s:g}s)") from e
    try:
        yield
    except RuntimeError as e:
        if not _is_comm_failure(e):
            raise
        raise RanksLost(f"rank {world.rank} of {world.size} lost the other ranks: {_first_line(e)} (a rank died, "
                        f"or stalled longer than --dist-timeout {timeout_s:g}s; see its output)") from e
    finally:
        gc.collect()  # the update's DDP module holds the group: free it now even if a reference cycle kept it
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a torchrun process group (a one-rank group included)."""
    return dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 and in a plain run: the one process that prints and writes the run folder."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap_model(policy: nn.Module, device: torch.device) -> nn.Module:
    """DDP around policy under torchrun (gradients averaged across ranks in backward), else policy.

    DDP broadcasts rank 0's parameters on construction, so all ranks start from the same weights.
    Acting, checkpoints and the no-grad KL use the bare module; only the update calls the wrapper.
    """
    if not dist.is_initialized():
        return policy
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over the ranks (a new tensor; t itself without a process group).

    t must live on the backend's device (the training device). A collective: every rank must call.
    """
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of t over the ranks (t itself without a process group); see all_reduce_sum."""
    if not dist.is_initialized():
        return t
    return all_reduce_sum(t) / dist.get_world_size()


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average the .grad of params over the ranks, in place (one flat all-reduce; nothing without a
    process group): for updates that step some parameters outside DDP."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag is True on any rank (flag itself without a process group). A collective."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item())


def all_games(returns: list[float], lengths: list[int]) -> tuple[list[float], list[int]]:
    """The finished games' returns and lengths of every rank, rank 0's first. A collective."""
    if not dist.is_initialized():
        return returns, lengths
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, (returns, lengths))
    return [r for rank_returns, _ in out for r in rank_returns], [n for _, rank_lengths in out for n in rank_lengths]


def all_gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """[t of rank 0, t of rank 1, ...] on every rank ([t] without a process group). A collective."""
    if not dist.is_initialized():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def gather_on_main(obj: T) -> list[T] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and give its result, or its ConfigError, to every rank.

    For checks that read rank 0's file system (the run folder): every rank then exits with the same
    one-line error instead of waiting for a rank that has gone.
    """
    if not dist.is_initialized():
        return fn()
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]
