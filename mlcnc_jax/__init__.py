"""mlcnc_jax: MLC-NC (long-tailed multi-label classification through neural collapse) in JAX/Flax."""

__version__ = "0.1.0"
