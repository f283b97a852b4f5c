"""The one registry of the optimizers and meta-parameter kinds that the tests run.

Every public optimizer of :mod:`mixflow_optax.transforms` is listed once, in ``OPTIMIZERS``: the
hand-written aliases (and a few configurations of them that take other code paths) and the stock
optax optimizers wrapped by ``reparameterize``. The kinds of meta-parameters are the second table,
``META_KINDS``. The tests read both:

- tests/test_transforms.py: the optax conformance suite, for every ``hand_written`` entry;
- tests/test_reparameterize.py: stock trajectory, overrides and meta-gradient, for every
  ``reparameterize`` entry;
- tests/test_exactness.py: meta-gradients against plain BPTT in float64, for every entry with
  ``meta_kinds``, in the covering design of ``exactness_design``;
- tests/test_forward.py: forward mode against reverse mode, on a few (entry, kind) pairs.

Every entry's ``name`` is its test id; a parameterised test's id is the names of its axes joined
by ``_`` (``test_matches_plain_bptt_adam_maml_T3_mixflow_remat``), never a number.

Adding an optimizer
-------------------
Add one ``Optimizer(...)`` to ``_HAND_WRITTEN`` (a transform of mixflow_optax.transforms) or
``_REPARAMETERIZED`` (a stock optax factory for ``reparameterize``). The fields:

- ``name``: the test id, unique; lower case, words joined by ``_``.
- ``make_fn`` / ``stock_fn``: the mixflow_optax factory and the stock optax factory it must
  follow. Both are called with keyword arguments only: ``kwargs`` updated by the test's own
  (``learning_rate=0.05``, an override); a chain is written as a small factory function.
- ``kwargs``: the construction arguments of the entry (small problems: rates ~0.05).
- ``overrides``: hyperparameters of the entry with another value each. The tests check that
  ``hyperparams=overrides`` in ``update`` equals constructing with those values, per tensor too.
- ``meta_kinds``: the ``META_KINDS`` for which the entry's meta-gradient is checked against plain
  BPTT; ``()`` to leave the entry out of the exactness tests (say why in a comment).
  ``per_param_rates`` needs ``per_element_rates``; ``hyperparams`` needs ``meta_hyperparams``.
- ``modes``: the ``MODES`` in which its meta-gradient is checked (all, unless a mode cannot give a
  finite result for a reason outside the library: say which).
- ``meta_hyperparams``: the hyperparameters (betas, decays, weight decay, clip threshold) learned
  as meta-parameters by the ``hyperparams`` kind, starting from their constructed values.
- ``rate``: the name of the step-size hyperparameter (``polyak_sgd``: ``max_learning_rate``).
- ``per_element_rates``: the update is an elementwise learning rate times an update that does not
  depend on it (the learning rate is the last factor): per-element rates are then the update at
  rate 1 times the rates, which the per-parameter-rate reference relies on.
- ``leafwise``: per-parameter values of every override equal running each tensor with its own
  value (``reparameterize``: the optimizers it runs tensor by tensor).
- ``global_hyperparams``: hyperparameters that couple tensors and take scalars only.
- ``sign_step``: the update does not depend differentiably on the gradient (sign steps, Lion):
  there is no second-order term, so ``mode="first_order"`` must equal the exact meta-gradient.
- ``stop_gradient_denominator``: the factory takes that keyword (the Adam family).
- ``static_args``: arguments that ``optax.inject_hyperparams`` / ``reparameterize`` must leave
  static (dtypes, shapes, PRNG keys).
- ``stock_promotes_dtype``: stock optax returns some update or state in another dtype than the
  parameters' (Adafactor's float32 momentum; Muon's float64 updates under x64 and float32
  Newton-Schulz coefficients), so the conformance test compares dtypes with stock optax only.
- ``exact_rtol``: relative tolerance of the float64 exactness tests (1e-10 unless the stock
  arithmetic itself has lower precision; say why).

Then run ``python -m pytest -p no:xdist -q tests -k <name>`` and
``python -m pytest -p no:xdist -q tests/test_exactness.py -k design`` (the covering checks).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import helpers
import jax
import jax.numpy as jnp
import optax
import optax.contrib

import mixflow_optax as mfo

T = mfo.transforms

HAND_WRITTEN = "hand_written"
REPARAMETERIZE = "reparameterize"


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optimizer configuration and what the tests need to know about it (see the module doc)."""

  name: str
  make_fn: Callable[..., optax.GradientTransformation]
  stock_fn: Callable[..., optax.GradientTransformation]
  kwargs: Mapping[str, Any]
  overrides: Mapping[str, Any]
  group: str = HAND_WRITTEN
  meta_kinds: tuple[str, ...] = ()
  modes: tuple[str, ...] = ("mixflow", "standard", "first_order", "forward")
  meta_hyperparams: tuple[str, ...] = ()
  rate: str = "learning_rate"
  per_element_rates: bool = True
  leafwise: bool = True
  global_hyperparams: tuple[str, ...] = ()
  sign_step: bool = False
  stop_gradient_denominator: bool = False
  static_args: tuple[str, ...] = ()
  stock_promotes_dtype: bool = False
  exact_rtol: float = 1e-10

  def make(self, **kwargs: Any) -> mfo.transforms.ReparamTransformation:
    """The mixflow_optax optimizer, ``kwargs`` replacing the entry's construction arguments."""
    return self.make_fn(**{**self.kwargs, **kwargs})

  def stock(self, **kwargs: Any) -> optax.GradientTransformation:
    """The stock optax optimizer with the same arguments."""
    return self.stock_fn(**{**self.kwargs, **kwargs})


