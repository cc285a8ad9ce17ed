"""Fashion-MNIST (28x28x1, 10 classes): ConvNet-3 teacher with batch norm, ConvNet-3 students.

``configs/fashion_mnist.py`` is the setting of the committed results (experiments/); no official
WMDD setting exists for this set. ``configs/fashion_mnist.py:quick`` is the README's demo: the same
method on smaller budgets (a 2-epoch teacher, barycenters of 2000 features per class, 500
synthesis steps, one evaluation seed), sized to finish `all` in under 20 minutes on a 2-core CPU.
"""

from configs import default


def get_config(variant: str = ""):
    config = default.get_config()
    config.data.name = "fashion_mnist"
    config.data.image_size = 28
    config.synthesis.crop_scale = (0.5, 1.0)   # 28 px images: a milder crop than ImageNet's 0.08
    if variant == "quick":
        config.teacher.epochs = 2
        config.barycenter.max_features_per_class = 2000
        config.synthesis.iterations = 500
        config.eval.seeds = (0,)
        config.eval.label_modes = ("hard", "soft")
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/fashion_mnist.py; use '' or 'quick'")
    return config
