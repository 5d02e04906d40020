"""The CUDA path's set-up, checked on a machine without CUDA.

torch's own argument checks for CUDA calls run before any device is touched, so a fake ``torch.cuda``
whose calls go through those checks catches, on CPU, the class of bug that crashed the first GPU run:
``torch.cuda.set_device(torch.device("cuda"))`` in the --overlap thread raised ``ValueError: Expected a
torch.device with a specified index``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.cuda._utils import _get_device_index

from fastppo import distributed
from fastppo.config import Config, training_device
from fastppo.distributed import World
from fastppo.rollout import BackgroundCollection


class FakeStream:
    """Stands in for torch.cuda.Stream: checks its device as torch does, records nothing."""

    def __init__(self, device=None, priority: int = 0):
        self.index = _get_device_index(device, optional=True)

    def wait_stream(self, other: FakeStream) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA API with one device (index 0) whose calls check their device arguments as torch does.

    set_device needs an index (torch's check, optional=False); streams accept an index-less device
    (optional=True, the current device). Records the devices set, per call.
    """
    calls: list[int] = []

    def set_device(device) -> None:
        calls.append(_get_device_index(device))  # raises for torch.device("cuda"), as the real call does

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return calls


class NoCollector:
    """A collector whose rollout is empty: what is tested is the thread's CUDA set-up around it."""

    def __init__(self):
        self.collected = 0

    def collect(self, actor, buf) -> None:
        self.collected += 1


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_the_training_device_has_its_index(fake_cuda, name):
    device = distributed.rank_device(training_device(Config(device=name)), World())
    assert device == torch.device("cuda", 0) and device.index == 0


def test_overlap_thread_sets_the_indexed_training_device(fake_cuda):
    """The --overlap thread's torch.cuda.set_device gets the device the trainer resolved (it failed on the
    first GPU run, where that device was torch.device("cuda"))."""
    device = distributed.rank_device(training_device(Config(device="cuda")), World())
    collector = NoCollector()
    background = BackgroundCollection(collector, device)
    for _ in range(2):
        background.start(actor=None, buf=None)
        background.wait()
    assert collector.collected == 2 and fake_cuda == [0, 0]


def test_an_index_less_cuda_device_is_refused_before_any_thread(fake_cuda):
    with pytest.raises(ValueError, match="with its index"):
        BackgroundCollection(NoCollector(), torch.device("cuda"))


def test_a_device_env_collection_stays_on_the_callers_stream(fake_cuda):
    """Envs on the device replace their state tensors every step: their --overlap thread keeps the trainer's stream
    (no stream of its own, where the allocator could hand a freed tensor to the update too early), on the right
    device."""
    collector = NoCollector()
    collector.on_device = True
    background = BackgroundCollection(collector, torch.device("cuda", 0))
    assert background.stream is None
    background.start(actor=None, buf=None)
    background.wait()
    assert collector.collected == 1 and fake_cuda == [0]