# ---------------------------------------------------------------------------
# Hand-written optimizers (mixflow_optax.transforms aliases and chains).
# ---------------------------------------------------------------------------

# Decay only the matrices (a callable mask works for dict params and for NNX).
MATRICES_ONLY = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
SCHEDULE = optax.linear_schedule(0.1, 0.01, transition_steps=10)
"""A learning-rate schedule (a constructor argument that is not a hyperparameter)."""

ALL_KINDS = ("learning_rate", "per_param_rates", "hyperparams", "loss_weights", "maml")
_NO_HYPERPARAMS_KIND = ("learning_rate", "per_param_rates", "loss_weights", "maml")


# Chains are written as factories with explicit keyword arguments (optax.inject_hyperparams binds
# them by name).


def mfo_clip_adam(max_norm=0.5, learning_rate=0.05):
  """mixflow_optax clipping (its threshold a hyperparameter), then mixflow_optax Adam."""
  return T.chain(T.clip_by_global_norm(max_norm), T.adam(learning_rate))


def stock_clip_adam(max_norm=0.5, learning_rate=0.05):
  return optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(learning_rate))


def mfo_clip_sgd(max_norm=1.0, learning_rate=0.1):
  """mixflow_optax clipping, then plain SGD."""
  return T.chain(T.clip_by_global_norm(max_norm), T.sgd(learning_rate))


def stock_clip_sgd(max_norm=1.0, learning_rate=0.1):
  return optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(learning_rate))


def optax_clip_sgd_momentum(learning_rate=0.1, momentum=0.9):
  """Stock optax clipping (no hyperparameters) inside a mixflow_optax chain."""
  return T.chain(optax.clip_by_global_norm(0.5), T.sgd(learning_rate, momentum=momentum))


def stock_optax_clip_sgd_momentum(learning_rate=0.1, momentum=0.9):
  return optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(learning_rate, momentum=momentum))


def optax_clip_adam(learning_rate=0.05, b1=0.9, b2=0.999):
  """Stock optax clipping at 0.3 (active on the exactness problem) inside a mixflow_optax chain."""
  return T.chain(optax.clip_by_global_norm(0.3), T.adam(learning_rate, b1=b1, b2=b2))


