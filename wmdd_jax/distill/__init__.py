"""WMDD's distillation stages, one file each: class statistics, barycenter targets, synthesis.

``statistics(config, workdir)`` (`class_stats`)  one eval-mode pass of the teacher over the real
    training images: per class, the penultimate features and, for every BatchNorm layer, the exact
    mean and (biased) variance of the layer's input (``statistics/class_00007.npz``).
``barycenter(config, workdir)`` (`targets`)  ``wmdd_jax.barycenter.class_barycenters`` on those
    features: IPC support points and weights per class (``barycenter/class_00007.npz``).
``recover(config, workdir)`` (`synthesis`)  the synthetic images, optimised with Adam so that their
    teacher features land on the barycenter points, their per-class BN statistics on the real ones,
    and the teacher classifies them as their class (``synthetic/images.npz`` and a PNG grid). The
    objective and its step are in `loss`.

Every stage works on the classes of this process's devices (``wmdd_jax.sharding``): one process
does all of them; on several hosts each reads and writes only its own.
"""

from wmdd_jax.distill.class_stats import (STATS_DIR, ClassStatistics, class_statistics, data_recipe,
                                          load_statistics, save_statistics, statistics)
from wmdd_jax.distill.loss import (SynthesisState, Targets, class_layout, make_synthesis_step, synthesis_grad_fn,
                                    synthesis_loss)
from wmdd_jax.distill.synthesis import SYNTHETIC_DIR, init_images, method_name, recover, save_grid
from wmdd_jax.distill.targets import BARYCENTER_DIR, BARYCENTER_KEYS, barycenter, compute_barycenters, load_barycenters

__all__ = [
    "BARYCENTER_DIR", "BARYCENTER_KEYS", "ClassStatistics", "STATS_DIR", "SYNTHETIC_DIR", "SynthesisState",
    "Targets", "barycenter", "class_statistics", "compute_barycenters", "data_recipe", "init_images",
    "load_barycenters", "load_statistics", "make_synthesis_step", "method_name", "recover", "save_grid",
    "save_statistics", "statistics", "synthesis_loss", "synthesis_grad_fn", "class_layout",
]
