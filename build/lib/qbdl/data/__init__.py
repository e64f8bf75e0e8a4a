"""LightningDataModules for qbdl: digits (embedded), imagenet, colorectal, camelyon17, torchvision sets."""

from qbdl.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataModule,
    ImageSpec,
    SpecTransform,
    TransformSubset,
    ood_dataloader,
    stratified_split,
)
from qbdl.data.camelyon17 import Camelyon17DataModule
from qbdl.data.colorectal import KATHER_CLASSES, ColorectalDataModule
from qbdl.data.digits import DigitsDataModule
from qbdl.data.errors import BadImageError, DataLeakError, DataNotFoundError
from qbdl.data.imagenet import ImageNetDataModule
from qbdl.data.leak import check_no_leak, fingerprint
from qbdl.data.torchvision_sets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KATHER_CLASSES",
    "BadImageError",
    "CIFAR10DataModule",
    "Camelyon17DataModule",
    "ColorectalDataModule",
    "DataLeakError",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "ImageSpec",
    "MNISTDataModule",
    "SVHNDataModule",
    "SpecTransform",
    "TransformSubset",
    "check_no_leak",
    "fingerprint",
    "ood_dataloader",
    "stratified_split",
]
