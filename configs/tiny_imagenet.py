"""Tiny-ImageNet (200 classes), upsampled to 224 px as in the official code.

Teacher: ResNet-18 with a 3x3 stride-2 stem (padding 3, no max-pool), as in the official code.
Synthesis: lr 0.1, r_bn 500, the official code's instructions for this set.
"""

from configs import imagenette


def get_config():
    config = imagenette.get_config()
    config.data.name = "tiny_imagenet"
    config.data.image_size = 224
    config.teacher.stem = "tiny"
    config.synthesis.lr, config.synthesis.r_bn = 0.1, 500.0
    for spec in (config.eval.soft, config.eval.hard):
        spec.stem = "tiny"
    return config
