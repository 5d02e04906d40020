"""Generalised advantage estimation in one Triton launch.

Math (per env column n, reverse over time t, as ``reference.gae``):

    delta_t = r_t + gamma * (1 - term_t) * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * (1 - cut_t) * A_{t+1},   cut_t = term_t or trunc_t,  A_T = 0
    R_t     = A_t + V_t

The recurrence is affine, A_t = b_t + a_t * A_{t+1} with a_t = gamma * lambda * (1 - cut_t) and
b_t = delta_t, so it can be run two ways, both parallel over columns (one program per BLOCK_N envs):

* ``impl="loop"``: each program walks t = T-1 .. 0 carrying A_{t+1} and V_{t+1} in registers.
* ``impl="scan"``: each program loads a [BLOCK_T, BLOCK_N] tile and composes the affine maps with
  ``tl.associative_scan(reverse=True)``; (a1, b1) then (a2, b2) compose to (a1 a2, b1 + a1 b2).
  Composition is not commutative and the operand order a backend passes under ``reverse=True`` is
  not something to lean on (the interpreter passes (later, earlier); triton-lang/triton#4362 reports
  GPU reverse scans mis-ordering non-commutative combines), so every element carries its time index
  and the combine picks the earlier operand by it: the result is the same whichever order it gets.
  T longer than BLOCK_T is handled in chunks from the end, carrying A at the chunk's first row.

Which one is faster is a GPU question (the loop has T dependent steps of tiny loads, the scan loads
whole tiles but does log(BLOCK_T) combine rounds); ``bench/bench_kernels.py`` measures both. The
default is "loop" until that benchmark has been run on a GPU.

Bytes moved per (t, env), fp32 values and rewards, bool flags: read r (4) + V (4, plus one bootstrap
row) + term (1) + trunc (1), write A (4) + R (4) = 18 B. Nothing is re-read, so the kernel is
bandwidth-bound at T * N * 18 B.

Not differentiable: advantages and returns are constants for the PPO gradient, so the op has no
autograd formula and its inputs are detached.

This module also holds the small pieces the loss kernels share: the (count, mean, M2) merge used for
the advantage statistics, the output allocator with its NaN-poison test hook, and the helper that
registers a launcher as a torch op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Test hook: when True every buffer a kernel is meant to fill is allocated full of NaN, so an element
# a kernel forgets to write fails the test instead of passing with whatever memory held.
POISON_OUTPUTS = False

_FLAG_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is set (tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def register_op(name: str, fn: Callable, fake: Callable) -> Callable:
    """Register fn as the torch op ``fastppo::name`` that autograd and torch.compile understand.

    Compiled Triton: ``torch.library.triton_op`` (the body calls its kernels through ``wrap_triton``,
    so Inductor sees and can fuse around them). Under TRITON_INTERPRET=1 the kernels are
    InterpretedFunction objects that ``wrap_triton`` cannot trace, so the op is an opaque
    ``torch.library.custom_op`` with an explicit fake (shape) implementation instead.
    """
    if INTERPRETED:
        op = torch.library.custom_op(f"fastppo::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(f"fastppo::{name}", fn, mutates_args=())


def wrap(kernel: Callable) -> Callable:
    """The launchable form of a kernel inside an op body (wrap_triton when compiled)."""
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


# ----------------------------------------------------------------------------------------------
# Shared statistics helpers: (count, mean, M2 = sum of squared deviations) triples.
# ----------------------------------------------------------------------------------------------


@triton.jit
def merge_stats(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two (count, mean, M2) triples, elementwise.

    Merging a single value x (n_b=1, m2_b=0) into an empty triple gives mean exactly x, and merging
    a value equal to the mean leaves it unchanged, so constant data keeps M2 exactly 0.
    """
    n = n_a + n_b
    delta = mean_b - mean_a
    w = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def reduce_stats(n, mean, m2, AXIS: tl.constexpr):
    """Combine (count, mean, M2) triples along AXIS into one.

    The sum is shifted by the largest valid mean, so triples that all share one mean combine to
    exactly that mean and M2 = 0: zero-variance advantages normalise to exactly 0, not rounding noise
    divided by 1e-8. Triples with count 0 are ignored (their mean may be anything finite).
    """
    valid = n > 0
    n_tot = tl.sum(n, axis=AXIS)
    k = tl.max(tl.where(valid, mean, -float("inf")), axis=AXIS)
    k = tl.where(n_tot > 0, k, 0.0)
    kk = tl.expand_dims(k, AXIS)
    mean_tot = k + tl.sum(tl.where(valid, n * (mean - kk), 0.0), axis=AXIS) / tl.maximum(n_tot, 1.0)
    d = mean - tl.expand_dims(mean_tot, AXIS)
    m2_tot = tl.sum(tl.where(valid, m2 + n * d * d, 0.0), axis=AXIS)
    return n_tot, mean_tot, m2_tot


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gae_loop_kernel(
    rew_ptr, val_ptr, term_ptr, trunc_ptr, mask_ptr,  # inputs (T, N), values (T + 1, N)
    adv_ptr, ret_ptr, stats_ptr,  # outputs: (T, N) contiguous, (T, N) contiguous, (programs, 3)
    T, N,
    stride_rt, stride_rn, stride_vt, stride_vn, stride_tt, stride_tn, stride_ct, stride_cn,
    stride_mt, stride_mn,
    gamma, gae_lambda,
    BLOCK_N: tl.constexpr,
    STORE_RET: tl.constexpr,  # write returns (the fused loss recomputes them from A + V)
    STATS: tl.constexpr,  # write this block's (count, mean, M2) of A over the valid entries
    HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    lastgaelam = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_next = tl.load(val_ptr + T * stride_vt + cols * stride_vn, mask=cmask, other=0.0).to(tl.float32)
    n_l = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-lane running (count, mean, M2) of A
    mean_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        r = tl.load(rew_ptr + t * stride_rt + cols * stride_rn, mask=cmask, other=0.0).to(tl.float32)
        v = tl.load(val_ptr + t * stride_vt + cols * stride_vn, mask=cmask, other=0.0).to(tl.float32)
        term = tl.load(term_ptr + t * stride_tt + cols * stride_tn, mask=cmask, other=0) != 0
        trunc = tl.load(trunc_ptr + t * stride_ct + cols * stride_cn, mask=cmask, other=0) != 0
        nextnonterminal = tl.where(term, 0.0, 1.0)
        nextnoncut = tl.where(term | trunc, 0.0, 1.0)
        delta = r + gamma * nextnonterminal * v_next - v
        lastgaelam = delta + gamma * gae_lambda * nextnoncut * lastgaelam
        tl.store(adv_ptr + t * N + cols, lastgaelam, mask=cmask)
        if STORE_RET:
            tl.store(ret_ptr + t * N + cols, lastgaelam + v, mask=cmask)
        if STATS:
            valid = cmask
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + t * stride_mt + cols * stride_mn, mask=cmask, other=0) != 0)
            n_l, mean_l, m2_l = merge_stats(n_l, mean_l, m2_l, tl.where(valid, 1.0, 0.0),
                                            tl.where(valid, lastgaelam, 0.0), 0.0)
        v_next = v
    if STATS:
        n_b, mean_b, m2_b = reduce_stats(n_l, mean_l, m2_l, 0)
        tl.store(stats_ptr + pid * 3, n_b)
        tl.store(stats_ptr + pid * 3 + 1, mean_b)
        tl.store(stats_ptr + pid * 3 + 2, m2_b)


