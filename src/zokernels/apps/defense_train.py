"""Models and training of the certified black-box defense (denoised smoothing, Salman et al. 2020; DeepZero §4).

- The base classifier is a small CNN trained with ordinary backprop on clean digits, then frozen behind
  `BlackBoxClassifier`, which answers logits only (no parameters, no autograd graph).
- The denoiser D_θ (residual 3x3 conv stack, identity at initialization) is trained on Gaussian-noised inputs to
  minimize the cross-entropy of the black box's answer on D_θ(x + σε). ZO: Sparse-CGE through the black box, the
  base point and K perturbed denoisers sent as one black-box call of (1 + K)·B images (`zokernels.stacked_cge_step`), or
  one `zokernels.cge_step` query at a time (engine 'api'). FO: backprop through the (white-box) classifier.
Images live in pixel space [0, 1], where σ and the certified ℓ2 radii are meant.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..api import cge_step
from ..estimators.stacked import stacked_cge_step
from ..sparsity import density_masks
from ..data import iterate_minibatches, load_digits_tensors
from .pde_model import corrector_forward_batched


def digits_pixel_space(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded digits (8x8, 1 channel) mapped back to [0, 1] pixels: load_digits_tensors standardizes with
    training-set statistics, an affine map whose extremes are pixels 0 and 16/16 (both occur in the training set),
    so (x - min) / (max - min) over the training set is exactly the original pixel scale."""
    split = load_digits_tensors(size=8, channels=1, seed=seed)
    low, high = split.train_x.min(), split.train_x.max()
    to_pixels = lambda x: ((x - low) / (high - low)).clamp(0, 1)  # noqa: E731 (clamp only removes rounding)
    return to_pixels(split.train_x), split.train_y, to_pixels(split.test_x), split.test_y


class DigitsClassifier(nn.Module):
    """Base classifier for 8x8 digits: two convolutions and a linear head (~7k parameters)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class BlackBoxClassifier:
    """Only outputs are visible: logits are computed without autograd and returned as fresh tensors, so nothing
    a caller does can reach the wrapped network's parameters or gradients. Counts queries (images)."""

    def __init__(self, network: nn.Module, batch_size: int = 4096):
        self._network = network.eval()
        self._batch_size = batch_size
        self.images_queried = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise TypeError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
        self.images_queried += len(images)
        chunks = [self._network(images[i:i + self._batch_size].detach())
                  for i in range(0, len(images), self._batch_size)]
        return torch.cat(chunks).clone()


class Denoiser(nn.Module):
    """x -> x + conv stack(x); the last layer starts at zero, so an untrained denoiser is the identity
    (the 'no denoiser' baseline) and every gain comes from training."""

    def __init__(self, hidden: int = 8, layers: int = 3):
        super().__init__()
        widths = [1] + [hidden] * (layers - 1) + [1]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return denoise_batched([p.unsqueeze(0) for p in self.parameters()], x.unsqueeze(0)).squeeze(0)


def denoise_batched(stacked: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Q denoisers on Q image batches [Q, B, 1, H, W] in one pass (grouped convolutions)."""
    return images + corrector_forward_batched(stacked, images, padding="zeros")


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    """Ordinary first-order training on clean images (an off-the-shelf classifier, not noise-trained)."""
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in iterate_minibatches(train_x, train_y, 64, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@dataclass
class DenoiserSettings:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    sigma: float = 0.25
    mu: float = 5e-3
    density: float = 0.1
    max_queries: int = 128
    engine: str = "batched"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (self.lr > 0 and self.sigma > 0 and self.mu > 0):
            raise ValueError(f"lr, sigma and mu must be > 0, got {self.lr}, {self.sigma}, {self.mu}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.engine not in ("batched", "api"):
            raise ValueError(f"engine must be 'batched' or 'api', got {self.engine!r}")


def _zo_denoiser_step(denoiser: Denoiser, black_box: BlackBoxClassifier, noisy: torch.Tensor, labels: torch.Tensor,
                      settings: DenoiserSettings, generator: torch.Generator) -> float:
    mask = density_masks(denoiser, settings.density, generator)
    if settings.engine == "api":
        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(black_box(model(batch[0])), batch[1])

        return cge_step(denoiser, (noisy, labels), loss_fn=loss_fn, mu=settings.mu, mask=mask).loss

    def loss_of_stacked(stacked: list[torch.Tensor]) -> torch.Tensor:
        queries = stacked[0].shape[0]
        images = denoise_batched(stacked, noisy.unsqueeze(0).expand(queries, *noisy.shape))
        logits = black_box(images.reshape(-1, *noisy.shape[1:]))
        losses = F.cross_entropy(logits, labels.repeat(queries), reduction="none")
        return losses.view(queries, -1).mean(dim=1)

    return stacked_cge_step(denoiser, loss_of_stacked, settings.mu, mask, settings.max_queries).loss


def train_denoiser(method: str, black_box: BlackBoxClassifier, white_box: nn.Module | None, train_x: torch.Tensor,
                   train_y: torch.Tensor, settings: DenoiserSettings, seed: int = 0,
                   on_step: Callable[[int, float], None] | None = None) -> Denoiser:
    """method 'zo' (through the black box) or 'fo' (backprop through `white_box`, the same network)."""
    if method not in ("zo", "fo"):
        raise ValueError(f"method must be 'zo' or 'fo', got {method!r}")
    if method == "fo" and white_box is None:
        raise ValueError("white_box is required for method 'fo'")
    torch.manual_seed(seed)
    denoiser = Denoiser()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(1, settings.steps + 1):
        index = torch.randint(len(train_y), (settings.batch_size,), generator=generator)
        noise = torch.randn(settings.batch_size, *train_x.shape[1:], generator=generator)
        noisy, labels = train_x[index] + settings.sigma * noise, train_y[index]
        optimizer.zero_grad(set_to_none=True)
        if method == "zo":
            loss = _zo_denoiser_step(denoiser, black_box, noisy, labels, settings, generator)
        else:
            loss_tensor = F.cross_entropy(white_box(denoiser(noisy)), labels)
            loss_tensor.backward()
            loss = loss_tensor.item()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss)
    return denoiser.eval()