def stock_optax_clip_adam(learning_rate=0.05, b1=0.9, b2=0.999):
  return optax.chain(optax.clip_by_global_norm(0.3), optax.adam(learning_rate, b1=b1, b2=b2))


_ADAM_OVERRIDES = {"learning_rate": 0.03, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "eps_root": 1e-6}

_HAND_WRITTEN = (
  Optimizer(
    "sgd",
    T.sgd,
    optax.sgd,
    {"learning_rate": 0.1},
    {"learning_rate": 0.03},
    meta_kinds=_NO_HYPERPARAMS_KIND,
  ),
  Optimizer(
    "sgd_momentum",
    T.sgd,
    optax.sgd,
    {"learning_rate": 0.1, "momentum": 0.9},
    {"learning_rate": 0.03, "momentum": 0.5},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("momentum",),
  ),
  Optimizer(
    "sgd_nesterov",
    T.sgd,
    optax.sgd,
    {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
    {"learning_rate": 0.03, "momentum": 0.5},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("momentum",),
  ),
  Optimizer(
    "adam",
    T.adam,
    optax.adam,
    {"learning_rate": 0.05},
    _ADAM_OVERRIDES,
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "adam_nesterov",
    T.adam,
    optax.adam,
    {"learning_rate": 0.05, "b1": 0.8, "nesterov": True},
    {"b1": 0.7},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
  ),
  Optimizer(
    "adamw",
    T.adamw,
    optax.adamw,
    {"learning_rate": 0.05, "weight_decay": 0.1},
    {"learning_rate": 0.03, "b2": 0.95, "weight_decay": 0.2},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "weight_decay"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "adamw_mask",
    T.adamw,
    optax.adamw,
    {"learning_rate": 0.05, "weight_decay": 0.1, "mask": MATRICES_ONLY},
    {"weight_decay": 0.3},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("weight_decay",),
  ),
  Optimizer(
    "rmsprop",
    T.rmsprop,
    optax.rmsprop,
    {"learning_rate": 0.01},
    {"learning_rate": 0.03, "decay": 0.8, "eps": 1e-4},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("decay",),
  ),
  Optimizer(
    "rmsprop_momentum",
    T.rmsprop,
    optax.rmsprop,
    {"learning_rate": 0.01, "momentum": 0.5},
    {"learning_rate": 0.03, "decay": 0.8, "eps": 1e-4, "momentum": 0.7},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("decay", "momentum"),
  ),
  Optimizer(
    "rmsprop_momentum_nesterov_eps_outside_bias_corrected",
    T.rmsprop,
    optax.rmsprop,
    {
      "learning_rate": 0.01,
      "momentum": 0.9,
      "nesterov": True,
      "eps_in_sqrt": False,
      "bias_correction": True,
    },
    {"momentum": 0.5, "decay": 0.8},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("decay", "momentum"),
  ),
  Optimizer(
    "rmsprop_centered",
    T.rmsprop,
    optax.rmsprop,
    {"learning_rate": 0.01, "centered": True},
    {"decay": 0.8, "eps": 1e-4},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("decay",),
  ),
  # The schedule is a constructor argument; a learning-rate override replaces it. The exactness
  # kinds all set the learning rate, so the schedule path is the conformance tests' alone.
  Optimizer(
    "adam_schedule",
    T.adam,
    optax.adam,
    {"learning_rate": SCHEDULE},
    {"learning_rate": 0.03, "b1": 0.8},
  ),
  Optimizer(
    "mfo_clip_adam",
    mfo_clip_adam,
    stock_clip_adam,
    {"max_norm": 0.5, "learning_rate": 0.05},
    {"max_norm": 0.3, "learning_rate": 0.03},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("max_norm",),
    global_hyperparams=("max_norm",),
  ),
  Optimizer(
    "mfo_clip_sgd",
    mfo_clip_sgd,
    stock_clip_sgd,
    {"max_norm": 1.0, "learning_rate": 0.1},
    {"max_norm": 0.5, "learning_rate": 0.03},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("max_norm",),
    global_hyperparams=("max_norm",),
  ),
  Optimizer(
    "optax_clip_sgd_momentum",
    optax_clip_sgd_momentum,
    stock_optax_clip_sgd_momentum,
    {"learning_rate": 0.1, "momentum": 0.9},
    {"learning_rate": 0.03, "momentum": 0.5},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("momentum",),
  ),
  Optimizer(
    "optax_clip_adam",
    optax_clip_adam,
    stock_optax_clip_adam,
    {"learning_rate": 0.05},
    {"learning_rate": 0.03, "b1": 0.8},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
  ),
  Optimizer(
    "lion",
    T.lion,
    optax.lion,
    {"learning_rate": 0.03, "weight_decay": 0.1},
    {"learning_rate": 0.02, "b1": 0.8, "b2": 0.9, "weight_decay": 0.05},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("weight_decay",),
    sign_step=True,
  ),
  Optimizer(
    "lion_mask",
    T.lion,
    optax.lion,
    {"learning_rate": 0.03, "weight_decay": 0.1, "mask": MATRICES_ONLY},
    {"weight_decay": 0.3},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("weight_decay",),
    sign_step=True,
  ),
  Optimizer(
    "nadam",
    T.nadam,
    optax.nadam,
    {"learning_rate": 0.05},
    _ADAM_OVERRIDES,
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "nadamw",
    T.nadamw,
    optax.nadamw,
    {"learning_rate": 0.05, "weight_decay": 0.1},
    {"b1": 0.8, "weight_decay": 0.2},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "weight_decay"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "adabelief",
    T.adabelief,
    optax.adabelief,
    {"learning_rate": 0.05},
    _ADAM_OVERRIDES,
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "adabelief_nesterov",
    T.adabelief,
    optax.adabelief,
    {"learning_rate": 0.05, "nesterov": True},
    {"b1": 0.8},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1",),
  ),
  Optimizer(
    "amsgrad",
    T.amsgrad,
    optax.amsgrad,
    {"learning_rate": 0.05},
    _ADAM_OVERRIDES,
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
    stop_gradient_denominator=True,
  ),
  Optimizer(
    "amsgrad_no_bias_correction",
    T.amsgrad,
    optax.amsgrad,
    {"learning_rate": 0.05, "bias_correction_mu": False, "bias_correction_nu": False},
    {"b2": 0.95},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "b2"),
  ),
  Optimizer(
    "adagrad",
    T.adagrad,
    optax.adagrad,
    {"learning_rate": 0.1},
    {"learning_rate": 0.02, "eps": 1e-3},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("eps",),
  ),
  # Factored second moments on every matrix (the vectors take the unfactored path); Adafactor's
  # clipping is active on the exactness problem. Not "decay_rate" as a meta-parameter: optax
  # computes its decay schedule in float32 (docs/optimizers.md).
  Optimizer(
    "adafactor",
    T.adafactor,
    optax.adafactor,
    {"learning_rate": 0.05, "min_dim_size_to_factor": 2},
    {"learning_rate": 0.02, "decay_rate": 0.7, "eps": 1e-20, "clipping_threshold": 0.5},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("clipping_threshold",),
    static_args=("dtype_momentum", "min_dim_size_to_factor"),
  ),
  # Momentum and weight decay. Not in the exactness tests: its momentum is float32 (optax's
  # dtype_momentum default), which float64 agreement to 1e-10 cannot survive.
  Optimizer(
    "adafactor_factored_momentum",
    T.adafactor,
    optax.adafactor,
    {
      "learning_rate": 0.05,
      "min_dim_size_to_factor": 2,
      "momentum": 0.5,
      "weight_decay_rate": 0.01,
    },
    {"decay_rate": 0.7, "momentum": 0.8, "weight_decay_rate": 0.1},
    # Weight decay is added after the rate (as in optax): the rate is not the last factor.
    per_element_rates=False,
    static_args=("dtype_momentum", "min_dim_size_to_factor"),
    stock_promotes_dtype=True,
  ),
  Optimizer(
    "lamb",
    T.lamb,
    optax.lamb,
    {"learning_rate": 0.05, "weight_decay": 0.1},
    {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "weight_decay": 0.2},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("b1", "weight_decay"),
    stop_gradient_denominator=True,
  ),
  # Muon on the matrices, AdamW on the vectors (optax.partition state).
  Optimizer(
    "muon",
    T.muon,
    optax.contrib.muon,
    {"learning_rate": 0.05},
    {"learning_rate": 0.02, "beta": 0.8, "eps": 1e-4, "weight_decay": 0.1, "adam_b1": 0.8},
    meta_kinds=ALL_KINDS,
    meta_hyperparams=("beta", "adam_b1"),
    stock_promotes_dtype=True,
  ),
  Optimizer(
    "muon_weight_decay_adam_rate",
    T.muon,
    optax.contrib.muon,
    {"learning_rate": 0.05, "weight_decay": 0.1, "adam_learning_rate": 0.02, "nesterov": False},
    {"adam_learning_rate": 0.05, "adam_b2": 0.9},
    # The vectors' rate is adam_learning_rate: learning_rate is not the last factor of every
    # update.
    meta_kinds=("learning_rate", "hyperparams", "loss_weights", "maml"),
    per_element_rates=False,
    meta_hyperparams=("weight_decay", "adam_learning_rate"),
    stock_promotes_dtype=True,
  ),
)

