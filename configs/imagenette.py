"""ImageNette (10 ImageNet classes, 224 px): the official WMDD code's recipe (docs/method.md).

Teacher: ResNet-18 (ImageNet stem), SGD 0.025, momentum 0.9, wd 1e-4, batch 32, cosine, 50 epochs.
Synthesis: 2000 iterations, Adam lr 0.25, r_bn 10, r_wb 1. Students: ResNet-18, soft labels of
crop + flip + CutMix batches.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "imagenette"
    config.data.image_size = 224
    t = config.teacher
    t.model, t.stem, t.lr, t.weight_decay, t.batch_size, t.epochs = "resnet18", "imagenet", 0.025, 1e-4, 32, 50
    t.schedule = "cosine"
    t.augment.crop_scale, t.augment.flip, t.augment.shift = (0.08, 1.0), True, 0
    config.synthesis.lr, config.synthesis.r_bn = 0.25, 10.0
    config.synthesis.crop_scale = (0.08, 1.0)
    config.eval.models = ("resnet18",)
    config.eval.label_modes = ("soft",)
    config.eval.soft.augment.cutmix = 1.0  # SRe2L / official relabel: CutMix (Beta(1, 1)) on every batch
    for spec in (config.eval.soft, config.eval.hard):
        spec.stem = "imagenet"
    return config
