"""Envs written in torch that run on the training device (``fastppo.devenv``'s protocol): ``--env-id torch:<name>``.

:class:`CartPole` is Gymnasium's CartPole-v1 (Barto, Sutton and Anderson's cart-pole, Gymnasium's constants,
Euler integration, a 500-step limit as truncation), vectorised over any number of envs with tensor ops: a
step of 4096 envs is the same ~20 elementwise kernels as a step of one, on the GPU and on the CPU alike. It
is the example to copy for an env of your own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import AutoresetMode

# Gymnasium's CartPoleEnv constants
GRAVITY, MASS_CART, MASS_POLE, HALF_LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = MASS_CART + MASS_POLE
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
THETA_LIMIT, X_LIMIT = 12 * 2 * math.pi / 360, 2.4


class CartPole:
    """num_envs CartPole-v1 envs on `device`, stepped together (NEXT_STEP autoreset, as EnvPool's and Gymnasium's).

    The state is float64 (as Gymnasium's numpy state, so trajectories match Gymnasium's to rounding), the
    observation float32. Every env's next starting state is drawn at every step from one generator on the
    device and used where an episode starts, so a step never asks the host which envs reset.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_fps": 50}
    high = np.array([X_LIMIT * 2, np.inf, THETA_LIMIT * 2, np.inf], dtype=np.float32)
    single_observation_space = Box(-high, high, dtype=np.float32)
    single_action_space = Discrete(2)

    def __init__(self, num_envs: int, device: torch.device | str = "cpu", max_episode_steps: int = 500):
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.max_episode_steps = max_episode_steps
        self.generator = torch.Generator(self.device)
        self.state = torch.zeros((num_envs, 4), dtype=torch.float64, device=self.device)  # x, x', theta, theta'
        self.steps = torch.zeros(num_envs, dtype=torch.int64, device=self.device)  # of the current episode
        self.done = torch.zeros(num_envs, dtype=torch.bool, device=self.device)  # the last step ended the episode

    def _starts(self) -> torch.Tensor:
        """Starting states of every env, uniform in [-0.05, 0.05) as Gymnasium's: (N, 4) float64."""
        u = torch.rand((self.num_envs, 4), dtype=torch.float64, device=self.device, generator=self.generator)
        return u * 0.1 - 0.05

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[torch.Tensor, dict]:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.state = self._starts()
        self.steps.zero_()
        self.done.zero_()
        return self.state.float(), {}

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        x, x_dot, theta, theta_dot = self.state.unbind(1)
        force = torch.where(actions == 1, FORCE, -FORCE)
        cos, sin = torch.cos(theta), torch.sin(theta)
        temp = (force + POLE_MASS_LENGTH * theta_dot**2 * sin) / TOTAL_MASS
        theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / TOTAL_MASS))
        x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
        state = torch.stack([x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot,
                             theta_dot + TAU * theta_acc], 1)
        # NEXT_STEP autoreset: an env whose episode ended at the last step starts a new one now, its action ignored
        restart = self.done
        self.state = torch.where(restart.unsqueeze(1), self._starts(), state)
        self.steps = torch.where(restart, 0, self.steps + 1)
        x, theta = self.state[:, 0], self.state[:, 2]
        terminated = ((x.abs() > X_LIMIT) | (theta.abs() > THETA_LIMIT)) & ~restart
        truncated = (self.steps >= self.max_episode_steps) & ~restart
        reward = (~restart).float()  # 1 for every step of an episode, its last included; 0 on the restart
        self.done = terminated | truncated
        return self.state.float(), reward, terminated, truncated, {}

    def render(self, env_id: int) -> np.ndarray:
        """Env env_id's screen as Gymnasium draws it (600 x 400: track, cart, pole, axle), (400, 600, 3) uint8."""
        x, _, theta, _ = self.state[env_id].tolist()
        width, height, scale = 600, 400, 600 / (2 * X_LIMIT)
        pole_width, pole_length, cart_y = 10.0, scale * 2 * HALF_LENGTH, 100
        frame = np.full((height, width, 3), 255, dtype=np.uint8)
        up, right = np.mgrid[height - 1 : -1 : -1, 0:width]  # pixel coordinates, y up from the bottom
        cart_x, axle_y = x * scale + width / 2, cart_y + 30 / 4
        frame[height - 1 - cart_y] = 0  # the track
        frame[(abs(right - cart_x) <= 25) & (abs(up - cart_y) <= 15)] = 0  # the cart, 50 x 30
        dx, dy = right - cart_x, up - axle_y
        along, across = dx * math.sin(theta) + dy * math.cos(theta), dx * math.cos(theta) - dy * math.sin(theta)
        frame[(along >= -pole_width / 2) & (along <= pole_length - pole_width / 2)
              & (abs(across) <= pole_width / 2)] = (202, 152, 101)
        frame[dx**2 + dy**2 <= (pole_width / 2) ** 2] = (129, 132, 203)
        return frame