# ---------------------------------------------------------------------------
# Stock optax optimizers wrapped by mixflow_optax.transforms.reparameterize.
# ---------------------------------------------------------------------------


def _wrapped(
  name,
  factory,
  kwargs,
  *,
  static_args=(),
  leafwise=True,
  per_element=True,
  meta_kinds=None,
  **fields,
):
  """A ``reparameterize`` entry: ``reparameterize(factory)`` against ``factory`` itself.

  ``per_element=False``: leafwise, but with per-tensor statistics (norms, factored moments), so
  per-parameter values are one scalar per tensor and per-element rates are refused.
  """
  per_element = leafwise and per_element
  per_param = ("per_param_rates",) if per_element else ()
  if meta_kinds is None:
    meta_kinds = ("learning_rate", *per_param, "loss_weights", "maml")
  return Optimizer(
    name,
    T.reparameterize(factory, static_args=static_args),
    factory,
    kwargs,
    {},
    group=REPARAMETERIZE,
    meta_kinds=meta_kinds,
    per_element_rates=per_element,
    leafwise=leafwise,
    static_args=static_args,
    **fields,
  )


# Every entry works with scalar hyperparameters and gives exact (stock) meta-gradients.
# ``leafwise=False``: per-parameter values are refused (global couplings, random keys, states
# that depend on a tensor's rank, contrib optimizers), as docs/optimizers.md says.
_REPARAMETERIZED = (
  _wrapped("adabelief", optax.adabelief, {"learning_rate": 0.05}),
  _wrapped("adadelta", optax.adadelta, {"learning_rate": 0.5}),
  _wrapped(
    "adafactor",
    optax.adafactor,
    {"learning_rate": 0.05},
    static_args=("min_dim_size_to_factor",),
    per_element=False,
  ),
  _wrapped("adagrad", optax.adagrad, {"learning_rate": 0.1}),
  _wrapped("adam", optax.adam, {"learning_rate": 0.05}),
  _wrapped("adamax", optax.adamax, {"learning_rate": 0.05}),
  _wrapped("adamaxw", optax.adamaxw, {"learning_rate": 0.05}),
  _wrapped("adamw", optax.adamw, {"learning_rate": 0.05}),
  _wrapped("adan", optax.adan, {"learning_rate": 0.05}),
  _wrapped("amsgrad", optax.amsgrad, {"learning_rate": 0.05}),
  _wrapped("fromage", optax.fromage, {"learning_rate": 0.05}, per_element=False),
  _wrapped("lamb", optax.lamb, {"learning_rate": 0.05}, per_element=False),
  _wrapped("lars", optax.lars, {"learning_rate": 0.5}, per_element=False),
  _wrapped("lion", optax.lion, {"learning_rate": 0.01}, sign_step=True),
  _wrapped("nadam", optax.nadam, {"learning_rate": 0.05}),
  _wrapped("nadamw", optax.nadamw, {"learning_rate": 0.05}),
  _wrapped(
    "noisy_sgd",
    optax.noisy_sgd,
    {"learning_rate": 0.05, "key": 0},
    static_args=("key",),
    leafwise=False,
  ),
  _wrapped("novograd", optax.novograd, {"learning_rate": 0.05}, per_element=False),
  _wrapped("optimistic_adam_v2", optax.optimistic_adam_v2, {"learning_rate": 0.05}),
  _wrapped(
    "optimistic_gradient_descent", optax.optimistic_gradient_descent, {"learning_rate": 0.05}
  ),
  # Needs the loss value in update (mfo.unroll does not pass it): not in the exactness tests.
  _wrapped(
    "polyak_sgd",
    optax.polyak_sgd,
    {"max_learning_rate": 0.5},
    leafwise=False,
    rate="max_learning_rate",
    meta_kinds=(),
  ),
  _wrapped("rmsprop", optax.rmsprop, {"learning_rate": 0.01}),
  _wrapped("sgd", optax.sgd, {"learning_rate": 0.1, "momentum": 0.9}),
  _wrapped("sign_sgd", optax.sign_sgd, {"learning_rate": 0.01}, sign_step=True),
  _wrapped("signum", optax.signum, {"learning_rate": 0.01}, sign_step=True),
  _wrapped("sm3", optax.sm3, {"learning_rate": 0.1}, leafwise=False),
  _wrapped("yogi", optax.yogi, {"learning_rate": 0.05}),
  _wrapped("contrib_acprop", optax.contrib.acprop, {"learning_rate": 0.05}, leafwise=False),
  _wrapped("contrib_ademamix", optax.contrib.ademamix, {"learning_rate": 0.05}, leafwise=False),
  # Forward mode gives NaN: stock ADOPT takes the square root of its zero initial second moment,
  # whose derivative (inf) meets the zero tangent of that state (inf * 0); reverse mode never
  # forms that product. The same arithmetic as MIXFLOW.md's sqrt(0) trap, in stock optax.
  _wrapped(
    "contrib_adopt",
    optax.contrib.adopt,
    {"learning_rate": 0.05},
    leafwise=False,
    modes=("mixflow", "standard", "first_order"),
  ),
  _wrapped("contrib_muon", optax.contrib.muon, {"learning_rate": 0.05}, leafwise=False),
  _wrapped(
    "contrib_schedule_free_sgd",
    optax.contrib.schedule_free_sgd,
    {"learning_rate": 0.5},
    leafwise=False,
  ),
  _wrapped(
    "contrib_simplified_ademamix",
    optax.contrib.simplified_ademamix,
    {"learning_rate": 0.05},
    leafwise=False,
  ),
)


