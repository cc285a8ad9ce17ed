"""Fashion-MNIST (28x28x1, 10 classes): ConvNet-3 teacher with batch norm, ConvNet-3 students.

No official WMDD setting exists for this set; synthesis values are tuned on a
validation split held out of train (see experiments/ for the search).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "fashion_mnist"
    config.data.image_size = 28
    config.synthesis.crop_scale = (0.5, 1.0)   # 28 px images: a milder crop than ImageNet's 0.08
    return config
