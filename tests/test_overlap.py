"""--overlap: rollout k+1 is collected by a frozen copy of the weights while the learner updates on
rollout k; the stored behaviour log-probs are the acting copy's, and the update's ratio uses them."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics, subprocess_env, wait_for_lines

from fastppo import kernels
from fastppo.advantage import compute_advantages
from fastppo.cli import main
from fastppo.config import Config, resolve
from fastppo.envs import env_info, make_envs
from fastppo.perf import copy_weights
from fastppo.policy import Actor, make_policy
from fastppo.rollout import AsyncCollector, BackgroundCollection, Collector
from fastppo.trainer import update

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def logprobs_under(policy: torch.nn.Module, buf) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = policy(buf.obs.flatten(0, 1))
    return F.log_softmax(logits, -1).gather(-1, buf.actions.reshape(-1, 1)).view_as(buf.logprobs)


@pytest.mark.parametrize("async_envs", [False, True], ids=["sync", "async"])
def test_overlap_records_behaviour_logprobs_and_the_ratio_uses_them(async_envs):
    info = env_info("CartPole-v1")
    cfg = resolve(Config(env_id="CartPole-v1", num_envs=4, num_steps=32, device="cpu", learning_rate=0.05), info)
    envs = make_envs(info, 4, 0, batch_size=2 if async_envs else None)
    torch.manual_seed(0)
    policy = make_policy(info)
    behaviour = copy.deepcopy(policy).requires_grad_(False)
    actor = Actor(behaviour)
    device = torch.device("cpu")
    collector = AsyncCollector(envs, info, device, 4, 2) if async_envs else Collector(envs, info, device)
    bufs = collector.allocate(cfg.num_steps, 2)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
    ops = kernels.select("torch", device)
    background = BackgroundCollection(collector, device)

    collector.collect(actor, bufs[0])
    theta_before = copy.deepcopy(policy)
    background.start(actor, bufs[1])  # rollout 2 by theta' while the learner updates on rollout 1
    compute_advantages(bufs[0], ops.gae, cfg.gamma, cfg.gae_lambda)
    update(policy, optimizer, bufs[0], cfg, ops, 0.0)
    background.wait()

    # rollout 2's behaviour log-probs, values and logits are theta' = the weights before the update...
    torch.testing.assert_close(bufs[1].logprobs, logprobs_under(theta_before, bufs[1]))
    with torch.no_grad():
        logits, values = theta_before(bufs[1].obs.flatten(0, 1))
    torch.testing.assert_close(bufs[1].values[:-1], values.view(32, 4))
    torch.testing.assert_close(bufs[1].dist, logits.view(32, 4, -1))
    # ... not the learner's, which has moved on
    assert (bufs[1].logprobs - logprobs_under(policy, bufs[1])).abs().max() > 1e-3

    # the update on rollout 2 feeds exactly those stored log-probs to the loss as log pi_old
    seen = []

    def ppo_loss(logits, actions, old_logp, *args, **kwargs):
        seen.append(old_logp.detach().clone())
        return ops.ppo_loss(logits, actions, old_logp, *args, **kwargs)

    compute_advantages(bufs[1], ops.gae, cfg.gamma, cfg.gae_lambda)
    update(policy, optimizer, bufs[1], cfg, ops._replace(ppo_loss=ppo_loss), 0.0)
    first_epoch = torch.cat(seen[: cfg.num_minibatches]).sort().values
    torch.testing.assert_close(first_epoch, bufs[1].logprobs.reshape(-1).sort().values)

    copy_weights(behaviour, policy)  # theta' <- theta, in place
    for a, b in zip(behaviour.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    envs.close()


def test_overlap_collection_error_reaches_the_trainer():
    class Broken:
        def collect(self, actor, buf):
            raise ValueError("env crashed")

    background = BackgroundCollection(Broken(), torch.device("cpu"))
    background.start(None, None)
    with pytest.raises(ValueError, match="env crashed"):
        background.wait()


@pytest.mark.slow
def test_cartpole_learns_to_450_with_overlap(tmp_path, capsys):
    """Seed 3 reaches 450 at 53,760 steps (README: seeds 1 and 2 at 172k and 119k), keeping this short."""
    run_dir = tmp_path / "overlap"
    code = main(["train", "--env-id", "CartPole-v1", "--total-timesteps", "500000", "--device", "cpu", "--seed", "3",
                 "--run-dir", str(run_dir), "--target-return", "450", "--overlap"])
    assert code == 0
    assert "target return 450.0 reached" in capsys.readouterr().out
    metrics = read_metrics(run_dir)
    assert metrics[-1]["global_step"] < 500_000
    assert all(m["perf/update"] > 0 for m in metrics)


def test_cudagraphs_on_cpu_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--cudagraphs", "True",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err == "fastppo: error: --cudagraphs needs CUDA; the training device is cpu\n"
    assert not (tmp_path / "r").exists()


def test_env_batch_size_needs_async(tmp_path, capsys):
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--env-batch-size", "2",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert "--env-batch-size needs --async-envs" in capsys.readouterr().err


def test_speed_options_train_on_cpu(tmp_path):
    """--async-envs --overlap --bf16 together, a few iterations: perf/* logged every iteration."""
    run_dir = tmp_path / "r"
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--total-timesteps", "1024", "--num-envs",
                 "4", "--num-steps", "64", "--async-envs", "--overlap", "--bf16", "--run-dir", str(run_dir)])
    assert code == 0
    metrics = read_metrics(run_dir)
    assert len(metrics) == 4
    for m in metrics:
        assert m["perf/iteration"] > 0 and m["perf/update"] > 0
        assert set(k for k in m if k.startswith("perf/")) >= {
            "perf/env_wait", "perf/h2d", "perf/inference", "perf/gae", "perf/update", "perf/logging", "perf/iteration"}


@pytest.mark.slow
def test_compile_trains_on_cpu(tmp_path):
    """--compile (torch.compile of the forward, acting and update) runs; compilation takes most of it."""
    run_dir = tmp_path / "r"
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cpu", "--total-timesteps", "64", "--num-envs", "2",
                 "--num-steps", "16", "--num-minibatches", "2", "--compile", "--run-dir", str(run_dir)])
    assert code == 0
    assert len(read_metrics(run_dir)) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_on_cuda_stream(tmp_path):
    """--overlap on CUDA (collection on its own stream) with --async-envs and --cudagraphs."""
    run_dir = tmp_path / "r"
    code = main(["train", "--env-id", "CartPole-v1", "--device", "cuda", "--total-timesteps", "4096", "--num-envs",
                 "8", "--num-steps", "64", "--async-envs", "--overlap", "--cudagraphs", "True",
                 "--run-dir", str(run_dir)])
    assert code == 0
    assert len(read_metrics(run_dir)) == 8


@pytest.mark.slow
def test_interrupted_async_overlap_run_resumes_and_learns_to_450(tmp_path, capsys):
    """SIGTERM an --async-envs --overlap run partway (here: a --max-seconds-like stop through a signal after
    iteration 40), resume it (weights, optimizer, counters, LR, RNG and recent returns restored; the envs
    restart on fresh seeds), and it reaches a 10-game mean of 450 within the 500k-step budget."""
    run_dir = tmp_path / "r"
    args = ["--async-envs", "--overlap", "--seed", "3", "--total-timesteps", "500000", "--target-return", "450"]
    proc = subprocess.Popen([sys.executable, "-m", "fastppo", "train", "--env-id", "CartPole-v1", "--device", "cpu",
                             "--run-dir", str(run_dir), *args], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(run_dir / "metrics.jsonl", 40, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.communicate(timeout=120)[0] is None and proc.returncode == 128 + signal.SIGTERM
    stopped_at = len(read_metrics(run_dir))
    assert read_metrics(run_dir)[-1]["charts/recent_return"] < 450, "stopped too late to show the resume learning"
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "target return 450.0 reached" in capsys.readouterr().out
    metrics = read_metrics(run_dir)
    assert len(metrics) > stopped_at and metrics[-1]["global_step"] < 500_000
    assert [m["global_step"] for m in metrics] == [512 * i for i in range(1, len(metrics) + 1)]


@pytest.mark.parametrize("async_envs,overlap", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["sync", "async", "sync-overlap", "async-overlap"])
def test_every_collection_is_one_interface(async_envs, overlap):
    """The loop sees one interface whatever the mode: next() -> a filled Rollout of T steps (with its
    games), refresh(policy) after the update, state() for the checkpoint (an action log only where a
    resume replays it: sync and not overlapped), close()."""
    from fastppo.perf import PhaseTimer
    from fastppo.rollout import Rollout, make_collection

    info = env_info("CartPole-v1")
    cfg = resolve(Config(env_id="CartPole-v1", num_envs=4, num_steps=8, device="cpu", async_envs=async_envs,
                         overlap=overlap), info)
    device = torch.device("cpu")
    envs = make_envs(info, 4, 0, batch_size=cfg.recv_batch_size if async_envs else None)
    policy = make_policy(info)
    collection = make_collection(cfg, envs, info, device, policy, policy, PhaseTimer(device), rollouts=3, seed=1)
    try:
        for _ in range(3):
            buf = collection.next()
            assert isinstance(buf, Rollout) and buf.num_steps == 8 and buf.games is not None
            assert buf.valid.any() and torch.isfinite(buf.values).all()
            collection.refresh(policy)
        state = collection.state()
        replayable = not (async_envs or overlap)
        assert (state["actions"] is not None) == replayable
        if replayable:
            assert state["actions"].shape == (3 * 8, 4)
        assert ("acting_rng" in state) == overlap
    finally:
        collection.close()
