"""Models of the DeepZero experiments, built from plain nn.Module blocks so an op-level engine can walk them.

- CIFAR ResNet-20/32/44/56 (He et al. 2016, the CIFAR variant): 3 stages of 16/32/64 channels, n basic blocks
  each (depth = 6n + 2), option-A shortcuts (strided subsample + zero channel padding: no parameters), Kaiming
  normal init of conv and linear weights. ResNet-20 has exactly 269,722 parameters.
- `small_cnn(depth)`: the adjustable CNN of the paper's CGE-vs-RGE study. The counts the paper reports
  (730 / 3,700 / 6,670 / 9,640 / 12,610 for depth 1..5) are matched exactly by, on 3-channel inputs:
      depth x [Conv3x3(18 out, padding 1, bias) -> BatchNorm2d(18) -> ReLU -> 2x2 pool] -> global avg pool
    -> Linear(18, 10)    (the same layer structure as the DeepZero code's AdjustableCNN; pooling has no params)
  first layer 3*9*18 + 18 + 36 = 540, each further layer 18*9*18 + 18 + 36 = 2,970, head 18*10 + 10 = 190:
  540 + 190 = 730, then +2,970 per layer. On 1-channel inputs the first layer has 360 fewer parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_int

RESNET_DEPTHS = (20, 32, 44, 56)
SMALL_CNN_DEPTHS = (1, 2, 3, 4, 5)


class ShortcutA(nn.Module):
    """Option-A shortcut: keep every `stride`-th pixel and zero-pad channels on both sides to `out_channels`.

    Parameter-free and channel-wise (output channel c depends only on input channel c - pad_before), which is
    why it is a named module: an engine can propagate a one-channel delta through it without densifying."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f"out_channels must be >= in_channels with an even difference, got "
                             f"{in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.pad_before = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        pad = self.pad_before
        return F.pad(x, (0, 0, 0, 0, pad, pad)) if pad else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {RESNET_DEPTHS} (6n + 2), got {depth}")
        check_int("num_classes", num_classes)
        check_int("in_channels", in_channels)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def _kaiming_init(model: nn.Module) -> None:
    # The reference CIFAR ResNet initializes conv and linear weights with Kaiming normal (fan_in); biases and
    # BN keep torch's defaults (bias uniform, gamma 1, beta 0).
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


def small_cnn(depth: int = 1, in_channels: int = 3, num_classes: int = 10, channels: int = 18,
              pool: str = "avg", kaiming: bool = True) -> nn.Sequential:
    """The paper's small CNN: depth x [Conv3x3(bias) -> BN -> ReLU -> pool 2x2] -> global average pool -> Linear.

    With the defaults (3-channel input, 18 channels, 10 classes) depth 1..5 has 730 / 3,700 / 6,670 / 9,640 /
    12,610 parameters. pool: 'avg' (default: linear and channel-wise, cheap for a delta engine), 'max' (the
    DeepZero code's AdjustableCNN) or 'none'; pooling uses ceil_mode so a 1x1 map stays 1x1 at any depth.
    A Sequential of plain modules, so parameter names are '0.weight', '1.weight', ..."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth not in SMALL_CNN_DEPTHS:
        raise ValueError(f"depth must be in 1..5, got {depth}")
    check_int("in_channels", in_channels)
    check_int("num_classes", num_classes)
    check_int("channels", channels)
    pools = {"avg": lambda: nn.AvgPool2d(2, ceil_mode=True), "max": lambda: nn.MaxPool2d(2, ceil_mode=True)}
    if pool not in (*pools, "none"):
        raise ValueError(f"pool must be one of ('avg', 'max', 'none'), got {pool!r}")
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=True),
                   nn.BatchNorm2d(channels), nn.ReLU()]
        if pool != "none":
            layers.append(pools[pool]())
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    model = nn.Sequential(*layers)
    if kaiming:
        _kaiming_init(model)
    return model


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, depth: int | None = None) -> nn.Module:
    """By name: 'resnet20' | 'resnet32' | 'resnet44' | 'resnet56' | 'small_cnn' (depth 1..5, default 3)."""
    resnets = {f"resnet{d}": d for d in RESNET_DEPTHS}
    if name in resnets:
        return CifarResNet(resnets[name], num_classes, in_channels)
    if name == "small_cnn":
        return small_cnn(3 if depth is None else depth, in_channels, num_classes)
    raise ValueError(f"model must be one of {sorted(resnets) + ['small_cnn']}, got {name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
