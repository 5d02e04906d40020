"""Speed options of the acting and learning paths, and per-phase timing.

* :class:`PhaseTimer` times the phases of an iteration (env wait, host-to-device, inference, GAE,
  update, logging). On CUDA a device phase records a pair of CUDA events on the current stream
  (no host sync); the events are read in :meth:`PhaseTimer.read`, which the trainer calls once per
  iteration at log time, right after the log line's own sync. Host phases (waiting for EnvPool,
  writing the log) and everything on CPU use ``time.perf_counter``.
* :func:`learner_forward` wraps the policy for the update: bf16 autocast (``--bf16``) and
  ``torch.compile`` (``--compile``). The wrapper shares the policy's parameters; checkpoints and the
  optimizer use the policy itself.
* :class:`Actor` is the acting path: Gumbel-max sampling (``policy.act``) on the learner, or on a
  frozen copy of its weights with ``--overlap``, optionally captured in a CUDA graph per batch size
  (``--cudagraphs``).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

from fastppo.policy import act

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


class Actor:
    """Chooses actions for a batch of observations: (action, log-prob, value, logits), no gradients.

    ``policy`` is the module that acts: the learner itself (on-policy) or a frozen copy of its
    weights (``--overlap``). ``forward`` (default: policy) is the callable that evaluates it, e.g.
    :func:`learner_forward`'s bf16/compiled wrapper. With ``cudagraphs`` (CUDA only) the sampling
    step for each batch size in ``graph_batch_sizes`` is captured once in a CUDA graph and replayed
    afterwards: one launch instead of ~20. The graph reads the weights at fixed addresses, so they
    must be updated in place (``copy_weights`` or the optimizer, never by reassigning parameters).
    The graph's uniforms are a static input that each call fills before the replay, outside the
    graph, with the same ``torch.rand`` call and ``generator`` as the eager path: a graphed step
    draws exactly what the eager one would, and capturing draws nothing, so the random streams
    (and an exact resume, and the overlap thread's own generator) are the same with or without
    ``cudagraphs``.
    """

    def __init__(
        self,
        policy: nn.Module,
        forward: nn.Module | None = None,
        generator: torch.Generator | None = None,
        cudagraphs: bool = False,
        graph_batch_sizes: tuple[int, ...] = (),
    ):
        self.policy = policy
        self.forward = forward if forward is not None else policy
        self.generator = generator
        self.cudagraphs = cudagraphs
        self.graph_batch_sizes = set(graph_batch_sizes)
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}

    def __call__(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs (B, ...) -> action (B,) int64, log-prob (B,), value (B,), logits (B, A).

        Graphed outputs are static buffers, overwritten by the next call of the same batch size:
        copy them (into the rollout) before calling again, as the collectors do.
        """
        if self.cudagraphs and obs.is_cuda and obs.shape[0] in self.graph_batch_sizes:
            static_obs, static_u, graph, outputs = self.graphs.get(obs.shape[0]) or self._capture(obs)
            static_obs.copy_(obs)
            torch.rand(static_u.shape, device=static_u.device, generator=self.generator, out=static_u)
            graph.replay()
            return outputs
        return act(self.forward, obs, self.generator)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(obs) (B,) float32, no gradients."""
        with torch.no_grad():
            return self.forward(obs)[1].float()

    def _capture(self, obs: torch.Tensor):
        static_obs = obs.clone()
        side = torch.cuda.Stream(obs.device)
        side.wait_stream(torch.cuda.current_stream(obs.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS/cuDNN workspaces, compile)
            # the first draws from a throwaway generator, so that capturing leaves the real ones alone
            logits = act(self.forward, static_obs, torch.Generator(obs.device))[3]
            static_u = torch.full_like(logits, 0.5)
            for _ in range(2):
                act(self.forward, static_obs, uniform=static_u)
        torch.cuda.current_stream(obs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = act(self.forward, static_obs, uniform=static_u)
        self.graphs[obs.shape[0]] = (static_obs, static_u, graph, outputs)
        return self.graphs[obs.shape[0]]