@triton.jit
def _affine_combine(t1, a1, b1, t2, a2, b2):
    """Compose x -> b + a x of two adjacent time segments; the one with the smaller tag is earlier.

    earlier(later(x)) = b_e + a_e (b_l + a_l x): (a, b) = (a_e a_l, b_e + a_e b_l), tag = min.
    """
    first_is_earlier = t1 < t2
    a_e = tl.where(first_is_earlier, a1, a2)
    b_e = tl.where(first_is_earlier, b1, b2)
    b_l = tl.where(first_is_earlier, b2, b1)
    return tl.minimum(t1, t2), a1 * a2, b_e + a_e * b_l


@triton.jit
def _gae_scan_kernel(
    rew_ptr, val_ptr, term_ptr, trunc_ptr, mask_ptr,
    adv_ptr, ret_ptr, stats_ptr,
    T, N,
    stride_rt, stride_rn, stride_vt, stride_vn, stride_tt, stride_tn, stride_ct, stride_cn,
    stride_mt, stride_mn,
    gamma, gae_lambda,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_RET: tl.constexpr,
    STATS: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)  # A at the first row of the chunk after this one
    n_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    mean_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(n_chunks):
        t0 = (n_chunks - 1 - c) * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        m2d = (rows < T)[:, None] & cmask[None, :]  # (BLOCK_T, BLOCK_N)
        r = tl.load(rew_ptr + rows[:, None] * stride_rt + cols[None, :] * stride_rn, mask=m2d, other=0.0)
        v = tl.load(val_ptr + rows[:, None] * stride_vt + cols[None, :] * stride_vn, mask=m2d, other=0.0)
        v_next = tl.load(val_ptr + (rows[:, None] + 1) * stride_vt + cols[None, :] * stride_vn,
                         mask=m2d, other=0.0)
        term = tl.load(term_ptr + rows[:, None] * stride_tt + cols[None, :] * stride_tn, mask=m2d, other=0) != 0
        trunc = tl.load(trunc_ptr + rows[:, None] * stride_ct + cols[None, :] * stride_cn, mask=m2d, other=0) != 0
        r = r.to(tl.float32)
        v = v.to(tl.float32)
        nextnonterminal = tl.where(term, 0.0, 1.0)
        delta = r + gamma * nextnonterminal * v_next.to(tl.float32) - v
        a = gamma * gae_lambda * tl.where(term | trunc, 0.0, 1.0)
        # rows past T are the identity map (a, b) = (1, 0)
        a = tl.where(m2d, a, 1.0)
        b = tl.where(m2d, delta, 0.0)
        tag = rows[:, None] + tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int32)
        _, a_s, b_s = tl.associative_scan((tag, a, b), 0, _affine_combine, reverse=True)
        adv = b_s + a_s * carry[None, :]
        out_offs = rows[:, None] * N + cols[None, :]
        tl.store(adv_ptr + out_offs, adv, mask=m2d)
        if STORE_RET:
            tl.store(ret_ptr + out_offs, adv + v, mask=m2d)
        if STATS:
            valid = m2d
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + rows[:, None] * stride_mt + cols[None, :] * stride_mn,
                                         mask=m2d, other=0) != 0)
            n_c, mean_c, m2_c = reduce_stats(tl.where(valid, 1.0, 0.0), tl.where(valid, adv, 0.0),
                                             tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32), 0)
            n_l, mean_l, m2_l = merge_stats(n_l, mean_l, m2_l, n_c, mean_c, m2_c)
        carry = tl.sum(tl.where(rows[:, None] == t0, adv, 0.0), axis=0)
    if STATS:
        n_b, mean_b, m2_b = reduce_stats(n_l, mean_l, m2_l, 0)
        tl.store(stats_ptr + pid * 3, n_b)
        tl.store(stats_ptr + pid * 3 + 1, mean_b)
        tl.store(stats_ptr + pid * 3 + 2, m2_b)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

