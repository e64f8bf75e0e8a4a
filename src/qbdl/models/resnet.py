"""ResNet builders: CIFAR-style resnet20 and torchvision resnet18/resnet50.

Plain nets, no quantization stubs: qbdl.quant.prepare traces them, quantizes the input where the net starts,
dequantizes the logits where it ends and turns each residual `+` into an INT8 add.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from .files import load_weights


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block (option B: 1x1 conv shortcut when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, section 4.2): 3 stages of n blocks, 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_chans: int = 3, weights_path: str | None = None) -> CifarResNet:
    """CIFAR-style ResNet-20 (0.27 M parameters) for small inputs."""
    model = CifarResNet(20, num_classes, in_chans)
    if weights_path:
        load_weights(model, weights_path)
    return model


def _torchvision_resnet(
    arch: str, num_classes: int, weights: str | None, weights_path: str | None, in_chans: int
) -> nn.Module:
    if weights and weights_path:
        raise ValueError(
            "give either `weights` (a torchvision weights name, downloads) or `weights_path`, not both"
        )
    model = getattr(tvm, arch)(weights=None, num_classes=1000 if (weights or weights_path) else num_classes)
    if weights:
        model.load_state_dict(download_weights(resolve_weights(arch, weights)))
    elif weights_path:
        load_weights(model, weights_path)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def resolve_weights(arch: str, name: str):
    """torchvision weights of `arch` named `name`: 'IMAGENET1K_V1', 'DEFAULT' or 'ResNet50_Weights.IMAGENET1K_V1'."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    valid = [w.name for w in enum] + ["DEFAULT"]
    prefix, _, short = str(name).rpartition(".")
    if prefix in ("", enum.__name__) and short in valid:
        return enum.DEFAULT if short == "DEFAULT" else enum[short]
    raise ValueError(
        f"unknown torchvision weights {name!r} for {arch}: valid names are {valid} (or "
        f"{enum.__name__}.<name>). Set model.weights to one of them, or model.weights=null "
        "model.weights_path=/path/to/weights.pth to load a local file."
    )


def download_weights(weights) -> dict:
    """The state dict of torchvision `weights` (torch hub cache, else a download); offline: a clear error."""
    from torch.hub import get_dir

    file = weights.url.rsplit("/", 1)[-1]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError, socket errors: no network here
        raise WeightsUnavailableError(
            f"cannot download the pretrained weights {type(weights).__name__}.{weights.name} "
            f"({type(exc).__name__}: {exc}). Offline, download {file} from {weights.url} on a machine with "
            f"internet and either put it in {os.path.join(get_dir(), 'checkpoints')} (torch's hub cache) or "
            f"run with model.weights=null model.weights_path=/path/to/{file}."
        ) from exc


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline) and no local file was given."""


def resnet18(
    num_classes: int = 1000, weights: str | None = None, weights_path: str | None = None, in_chans: int = 3
) -> nn.Module:
    """torchvision ResNet-18; `weights` names torchvision weights (online), `weights_path` a local file."""
    return _torchvision_resnet("resnet18", num_classes, weights, weights_path, in_chans)


def resnet50(
    num_classes: int = 1000, weights: str | None = None, weights_path: str | None = None, in_chans: int = 3
) -> nn.Module:
    """torchvision ResNet-50; `weights` names torchvision weights (online), `weights_path` a local file."""
    return _torchvision_resnet("resnet50", num_classes, weights, weights_path, in_chans)