def _by_name(entries):
  table = {}
  for entry in entries:
    if entry.name in table:
      raise ValueError(f"two registry entries are named {entry.name!r}")
    table[entry.name] = entry
  return table


HAND_WRITTEN_OPTIMIZERS: Mapping[str, Optimizer] = _by_name(_HAND_WRITTEN)
"""The hand-written optimizers (and chains of them), by name."""

REPARAMETERIZED_OPTIMIZERS: Mapping[str, Optimizer] = _by_name(_REPARAMETERIZED)
"""The stock optax optimizers wrapped by ``reparameterize``, by name (the stock name)."""

OPTIMIZERS: Mapping[str, Optimizer] = _by_name(
  (
    *_HAND_WRITTEN,
    *(dataclasses.replace(e, name=f"reparameterize_{e.name}") for e in _REPARAMETERIZED),
  )
)
"""Every optimizer; the wrapped ones as ``reparameterize_<name>``."""


# ---------------------------------------------------------------------------
# Meta-parameter kinds (on the exactness problem of tests/helpers.py).
# ---------------------------------------------------------------------------


class MetaKind(NamedTuple):
  """What the meta-parameters are, and how the stock reference is built from them.

  ``init(opt, params)``: the initial meta-parameters. ``hyperparams_fn(opt)``: the
  ``hyperparams_fn`` of ``mfo.unroll`` (``None``: the meta-parameters are no hyperparameters).
  ``stock(opt, meta)``: ``(stock optax optimizer, per-leaf factor of its updates or None)``, built
  from traced meta-parameters for the plain-BPTT reference. ``weighted_loss``: the inner loss
  weights each example by ``sigmoid(meta["logits"])``. ``learned_init``: MAML, the
  meta-parameters are the initial parameters (``init`` returns none besides them).
  ``supports(opt)``: the kind applies to the registry entry.
  """

  name: str
  init: Callable[[Optimizer, Any], Any]
  hyperparams_fn: Callable[[Optimizer], Callable[[Any], dict] | None]
  stock: Callable[[Optimizer, Any], tuple[optax.GradientTransformation, Any]]
  supports: Callable[[Optimizer], bool]
  weighted_loss: bool = False
  learned_init: bool = False


