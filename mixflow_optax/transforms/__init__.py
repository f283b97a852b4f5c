"""Reparameterised optax optimizers: updates as explicit functions of gradients and hyperparameters."""

from mixflow_optax.transforms._alias import adam, adamw, rmsprop, sgd
from mixflow_optax.transforms._base import (
  PerLeaf,
  ReparamTransformation,
  chain,
  leaf_results,
  map_leaves,
  named_chain,
  per_leaf,
  rename_hyperparams,
  resolve_hyperparams,
)
from mixflow_optax.transforms._lopt import (
  MLPLOptState,
  init_learned_adam_meta,
  learned_adam_hyperparams,
  mlp_lopt,
)
from mixflow_optax.transforms._transforms import (
  add_decayed_weights,
  clip_by_global_norm,
  safe_sqrt,
  scale,
  scale_by_adam,
  scale_by_learning_rate,
  scale_by_rms,
  scale_by_stddev,
  trace,
)

__all__ = [
  "MLPLOptState",
  "PerLeaf",
  "ReparamTransformation",
  "adam",
  "adamw",
  "add_decayed_weights",
  "chain",
  "clip_by_global_norm",
  "init_learned_adam_meta",
  "learned_adam_hyperparams",
  "leaf_results",
  "map_leaves",
  "mlp_lopt",
  "named_chain",
  "per_leaf",
  "rename_hyperparams",
  "resolve_hyperparams",
  "rmsprop",
  "safe_sqrt",
  "scale",
  "scale_by_adam",
  "scale_by_learning_rate",
  "scale_by_rms",
  "scale_by_stddev",
  "sgd",
  "trace",
]
