"""k25jax: a JAX/Flax re-implementation of the methods of the Kimi K2.5 technical report (arXiv 2602.02276)."""

__version__ = "0.1.0"
