"""Speed options of the learning path, and per-phase timing.

* :class:`PhaseTimer` times the phases of an iteration (env wait, host-to-device, inference, GAE,
  update, logging). On CUDA a device phase records a pair of CUDA events on the current stream
  (no host sync); the events are read in :meth:`PhaseTimer.read`, which the trainer calls once per
  iteration at log time, right after the log line's own sync. Host phases (waiting for EnvPool,
  writing the log) and everything on CPU use ``time.perf_counter``.
* :func:`learner_forward` wraps the policy for the update: bf16 autocast (``--bf16``) and
  ``torch.compile`` (``--compile``). The wrapper shares the policy's parameters; checkpoints and the
  optimizer use the policy itself.
* The acting path, :class:`fastppo.policy.Actor`, lives beside the policy.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

PHASES = ("env_wait", "h2d", "inference", "gae", "update", "logging")


class PhaseTimer:
    """Seconds spent per phase since the last :meth:`read`; one timer per thread (no locking).

    ``phase(name)`` times device work (CUDA events on the current stream on CUDA, wall clock on
    CPU); ``phase(name, host=True)`` always times the wall clock (the host waiting for EnvPool).
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False) -> Iterator[None]:
        if self.cuda and not host:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.host[name] += time.perf_counter() - t0

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read, and reset.

        On CUDA this waits for the last recorded event of each phase: call it at log time only,
        where the trainer already synchronises.
        """
        out = dict(self.host)
        for name, pairs in self.events.items():
            if pairs:
                pairs[-1][1].synchronize()  # events of one phase are in stream order
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        self.host = defaultdict(float)
        self.events = defaultdict(list)
        return out


class _Autocast(nn.Module):
    """policy(obs) under bf16 autocast; logits and values come back in float32 for the loss."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(obs.device.type, dtype=torch.bfloat16):
            logits, value = self.policy(obs)
        return logits.float(), value.float()


def learner_forward(policy: nn.Module, bf16: bool = False, compile: bool = False) -> nn.Module:
    """The module the update calls: policy, in bf16 autocast and/or compiled. Same parameters."""
    forward = _Autocast(policy) if bf16 else policy
    if compile:
        forward = torch.compile(forward)
    return forward


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst <- src in place (parameter addresses are kept, so a captured CUDA graph stays valid)."""
    torch._foreach_copy_(list(dst.parameters()), list(src.parameters()))
    for b_dst, b_src in zip(dst.buffers(), src.buffers(), strict=True):
        b_dst.copy_(b_src)
