"""hybrid_attn: hybrid convolution + self-attention vision backbones in JAX/Flax."""

__version__ = "0.1.0"