def _float(x):
  """A strongly typed float array (a weak type would retrace a jitted step once updated)."""
  return jnp.asarray(x, jnp.result_type(float))


def _default(opt, name):
  return _float(opt.make().hyperparams[name])


def _per_param_log_rates(params):
  # Per-element rates for w1, per-tensor for the rest.
  del params
  lr = helpers.LR
  return {
    "w1": jnp.log(lr) + 0.1 * jnp.arange(12.0).reshape(3, 4) / 12,
    "b1": jnp.log(_float(lr)),
    "w2": jnp.log(_float(2 * lr)),
  }


_KINDS = (
  MetaKind(
    "learning_rate",
    init=lambda opt, params: {"log_lr": jnp.log(_float(helpers.LR))},
    hyperparams_fn=lambda opt: lambda meta: {opt.rate: jnp.exp(meta["log_lr"])},
    stock=lambda opt, meta: (opt.stock(**{opt.rate: jnp.exp(meta["log_lr"])}), None),
    supports=lambda opt: True,
  ),
  # The reference: the stock optimizer at rate 1, its updates rescaled leaf by leaf (the learning
  # rate is the last, linear factor: ``per_element_rates``).
  MetaKind(
    "per_param_rates",
    init=lambda opt, params: {"log_lr": _per_param_log_rates(params)},
    hyperparams_fn=lambda opt: lambda meta: {opt.rate: jax.tree.map(jnp.exp, meta["log_lr"])},
    stock=lambda opt, meta: (opt.stock(**{opt.rate: 1.0}), jax.tree.map(jnp.exp, meta["log_lr"])),
    supports=lambda opt: opt.per_element_rates,
  ),
  # Betas, decays, weight decay, clip thresholds: ``meta_hyperparams`` from their defaults, and
  # the log learning rate.
  MetaKind(
    "hyperparams",
    init=lambda opt, params: {
      "log_lr": jnp.log(_float(helpers.LR)),
      "hp": {k: _default(opt, k) for k in opt.meta_hyperparams},
    },
    hyperparams_fn=lambda opt: lambda meta: {opt.rate: jnp.exp(meta["log_lr"]), **meta["hp"]},
    stock=lambda opt, meta: (opt.stock(**{opt.rate: jnp.exp(meta["log_lr"])}, **meta["hp"]), None),
    supports=lambda opt: bool(opt.meta_hyperparams),
  ),
  MetaKind(
    "loss_weights",
    init=lambda opt, params: {"logits": jnp.linspace(-1.0, 1.0, 5)},
    hyperparams_fn=lambda opt: None,
    stock=lambda opt, meta: (opt.stock(**{opt.rate: helpers.LR}), None),
    supports=lambda opt: True,
    weighted_loss=True,
  ),
  MetaKind(
    "maml",
    init=lambda opt, params: {},
    hyperparams_fn=lambda opt: None,
    stock=lambda opt, meta: (opt.stock(**{opt.rate: helpers.LR}), None),
    supports=lambda opt: True,
    learned_init=True,
  ),
)

