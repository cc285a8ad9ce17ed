"""wmdd-jax: dataset distillation by the Wasserstein metric, in JAX/Flax."""

__version__ = "0.1.0"
