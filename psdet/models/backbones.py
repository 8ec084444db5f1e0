"""Backbones: an RGB image [B, 3, S, S] -> a feature map [B, 32 * depth_factor, S/32, S/32].

`depth_factor` 32 gives the original networks (a 1024-channel map); every other width
is scaled by depth_factor / 32. Written out here rather than taken from torchvision.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

# ----------------------------------------------------------------------------- Darknet (DMPR-PS)


def conv_bn_leaky(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """Bias-free conv, BatchNorm, LeakyReLU(0.1): the unit every Darknet layer is made of."""
    padding = 0 if kernel_size == 1 else 1  # 3x3 keeps the size; 4x4 stride 2 halves it exactly
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1),
    ]


def detector_block(channels: int) -> list[nn.Module]:
    """1x1 squeeze 2c -> c, then 3x3 expand c -> 2c (each with BN and LeakyReLU 0.1)."""
    return conv_bn_leaky(2 * channels, channels, 1) + conv_bn_leaky(channels, 2 * channels, 3)


def halve_unit(channels: int) -> list[nn.Module]:
    """4x4 stride-2 conv c -> 2c: halves the resolution, doubles the width."""
    return conv_bn_leaky(channels, 2 * channels, 4, stride=2)


class Darknet(nn.Module):
    """YetAnotherDarknet of DMPR-PS: darknet-53 style units at the depth of darknet-19.

    Five halvings; stage s (1..5) is a halve unit followed by (1, 1, 2, 2, 1) detector blocks.
    Default PyTorch init, as the original.
    """

    blocks_per_stage = (1, 1, 2, 2, 1)

    def __init__(self, depth_factor: int):
        super().__init__()
        layers = conv_bn_leaky(3, depth_factor, 3)
        width = depth_factor
        for num_blocks in self.blocks_per_stage:
            layers += halve_unit(width)
            width *= 2
            for _ in range(num_blocks):
                layers += detector_block(width // 2)
        self.layers = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, image: Tensor) -> Tensor:
        return self.layers(image)


# ----------------------------------------------------------------------------- VGG16


VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 1024, "M")


class VGG16(nn.Module):
    """VGG16 (config D) features without BN, the last conv widened to 1024; no classifier.

    Init as the original: conv weights ~ N(0, sqrt(2 / (k * k * out))), biases 0.
    """

    def __init__(self, depth_factor: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in VGG16_WIDTHS:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = width * depth_factor // 32
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)

    def forward(self, image: Tensor) -> Tensor:
        return self.features(image)


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet stem (7x7 stride 2, max-pool) + 4 stages, no pooling or classifier; the
    stem width 64 and `stage_planes` are widths at depth_factor 32.

    Init as the original: kaiming-normal (fan_out, relu) convs, BN weight 1 and bias 0.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, ...],
                 stage_planes: tuple[int, ...], depth_factor: int):
        super().__init__()
        planes = [width * depth_factor // 32 for width in stage_planes]
        self.in_channels = 64 * depth_factor // 32
        self.conv1 = nn.Conv2d(3, self.in_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, planes[0], blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(block, planes[1], blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(block, planes[2], blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(block, planes[3], blocks_per_stage[3], stride=2)
        self.out_channels = self.in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [block(self.in_channels, planes, stride, downsample)]
        self.in_channels = out_channels
        layers += [block(out_channels, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ----------------------------------------------------------------------------- by name


def vgg16(depth_factor: int) -> VGG16:
    return VGG16(depth_factor)


def darknet(depth_factor: int) -> Darknet:
    return Darknet(depth_factor)


def resnet18(depth_factor: int) -> ResNet:
    # layer4 widened to 1024 planes so the map has 32 * depth_factor channels
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 1024), depth_factor)


def resnet50(depth_factor: int) -> ResNet:
    # layer4 narrowed to 256 planes (x4 expansion = 1024 channels)
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 256), depth_factor)


def build_backbone(name: str, depth_factor: int) -> nn.Module:
    """`vgg16 | darknet | resnet18 | resnet50` -> a module with `.out_channels == 32 * depth_factor`."""
    constructors = {"vgg16": vgg16, "darknet": darknet, "resnet18": resnet18, "resnet50": resnet50}
    if name not in constructors:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(constructors)}")
    return constructors[name](depth_factor)
