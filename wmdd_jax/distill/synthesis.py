"""Stage ``recover``: the synthetic images, optimised over the mesh, and the files they go to.

Starts from the real image nearest each barycenter point (or noise), runs `make_synthesis_step`
for ``synthesis.iterations`` steps with checkpoints, and writes ``synthetic/images.npz`` and a PNG
grid (one row per class). On several processes each writes its classes' shard and process 0 joins them.
"""

from __future__ import annotations

import glob
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from wmdd_jax import checkpoint as ckpt
from wmdd_jax import files, sharding
from wmdd_jax.data import Source, denormalize, load_split, normalize
from wmdd_jax.distill.class_stats import STATS_DIR, ClassStatistics, load_statistics, owned_classes
from wmdd_jax.distill.loss import SynthesisState, Targets, chunk_classes, class_layout, make_synthesis_step
from wmdd_jax.distill.targets import barycenter
from wmdd_jax.errors import UserError
from wmdd_jax.metric_writers import EventFileWriter
from wmdd_jax.teacher import identity as teacher_identity
from wmdd_jax.teacher import load_teacher
from wmdd_jax.train import BOOKKEEPING

SYNTHETIC_DIR = "synthetic"


def init_images(config, source: Source, stats: ClassStatistics, support: np.ndarray) -> np.ndarray:
    """``[n, m, h, w, c]`` normalised initial images of the classes of ``stats``.

    ``noise``: class ``k`` draws from ``fold_in(key(seed), k)``. ``real``: for each support
    point, the nearest not yet taken real image of its class (only those images are read).
    """
    n, m = support.shape[:2]
    h, w, ch = source.image_shape
    init = config.synthesis.init
    if init == "noise":
        return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), k),
                                                      (m, h, w, ch))) for k in stats.classes])
    if init != "real":
        raise UserError(f"synthesis.init must be 'real' or 'noise', got {init!r}")
    picks = []
    for i in range(n):
        f, b = stats.features[i], support[i]
        d = (f * f).sum(1)[:, None] - 2 * f @ b.T + (b * b).sum(1)[None]      # [n_k, m] squared distances
        chosen = []
        for j in range(m):  # greedy: each support point takes its nearest image not yet taken
            order = np.argsort(d[:, j])
            chosen.append(next(c for c in order if c not in chosen))
        picks.append(stats.indices[i][chosen])
    images, _ = source.get(np.concatenate(picks))
    return np.asarray(normalize(images, source.mean, source.std)).reshape(n, m, h, w, ch)



def method_name(config) -> str:
    s = config.synthesis
    if s.method:
        return s.method
    if int(s.iterations) == 0:  # nothing optimised: the initial images are the set
        return "noise" if s.init == "noise" else "barycenter_real"
    name = "wmdd" if s.use_barycenter else "no_barycenter"
    if not s.per_class_bn:
        name += "_global_bn"
    if s.init == "noise":
        name += "_noise_init"
    return name


def _shard_file(out_dir: str) -> str:
    return os.path.join(out_dir, f"images.process{jax.process_index():03d}-of-{jax.process_count():03d}.npz")


def _load_images(path: str) -> np.ndarray:
    return ckpt.read_npz(path, "recover")["images"]


