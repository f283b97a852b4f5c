"""Neural-network building blocks that keep their memory saving under forward-over-reverse.

- :func:`dot_product_attention`: ``jax.nn.dot_product_attention`` semantics,
  computed over key blocks (O(S * block) memory in every order of
  differentiation).
"""

from mixflow_optax.nn._attention import dot_product_attention

__all__ = ["dot_product_attention"]
