"""Reparameterised optax optimizers: updates as explicit functions of gradients and hyperparameters."""

from mixflow_optax.transforms._adaptive import (
  ema,
  scale_by_amsgrad,
  scale_by_belief,
  scale_by_lion,
  scale_by_rss,
  scale_by_trust_ratio,
)
from mixflow_optax.transforms._alias import (
  adabelief,
  adafactor,
  adagrad,
  adam,
  adamw,
  amsgrad,
  lamb,
  lion,
  nadam,
  nadamw,
  rmsprop,
  sgd,
)
from mixflow_optax.transforms._base import (
  ReparamTransformation,
  chain,
  named_chain,
  rename_hyperparams,
)
from mixflow_optax.transforms._factorized import clip_by_block_rms, scale_by_factored_rms
from mixflow_optax.transforms._lopt import (
  MLPLOptState,
  init_learned_adam_meta,
  learned_adam_hyperparams,
  mlp_lopt,
)
from mixflow_optax.transforms._muon import muon, scale_by_muon
from mixflow_optax.transforms._reparameterize import reparameterize
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
  "ReparamTransformation",
  "adabelief",
  "adafactor",
  "adagrad",
  "adam",
  "adamw",
  "add_decayed_weights",
  "amsgrad",
  "chain",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "ema",
  "init_learned_adam_meta",
  "lamb",
  "learned_adam_hyperparams",
  "lion",
  "mlp_lopt",
  "muon",
  "nadam",
  "nadamw",
  "named_chain",
  "rename_hyperparams",
  "reparameterize",
  "rmsprop",
  "safe_sqrt",
  "scale",
  "scale_by_adam",
  "scale_by_amsgrad",
  "scale_by_belief",
  "scale_by_factored_rms",
  "scale_by_learning_rate",
  "scale_by_lion",
  "scale_by_muon",
  "scale_by_rms",
  "scale_by_rss",
  "scale_by_stddev",
  "scale_by_trust_ratio",
  "sgd",
  "trace",
]
