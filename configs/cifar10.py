"""CIFAR-10 (32x32x3, 10 classes): ConvNet-3 teacher with batch norm; ConvNet-3 and ResNet-18 students.

No official WMDD setting; the DD-literature ConvNet protocol with Fashion-MNIST's synthesis defaults.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.teacher.epochs = 50  # our choice (no published teacher recipe for a ConvNet here)
    config.eval.models = ("convnet3", "resnet18")
    config.synthesis.crop_scale = (0.5, 1.0)
    return config
