"""ResNet builders (quantization-ready)."""

from .files import load_state, load_weights, save_state, state_dict_bytes
from .resnet import CifarResNet, resnet18, resnet20, resnet50

__all__ = [
    "CifarResNet",
    "load_state",
    "load_weights",
    "resnet18",
    "resnet20",
    "resnet50",
    "save_state",
    "state_dict_bytes",
]
