"""Defaults shared by every dataset config; dataset files start from this and change a few fields.

Every number the code uses lives here, so that ``--config.a.b=value`` reaches it.
"""

import ml_collections


def train_spec(**overrides) -> ml_collections.ConfigDict:
    """One training run's recipe (teacher pretraining or one evaluation student)."""
    spec = ml_collections.ConfigDict(dict(
        model="convnet3",       # convnet3 | convnet4 | resnet18
        norm="instance",        # ConvNets: instance | batch | none
        stem="small",           # ResNets: imagenet | small | tiny
        width=128,              # ConvNet width
        first_padding=-1,       # ConvNet first conv: -1 = DC's rule (3 for 1-channel images, else 1)
        weight_init="torch",    # torch: PyTorch's defaults, as the official code | kaiming: our draw before
        optimizer="sgd",        # sgd | adamw | adam
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="step",        # cosine | step (lr/10 at half, the DC protocol) | constant
        epochs=300,
        batch_size=256,
        augment=ml_collections.ConfigDict(dict(
            flip=False,             # random horizontal flips
            crop_scale=ml_collections.config_dict.placeholder(tuple),  # (lo, hi): random-resized crop
            shift=0,                # px of random shift (pad + crop)
            cutmix=0.0,             # probability of CutMix per batch (soft labels only); 0 = off
            cutmix_beta=1.0,        # CutMix's Beta(beta, beta) for the kept area
        )),
        label_mode="hard",      # hard: cross-entropy | soft: KL to the teacher's logits
        temperature=20.0,       # soft labels: KD temperature
        checkpoint_every_steps=1000,
        checkpoint_every_secs=180.0,
        log_every_steps=50,
    ))
    for key, value in overrides.items():
        if isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.ipc = 10                      # synthetic images per class
    config.conv_impl = "auto"            # auto (winograd on CPU, lax.conv on GPU/TPU) | winograd | im2col | lax
    config.dtype = "float32"             # training compute: float32 | bfloat16 (parameters, optimizer, BN stay float32)
    config.precision = "default"         # matmul/conv precision of training steps: default | high | highest

    config.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        data_dir="",                     # '' = the dataset's default location
        tfds_name="",                    # tfds sets: another builder config, e.g. imagenette/320px-v2
        image_size=28,
        validation_per_class=0,          # > 0 holds this many train images per class out as 'validation'
        validation_seed=0,
    ))

    # Teacher: trained on the real training split; must have BatchNorm (WMDD matches its statistics).
    # Our recipe for small images (no published one for a ConvNet teacher).
    config.teacher = train_spec(norm="batch", optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine",
                                epochs=20, batch_size=256, augment=dict(flip=True, shift=2))
    config.teacher.checkpoint = ""       # a finished teacher work directory to reuse instead of training
    config.teacher.first_padding = 1     # our teacher: padding 1 everywhere (students follow DC's rule)

    # Evaluation: train fresh students on the (synthetic or random-real) set, report test accuracy.
    config.eval = ml_collections.ConfigDict()
    config.eval.source = "synthetic"     # synthetic (this workdir's distilled set) | random_real | a folder
    config.eval.models = ("convnet3",)
    config.eval.label_modes = ("hard",)  # any of hard, soft
    config.eval.seeds = (0, 1, 2)
    config.eval.split = "test"           # test | validation (for tuning)
    # The seeds of one model and label mode: stack (one vmapped program) | sequence (one compiled step,
    # in turn) | concurrent (one compiled step, each seed in a thread; one device, one process) | auto
    # (stack on GPU/TPU or several devices; concurrent on one CPU device, where it fills the cores).
    config.eval.together = "auto"
    config.eval.relabel_seed = 0         # batch order + augmentation of stored soft labels
    # DC/DM protocol: SGD 0.01, lr/10 at half, wd 5e-4, batch 256, no augmentation.
    config.eval.hard = train_spec(epochs=300)
    # SRe2L/WMDD protocol: AdamW 1e-3, wd 0.01, cosine, batch 100, KD T=20, crop + flip.
    config.eval.soft = train_spec(optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine", epochs=300,
                                  batch_size=100, label_mode="soft", temperature=20.0,
                                  augment=dict(flip=True, crop_scale=(0.08, 1.0)))
    config.eval.soft.relabel = "online"  # online: teacher in the loop | stored: labels from the relabel stage

    # Synthesis (the recover stage; docs/method.md): the official code's ImageNette recipe.
    config.synthesis = ml_collections.ConfigDict(dict(
        iterations=2000,
        lr=0.25,                         # Adam on the pixels, betas (0.5, 0.9), cosine to 0
        r_bn=10.0,                       # weight of the BN-statistics loss
        r_wb=1.0,                        # weight of the cross-entropy term
        first_bn_multiplier=1.0,
        per_class_bn=True,               # False: SRe2L's global BN statistics
        use_barycenter=True,             # False: the no-barycenter (SRe2L-style) ablation
        init="real",                     # real (nearest real image to each support point) | noise
        crop_scale=(0.08, 1.0),
        jitter=32,                       # max random roll in px at 224 px; scaled to data.image_size
        flip=True,
        batch_size=100,                  # the official batch: the loss is summed over groups of this many
        chunk_images=0,                  # images per forward/backward chunk of a device; 0 = auto (CPU: all, else batch_size)
        method="",                       # name in results; '' = derived (wmdd, no_barycenter, ..._global_bn)
        checkpoint_every_steps=200,
        checkpoint_every_secs=180.0,
        log_every_steps=20,
    ))
    config.barycenter = ml_collections.ConfigDict(dict(
        learn_weights=False,             # True: weighted (k-means) barycenter; False: uniform weights
        max_features_per_class=0,        # 0 = all; else a random budget per class
        num_iterations=100,              # uniform weights: outer fixed-point steps (epsilon annealed)
        batch_size=1,                    # classes per vmap chunk (1: in sequence, ~2x faster on CPU); 0: one vmap
    ))
    # Devices: class-sharded arrays over a mesh (wmdd_jax/sharding.py); several hosts via jax.distributed.
    config.mesh = ml_collections.ConfigDict(dict(
        shape=(-1,),                     # devices per axis; -1 = all the rest
        axes=("classes",),               # class arrays are split over all axes together
    ))
    config.distributed = ml_collections.ConfigDict(dict(
        enabled=False,                   # or WMDD_DISTRIBUTED=1: call jax.distributed.initialize first
        coordinator_address="",          # '' (and 0 / -1 below) = JAX's detection (TPU VM, Slurm, Open MPI)
        num_processes=0,
        process_id=-1,
        cpu_collectives="gloo",          # CPU backend only: cross-process collectives
        timeout_secs=300,
    ))
    # JAX's persistent compilation cache (wmdd_jax/compilation_cache.py): later runs of the same shapes
    # read their compiled programs back instead of compiling them again.
    config.compilation_cache = ml_collections.ConfigDict(dict(
        dir="auto",                      # auto: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/wmdd_jax/xla; '' = off
        min_compile_secs=0.2,            # programs that compile faster are not stored
        max_size_mb=2048,                # least recently used entries go beyond this; -1 = no bound
    ))
    # Stage export: our synthetic set and teacher in the PyTorch layouts (wmdd_jax/interop).
    config.export = ml_collections.ConfigDict(dict(
        image_format="png",              # png (exact) | jpeg (the official code's choice, lossy)
        jpeg_quality=95,
    ))
    return config
