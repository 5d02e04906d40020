"""Benchmark fastppo's Triton kernels against the eager torch reference and torch.compile(reference).

    python bench/bench_kernels.py                 # CUDA: full table, JSON under bench/results/
    python bench/bench_kernels.py --smoke         # tiny shapes; without CUDA, under the Triton interpreter

Rows (median microseconds, triton.testing.do_bench):
  gae            T=128, N=M/128 and T=128, N=4096: impl loop, impl scan, torch, torch.compile
  ppo_loss       M in {256, 1024, 8192, 32768, 131072} x A in {6, 18}: forward, backward, both
  gae_ppo_loss   T=128, n=M/128 x A in {6, 18}: the fused op against reference.gae_ppo_loss
  gaussian_ppo_loss  M as ppo_loss x D in {6, 17} action dims, a state-independent (1, D) log-std
                 materialised to (M, D) as the trainer's policy does (CleanRL's continuous policy):
                 forward, backward, both
The losses get the behaviour policy's logits (mean and log-std) for the exact KL, as in training.

Triton's loss "forward" already computes the gradients (its backward is a scale by grad_output),
so the column to compare across providers is "both". GB/s is the op's minimum traffic (the bytes
model in each kernel module's docstring) over the time of "both" (or of the call for gae), and
%copy compares it with a device-to-device copy measured in the same run. The timings need CUDA;
--smoke only checks that every row runs (CPU times under the interpreter mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = (256, 1024, 8192, 32768, 131072)
ACTIONS = (6, 18)
ACTION_DIMS = (6, 17)  # continuous actions: e.g. HalfCheetah and Humanoid
T_GAE = 128
CLIP = dict(clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of fn: do_bench on CUDA; one wall-clock call in smoke mode on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=25 if smoke else 100, rep=50 if smoke else 300,
                                                        return_mode="median")

    def wall(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)

    return wall


def copy_gbps(device: torch.device, bench: Callable, smoke: bool) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time)."""
    n = (1 << 20) if smoke else (1 << 28)  # 4 MiB or 1 GiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def loss_inputs(M: int, A: int, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    logits = torch.randn(M, A, device=device, requires_grad=True)
    values = torch.randn(M, device=device, requires_grad=True)
    actions = torch.randint(0, A, (M,), device=device)
    old_logp = torch.log_softmax(logits.detach(), -1).gather(-1, actions[:, None])[:, 0] + 0.1 * torch.randn(
        M, device=device)
    rest = [torch.randn(M, device=device) for _ in range(3)]  # advantages, old_values, returns
    args = [logits, actions, old_logp, rest[0], values, rest[1], rest[2]]
    old_logits = logits.detach() + 0.1 * torch.randn(M, A, device=device)  # the trainer always passes them (exact KL)
    return args, dict(CLIP, mask=torch.rand(M, device=device) < 0.9, old_logits=old_logits)