# TRITON_INTERPRET=1 at import time makes @triton.jit build InterpretedFunction objects; those run on
# CPU tensors but cannot be traced by torch.library.wrap_triton (see register_op).
INTERPRETED = not isinstance(_gae_loop_kernel, triton.runtime.JITFunction)

IMPLS = ("loop", "scan")
DEFAULT_IMPL = "loop"  # until bench/bench_kernels.py has compared the two on a GPU
MAX_STATS_BLOCKS = 256  # the loss kernels load every block's statistics in one vector


def check_gae_inputs(
    rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor
) -> tuple[int, int]:
    """Validate GAE inputs; returns (T, N). Raises ValueError naming the bad value."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D (T, N), got shape {tuple(rewards.shape)}")
    T, N = rewards.shape
    if T == 0 or N == 0:
        raise ValueError(f"rewards must be non-empty, got shape {(T, N)}")
    if values.shape != (T + 1, N):
        raise ValueError(f"values must have shape {(T + 1, N)} (T + 1 rows), got {tuple(values.shape)}")
    for name, x in (("terminated", terminated), ("truncated", truncated)):
        if x.shape != (T, N):
            raise ValueError(f"{name} must have shape {(T, N)}, got {tuple(x.shape)}")
        if x.dtype not in _FLAG_DTYPES:
            raise ValueError(f"{name} must be bool/uint8/int/float, got {x.dtype}")
    if values.dtype != torch.float32:
        raise ValueError(f"values must be float32, got {values.dtype}")
    if rewards.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rewards must be float16/bfloat16/float32, got {rewards.dtype}")
    for name, x in (("values", values), ("terminated", terminated), ("truncated", truncated)):
        if x.device != rewards.device:
            raise ValueError(f"{name} is on {x.device}, rewards on {rewards.device}")
    return T, N


def launch_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    impl: str = DEFAULT_IMPL,
    *,
    store_returns: bool = True,
    mask: torch.Tensor | None = None,
    stats: bool = False,
    block_n: int | None = None,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch one GAE kernel on validated inputs.

    Returns (advantages (T, N) fp32, returns (T, N) fp32 or None, stats (programs, 3) fp32 or None):
    stats holds each column block's (count, mean, M2) of the advantages over the entries where mask
    is true (every entry without a mask); ``gae_loss`` uses it to normalise advantages.
    """
    T, N = rewards.shape
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if block_n is None:
        # enough column blocks to fill the GPU, few enough for one vector load of their stats
        block_n = max(16 if impl == "scan" else 32, triton.next_power_of_2(triton.cdiv(N, MAX_STATS_BLOCKS)))
        block_n = min(block_n, triton.next_power_of_2(N))
    grid = (triton.cdiv(N, block_n),)
    device = rewards.device
    adv = empty_output((T, N), torch.float32, device)
    # An unused output pointer gets its own dummy, never another output: an op's written buffers
    # must not alias (triton_op's mutation analysis works per argument).
    unused = torch.empty(1, dtype=torch.float32, device=device) if not (store_returns and stats) else None
    ret = empty_output((T, N), torch.float32, device) if store_returns else unused
    st = empty_output((grid[0], 3), torch.float32, device) if stats else unused
    # Flags go to the kernels as they are, bool included: Triton loads a bool pointer as bytes compared
    # with 0. A uint8 view of them here would put aten.view.dtype of a bool tensor in the graph that
    # torch.compile hands to Inductor, which cannot lower it up to torch 2.11 (torch.iinfo(torch.bool)).
    m = mask if mask is not None else terminated  # dummy pointer if unused
    args = (rewards, values, terminated, truncated, m, adv, ret, st, T, N,
            rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
            terminated.stride(0), terminated.stride(1), truncated.stride(0), truncated.stride(1),
            m.stride(0), m.stride(1), gamma, gae_lambda)
    flags = dict(STORE_RET=store_returns, STATS=stats, HAS_MASK=mask is not None)
    if impl == "loop":
        wrap(_gae_loop_kernel)[grid](*args, BLOCK_N=block_n, **flags, num_warps=1 if block_n <= 32 else 4)
    else:
        if block_t is None:
            block_t = min(triton.next_power_of_2(T), 128)
        wrap(_gae_scan_kernel)[grid](*args, BLOCK_T=block_t, BLOCK_N=block_n, **flags, num_warps=4)
    return adv, (ret if store_returns else None), (st if stats else None)


# ----------------------------------------------------------------------------------------------
# Op and public function
# ----------------------------------------------------------------------------------------------


def _gae_op(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    adv, ret, _ = launch_gae(rewards, values, terminated, truncated, gamma, gae_lambda, impl)
    return adv, ret


def _gae_fake(rewards, values, terminated, truncated, gamma, gae_lambda, impl):
    return torch.empty_like(values[:-1]), torch.empty_like(values[:-1])


_gae = register_op("gae", _gae_op, _gae_fake)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    *,
    impl: str = DEFAULT_IMPL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``reference.gae``: (advantages, returns), both (T, N) float32.

    Args as ``reference.gae``: rewards (T, N) float16/bfloat16/float32, values (T + 1, N) float32,
    terminated/truncated (T, N) bool/uint8/int/float (nonzero = set). Any strides.
    impl: "loop" (backward loop per column block) or "scan" (tl.associative_scan over time tiles).
    No gradient flows through GAE (its inputs are detached).
    """
    check_gae_inputs(rewards, values, terminated, truncated)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return _gae(rewards.detach(), values.detach(), terminated, truncated, float(gamma), float(gae_lambda), impl)
