"""semimeta_jax: semi-supervised learning with meta-gradients in JAX/Flax."""

__version__ = '0.1.0'
