"""Neural-network pieces that keep their memory saving under forward-over-reverse.

- :func:`dot_product_attention`: :func:`jax.nn.dot_product_attention` semantics,
  computed over key blocks: :math:`O(S \\cdot \\text{block})` memory for the
  output, its gradient and :func:`jax.jvp` of :func:`jax.grad`.
- :func:`flax_attention`: the same as the ``attention_fn`` of Flax attention
  modules (:class:`flax.nnx.MultiHeadAttention`, :class:`flax.linen.MultiHeadDotProductAttention`).
- :func:`chunked_cross_entropy`: LM head and cross entropy over chunks of
  tokens, without the :math:`N \\times V` logits.
- :data:`ATTENTION_RESIDUALS`: the checkpoint name of the attention's saved
  forward results, for a per-layer :func:`jax.checkpoint` policy.
"""

from mixflow_optax.nn._attention import ATTENTION_RESIDUALS, dot_product_attention
from mixflow_optax.nn._flax import flax_attention
from mixflow_optax.nn._losses import chunked_cross_entropy

__all__ = [
  "ATTENTION_RESIDUALS",
  "chunked_cross_entropy",
  "dot_product_attention",
  "flax_attention",
]