def fused_inputs(T: int, n: int, A: int, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    logits = torch.randn(T, n, A, device=device, requires_grad=True)
    values = torch.randn(T + 1, n, device=device, requires_grad=True)
    actions = torch.randint(0, A, (T, n), device=device)
    old_logp = torch.log_softmax(logits.detach(), -1).gather(-1, actions[..., None])[..., 0]
    flags = [torch.rand(T, n, device=device) < 0.01 for _ in range(2)]
    args = [logits, actions, old_logp, values, torch.randn(T, n, device=device), torch.randn(T, n, device=device),
            *flags]
    old_logits = logits.detach() + 0.1 * torch.randn(T, n, A, device=device)
    return args, dict(CLIP, gamma=0.99, gae_lambda=0.95, mask=torch.rand(T, n, device=device) < 0.9,
                      old_logits=old_logits)


def gaussian_inputs(M: int, D: int, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """mean (M, D) and a shared log-std parameter (1, D) (see shared_log_std), both requiring grad; the
    behaviour policy's mean and log-std (M, D), which the trainer always passes (exact KL)."""
    from fastppo.kernels import reference

    mean = torch.randn(M, D, device=device, requires_grad=True)
    log_std = torch.full((1, D), -0.5, device=device, requires_grad=True)
    values = torch.randn(M, device=device, requires_grad=True)
    actions = mean.detach() + log_std.detach().exp() * torch.randn(M, D, device=device)
    old_logp = reference.gaussian_log_prob(mean.detach(), log_std.detach(), actions) + 0.1 * torch.randn(
        M, device=device)
    rest = [torch.randn(M, device=device) for _ in range(3)]  # advantages, old_values, returns
    args = [mean, log_std, actions, old_logp, rest[0], values, rest[1], rest[2]]
    old_mean = mean.detach() + 0.1 * torch.randn(M, D, device=device)
    old_log_std = log_std.detach().expand(M, D).contiguous()
    return args, dict(CLIP, mask=torch.rand(M, device=device) < 0.9, old_mean=old_mean, old_log_std=old_log_std)


def shared_log_std(fn: Callable) -> Callable:
    """fn with its log_std argument given as the (1, D) parameter, materialised to (M, D) inside, as the
    trainer's Gaussian policy hands it over (so the timed backward includes autograd's sum of the
    per-sample log-std gradient)."""
    return lambda mean, log_std, *rest, **kw: fn(mean, log_std.expand_as(mean).contiguous(), *rest, **kw)


def gaussian_loss_bytes(M: int, D: int, esize: int = 4) -> int:
    """mean, log_std, actions, old_mean and old_log_std read, dmean and dlog_std written (M, D); the 5
    float vectors + mask read, dvalues written (gaussian_loss.py's model; the materialised log-std's
    copy and autograd's sum of dlog_std over the samples are not counted)."""
    return M * D * esize * 7 + M * (4 * 5 + 1) + M * 4


def loss_bytes(M: int, A: int, esize: int = 4) -> int:
    """dlogits and dvalues written, logits, old logits and 6 vectors (int64 actions) + mask read."""
    return M * A * esize * 3 + M * (8 + 4 * 5 + 1) + M * 4


def gae_bytes(T: int, N: int) -> int:
    return T * N * 18 + N * 4


def fused_bytes(T: int, n: int, A: int) -> int:
    """loss_bytes without the returns read, plus GAE's reads (r, flags) and its A write + re-read."""
    return loss_bytes(T * n, A) - T * n * 4 + T * n * (4 + 1 + 1 + 4 + 4) + n * 4


def fwd_bwd_rows(op: str, shape: str, providers: dict[str, Callable], args: list, kw: dict, bench: Callable,
                 nbytes: int, copy: float) -> list[dict]:
    """forward, backward (retain_graph) and both, per provider, for a loss; the gradients are taken
    w.r.t. every argument that requires grad (logits or mean and log-std, and values)."""
    rows = []
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, fn in providers.items():
        fwd = bench(lambda fn=fn: fn(*args, **kw))
        loss, _ = fn(*args, **kw)
        bwd = bench(lambda loss=loss: torch.autograd.grad(loss, leaves, retain_graph=True))
        both = bench(lambda fn=fn: torch.autograd.grad(fn(*args, **kw)[0], leaves))
        gbps = nbytes / (both * 1e-6) / 1e9
        rows.append(dict(op=op, shape=shape, provider=name, fwd_us=fwd, bwd_us=bwd, both_us=both, gbps=gbps,
                         pct_copy=100 * gbps / copy))
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under the interpreter")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the JSON result")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("bench_kernels: needs CUDA for meaningful timings (no GPU here); "
                     "--smoke runs a tiny check on CPU under the Triton interpreter")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import triton

    from fastppo.kernels import gae as gae_mod
    from fastppo.kernels import gae_loss as gae_loss_mod
    from fastppo.kernels import gaussian_loss as gaussian_loss_mod
    from fastppo.kernels import loss as loss_mod
    from fastppo.kernels import reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not gae_mod.INTERPRETED:
        sys.exit("bench_kernels --smoke on CPU: the kernels were imported without TRITON_INTERPRET=1")
    bench = timer(args.smoke)
    sizes, actions, gae_shapes = SIZES, ACTIONS, [(T_GAE, M // T_GAE) for M in SIZES] + [(T_GAE, 4096)]
    action_dims = ACTION_DIMS
    if args.smoke:
        sizes, actions, gae_shapes, action_dims = (256,), (6,), [(8, 4)], (6,)
    # torch.compile on CPU builds C++ for ~20 s a variant: left out of the CPU smoke run.
    compile_ok = device.type == "cuda"
    compiled = {}
    if compile_ok:
        compiled = dict(gae=torch.compile(reference.gae), ppo_loss=torch.compile(reference.ppo_loss),
                        gae_ppo_loss=torch.compile(reference.gae_ppo_loss),
                        gaussian_ppo_loss=torch.compile(shared_log_std(reference.gaussian_ppo_loss)))
    copy = copy_gbps(device, bench, args.smoke)
    rows: list[dict] = []

    gae_providers: dict[str, Callable] = {
        f"triton-{impl}": (lambda *a, impl=impl: gae_mod.gae(*a, impl=impl)) for impl in gae_mod.IMPLS}
    gae_providers["torch"] = reference.gae
    if compile_ok:
        gae_providers["torch.compile"] = compiled["gae"]
    for T, N in gae_shapes:
        gae_args = (torch.randn(T, N, device=device), torch.randn(T + 1, N, device=device),
                    torch.rand(T, N, device=device) < 0.01, torch.rand(T, N, device=device) < 0.01, 0.99, 0.95)
        for name, fn in gae_providers.items():
            us = bench(lambda fn=fn, gae_args=gae_args: fn(*gae_args))
            gbps = gae_bytes(T, N) / (us * 1e-6) / 1e9
            rows.append(dict(op="gae", shape=f"T={T} N={N}", provider=name, fwd_us=us, bwd_us=None, both_us=us,
                             gbps=gbps, pct_copy=100 * gbps / copy))

    for M in sizes:
        for A in actions:
            largs, lkw = loss_inputs(M, A, device)
            providers = {"triton": loss_mod.ppo_loss, "torch": reference.ppo_loss}
            if compile_ok:
                providers["torch.compile"] = compiled["ppo_loss"]
            rows += fwd_bwd_rows("ppo_loss", f"M={M} A={A}", providers, largs, lkw, bench, loss_bytes(M, A), copy)
            n = max(1, M // T_GAE) if not args.smoke else 4
            T = M // n
            fargs, fkw = fused_inputs(T, n, A, device)
            providers = {"triton": gae_loss_mod.gae_ppo_loss, "torch": reference.gae_ppo_loss}
            if compile_ok:
                providers["torch.compile"] = compiled["gae_ppo_loss"]
            rows += fwd_bwd_rows("gae_ppo_loss", f"T={T} n={n} A={A}", providers, fargs, fkw, bench,
                                 fused_bytes(T, n, A), copy)
        for D in action_dims:
            gargs, gkw = gaussian_inputs(M, D, device)
            providers = {"triton": shared_log_std(gaussian_loss_mod.gaussian_ppo_loss),
                         "torch": shared_log_std(reference.gaussian_ppo_loss)}
            if compile_ok:
                providers["torch.compile"] = compiled["gaussian_ppo_loss"]
            rows += fwd_bwd_rows("gaussian_ppo_loss", f"M={M} D={D}", providers, gargs, gkw, bench,
                                 gaussian_loss_bytes(M, D), copy)

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter; times meaningless)"
    result = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), smoke=args.smoke,
                  copy_gbps=copy, rows=rows)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | commit {result['commit']} | "
          f"copy {copy:.0f} GB/s")
    header = (f"{'op':<17} {'shape':<20} {'provider':<14} {'fwd us':>9} {'bwd us':>9} {'both us':>9} "
              f"{'GB/s':>8} {'%copy':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['op']:<17} {row['shape']:<20} {row['provider']:<14} {fmt(row['fwd_us']):>9} "
              f"{fmt(row['bwd_us']):>9} {fmt(row['both_us']):>9} {row['gbps']:>8.1f} {row['pct_copy']:>6.1f}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in gpu.split(" (")[0]).strip("-").lower()
    stamp = result["date"].replace(":", "").replace("-", "")
    path = out_dir / f"kernels-{slug}{'-smoke' if args.smoke else ''}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
