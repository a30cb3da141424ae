"""CIFAR ResNets of He et al. (2016) with option-A shortcuts, registered in timm's model registry.

State-dict keys follow akamaster/pytorch_resnet_cifar10 (`conv1`, `bn1`, `layer{1,2,3}.{i}.*`,
`linear`), so checkpoints trained with that code load unchanged. After ``import hub_dfq``,
``timm.create_model("resnet20_cifar")`` works like any timm model.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet"]

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channels added equally on both sides."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of widths 16, 32, 64."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg", **_):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if global_pool != "avg":
            raise ValueError(f"CIFAR ResNets only support global_pool='avg', got {global_pool!r}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = 64
        self.global_pool = global_pool
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1",
        "classifier": "linear",
        "label_names": CIFAR10_LABELS,
        "license": "bsd-2-clause",
        **kwargs,
    }


def embedded_checkpoint() -> str:
    """Path of the ResNet-20 weights shipped inside the package."""
    return str(resources.files("hub_dfq") / "assets" / "default" / "model.safetensors")


default_cfgs = generate_default_cfgs(
    {
        # The JPEG-adapted CIFAR-10 weights ship with the package, so `pretrained=True` needs no network.
        "resnet20_cifar.jpeg_cifar10": _cfg(file=embedded_checkpoint()),
        "resnet32_cifar": _cfg(),
        "resnet44_cifar": _cfg(),
        "resnet56_cifar": _cfg(),
    }
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, depth=depth, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet56_cifar", 56, pretrained, **kwargs)
