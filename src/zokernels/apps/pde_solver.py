"""The solvers of the PDE error-correction program: 2D viscous Burgers on a periodic square [0, 2π)².

One time step = explicit diffusion, then semi-Lagrangian self-advection (PhiFlow's `diffuse.explicit` and
`advect.semi_lagrangian` on a CenteredGrid). Two implementations of the *same* step:
- `PhiFlowBurgers`: PhiFlow on its numpy backend, wrapped as a black box. States go in and out as torch tensors but
  cross through numpy, so no autograd graph can connect its output to its input; this is the solver ZO-SOL trains
  through. A batch of states is one PhiFlow call (its batch dimension), which is how ZO queries are batched.
- `burgers_step_torch`: the same discretization written in torch (differentiable twin), used for FO-SOL only and
  checked against PhiFlow in the tests.
States are tensors [B, 2, H, W]: channel 0 is the x (width) velocity component, channel 1 the y component.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DOMAIN = 2 * math.pi


@dataclass(frozen=True)
class BurgersConfig:
    """Coarse grid `coarse` cells per side with time step `dt`; the reference runs on `coarse * refine` cells
    with `substeps` steps of dt/substeps, and is downsampled to the coarse grid by cell averaging."""

    coarse: int = 16
    refine: int = 2
    substeps: int = 2
    dt: float = 0.1
    viscosity: float = 0.02

    def __post_init__(self) -> None:
        for name in ("coarse", "refine", "substeps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.coarse < 4:
            raise ValueError(f"coarse must be >= 4 cells, got {self.coarse}")
        if not (self.dt > 0 and self.viscosity >= 0):
            raise ValueError(f"dt must be > 0 and viscosity >= 0, got dt={self.dt}, viscosity={self.viscosity}")
        dx = DOMAIN / (self.coarse * self.refine)
        if self.viscosity * self.dt / self.substeps / dx ** 2 > 0.25:
            raise ValueError("explicit diffusion is unstable for this viscosity/dt/grid (need nu*dt/dx^2 <= 0.25)")

    @property
    def fine(self) -> int:
        return self.coarse * self.refine


def _check_state(state: torch.Tensor) -> None:
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor [B, 2, H, W], got {type(state).__name__}")
    if state.dim() != 4 or state.shape[1] != 2:
        raise ValueError(f"state must have shape [B, 2, H, W], got {tuple(state.shape)}")


class PhiFlowBurgers:
    """Black-box Burgers step on a `resolution`² periodic grid: `solver(state) -> next state`, no gradients."""

    def __init__(self, resolution: int, dt: float, viscosity: float):
        from phi import flow  # imported here so that `zokernels` never pays PhiFlow's import time by default

        self.flow, self.resolution, self.dt, self.viscosity = flow, resolution, dt, viscosity
        self.calls = 0

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        _check_state(state)
        if state.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(f"state must be on the {self.resolution}x{self.resolution} grid, "
                             f"got {tuple(state.shape[2:])}")
        flow = self.flow
        # Crossing through numpy is the point: the output cannot carry an autograd graph back to the input.
        values = np.ascontiguousarray(state.detach().cpu().numpy().transpose(0, 2, 3, 1), dtype=np.float32)
        grid = flow.CenteredGrid(flow.math.tensor(values, flow.batch("b"), flow.spatial("y,x"),
                                                  flow.channel(vector="x,y")),
                                 flow.extrapolation.PERIODIC, bounds=flow.Box(x=DOMAIN, y=DOMAIN))
        grid = flow.diffuse.explicit(grid, self.viscosity, self.dt)
        grid = flow.advect.semi_lagrangian(grid, grid, self.dt)
        self.calls += 1
        out = grid.values.numpy("b,vector,y,x")
        return torch.from_numpy(np.ascontiguousarray(out)).to(dtype=state.dtype)


def burgers_step_torch(state: torch.Tensor, dt: float, viscosity: float) -> torch.Tensor:
    """Differentiable twin of PhiFlowBurgers: 5-point periodic Laplacian, then backward lookup with periodic
    bilinear interpolation at x - dt·v(x)."""
    _check_state(state)
    batch_size, channels, height, width = state.shape
    dx, dy = DOMAIN / width, DOMAIN / height
    laplace = ((state.roll(1, 3) + state.roll(-1, 3) - 2 * state) / dx ** 2
               + (state.roll(1, 2) + state.roll(-1, 2) - 2 * state) / dy ** 2)
    state = state + viscosity * dt * laplace
    cols = torch.arange(width, dtype=state.dtype, device=state.device).view(1, 1, width)
    rows = torch.arange(height, dtype=state.dtype, device=state.device).view(1, height, 1)
    px = cols - dt * state[:, 0] / dx
    py = rows - dt * state[:, 1] / dy
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0).unsqueeze(1), (py - y0).unsqueeze(1)
    x0, y0 = x0.long() % width, y0.long() % height
    x1, y1 = (x0 + 1) % width, (y0 + 1) % height
    flat = state.reshape(batch_size, channels, height * width)

    def sample(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy * width + xx).reshape(batch_size, 1, -1).expand(-1, channels, -1)
        return flat.gather(2, index).reshape(batch_size, channels, height, width)

    return ((1 - fy) * ((1 - fx) * sample(y0, x0) + fx * sample(y0, x1))
            + fy * ((1 - fx) * sample(y1, x0) + fx * sample(y1, x1)))


def random_initial_states(count: int, resolution: int, generator: torch.Generator,
                          max_wavenumber: int = 3, amplitude: float = 1.0) -> torch.Tensor:
    """Smooth random periodic velocity fields: a random combination of Fourier modes |k| <= max_wavenumber,
    scaled so that each field's largest speed component is `amplitude`."""
    if count < 1 or resolution < 4:
        raise ValueError(f"count must be >= 1 and resolution >= 4, got count={count}, resolution={resolution}")
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) * DOMAIN / resolution
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    state = torch.zeros(count, 2, resolution, resolution, dtype=torch.float64)
    for kx in range(-max_wavenumber, max_wavenumber + 1):
        for ky in range(0, max_wavenumber + 1):
            if (kx, ky) == (0, 0) or kx * kx + ky * ky > max_wavenumber ** 2:
                continue
            coeff = torch.randn(count, 2, 2, generator=generator, dtype=torch.float64)
            phase = kx * xx + ky * yy
            state += coeff[..., 0, None, None] * torch.cos(phase) + coeff[..., 1, None, None] * torch.sin(phase)
    scale = state.abs().amax(dim=(1, 2, 3), keepdim=True)
    return (amplitude * state / scale).to(torch.float32)


def downsample(state: torch.Tensor, factor: int) -> torch.Tensor:
    """Cell averages: the coarse cell value that best represents the fine cells it covers."""
    return state if factor == 1 else F.avg_pool2d(state, factor)


@torch.no_grad()
def reference_trajectories(config: BurgersConfig, initial_fine: torch.Tensor, steps: int) -> torch.Tensor:
    """Fine-grid PhiFlow simulation downsampled to the coarse grid: [N, steps + 1, 2, coarse, coarse]."""
    solver = PhiFlowBurgers(config.fine, config.dt / config.substeps, config.viscosity)
    state, frames = initial_fine, [downsample(initial_fine, config.refine)]
    for _ in range(steps):
        for _ in range(config.substeps):
            state = solver(state)
        frames.append(downsample(state, config.refine))
    return torch.stack(frames, dim=1)
