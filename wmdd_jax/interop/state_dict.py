"""PyTorch ``state_dict`` <-> Flax variables for our ResNet-18 and ConvNet. Pure numpy.

Layouts on the PyTorch side:

- ResNet: torchvision's names (``conv1``, ``bn1``, ``layer{i}.{j}.conv1|bn1|conv2|bn2``,
  ``layer{i}.{j}.downsample.0|1``, ``fc``), whatever the stem: the small-image stems only
  change ``conv1.weight``'s shape (SRe2L/WMDD replace ``conv1`` and set ``maxpool`` to
  ``Identity``, which has no parameters).
- ConvNet: the dataset-distillation ``ConvNet`` (DC/DM/MTT): ``features`` is a Sequential
  of ``[Conv2d, norm, ReLU, AvgPool2d]`` per block (``[Conv2d, ReLU, AvgPool2d]`` without
  norm), so block ``i``'s conv is ``features.{s i}`` and its norm ``features.{s i + 1}``
  with ``s`` = 4 or 3; the norm is ``GroupNorm(C, C)`` (instance) or ``BatchNorm2d``;
  ``classifier`` is a Linear on the flattened NCHW map.

Conversions: conv ``[out, in, kh, kw]`` <-> ``[kh, kw, in, out]``; Linear ``[out, in]`` <->
Dense ``[in, out]``; the ConvNet classifier's input rows are reordered from (c, y, x) to
(y, x, c) because our feature map is flattened NHWC. BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` are ``scale``/``bias`` (params) and ``mean``/``var``
(``batch_stats``; same PyTorch momentum semantics, so no rescaling).
``num_batches_tracked`` is accepted and dropped on import, written as 0 on export.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import numpy as np

from wmdd_jax.errors import UserError
from wmdd_jax.models import ConvNet, ResNet

_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_TRACKED = "num_batches_tracked"


class Entry(NamedTuple):
    """One tensor: its PyTorch key, its path in our variables, how it is laid out.

    kind: ``conv`` (4-d kernel), ``linear`` (2-d kernel), ``flat_linear`` (the ConvNet
    classifier: also reorders its input rows; ``feature_map`` = (h, w, c)), ``vector``.
    """

    torch_key: str
    path: tuple[str, ...]
    kind: str
    feature_map: tuple[int, int, int] | None = None


def torch_module_name(model, flax_path: str) -> str:
    """The PyTorch module name of one of our modules (``"layer1_0/downsample_bn"`` -> ``"layer1.0.downsample.1"``).

    Handy to pair our BatchNorm layers (keys of `collect_bn_moments`) with PyTorch hooks.
    """
    parts = flax_path.split("/")
    if isinstance(model, ResNet):
        out = []
        for p in parts:
            block = re.fullmatch(r"layer(\d+)_(\d+)", p)
            if block:
                out.append(f"layer{block[1]}.{block[2]}")
            else:
                out.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(p, p))
        return ".".join(out)
    if isinstance(model, ConvNet):
        (name,) = parts
        stride = 3 if model.norm == "none" else 4
        layer = re.fullmatch(r"(conv|norm)(\d+)", name)
        if layer:
            return f"features.{stride * int(layer[2]) + (layer[1] == 'norm')}"
        return name
    raise TypeError(f"no PyTorch layout for {type(model).__name__}")


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def key_map(model, shapes, image_shape: tuple[int, ...] | None = None) -> list[Entry]:
    """The entries of ``model``'s variables, given their shapes (e.g. from `jax.eval_shape`).

    Args:
      model: a `ResNet` or `ConvNet`.
      shapes: ``{'params': ..., 'batch_stats': ...}`` nested dicts of arrays or shape structs.
      image_shape: (h, w, c) the model runs on. ConvNets need it for a non-square image (the
        classifier's input is the pooled map, ``h' // 2**depth`` by ``w' // 2**depth`` with h', w'
        the first convolution's output size); without
        it the map is taken to be square.
    Returns:
      One `Entry` per tensor, grouped by module in the order of ``shapes['params']``, each
      module's parameters before its running statistics.
    """
    flat = dict(_flatten(shapes))
    modules = list(dict.fromkeys(path[1:-1] for path in flat if path[0] == "params"))
    modules += [m for m in dict.fromkeys(path[1:-1] for path in flat) if m not in modules]
    entries = []
    for module in modules:
        for collection, name in _LEAF_NAMES:
            path = (collection, *module, name)
            if path not in flat:
                continue
            key = f"{torch_module_name(model, '/'.join(module))}.{_LEAF_NAMES[collection, name]}"
            ndim = len(flat[path].shape)
            kind, fmap = ("conv" if ndim == 4 else "linear" if ndim == 2 else "vector"), None
            if isinstance(model, ConvNet) and kind == "linear":
                kind, fmap = "flat_linear", _feature_map(model, flat[path].shape[0], image_shape, key)
            entries.append(Entry(key, path, kind, fmap))
    unnamed = set(flat) - {e.path for e in entries}
    if unnamed:
        raise TypeError(f"no PyTorch name for {sorted(unnamed)}")
    return entries


def _feature_map(model: ConvNet, rows: int, image_shape, key: str) -> tuple[int, int, int]:
    c = model.width
    if image_shape is not None:
        pad = model.first_padding if model.first_padding >= 0 else (3 if image_shape[-1] == 1 else 1)
        grow = 2 * (pad - 1)  # the first 3x3 conv keeps the size at padding 1
        return (image_shape[0] + grow) // 2**model.depth, (image_shape[1] + grow) // 2**model.depth, c
    side = int(round((rows // c) ** 0.5))
    if side * side * c != rows:
        raise ValueError(f"{key}: give image_shape, {rows} inputs is not a square map of {c} channels")
    return side, side, c


def _to_ours(entry: Entry, t: np.ndarray) -> np.ndarray:
    if entry.kind == "conv":
        return t.transpose(2, 3, 1, 0)
    if entry.kind == "linear":
        return t.T
    if entry.kind == "flat_linear":
        h, w, c = entry.feature_map
        return t.reshape(t.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, t.shape[0])
    return t


def _to_torch(entry: Entry, a: np.ndarray) -> np.ndarray:
    if entry.kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if entry.kind == "linear":
        return a.T
    if entry.kind == "flat_linear":
        h, w, c = entry.feature_map
        return a.reshape(h, w, c, a.shape[-1]).transpose(3, 2, 0, 1).reshape(a.shape[-1], c * h * w)
    return a


def _torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_torch(entry, np.empty(shape, np.uint8)).shape


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def from_torch(state_dict: Mapping[str, np.ndarray], model, shapes, image_shape=None,
               describe: str = "the model") -> dict:
    """Our variables from a PyTorch ``state_dict`` (values: numpy arrays).

    Args:
      state_dict: torch key -> numpy array (see `load_torch_checkpoint`).
      model: the `ResNet` or `ConvNet` to fill.
      shapes: that model's variables or their shape structs (the target layout).
      image_shape: (h, w, c) the model runs on; needed for ConvNets on non-square images.
      describe: how error messages name ``model`` (e.g. the config fields that built it).
    Returns:
      ``{'params': ..., 'batch_stats': ...}`` as nested dicts of float32 numpy arrays.
    Raises:
      UserError naming missing keys, unexpected keys and shape mismatches.
    """
    entries = key_map(model, shapes, image_shape)
    expected = {e.torch_key for e in entries}
    tracked = {e.torch_key.rsplit(".", 1)[0] + "." + _TRACKED for e in entries if e.path[0] == "batch_stats"}
    missing = expected - set(state_dict)
    unexpected = set(state_dict) - expected - tracked
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    leaves = dict(_flatten(shapes))
    bad_shapes = []
    for e in entries:
        if e.torch_key in state_dict:
            want = _torch_shape(e, tuple(leaves[e.path].shape))
            got = tuple(np.shape(state_dict[e.torch_key]))
            if got != want:
                bad_shapes.append(f"{e.torch_key} is {list(got)}, expected {list(want)}")
    if bad_shapes:
        problems.append("shape mismatch: " + "; ".join(bad_shapes[:4]) +
                        (f" and {len(bad_shapes) - 4} more" if len(bad_shapes) > 4 else ""))
        hint = _first_conv_hint(model, state_dict, image_shape)
        if hint:
            problems.append(hint)
    if problems:
        raise UserError(f"the PyTorch weights do not fit {describe}: " + "; ".join(problems))
    out: dict = {}
    for e in entries:
        node = out
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = np.array(_to_ours(e, np.asarray(state_dict[e.torch_key], np.float32)), order="C")
    return out


def to_torch(variables, model, image_shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """The PyTorch ``state_dict`` of our variables: torch key -> numpy array (float32; int64 counters).

    Loads into the PyTorch module with ``load_state_dict(..., strict=True)`` once the arrays
    are tensors (`save_torch_checkpoint` does that).
    """
    leaves = dict(_flatten(variables))
    out = {}
    for e in key_map(model, variables, image_shape):
        out[e.torch_key] = np.array(_to_torch(e, np.asarray(leaves[e.path], np.float32)), order="C")
        if e.path[0] == "batch_stats" and e.path[-1] == "var":
            out[e.torch_key.rsplit(".", 1)[0] + "." + _TRACKED] = np.zeros((), np.int64)
    return out


def _first_conv_hint(model, state_dict, image_shape) -> str | None:
    """DC/DM's ConvNet pads its first conv by 3 on 1-channel images: its map is that of 32x32 for 28x28."""
    w, head = state_dict.get("features.0.weight"), state_dict.get("classifier.weight")
    if not isinstance(model, ConvNet) or w is None or head is None or image_shape is None:
        return None
    side = 32 // 2**model.depth
    if tuple(image_shape[:2]) == (28, 28) and np.shape(w)[1] == 1 and np.shape(head)[1] == np.shape(w)[0] * side**2:
        return (f"this looks like DC/DM's ConvNet, which pads its first convolution by 3 on 1-channel 28x28 "
                f"images ({side}x{side} final map); this model pads by {model.first_padding}: set "
                f"first_padding=-1 (DC's rule) in the model's config section")
    return None
