"""The matmul precision of the barycenter ops: one argument, checked, applied to all they trace.

JAX's default precision for float32 matmuls is the platform's fastest: one bfloat16 pass on TPU,
TF32 on recent NVIDIA GPUs. Squared distances by ``|x|^2 + |y|^2 - 2 x.y``, Sinkhorn at an
epsilon of 1e-3 of the variance and float32 tolerances need full float32 products, so every public
op takes ``precision`` (default ``"highest"``) and traces its body under
``jax.default_matmul_precision``. That reaches every dot, ours and OTT's (cost matrices, kernel
applications), because ``lax.dot_general`` resolves a missing ``precision`` from that setting when
it is traced and records the result in the program; the setting is also part of every ``jit``
cache key, so jitted helpers (``jnp.matmul``, ``jnp.einsum``, OTT's) are traced again rather than
reused at another precision.
"""

from typing import Union

import jax

PrecisionLike = Union[str, jax.lax.Precision]

_NAMES = ("default", "high", "highest")


def _precision_name(precision: PrecisionLike) -> str:
    """``"default"``, ``"high"`` or ``"highest"`` for a name (any case) or a ``jax.lax.Precision``;
    ``ValueError`` for anything else."""
    if isinstance(precision, jax.lax.Precision):
        return precision.name.lower()
    if isinstance(precision, str) and precision.lower() in _NAMES:
        return precision.lower()
    raise ValueError(f"precision must be one of {', '.join(repr(n) for n in _NAMES)} or a "
                     f"jax.lax.Precision (DEFAULT, HIGH, HIGHEST); got {precision!r}. Use 'highest' "
                     "(the default) for float32 products on TPU and GPU.")


def _matmul_precision(precision: PrecisionLike):
    """A context in which every matmul traced without an explicit precision uses ``precision``
    (checked by :func:`_precision_name`)."""
    return jax.default_matmul_precision(_precision_name(precision))
