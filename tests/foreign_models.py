"""A corpus of models written the way their public originals write them, for the CGE engine (issue 12).

Each entry is our own transcription of a public model's structure and coding style — the idioms are the point,
since they are what break op-level engines: `nn.ReLU(inplace=True)`, `out += identity`, `torch.flatten(x, 1)`,
`x.view(x.size(0), -1)`, LambdaLayer shortcuts, forwards with defaulted keyword arguments, modules held in plain
Python lists, `F.dropout(x, p, training=self.training)`, drop_path via `x.new_empty(shape).bernoulli_(keep)`,
`.div_`, permutes around LayerNorm, parameters read as attributes (`self.gamma * x`, `self.cls_token.expand`),
`B, N, C = x.shape`, `torch.cat`, RNN tuple outputs, nn.MultiheadAttention and TransformerEncoderLayer (whose
no-grad eval forward is a fused fast path), `F.interpolate`, Hugging Face ModelOutput.

Everything is shrunk (widths, depths, input sizes) so that the whole corpus runs in a few minutes on 2 CPU cores;
each factory says what it shrank. No code is copied: the structure is re-written from the originals' published
architecture, keeping their forward-pass idioms.

    CORPUS: list[Entry]; entry.build(seed) -> (model, batch)

Batches are `(x, y)` tuples (the model is called as `model(x)`, the default loss is cross-entropy of the output
against y) or, for the Hugging Face models, dicts with input_ids / attention_mask / labels (`model(**batch)`, the
loss is the model's own `outputs.loss`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Entry:
    name: str             # pytest id
    original: str         # the public model it transcribes
    factory: Callable[[], tuple[nn.Module, Any]]
    first: str            # name of the first layer's weight (the layer that reads the input)

    def build(self, seed: int = 0) -> tuple[nn.Module, Any]:
        torch.manual_seed(seed)
        return self.factory()


def _images(batch: int, channels: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, channels, size, size), torch.randint(0, classes, (batch,))


# ----------------------------------------------------------------------------------------------------------------
# torchvision ResNet-18 (torchvision/models/resnet.py)
# ----------------------------------------------------------------------------------------------------------------
def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class TVResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, width=64, norm_layer=None):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, TVBasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = []
        layers.append(block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self.dilation,
                            norm_layer))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x):
        return self._forward_impl(x)


def tv_resnet18():
    # Shrunk: base width 8 instead of 64 (stages 8/16/32/64 channels), 32x32 inputs instead of 224x224.
    return TVResNet(TVBasicBlock, [2, 2, 2, 2], num_classes=10, width=8), _images(4, 3, 32, 10)


def tv_resnet_groupnorm():
    # The same torchvision ResNet with its `norm_layer` argument set to GroupNorm (Wu & He 2018's GN ResNet; the
    # usual BN-free ResNet in federated learning). Shrunk: ResNet-10 layout [1, 1, 1, 1], width 8, 32x32 inputs.
    norm = lambda channels: nn.GroupNorm(4, channels)  # noqa: E731
    return TVResNet(TVBasicBlock, [1, 1, 1, 1], num_classes=10, width=8, norm_layer=norm), _images(4, 3, 32, 10)


# ----------------------------------------------------------------------------------------------------------------
# torchvision MobileNetV2 (torchvision/models/mobilenetv2.py, the ConvBNReLU version)
# ----------------------------------------------------------------------------------------------------------------
def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # make sure that round down does not go down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1, norm_layer=None):
        padding = (kernel_size - 1) // 2
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            norm_layer(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, norm_layer=None):
        super().__init__()
        self.stride = stride
        assert stride in [1, 2]
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers = []
        if expand_ratio != 1:
            # pw
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer))
        layers.extend([
            # dw
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, norm_layer=norm_layer),
            # pw-linear
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width_mult=1.0, inverted_residual_setting=None, round_nearest=8,
                 last_channel=1280, dropout=0.2):
        super().__init__()
        block = InvertedResidual
        input_channel = 32
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t, c, n, s
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x):
        x = self.features(x)
        # Cannot use "squeeze" as batch-size can be 1
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x):
        return self._forward_impl(x)


def tv_mobilenet_v2():
    # Shrunk: width_mult 0.25, the first four stages of the setting with n <= 2 repeats (one residual block
    # with stride 1 and inp == oup kept), last_channel 64 instead of 1280, 32x32 inputs. Classifier weights are
    # N(0, 0.01) as in the original, so initial logits are small.
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 1, 2]]
    model = MobileNetV2(num_classes=10, width_mult=0.25, inverted_residual_setting=setting, last_channel=64)
    return model, _images(4, 3, 32, 10)


# ----------------------------------------------------------------------------------------------------------------
# torchvision VGG-11 (torchvision/models/vgg.py, cfg "A")
# ----------------------------------------------------------------------------------------------------------------
class VGG(nn.Module):
    def __init__(self, features, num_classes=1000, init_weights=True, dropout=0.5, hidden=4096, pool=7):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_layers(cfg, batch_norm=False):
    layers = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def tv_vgg11():
    # Shrunk: cfg "A" with widths / 8 (8 ... 64), classifier hidden 64 instead of 4096, 32x32 inputs. The
    # AdaptiveAvgPool2d((7, 7)) is kept: on a 1x1 feature map (32x32 input after five pools) it replicates the
    # pixel 49 times, as torchvision's VGG does on CIFAR-sized inputs.
    cfg = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
    return VGG(make_layers(cfg), num_classes=10, hidden=64), _images(4, 3, 32, 10)


# ----------------------------------------------------------------------------------------------------------------
# DeepZero (OPTML-Group/DeepZero, models/resnet_s.py and models/cnn.py)
# ----------------------------------------------------------------------------------------------------------------
def _weights_init(m):
    classname = m.__class__.__name__  # noqa: F841 (kept as the original has it)
    if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super(LambdaLayer, self).__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class DZBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super(DZBasicBlock, self).__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                # option A: strided subsample, channels zero-padded on both sides
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))
            elif option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


def split_model(model):
    modules = []
    for m in model.children():
        if isinstance(m, (nn.Sequential,)):
            modules += split_model(m)
        else:
            modules.append(m)
    return modules


class DZResNet(nn.Module):
    """DeepZero's ResNet: the children are flattened into a plain Python list (not a ModuleList) at init, and
    forward walks it from `starting_id`, with the stem ReLU and the head pooling applied by list position."""

    def __init__(self, block, num_blocks, num_classes=10):
        super(DZResNet, self).__init__()
        self.in_planes = 16

        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(block, 16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 64, num_blocks[2], stride=2)
        self.fc = nn.Linear(64, num_classes)

        self.apply(_weights_init)
        self.splited_modules = split_model(self)
        self.length = len(self.splited_modules)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x, starting_id=0, return_interval=False):
        if return_interval:
            res = []
        for i in range(starting_id, self.length):
            x = self.splited_modules[i](x)
            if i == 1:
                x = F.relu(x)
            elif i == self.length - 2:
                x = F.avg_pool2d(x, x.size(3))
                x = x.reshape(x.size(0), -1)
            if return_interval:
                res.append(x.clone())
        return res if return_interval else x


class AkamasterResNet(DZResNet):
    """The pytorch_resnet_cifar10 forward that DeepZero's ResNet derives from (its docstring credits it): the
    same modules, called by attribute, `F.avg_pool2d(out, out.size()[3])` and `out.view(out.size(0), -1)`."""

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        out = self.fc(out)
        return out


def dz_resnet20():
    # Full ResNet-20 widths (16/32/64; the option-A padding planes//4 depends on them); 16x16 inputs instead of
    # 32x32 to keep the float64 oracle cheap.
    return DZResNet(DZBasicBlock, [3, 3, 3], num_classes=10), _images(4, 3, 16, 10)


def akamaster_resnet20():
    # As dz_resnet20, with the original attribute-calling forward.
    return AkamasterResNet(DZBasicBlock, [3, 3, 3], num_classes=10), _images(4, 3, 16, 10)


class AdjustableCNN(nn.Module):
    def __init__(self, depth, channel_num=24):
        super(AdjustableCNN, self).__init__()
        self.conv_layers = nn.ModuleList()
        self.fc = nn.Linear(channel_num, 10)

        for i in range(depth):
            if i == 0:
                self.conv_layers.append(nn.Conv2d(3, channel_num, 3, padding=1))
            else:
                self.conv_layers.append(nn.Conv2d(channel_num, channel_num, 3, padding=1))
            self.conv_layers.append(nn.BatchNorm2d(channel_num))
            self.conv_layers.append(nn.ReLU(inplace=True))
            self.conv_layers.append(nn.MaxPool2d(2, 2))

        self.adaptive_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        for layer in self.conv_layers:
            x = layer(x)
        x = self.adaptive_pool(x)
        x = x.view(x.size(0), -1)
        x = self.fc(x)
        return x


def dz_small_cnn():
    # depth 3, channel_num 12 (the original default is 24), 16x16 inputs.
    return AdjustableCNN(3, channel_num=12), _images(6, 3, 16, 10)


# ----------------------------------------------------------------------------------------------------------------
# timm idioms: drop_path, F.dropout in forward_head, Mlp, ConvNeXt block, ViT, MLP-Mixer
# ----------------------------------------------------------------------------------------------------------------
def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    """Per-sample stochastic depth (timm/layers/drop.py)."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class TimmBasicBlock(nn.Module):
    """timm/models/resnet.py BasicBlock: act layers built from act_layer(inplace=True), optional drop_path
    applied before the in-place residual add."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 drop_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)

        return x


class TimmResNet(nn.Module):
    """timm ResNet skeleton: stem, stages with linearly increasing drop_path rates, SelectAdaptivePool-style
    global average pooling with flatten, and forward_head's `F.dropout(x, p=float(self.drop_rate),
    training=self.training)`."""

    def __init__(self, layers, num_classes=10, width=8, drop_rate=0.0, drop_path_rate=0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        net_num_blocks = sum(layers)
        net_block_idx = 0
        inplanes = width
        stages = []
        for stage_idx, num_blocks in enumerate(layers):
            planes = width * 2 ** stage_idx
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for block_idx in range(num_blocks):
                downsample = None
                if block_idx == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                               nn.BatchNorm2d(planes))
                block_dpr = drop_path_rate * net_block_idx / (net_num_blocks - 1)  # stochastic depth linear decay
                blocks.append(TimmBasicBlock(inplanes, planes, stride if block_idx == 0 else 1, downsample,
                                             drop_path=DropPath(block_dpr) if block_dpr > 0. else None))
                inplanes = planes
                net_block_idx += 1
            stages.append((f"layer{stage_idx + 1}", nn.Sequential(*blocks)))
        for name, stage in stages:
            self.add_module(name, stage)
        self.num_features = inplanes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def timm_resnet_droppath():
    # Shrunk: 3 stages of [1, 2, 1] blocks, widths 8/16/32, 16x16 inputs; drop_rate 0.2, drop_path_rate 0.3 (so
    # that train mode draws masks on both paths).
    return TimmResNet([1, 2, 1], num_classes=10, width=8, drop_rate=0.2, drop_path_rate=0.3), _images(8, 3, 16, 10)


class Mlp(nn.Module):
    """MLP as used in Vision Transformer, MLP-Mixer and related networks (timm/layers/mlp.py)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, bias=True,
                 drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class ConvNeXtLayerNorm(nn.Module):
    """LayerNorm for channels_last (N, H, W, C) via F.layer_norm, or channels_first (N, C, H, W) written out
    with mean/pow/sqrt and weights broadcast as weight[:, None, None] (the ConvNeXt repository's LayerNorm)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape, )

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        elif self.data_format == "channels_first":
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
            return x


class ConvNeXtBlock(nn.Module):
    """DwConv 7x7 -> permute to (N, H, W, C) -> LayerNorm -> Linear 4C -> GELU -> Linear C -> gamma * x ->
    permute back -> input + drop_path(x)."""

    def __init__(self, dim, drop_path=0., layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # depthwise conv
        self.norm = ConvNeXtLayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # pointwise/1x1 convs, implemented with linear layers
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones((dim)),
                                  requires_grad=True) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

        x = input + self.drop_path(x)
        return x


class ConvNeXt(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0., layer_scale_init_value=1e-6, head_init_scale=1.):
        super().__init__()
        self.downsample_layers = nn.ModuleList()  # stem and 3 intermediate downsampling conv layers
        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            ConvNeXtLayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
        )
        self.downsample_layers.append(stem)
        for i in range(len(dims) - 1):
            downsample_layer = nn.Sequential(
                ConvNeXtLayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
            )
            self.downsample_layers.append(downsample_layer)

        self.stages = nn.ModuleList()  # feature resolution stages, each consisting of multiple residual blocks
        dp_rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(len(dims)):
            stage = nn.Sequential(
                *[ConvNeXtBlock(dim=dims[i], drop_path=dp_rates[cur + j],
                                layer_scale_init_value=layer_scale_init_value) for j in range(depths[i])]
            )
            self.stages.append(stage)
            cur += depths[i]

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # final norm layer
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(self._init_weights)
        self.head.weight.data.mul_(head_init_scale)
        self.head.bias.data.mul_(head_init_scale)

    def _init_weights(self, m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=.02)
            nn.init.constant_(m.bias, 0)

    def forward_features(self, x):
        for i in range(len(self.stages)):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.head(x)
        return x


def convnext_tiny():
    # Shrunk: 3 stages, depths (1, 2, 1), dims (8, 16, 32), 32x32 inputs (stem stride 4 -> 8x8 -> 4x4 -> 2x2).
    # layer_scale_init_value 0.1 instead of 1e-6 so the blocks' coordinates have gradients above the noise of a
    # float32 difference; drop_path_rate 0.2 so train mode draws per-sample masks.
    model = ConvNeXt(num_classes=10, depths=(1, 2, 1), dims=(8, 16, 32), drop_path_rate=0.2,
                     layer_scale_init_value=0.1)
    return model, _images(4, 3, 32, 10)


class Attention(nn.Module):
    """timm vision_transformer Attention: one qkv Linear, reshape/permute to (3, B, heads, N, head_dim), either
    the fused F.scaled_dot_product_attention or the written-out softmax attention."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0., fused_attn=False):
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                dropout_p=self.attn_drop.p if self.training else 0.,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, proj_drop=0., attn_drop=0., drop_path=0.,
                 fused_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop, fused_attn=fused_attn)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """2D image to patch embedding: a strided Conv2d, then flatten(2).transpose(1, 2) (NCHW -> NLC)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x):
        B, C, H, W = x.shape
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        x = self.norm(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0., pos_drop_rate=0., proj_drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., fused_attn=False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * .02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            ViTBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], fused_attn=fused_attn)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=.02)
        # timm initializes cls_token with std 1e-6; 0.02 here so its coordinates are not at the noise floor.
        nn.init.normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _pos_embed(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = x[:, 0]  # class token
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _vit(fused_attn: bool):
    # Shrunk: 16x16 images in 4x4 patches (16 patches + cls), embed_dim 16, depth 2, 2 heads, mlp_ratio 2;
    # dropout 0.1 on attention, projections and head, drop_path 0.1.
    model = VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=16, depth=2, num_heads=2,
                              mlp_ratio=2., drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1,
                              drop_path_rate=0.1, fused_attn=fused_attn)
    return model, _images(4, 3, 16, 10)


def vit_eager():
    return _vit(fused_attn=False)


def vit_sdpa():
    return _vit(fused_attn=True)


class MixerBlock(nn.Module):
    """Residual block with token mixing and channel MLPs: token mixing runs on x.transpose(1, 2)."""

    def __init__(self, dim, seq_len, mlp_ratio=(0.5, 4.0), drop=0., drop_path=0.):
        super().__init__()
        tokens_dim, channels_dim = [int(x * dim) for x in mlp_ratio]
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim, act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim, act_layer=nn.GELU, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class MlpMixer(nn.Module):
    def __init__(self, num_classes=1000, img_size=224, in_chans=3, patch_size=16, num_blocks=8, embed_dim=512,
                 drop_rate=0., proj_drop_rate=0., drop_path_rate=0.):
        super().__init__()
        self.drop_rate = drop_rate
        self.stem = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.blocks = nn.Sequential(*[
            MixerBlock(embed_dim, self.stem.num_patches, drop=proj_drop_rate, drop_path=drop_path_rate)
            for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean(dim=1)  # global_pool 'avg'
        x = self.head_drop(x)
        return self.head(x)


def mlp_mixer():
    # Shrunk: 16x16 images in 4x4 patches, embed_dim 16, 2 blocks; dropout 0.1, drop_path 0.1.
    model = MlpMixer(num_classes=10, img_size=16, patch_size=4, num_blocks=2, embed_dim=16, drop_rate=0.1,
                     proj_drop_rate=0.1, drop_path_rate=0.1)
    return model, _images(4, 3, 16, 10)


# ----------------------------------------------------------------------------------------------------------------
# torchvision DenseNet (torchvision/models/densenet.py): list-of-features concatenation
# ----------------------------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)

        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs):
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))  # noqa: T484
        return bottleneck_output

    def forward(self, input):
        if isinstance(input, torch.Tensor):
            prev_features = [input]
        else:
            prev_features = input

        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                                drop_rate=drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4, drop_rate=0,
                 num_classes=1000):
        super().__init__()
        # First convolution
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))

        # Each denseblock
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def tv_densenet():
    # Shrunk: growth_rate 4, block_config (2, 2), num_init_features 8, bn_size 2, drop_rate 0.1, 32x32 inputs.
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, drop_rate=0.1,
                     num_classes=10)
    return model, _images(4, 3, 32, 10)


# ----------------------------------------------------------------------------------------------------------------
# torchvision MobileNetV3 (Hardswish, SE with Hardsigmoid) and EfficientNet (SiLU, SE with Sigmoid, StochasticDepth)
# ----------------------------------------------------------------------------------------------------------------
class Conv2dNormActivation(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, groups=1,
                 norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, inplace=True, bias=None):
        if padding is None:
            padding = (kernel_size - 1) // 2
        if bias is None:
            bias = norm_layer is None
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: global pool, 1x1 conv, activation, 1x1 conv, scale activation,
    `scale * input`."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


class MobileNetV3Block(nn.Module):
    """torchvision mobilenetv3.InvertedResidual: expand (1x1), depthwise, SE (Hardsigmoid), project; activation
    nn.Hardswish or nn.ReLU, built with inplace=True by Conv2dNormActivation."""

    def __init__(self, input_channels, kernel, expanded_channels, out_channels, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers = []
        activation_layer = nn.Hardswish if use_hs else nn.ReLU
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, activation_layer=activation_layer))
        if use_se:
            squeeze_channels = _make_divisible(expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, settings, last_channel, num_classes=1000, dropout=0.2):
        super().__init__()
        layers = []
        firstconv_output_channels = settings[0][0]
        layers.append(Conv2dNormActivation(3, firstconv_output_channels, kernel_size=3, stride=2,
                                           activation_layer=nn.Hardswish))
        for cnf in settings:
            layers.append(MobileNetV3Block(*cnf))
        lastconv_input_channels = settings[-1][3]
        lastconv_output_channels = 6 * lastconv_input_channels
        layers.append(Conv2dNormActivation(lastconv_input_channels, lastconv_output_channels, kernel_size=1,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def tv_mobilenet_v3():
    # Shrunk: four blocks of the mobilenet_v3_small table (input, kernel, expanded, out, SE, Hardswish, stride)
    # at about quarter width, last_channel 32 instead of 1024, 32x32 inputs. Note nn.Dropout(inplace=True).
    settings = [(8, 3, 8, 8, True, False, 2), (8, 3, 24, 8, False, False, 1), (8, 5, 24, 16, True, True, 2),
                (16, 5, 48, 16, True, True, 1)]
    return MobileNetV3(settings, last_channel=32, num_classes=10), _images(4, 3, 32, 10)


def stochastic_depth(input, p, mode, training=True):
    """torchvision.ops.stochastic_depth: 'row' drops whole samples, 'batch' the whole batch."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p, mode):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class MBConv(nn.Module):
    """torchvision efficientnet.MBConv: expand (SiLU, inplace), depthwise (SiLU), SE (SiLU, Sigmoid), project,
    StochasticDepth('row') on the residual branch, then `result += input`."""

    def __init__(self, expand_ratio, kernel, stride, input_channels, out_channels, stochastic_depth_prob):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers = []
        activation_layer = nn.SiLU
        expanded_channels = _make_divisible(input_channels * expand_ratio, 8)
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, activation_layer=activation_layer))
        squeeze_channels = max(1, input_channels // 4)
        layers.append(SqueezeExcitation(expanded_channels, squeeze_channels, activation=partial(nn.SiLU,
                                                                                                inplace=True)))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, settings, dropout, stochastic_depth_prob=0.2, num_classes=1000):
        super().__init__()
        layers = []
        firstconv_output_channels = settings[0][3]
        layers.append(Conv2dNormActivation(3, firstconv_output_channels, kernel_size=3, stride=2,
                                           activation_layer=nn.SiLU))
        total_stage_blocks = len(settings)
        for stage_block_id, (expand_ratio, kernel, stride, inp, out) in enumerate(settings):
            sd_prob = stochastic_depth_prob * float(stage_block_id) / total_stage_blocks
            layers.append(MBConv(expand_ratio, kernel, stride, inp, out, sd_prob))
        lastconv_input_channels = settings[-1][4]
        lastconv_output_channels = 4 * lastconv_input_channels
        layers.append(Conv2dNormActivation(lastconv_input_channels, lastconv_output_channels, kernel_size=1,
                                           activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(lastconv_output_channels, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def tv_efficientnet():
    # Shrunk: four MBConv blocks (expand, kernel, stride, in, out) at about quarter of B0's width, 32x32 inputs;
    # stochastic_depth_prob 0.4 (B0: 0.2) so train mode draws per-sample masks in the residual blocks.
    settings = [(1, 3, 1, 8, 8), (4, 3, 2, 8, 8), (4, 5, 1, 8, 8), (4, 3, 2, 8, 16)]
    return EfficientNet(settings, dropout=0.2, stochastic_depth_prob=0.4, num_classes=10), _images(4, 3, 32, 10)


# ----------------------------------------------------------------------------------------------------------------
# Small classics: pytorch/examples MNIST net, the 60-minute-blitz LeNet, a U-Net decoder, M5 audio net
# ----------------------------------------------------------------------------------------------------------------
class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py: functional ReLUs, F.max_pool2d, Dropout modules, torch.flatten,
    F.log_softmax output (the example trains it with F.nll_loss; cross-entropy of log-probabilities is the
    same number)."""

    def __init__(self, c1=32, c2=64, hidden=128):
        super(MnistNet, self).__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * 6 * 6, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def mnist_example():
    # Shrunk: channels 8/16 (original 32/64), fc1 64 (original 128), 16x16 inputs (28x28) -> 6x6 after the pool.
    return MnistNet(c1=8, c2=16, hidden=64), _images(8, 1, 16, 10)


class LeNet(nn.Module):
    """The 60-minute-blitz Net: F.max_pool2d(F.relu(conv), (2, 2)), a bare int window for the second pool,
    and `x.view(-1, self.num_flat_features(x))`."""

    def __init__(self):
        super(LeNet, self).__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x

    def num_flat_features(self, x):
        size = x.size()[1:]  # all dimensions except the batch dimension
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


def lenet():
    # Full size (32x32 single-channel inputs).
    return LeNet(), _images(4, 1, 32, 10)


class DoubleConv(nn.Module):
    """(convolution => [norm] => LeakyReLU) * 2, with nnU-Net's InstanceNorm2d(affine=True) and
    LeakyReLU(negative_slope=1e-2, inplace=True) in place of milesial/Pytorch-UNet's BN + ReLU."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(mid_channels, affine=True),
            nn.LeakyReLU(negative_slope=1e-2, inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(negative_slope=1e-2, inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """Downscaling with maxpool then double conv"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upscaling (F.interpolate, bilinear) then pad to the skip's size, torch.cat([x2, x1], dim=1), double conv"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, x1, x2):
        x1 = F.interpolate(x1, scale_factor=2, mode="bilinear", align_corners=True)
        # input is CHW
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class OutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(OutConv, self).__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    def __init__(self, n_channels, n_classes, base=64):
        super(UNet, self).__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.inc = DoubleConv(n_channels, base)
        self.down1 = Down(base, base * 2)
        self.down2 = Down(base * 2, base * 4 // 2)
        self.up1 = Up(base * 4, base * 2 // 2)
        self.up2 = Up(base * 2, base)
        self.outc = OutConv(base, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x = self.up1(x3, x2)
        x = self.up2(x, x1)
        logits = self.outc(x)
        return logits


def unet():
    # Shrunk: two down / two up levels (original four), base width 4 (original 64), 12x12 single-channel images
    # with per-pixel labels: the logits are [B, classes, H, W] and the default cross-entropy is per pixel.
    x = torch.randn(4, 1, 12, 12)
    return UNet(n_channels=1, n_classes=3, base=4), (x, torch.randint(0, 3, (4, 12, 12)))


class M5(nn.Module):
    """torchaudio speech-command tutorial M5: strided Conv1d on raw audio, BatchNorm1d, MaxPool1d, functional
    ReLUs, F.avg_pool1d over the remaining length, permute, Linear, F.log_softmax(dim=2)."""

    def __init__(self, n_input=1, n_output=35, stride=16, n_channel=32):
        super().__init__()
        self.conv1 = nn.Conv1d(n_input, n_channel, kernel_size=80, stride=stride)
        self.bn1 = nn.BatchNorm1d(n_channel)
        self.pool1 = nn.MaxPool1d(4)
        self.conv2 = nn.Conv1d(n_channel, n_channel, kernel_size=3)
        self.bn2 = nn.BatchNorm1d(n_channel)
        self.pool2 = nn.MaxPool1d(4)
        self.conv3 = nn.Conv1d(n_channel, 2 * n_channel, kernel_size=3)
        self.bn3 = nn.BatchNorm1d(2 * n_channel)
        self.pool3 = nn.MaxPool1d(4)
        self.conv4 = nn.Conv1d(2 * n_channel, 2 * n_channel, kernel_size=3)
        self.bn4 = nn.BatchNorm1d(2 * n_channel)
        self.pool4 = nn.MaxPool1d(4)
        self.fc1 = nn.Linear(2 * n_channel, n_output)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(self.bn1(x))
        x = self.pool1(x)
        x = self.conv2(x)
        x = F.relu(self.bn2(x))
        x = self.pool2(x)
        x = self.conv3(x)
        x = F.relu(self.bn3(x))
        x = self.pool3(x)
        x = self.conv4(x)
        x = F.relu(self.bn4(x))
        x = self.pool4(x)
        x = F.avg_pool1d(x, x.shape[-1])
        x = x.permute(0, 2, 1)
        x = self.fc1(x)
        # The tutorial returns [B, 1, classes] and its training loop squeezes; squeezed here so the default
        # cross-entropy applies.
        return F.log_softmax(x, dim=2).squeeze(1)


def m5_audio():
    # Shrunk: n_channel 8 (original 32), 10 classes; full 8,000-sample inputs (1 s at 8 kHz), which the four
    # conv/pool stages reduce to length 1.
    return M5(n_input=1, n_output=10, n_channel=8), (torch.randn(4, 1, 8000), torch.randint(0, 10, (4,)))


# ----------------------------------------------------------------------------------------------------------------
# Tabular, sequence and text models
# ----------------------------------------------------------------------------------------------------------------
class LinBnDrop(nn.Sequential):
    """fastai's LinBnDrop: BatchNorm1d, Dropout, Linear, activation (bn first, as fastai's default)."""

    def __init__(self, n_in, n_out, bn=True, p=0., act=None, lin_first=False):
        layers = [nn.BatchNorm1d(n_out if lin_first else n_in)] if bn else []
        if p != 0:
            layers.append(nn.Dropout(p))
        lin = [nn.Linear(n_in, n_out, bias=not bn)]
        if act is not None:
            lin.append(act)
        layers = lin + layers if lin_first else layers + lin
        super().__init__(*layers)


class TabularMLP(nn.Module):
    """fastai TabularModel, continuous features only: bn_cont (BatchNorm1d), then LinBnDrop layers with
    ReLU(inplace=True), and a last LinBnDrop without BN."""

    def __init__(self, n_cont, out_sz, layers, ps=None):
        super().__init__()
        ps = ps or [0.] * len(layers)
        self.bn_cont = nn.BatchNorm1d(n_cont)
        sizes = [n_cont] + layers + [out_sz]
        actns = [nn.ReLU(inplace=True) for _ in range(len(sizes) - 2)] + [None]
        _layers = [LinBnDrop(sizes[i], sizes[i + 1], bn=(i != len(actns) - 1), p=p, act=a, lin_first=False)
                   for i, (p, a) in enumerate(zip(ps + [0.], actns))]
        self.layers = nn.Sequential(*_layers)

    def forward(self, x_cont):
        x_cont = self.bn_cont(x_cont)
        return self.layers(x_cont)


def tabular_bn1d():
    # 12 continuous features, hidden layers [32, 16] with dropout 0.1, 3 classes, batch 8.
    x = torch.randn(8, 12) * torch.linspace(0.5, 3.0, 12) + torch.linspace(-1.0, 1.0, 12)
    return TabularMLP(12, 3, [32, 16], ps=[0.1, 0.1]), (x, torch.randint(0, 3, (8,)))


class LSTMClassifier(nn.Module):
    """The sentiment-analysis tutorial LSTM: Embedding(padding_idx=0), a 2-layer nn.LSTM(batch_first=True,
    dropout=...), `lstm_out, (hidden, cell) = self.lstm(embeds)`, the last time step, Dropout, Linear."""

    def __init__(self, vocab_size, embedding_dim, hidden_dim, output_size, n_layers=2, drop_prob=0.5):
        super().__init__()
        self.output_size = output_size
        self.n_layers = n_layers
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, n_layers, dropout=drop_prob, batch_first=True)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(hidden_dim, output_size)

    def forward(self, x):
        embeds = self.embedding(x)
        lstm_out, (hidden, cell) = self.lstm(embeds)
        out = lstm_out[:, -1, :]
        out = self.dropout(out)
        out = self.fc(out)
        return out


def _tokens(batch, length, vocab):
    x = torch.randint(1, vocab, (batch, length))
    x[0, :2] = 0  # left padding on one sample
    return x


def lstm_classifier():
    # Shrunk: vocab 50, embedding 8, hidden 8, 2 layers with inter-layer dropout 0.2, sequences of 6 tokens.
    return LSTMClassifier(50, 8, 8, 3, n_layers=2, drop_prob=0.2), (_tokens(4, 6, 50), torch.randint(0, 3, (4,)))


class GRUClassifier(nn.Module):
    """A time-series GRU classifier: nn.GRU(batch_first=True) on float features, the tuple output unpacked as
    `out, h_n`, the last time step `out[:, -1, :]` into a Linear."""

    def __init__(self, input_size, hidden_size, num_classes, num_layers=1):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.gru = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size, device=x.device, dtype=x.dtype)
        out, h_n = self.gru(x, h0)
        out = self.fc(out[:, -1, :])
        return out


def gru_classifier():
    # 5 input features, hidden 8, 7 time steps, batch 4.
    return GRUClassifier(5, 8, 4), (torch.randn(4, 7, 5), torch.randint(0, 4, (4,)))


class BagOfEmbeddings(nn.Module):
    """A fastText-style bag-of-words classifier: nn.Embedding(padding_idx=0), the padded mean over tokens
    (sum of embeddings divided by the count of non-pad tokens), Linear."""

    def __init__(self, vocab_size, embed_dim, num_class):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.fc = nn.Linear(embed_dim, num_class)
        self.init_weights()

    def init_weights(self):
        initrange = 0.5
        self.embedding.weight.data.uniform_(-initrange, initrange)
        self.embedding.weight.data[0].zero_()
        self.fc.weight.data.uniform_(-initrange, initrange)
        self.fc.bias.data.zero_()

    def forward(self, text):
        mask = (text != 0).unsqueeze(-1).float()
        embedded = (self.embedding(text) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.fc(embedded)


def embedding_bow():
    # vocab 60, embed_dim 8, 4 classes, 10 tokens per sample.
    return BagOfEmbeddings(60, 8, 4), (_tokens(8, 10, 60), torch.randint(0, 4, (8,)))


class MHAClassifier(nn.Module):
    """Token embedding + learned positions, one nn.MultiheadAttention(batch_first=True, dropout) block with a
    residual and nn.LayerNorm, `attn_output, _ = self.attn(x, x, x, key_padding_mask=..., need_weights=False)`,
    masked mean pooling, Linear."""

    def __init__(self, vocab_size, d_model, nhead, num_classes, max_len=32, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)
        nn.init.normal_(self.pos, std=0.1)

    def forward(self, tokens):
        pad = tokens == 0
        x = self.embed(tokens) + self.pos[:, :tokens.size(1)]
        attn_output, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm(x + attn_output)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        x = (x * keep).sum(dim=1) / keep.sum(dim=1)
        return self.fc(x)


def mha_classifier():
    # vocab 40, d_model 8, 2 heads, attention dropout 0.1, 6 tokens, batch 4.
    return MHAClassifier(40, 8, 2, 3), (_tokens(4, 6, 40), torch.randint(0, 3, (4,)))


class PositionalEncoding(nn.Module):
    """The PyTorch transformer tutorial's sinusoidal PositionalEncoding (a registered buffer `pe` and Dropout),
    here for batch_first inputs."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(1, max_len, d_model)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        x = x + self.pe[:, :x.size(1)]
        return self.dropout(x)


class TransformerClassifier(nn.Module):
    """nn.TransformerEncoder of nn.TransformerEncoderLayer(batch_first=True) as in the PyTorch tutorial
    (embedding * sqrt(d_model), PositionalEncoding), src_key_padding_mask, mean over tokens, Linear. In eval
    mode under no_grad, PyTorch runs its fused fast path (and nested tensors for the padding mask)."""

    def __init__(self, ntoken, d_model, nhead, d_hid, nlayers, num_classes, dropout=0.1):
        super().__init__()
        self.pos_encoder = PositionalEncoding(d_model, dropout, max_len=64)
        encoder_layers = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(encoder_layers, nlayers, enable_nested_tensor=True)
        self.embedding = nn.Embedding(ntoken, d_model)
        self.d_model = d_model
        self.linear = nn.Linear(d_model, num_classes)

    def forward(self, src):
        pad = src == 0
        src = self.embedding(src) * math.sqrt(self.d_model)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, src_key_padding_mask=pad)
        output = output.masked_fill(pad.unsqueeze(-1), 0.0).sum(1) / (~pad).sum(1, keepdim=True)
        return self.linear(output)


def transformer_encoder():
    # Shrunk: d_model 8, 2 heads, feed-forward 16, 2 layers, vocab 40, 6 tokens; dropout 0.1.
    return TransformerClassifier(40, 8, 2, 16, 2, 3), (_tokens(4, 6, 40), torch.randint(0, 3, (4,)))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers, their own classes with tiny configs (random init)
# ----------------------------------------------------------------------------------------------------------------
def _hf_tokens(batch, length, vocab):
    input_ids = torch.randint(3, vocab, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, -2:] = 0  # right padding on one sample
    input_ids[0, -2:] = 0
    return input_ids, attention_mask


def hf_bert():
    # BertForSequenceClassification with hidden 32, 2 layers, 2 heads, intermediate 64, vocab 100, 3 labels;
    # dropout 0.1 (hidden and attention) as in BERT's config defaults; 8 tokens, batch 4.
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    input_ids, attention_mask = _hf_tokens(4, 8, 100)
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.randint(0, 3, (4,))}


def hf_llama():
    # LlamaForCausalLM with hidden 32, 2 layers, 2 heads (1 key/value head: grouped-query attention),
    # intermediate 64, vocab 100; labels are the input ids with padding set to -100; 8 tokens, batch 4.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    input_ids, attention_mask = _hf_tokens(4, 8, 100)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


CORPUS: list[Entry] = [
    Entry("tv_resnet18", "torchvision.models.resnet18", tv_resnet18, "conv1.weight"),
    Entry("tv_resnet10_groupnorm", "torchvision ResNet(norm_layer=GroupNorm)", tv_resnet_groupnorm,
          "conv1.weight"),
    Entry("tv_mobilenet_v2", "torchvision.models.mobilenet_v2", tv_mobilenet_v2, "features.0.0.weight"),
    Entry("tv_mobilenet_v3", "torchvision.models.mobilenet_v3_small", tv_mobilenet_v3, "features.0.0.weight"),
    Entry("tv_efficientnet", "torchvision.models.efficientnet_b0", tv_efficientnet, "features.0.0.weight"),
    Entry("tv_vgg11", "torchvision.models.vgg11", tv_vgg11, "features.0.weight"),
    Entry("tv_densenet", "torchvision.models.densenet121", tv_densenet, "features.conv0.weight"),
    Entry("deepzero_resnet20", "OPTML-Group/DeepZero models/resnet_s.py resnet20", dz_resnet20, "conv1.weight"),
    Entry("akamaster_resnet20", "akamaster/pytorch_resnet_cifar10 resnet20", akamaster_resnet20, "conv1.weight"),
    Entry("deepzero_small_cnn", "OPTML-Group/DeepZero models/cnn.py AdjustableCNN", dz_small_cnn,
          "conv_layers.0.weight"),
    Entry("timm_resnet_droppath", "timm ResNet (drop_path_rate, drop_rate)", timm_resnet_droppath,
          "conv1.weight"),
    Entry("convnext", "facebookresearch/ConvNeXt", convnext_tiny, "downsample_layers.0.0.weight"),
    Entry("vit_eager", "timm VisionTransformer (written-out attention)", vit_eager, "patch_embed.proj.weight"),
    Entry("vit_sdpa", "timm VisionTransformer (fused_attn)", vit_sdpa, "patch_embed.proj.weight"),
    Entry("mlp_mixer", "timm MlpMixer", mlp_mixer, "stem.proj.weight"),
    Entry("mnist_example", "pytorch/examples mnist Net", mnist_example, "conv1.weight"),
    Entry("lenet", "PyTorch 60-minute blitz Net", lenet, "conv1.weight"),
    Entry("unet", "milesial/Pytorch-UNet (nnU-Net norm/activation)", unet, "inc.double_conv.0.weight"),
    Entry("m5_audio", "torchaudio speech-command tutorial M5", m5_audio, "conv1.weight"),
    Entry("tabular_bn1d", "fastai TabularModel (continuous)", tabular_bn1d, "bn_cont.weight"),
    Entry("lstm_classifier", "sentiment-analysis LSTM tutorial", lstm_classifier, "embedding.weight"),
    Entry("gru_classifier", "time-series GRU classifier", gru_classifier, "gru.weight_ih_l0"),
    Entry("embedding_bow", "fastText-style bag of embeddings", embedding_bow, "embedding.weight"),
    Entry("mha_classifier", "nn.MultiheadAttention classifier", mha_classifier, "embed.weight"),
    Entry("transformer_encoder", "PyTorch nn.TransformerEncoder tutorial", transformer_encoder, "embedding.weight"),
    Entry("hf_bert", "transformers.BertForSequenceClassification", hf_bert,
          "bert.embeddings.word_embeddings.weight"),
    Entry("hf_llama", "transformers.LlamaForCausalLM", hf_llama, "model.embed_tokens.weight"),
]
