"""CIFAR-100 (32x32x3, 100 classes): as CIFAR-10."""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.data.name = "cifar100"
    return config
