"""Training the corrector three ways (Um et al. 2020 naming, as in DeepZero's PDE experiment):

- NON: offline, on pairs (P(reference_t), reference_{t+1}) computed once; the solver is never in the loop.
- FO-SOL: solver in the loop, n unrolled steps, backprop through the differentiable torch twin of the solver.
- FO-SPARSE (a control, not a method of the paper): FO-SOL's exact gradient kept only on the coordinates ZO-SOL
  estimates at that step (the same windows and the same density masks, drawn from the same stream), so that
  ZO-SOL − FO-SPARSE is the cost of the estimate's error and FO-SPARSE − FO-SOL the cost of the sparse budget.
- ZO-SOL: solver in the loop, n unrolled steps through the black-box PhiFlow solver; gradients by Sparse-CGE.
  The base point and all perturbed coordinates of a chunk are one rollout of Q = 1 + K parameter sets, so every
  solver call carries Q*B states (`zokernels.stacked_cge_step`). `engine="api"` instead calls `zokernels.cge_step`
  (one loss evaluation per coordinate) — same estimate, the comparison the tests make.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..api import cge_step
from ..estimators.stacked import stacked_cge_step
from ..sparsity import density_masks
from .pde_model import Corrector, Step, rollout_loss_batched

METHODS = ("non", "fo-sol", "fo-sparse", "zo-sol")
ENGINES = ("batched", "api")


@dataclass
class TrainSettings:
    steps: int = 150
    batch_size: int = 8
    unroll: int = 4
    lr: float = 2e-3
    mu: float = 2e-5
    density: float = 0.25
    max_queries: int = 256
    engine: str = "batched"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "unroll", "max_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not (self.lr > 0 and self.mu > 0):
            raise ValueError(f"lr and mu must be > 0, got lr={self.lr}, mu={self.mu}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")


def sample_windows(references: torch.Tensor, batch_size: int, unroll: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: start states [B, 2, H, W] and the next `unroll` reference states [B, n, 2, H, W]."""
    n_traj, n_frames = references.shape[:2]
    if unroll >= n_frames:
        raise ValueError(f"unroll must be < the number of reference frames ({n_frames}), got {unroll}")
    traj = torch.randint(n_traj, (batch_size,), generator=generator)
    start = torch.randint(n_frames - unroll, (batch_size,), generator=generator)
    offsets = start[:, None] + torch.arange(unroll + 1)[None, :]
    windows = references[traj[:, None], offsets]
    return windows[:, 0], windows[:, 1:]


def _zo_step(model: Corrector, solver: Step, start: torch.Tensor, targets: torch.Tensor, settings: TrainSettings,
             generator: torch.Generator) -> float:
    mask = density_masks(model, settings.density, generator)
    if settings.engine == "api":
        def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            stacked = [p.detach().unsqueeze(0) for p in m.parameters()]
            return rollout_loss_batched(solver, stacked, batch[0], batch[1])[0]

        return cge_step(model, (start, targets), loss_fn=loss_fn, mu=settings.mu, mask=mask).loss

    def loss_of_stacked(stacked: list[torch.Tensor]) -> torch.Tensor:
        return rollout_loss_batched(solver, stacked, start, targets)

    return stacked_cge_step(model, loss_of_stacked, settings.mu, mask, settings.max_queries).loss


def _fo_sol_step(model: Corrector, twin: Step, start: torch.Tensor, targets: torch.Tensor) -> float:
    stacked = [p.unsqueeze(0) for p in model.parameters()]
    loss = rollout_loss_batched(twin, stacked, start, targets)[0].float()
    loss.backward()
    return loss.item()


def _keep_masked(model: Corrector, mask: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad.mul_(mask[name].to(p.grad.dtype))


def _non_step(model: Corrector, pairs: tuple[torch.Tensor, torch.Tensor], batch_size: int,
              generator: torch.Generator) -> float:
    inputs, targets = pairs
    index = torch.randint(len(inputs), (batch_size,), generator=generator)
    loss = F.mse_loss(inputs[index] + model(inputs[index]), targets[index])
    loss.backward()
    return loss.item()


def offline_pairs(solver: Step, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NON's data set, computed once: one solver step from every reference state, and the next reference state."""
    starts = references[:, :-1].reshape(-1, *references.shape[2:])
    with torch.no_grad():
        inputs = solver(starts)
    return inputs, references[:, 1:].reshape(-1, *references.shape[2:])


def train_corrector(method: str, model: Corrector, references: torch.Tensor, solver: Step, twin: Step,
                    settings: TrainSettings, generator: torch.Generator,
                    on_step: Callable[[int, float], None] | None = None) -> Corrector:
    """Trains `model` in place with Adam (cosine-decayed lr); the same settings and data order for every method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    pairs = offline_pairs(solver, references) if method == "non" else None
    # Masks get their own stream, so every method sees the same training windows in the same order.
    mask_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        if method == "non":
            loss = _non_step(model, pairs, settings.batch_size * settings.unroll, generator)
        else:
            start, targets = sample_windows(references, settings.batch_size, settings.unroll, generator)
            if method == "fo-sol":
                loss = _fo_sol_step(model, twin, start, targets)
            elif method == "fo-sparse":
                loss = _fo_sol_step(model, twin, start, targets)
                _keep_masked(model, density_masks(model, settings.density, mask_generator))
            else:
                loss = _zo_step(model, solver, start, targets, settings, mask_generator)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss)
    return model
