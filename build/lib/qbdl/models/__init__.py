"""ResNet builders (quantization-ready)."""

from .resnet import CifarResNet, load_weights, resnet18, resnet20, resnet50

__all__ = ["CifarResNet", "load_weights", "resnet18", "resnet20", "resnet50"]
