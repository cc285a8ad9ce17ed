"""ImageNet-1K (1000 classes, 224 px). The teacher is torchvision's pretrained ResNet-18, as in the
official code: set --config.teacher.checkpoint to it (PyTorch interop); the teacher settings below are
torchvision's recipe, for training one here. Synthesis: lr 0.25, r_bn 500 (official code).
"""

from configs import imagenette


def get_config():
    config = imagenette.get_config()
    config.data.name = "imagenet2012"
    config.teacher.epochs = 90
    config.teacher.batch_size = 256
    config.teacher.lr = 0.1
    config.synthesis.lr, config.synthesis.r_bn = 0.25, 500.0
    return config