def recover(config, workdir: str) -> np.ndarray:
    """Stage ``recover``: optimises the synthetic set over the mesh; resumes from its last checkpoint.

    ``synthesis.iterations=0`` keeps the initial images as they are (with ``init=real``: the real
    image nearest each support point, a barycenter-selected coreset; an ablation of the optimisation).

    Returns this process's images ``[n * ipc, h, w, c]`` in [0, 1] (all classes on one process).
    Several processes each write ``synthetic/images.processP-of-N.npz`` (their classes); process 0
    joins them into ``synthetic/images.npz`` when it sees them all (a shared work directory).
    """
    out_dir = os.path.join(workdir, SYNTHETIC_DIR)
    out_file = os.path.join(out_dir, "images.npz")
    cfg = config.synthesis
    if int(cfg.iterations) < 0:
        raise UserError(f"synthesis.iterations must be >= 0 (0: the initial images, unoptimised), "
                        f"got {cfg.iterations}")
    # chunk_images changes how the gradient is computed, not what it is.
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in (*BOOKKEEPING, "method", "chunk_images")}
    source = load_split(config.data, "train")
    teacher = load_teacher(config, workdir, source)
    teacher_id = teacher_identity(teacher)
    ckpt.check_recipe(out_dir, dict(recipe, teacher=teacher_id, ipc=int(config.ipc), seed=int(config.seed)),
                      "a synthetic set")
    multi = jax.process_count() > 1
    mine = _shard_file(out_dir) if multi else out_file
    if sharding.all_processes_agree(os.path.exists(out_file) or os.path.exists(mine)):
        return _load_images(mine if os.path.exists(mine) else out_file)
    C, m = source.num_classes, int(config.ipc)
    mesh = sharding.make_mesh(config.mesh)
    group, spread = class_layout(cfg, m, C, mesh.size)  # whole official batches per device, if it can
    classes = owned_classes(mesh, C, group)
    C_pad = sharding.num_padded_classes(C, mesh, group)
    stats = load_statistics(os.path.join(workdir, STATS_DIR), classes)
    bc = barycenter(config, workdir, teacher_id)
    row = {k: i for i, k in enumerate(classes)}

    def by_class(arrays):  # this process's rows -> a class-sharded global array
        arrays = np.asarray(arrays)
        return sharding.class_array(mesh, C, lambda k: arrays[row[k]], arrays.shape[1:], arrays.dtype, group)

    if cfg.per_class_bn:
        bn_mean = {layer: by_class(v) for layer, v in stats.bn_mean.items()}
        bn_var = {layer: by_class(v) for layer, v in stats.bn_var.items()}
    else:
        running = flax.traverse_util.flatten_dict(teacher.variables["batch_stats"], sep="/")
        bn_mean = sharding.put_replicated({k[: -len("/mean")]: v for k, v in running.items()
                                           if k.endswith("/mean")}, mesh)
        bn_var = sharding.put_replicated({k[: -len("/var")]: v for k, v in running.items()
                                          if k.endswith("/var")}, mesh)
    targets = Targets(by_class(bc["support"]), bn_mean, bn_var)
    class_ids = sharding.class_array(mesh, C, lambda k: np.int32(k), (), np.int32, group)
    class_mask = sharding.class_array(mesh, C, lambda k: np.float32(1), (), np.float32, group)
    variables = sharding.put_replicated(teacher.variables, mesh)

    schedule = optax.cosine_decay_schedule(cfg.lr, max(int(cfg.iterations), 1))
    tx = optax.adam(schedule, b1=0.5, b2=0.9, eps=1e-8)
    images = by_class(init_images(config, source, stats, bc["support"]).astype(np.float32))

    def fresh(images):
        return SynthesisState(step=jnp.zeros((), jnp.int32), images=images, opt_state=tx.init(images))

    shardings = sharding.tree_shardings(jax.eval_shape(fresh, images), mesh, C_pad)
    state = jax.jit(fresh, out_shardings=shardings)(images)
    manager = ckpt.manager(os.path.join(out_dir, "checkpoints"))
    state = ckpt.restore(manager, state)
    step_fn = make_synthesis_step(teacher.model, cfg, np.asarray(source.mean, np.float32),
                                  np.asarray(source.std, np.float32), source.image_shape[0], tx,
                                  seed=config.seed + 1, state_shardings=shardings, mesh=mesh,
                                  spread=spread, chunk=None if spread else chunk_classes(
                                      cfg, m, C_pad // mesh.size, group, sharding.mesh_platform(mesh)))
    start, last_save, t0 = int(state.step), time.time(), time.time()
    if start:
        print(f"recover: resuming at step {start} of {cfg.iterations}")
    bar = tqdm(total=cfg.iterations, initial=start, desc=f"recover {method_name(config)}",
               disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
    # Loss parts and learning rate: metrics.jsonl and TensorBoard event files in synthetic/.
    metrics_path, curves = os.path.join(out_dir, "metrics.jsonl"), EventFileWriter(out_dir)
    if jax.process_index() == 0:
        files.write_jsonl(metrics_path, [r for r in files.read_jsonl(metrics_path) if r.get("step", 0) <= start])
    try:
        for it in range(start, cfg.iterations):
            state, parts = step_fn(state, targets, variables, class_ids, class_mask)
            done = it + 1
            if done % int(cfg.log_every_steps) == 0:
                scalars = {k: float(v) for k, v in parts.items()}
                scalars["learning_rate"] = float(schedule(it))
                curves.write_scalars(done, scalars)
                if jax.process_index() == 0:
                    files.append_jsonl(metrics_path, {"step": done, **scalars})
                bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()})
            bar.update(1)
            # Time-based saves only at log steps, decided by process 0 so every process saves together.
            due = done % int(cfg.log_every_steps) == 0 and sharding.broadcast_flag(
                time.time() - last_save > cfg.checkpoint_every_secs)
            if done % int(cfg.checkpoint_every_steps) == 0 or due or done == cfg.iterations:
                ckpt.save(manager, done, state)
                last_save = time.time()
    finally:
        bar.close()
        curves.close()
        ckpt.wait(manager)
    rows = sharding.local_class_rows(state.images, C)
    pixels = np.clip(np.asarray(denormalize(np.stack([rows[k] for k in classes]), source.mean, source.std)), 0, 1)
    pixels = pixels.reshape(len(classes) * m, *pixels.shape[2:])
    finite = np.isfinite(pixels).reshape(len(classes), -1).all(1)
    if not sharding.all_processes_agree(bool(finite.all())):  # every process stops, none waits on the others
        bad = [k for k, ok in zip(classes, finite) if not ok]
        raise UserError(f"recover: the synthetic images of classes {bad or 'on another process'} are not finite "
                        f"(the optimisation diverged); nothing was written. Lower --config.synthesis.lr (now "
                        f"{cfg.lr}) and delete {out_dir} to start it over")
    os.makedirs(out_dir, exist_ok=True)
    ckpt.write_npz(mine, images=pixels, labels=np.repeat(np.asarray(classes), m).astype(np.int32),
                   weights=(bc["weights"] * m).reshape(-1).astype(np.float32), method=np.array(method_name(config)))
    sharding.sync("wmdd_jax recover: shards written")
    if multi and jax.process_index() == 0:
        _join_shards(out_dir, out_file)
    if os.path.exists(out_file):
        save_grid(ckpt.read_npz(out_file, "recover")["images"].reshape(C, m, *pixels.shape[1:]), os.path.join(out_dir, "grid.png"))
    print(f"recover: {len(classes) * m} images in {time.time() - t0:.0f} s -> {mine}")
    return pixels


def _join_shards(out_dir: str, out_file: str) -> None:
    """Process 0: one ``images.npz`` from every process's shard, when all are visible here."""
    paths = sorted(glob.glob(os.path.join(out_dir, f"images.process*-of-{jax.process_count():03d}.npz")))
    if len(paths) != jax.process_count():
        print(f"recover: {len(paths)} of {jax.process_count()} image shards visible in {out_dir}; join them "
              f"there (a shared work directory does it by itself)")
        return
    parts = [ckpt.read_npz(p, "recover") for p in paths]
    order = np.argsort(np.concatenate([p["labels"] for p in parts]), kind="stable")
    joined = {key: np.concatenate([p[key] for p in parts])[order] for key in ("images", "labels", "weights")}
    ckpt.write_npz(out_file, **joined, method=parts[0]["method"])


def save_grid(images: np.ndarray, path: str, max_columns: int = 10, scale: int = 2) -> None:
    """PNG of ``images`` [C, m, h, w, c] in [0, 1]: one row per class, at most ``max_columns`` each."""
    from PIL import Image

    C, m, h, w, ch = images.shape
    cols = min(m, max_columns)
    grid = np.ones((C * (h + 2), cols * (w + 2), ch), np.float32)
    for k in range(C):
        for j in range(cols):
            grid[k * (h + 2) + 1 : k * (h + 2) + 1 + h, j * (w + 2) + 1 : j * (w + 2) + 1 + w] = images[k, j]
    pixels = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if ch == 1 else pixels)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
