"""mixflow_optax: exact meta-gradients through unrolled optax optimizers, computed
with mixed-mode (forward-over-reverse) differentiation (MixFlow-MG)."""

from mixflow_optax import nn, transforms
from mixflow_optax._check_grad import (
  MetaGradientCheck,
  MetaGradientMismatchError,
  check_meta_gradient,
)
from mixflow_optax._forward import ForwardTangents
from mixflow_optax._fwdrev import ForwardModeError, fwdrev_grad, fwdrev_value_and_grad
from mixflow_optax._memory import CompiledMemory, compiled_memory, peak_memory
from mixflow_optax._meta import MetaOptimizer, MetaState, meta_optimizer
from mixflow_optax._training import (
  MetaTrainResult,
  export_optimizer,
  meta_train,
  sample_batches,
)
from mixflow_optax._unroll import INNER_GRAD_NAME, unroll

__version__ = "0.1.0"

__all__ = [
  "CompiledMemory",
  "INNER_GRAD_NAME",
  "ForwardModeError",
  "ForwardTangents",
  "MetaGradientCheck",
  "MetaGradientMismatchError",
  "MetaOptimizer",
  "MetaState",
  "MetaTrainResult",
  "check_meta_gradient",
  "compiled_memory",
  "export_optimizer",
  "fwdrev_grad",
  "fwdrev_value_and_grad",
  "meta_optimizer",
  "meta_train",
  "nn",
  "peak_memory",
  "sample_batches",
  "transforms",
  "unroll",
]
