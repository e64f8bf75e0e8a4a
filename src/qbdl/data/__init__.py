"""LightningDataModules for qbdl: digits (embedded), imagenet, colorectal, camelyon17, torchvision sets."""

from qbdl.data.camelyon17 import Camelyon17DataModule
from qbdl.data.colorectal import KATHER_CLASSES, ColorectalDataModule
from qbdl.data.digits import DigitsDataModule
from qbdl.data.errors import BadImageError, DataLeakError, DataNotFoundError
from qbdl.data.imagenet import ImageNetDataModule
from qbdl.data.leak import check_no_leak, fingerprint
from qbdl.data.module import ImageDataModule, ood_dataloader
from qbdl.data.splits import TransformSubset, stratified_split
from qbdl.data.torchvision_sets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)
from qbdl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageSpec, SpecTransform

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
