"""The corrector CNN and the corrected rollouts of the PDE program.

The corrector's forward is written once, functionally, for Q parameter sets at a time (grouped convolutions):
Q = 1 is the ordinary module forward; Q = 1 + K evaluates the base point and K coordinate-perturbed copies in one
pass, which is what lets ZO queries travel through the black-box solver as one batch."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Step = Callable[[torch.Tensor], torch.Tensor]


class Corrector(nn.Module):
    """State [B, 2, H, W] -> correction of the same shape; periodic 3x3 convolutions with ReLU in between.

    The last layer starts at zero, so an untrained corrector is exactly the uncorrected solver (SRC) and every
    improvement measured comes from training."""

    def __init__(self, hidden: int = 8, layers: int = 3):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be an int >= 1, got {layers!r}")
        widths = [2] + [hidden] * (layers - 1) + [2]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        stacked = [p.unsqueeze(0) for p in self.parameters()]
        return corrector_forward_batched(stacked, state.unsqueeze(0)).squeeze(0)


def corrector_forward_batched(stacked: Sequence[torch.Tensor], states: torch.Tensor,
                              padding: str = "circular") -> torch.Tensor:
    """Q parameter sets of a 3x3 conv-ReLU stack applied to Q input batches: stacked = [w0, b0, w1, b1, ...] each
    with a leading Q axis (in `Corrector.parameters()` order); states [Q, B, C, H, W] -> [Q, B, C_out, H, W].
    padding: 'circular' (periodic PDE fields) or 'zeros' (images)."""
    if padding not in ("circular", "zeros"):
        raise ValueError(f"padding must be 'circular' or 'zeros', got {padding!r}")
    if len(stacked) % 2:
        raise ValueError(f"stacked must alternate weight, bias tensors; got {len(stacked)} tensors")
    if states.dim() != 5:
        raise ValueError(f"states must have shape [Q, B, C, H, W], got {tuple(states.shape)}")
    queries, batch_size, _, height, width = states.shape
    # [Q, B, C, H, W] -> [B, Q*C, H, W]: each query's channels form one convolution group.
    hidden = states.transpose(0, 1).reshape(batch_size, -1, height, width)
    n_layers = len(stacked) // 2
    for layer in range(n_layers):
        weight, bias = stacked[2 * layer], stacked[2 * layer + 1]
        if weight.shape[0] != queries:
            raise ValueError(f"stacked parameters must all have leading size Q={queries}, got {weight.shape[0]}")
        hidden = F.pad(hidden, (1, 1, 1, 1), mode="circular" if padding == "circular" else "constant")
        hidden = F.conv2d(hidden, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1), groups=queries)
        if layer < n_layers - 1:
            hidden = F.relu(hidden)
    return hidden.reshape(batch_size, queries, -1, height, width).transpose(0, 1)


def rollout_batched(step: Step, stacked: Sequence[torch.Tensor] | None, start: torch.Tensor,
                    n_steps: int) -> torch.Tensor:
    """Unrolls s <- P(s) + C(P(s)) for n_steps with Q corrector parameter sets (None = no corrector).

    start: [B, 2, H, W] (shared by all Q) or [Q, B, 2, H, W]. The solver P sees one batch of Q*B states per step.
    Returns the states after each step, [Q, n_steps, B, 2, H, W]."""
    queries = 1 if stacked is None else stacked[0].shape[0]
    state = start.unsqueeze(0).expand(queries, *start.shape) if start.dim() == 4 else start
    frames = []
    for _ in range(n_steps):
        flat = step(state.reshape(-1, *state.shape[2:]))
        state = flat.reshape(state.shape)
        if stacked is not None:
            state = state + corrector_forward_batched(stacked, state)
        frames.append(state)
    return torch.stack(frames, dim=1)


def stacked_parameters(model: Corrector, queries: int = 1) -> list[torch.Tensor]:
    """The model's parameters with a leading axis of size `queries` (copies, detached)."""
    return [p.detach().unsqueeze(0).repeat(queries, *([1] * p.dim())) for p in model.parameters()]


def rollout_loss_batched(step: Step, stacked: Sequence[torch.Tensor], start: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the corrected rollout against targets [B, n, 2, H, W], one value per query: [Q]."""
    frames = rollout_batched(step, stacked, start, targets.shape[1])
    # The reduction runs in float64: ZO differences are ~mu*gradient, far below the loss's fp32 resolution.
    error = (frames - targets.transpose(0, 1).unsqueeze(0)).double()
    return error.pow(2).mean(dim=(1, 2, 3, 4, 5))