META_KINDS: Mapping[str, MetaKind] = {k.name: k for k in _KINDS}
"""The meta-parameter kinds, by name."""

assert tuple(META_KINDS) == ALL_KINDS


# ---------------------------------------------------------------------------
# The exactness design: every optimizer with every mode and every kind it supports.
# ---------------------------------------------------------------------------

UNROLL_MODES = ("mixflow", "standard", "first_order")
"""The modes of ``mfo.unroll`` (reverse mode; ``remat`` applies)."""

MODES = (*UNROLL_MODES, "forward")
"""How the meta-gradient is computed: ``mfo.unroll``'s modes and ``meta_optimizer``'s forward mode."""

T_VALUES = (1, 3, 8)
"""Inner steps of the exactness cases (rotated through the design)."""


class ExactnessCase(NamedTuple):
  """One meta-gradient check: ``optimizer`` x ``kind`` x ``mode``, ``T`` inner steps, ``remat``."""

  optimizer: str
  kind: str
  mode: str
  T: int
  remat: bool

  @property
  def name(self) -> str:
    remat = ("_remat" if self.remat else "_no_remat") if self.mode in UNROLL_MODES else ""
    return f"{self.optimizer}_{self.kind}_T{self.T}_{self.mode}{remat}"


def kinds_of(opt: Optimizer) -> tuple[str, ...]:
  """The kinds an entry is checked for: its ``meta_kinds`` that apply to it."""
  for kind in opt.meta_kinds:
    if not META_KINDS[kind].supports(opt):
      raise ValueError(f"{opt.name}: meta kind {kind!r} does not apply (see tests/registry.py)")
  return opt.meta_kinds


