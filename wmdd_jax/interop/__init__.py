"""PyTorch interop: checkpoints and synthetic image sets in and out.

``state_dict``  our variables <-> PyTorch ``state_dict`` (torchvision ResNet-18 names, the
    dataset-distillation ConvNet's ``features.<i>``/``classifier``); numpy only.
``checkpoint``  ``.pth``/``.pt`` files (torch imported lazily), a `Teacher` from one.
``images``      ``new{class:03d}/class{c:03d}_id{i:03d}.jpg`` folders and ``.pt`` tensors.
``export``      the ``export`` stage: a work directory's set and teacher in those formats.
"""

from wmdd_jax.interop.checkpoint import (load_torch_checkpoint, load_torch_teacher, save_torch_checkpoint,
                                         save_torch_teacher)
from wmdd_jax.interop.images import (ImageSet, is_torch_image_set, load_torch_image_set, read_image_folder,
                                     read_tensor_file, read_torch_image_set, write_image_folder,
                                     write_tensor_file)
from wmdd_jax.interop.state_dict import Entry, from_torch, key_map, to_torch, torch_module_name

__all__ = [
    "Entry", "ImageSet", "from_torch", "is_torch_image_set", "key_map", "load_torch_checkpoint",
    "load_torch_image_set", "load_torch_teacher", "read_image_folder", "read_tensor_file",
    "read_torch_image_set", "save_torch_checkpoint", "save_torch_teacher", "to_torch", "torch_module_name",
    "write_image_folder", "write_tensor_file",
]