def exactness_design(
  optimizers: Mapping[str, Optimizer] = OPTIMIZERS,
  modes: tuple[str, ...] = MODES,
  t_values: tuple[int, ...] = T_VALUES,
) -> tuple[ExactnessCase, ...]:
  """A pairwise covering design instead of the full optimizer x kind x mode product.

  Entry ``i`` gets ``max(len(modes), len(kinds))`` cases (its own modes and kinds); case ``j``
  takes mode ``j`` and kind ``i + j`` (both cyclically), so every entry meets every mode and every kind it supports, and
  the offset ``i`` spreads each (kind, mode) pair over many entries. ``T`` and ``remat`` rotate
  over the cases, so every mode meets every T (and, for the modes with ``remat``, every remat
  setting) many times. ``tests/test_exactness.py`` checks these covering properties.
  """
  cases = []
  rotation = itertools.cycle(itertools.product(t_values, (True, False)))
  for i, opt in enumerate(o for o in optimizers.values() if o.meta_kinds):
    kinds = kinds_of(opt)
    opt_modes = tuple(m for m in modes if m in opt.modes)
    for j in range(max(len(opt_modes), len(kinds))):
      T, remat = next(rotation)
      cases.append(
        ExactnessCase(
          opt.name, kinds[(i + j) % len(kinds)], opt_modes[j % len(opt_modes)], T, remat
        )
      )
  return tuple(cases)


@functools.cache
def design() -> tuple[ExactnessCase, ...]:
  """The exactness cases of the test suite."""
  return exactness_design()
