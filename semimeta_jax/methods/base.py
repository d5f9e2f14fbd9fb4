"""The Method interface: what the training loop, the data layer and validation read.

A method is one module that builds one `Method` value; `methods/__init__.py` maps
`config.method` to it. The loop binds the attributes and never names a method, so
adding one is a file and a registry line: the file brings its config block, its
checks, its presets and its step.

An `Option` is the same kind of seam for what wraps any method's step (an average
of the weights kept and evaluated beside them): its config block, its checks, the
state it keeps, the step wrapper and the weight sets it adds to the evaluation.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import ml_collections

PyTree = Any
# (state, batch, *, config, num_classes) -> (state, metrics): pure, jit-able.
TrainStep = Callable[..., tuple[Any, dict]]
# {block name: the block's defaults}, e.g. {'vat': ConfigDict(epsilon=6.0, ...)}.
ConfigBlocks = Callable[[], dict[str, ml_collections.ConfigDict]]
# {dataset: {preset name: {dotted field: value}}}: a paper's settings as config overrides.
Presets = Mapping[str, Mapping[str, Mapping[str, Any]]]


def no_checks(config) -> None:
  """The `validate` of a method without fields of its own."""
  del config


def no_blocks() -> dict[str, ml_collections.ConfigDict]:
  """The `config_blocks` of a method without fields of its own."""
  return {}


def no_extra_state(config, *, num_train: int, num_classes: int) -> PyTree:
  """The `init_extra_state` of a method that keeps nothing beyond the weights."""
  del config, num_train, num_classes
  return {}


def when_configured(config) -> bool:
  """The `keeps_ema` default: an average is kept when the `ema` option asks for one."""
  return config.ema.decay > 0


def constant_decay(config, step) -> Any:
  """The `ema_decay` default: the configured decay at every step."""
  del step
  return config.ema.decay


def never(config) -> int:
  """The `diagnostics_every_steps` of a method without diagnostics."""
  del config
  return 0


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method, as the loop sees it.

  Attributes:
    name: the value of `config.method` that selects it.
    train_step: `(state, batch, *, config, num_classes) -> (state, metrics)`, pure.
      `batch` is {'labeled': {'image', 'label', 'index'}, 'unlabeled': {...}}.
    uses_unlabeled: whether the step reads the unlabeled stream (the data layer
      builds it only then).
    strong_view: `(config) -> bool`, whether the step reads the unlabeled rows'
      'strong_image' (RandAugment, `data/strong_view.py`); built only then.
    reads_pool_size: whether `train_step` takes the keyword `pool_size`, the number
      of examples in the unlabeled pool (a memory over the pool counts its unused
      entries against it: FlexMatch).
    config_blocks: `() -> {name: ConfigDict}`, the method's own fields and their
      defaults; the default config composes every registered method's blocks.
    renamed_fields: {earlier dotted name: current dotted name} of its fields, so
      that a config saved before a rename is read in today's names.
    presets: {dataset: {preset name: {dotted field: value}}}, the papers'
      settings (`--config=configs/digits.py:NAME`).
    validate: `(config) -> None`, raises `errors.ConfigError` naming the field;
      the method's own checks, called once by `validation.validate_config`.
    keeps_ema: `(config) -> bool`, whether the run keeps an exponential moving
      average of the weights (the `ema` option; Mean Teacher's teacher).
    ema_decay: `(config, step) -> decay` of that average after optimizer step
      `step` (0-based); traced.
    init_extra_state: `(config, *, num_train, num_classes) -> pytree` kept in
      `TrainState.extra` (per-example buffers); replicated and checkpointed.
    init_model_state: optional `(config, *, model, image_shape, rng, params,
      batch_stats, num_classes) -> pytree`, merged into `TrainState.extra` once the
      classifier is initialised: what is built from the model or its weights (a
      second network and its optimizer state, a memory as wide as the features,
      a discriminator). `rng` is a key of its own, independent of the classifier's.
    diagnostics: optional `(state, batch, *, config) -> {name: scalar}`, run by
      the loop on the state a step is about to update.
    diagnostics_every_steps: `(config) -> int`, its cadence (0 = off).
    diagnostics_prefix: the metric prefix of the diagnostics.
    describe: `(config) -> str`, the method's settings in the run plan ('' = none).
    weight_sets: `(config) -> [WeightSet]` the method adds to the evaluation after
      the raw weights (a second network it trains; the raw weights stay the headline).
  """
  name: str
  train_step: TrainStep
  uses_unlabeled: bool
  strong_view: Callable[[Any], bool] = lambda config: False
  reads_pool_size: bool = False
  config_blocks: ConfigBlocks = no_blocks
  renamed_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  presets: Presets = dataclasses.field(default_factory=dict)
  validate: Callable[[Any], None] = no_checks
  keeps_ema: Callable[[Any], bool] = when_configured
  ema_decay: Callable[[Any, Any], Any] = constant_decay
  init_extra_state: Callable[..., PyTree] = no_extra_state
  init_model_state: Optional[Callable[..., PyTree]] = None
  diagnostics: Optional[Callable[..., dict]] = None
  diagnostics_every_steps: Callable[[Any], int] = never
  diagnostics_prefix: str = 'diagnostics'
  describe: Callable[[Any], str] = lambda config: ''
  weight_sets: Callable[[Any], list] = lambda config: []


@dataclasses.dataclass(frozen=True)
class WeightSet:
  """One set of weights the loop evaluates, and how to get it ready.

  Attributes:
    prefix: the metric prefix of its evaluation ('eval', 'eval_ema', ...).
    select: `(state) -> (params, batch_stats)`, pure (runs inside the eval step).
    ready: `(state) -> bool` on the host: whether it can be evaluated now.
    statistics_batches: how many recent training batches `batch_statistics`
      needs before each evaluation (0: none, the set is evaluated as it is).
    batch_statistics: `(state, batch) -> statistics` of one training batch, pure.
    with_statistics: `(state, [statistics, ...]) -> state` that carries them.
  """
  prefix: str
  select: Callable[[Any], tuple[PyTree, PyTree]]
  ready: Callable[[Any], bool] = lambda state: True
  statistics_batches: int = 0
  batch_statistics: Optional[Callable[[Any, Any], PyTree]] = None
  with_statistics: Optional[Callable[[Any, list], Any]] = None


@dataclasses.dataclass(frozen=True)
class Option:
  """A training option wrapped around any method's step.

  Attributes:
    name: its config block and its key in `TrainState.extra`.
    config_blocks: `() -> {name: ConfigDict}`.
    renamed_fields: {earlier dotted name: current dotted name}.
    validate: `(config) -> None`, raises `errors.ConfigError` naming the field.
    enabled: `(config, method) -> bool`, whether this run uses it.
    init_state: `(config, params, batch_stats) -> pytree` kept in `extra[name]`.
    wrap: `(step, config, method) -> step`, the step followed by the option's update.
    weight_sets: `(config) -> [WeightSet]` it adds to the evaluation.
    headline: `(config) -> bool`, whether its (first) weight set is the run's reported one.
    learning_rate_tail: `(config) -> (steps, schedule) | None`, a schedule that
      replaces the last `steps` of the main learning-rate schedule.
    describe: `(config) -> str`, its settings in the run plan.
  """
  name: str
  config_blocks: ConfigBlocks = no_blocks
  renamed_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  validate: Callable[[Any], None] = no_checks
  enabled: Callable[[Any, Method], bool] = lambda config, method: False
  init_state: Callable[..., PyTree] = lambda config, params, batch_stats: {}
  wrap: Callable[..., TrainStep] = lambda step, config, method: step
  weight_sets: Callable[[Any], list] = lambda config: []
  headline: Callable[[Any], bool] = lambda config: False
  learning_rate_tail: Callable[[Any], Optional[tuple[int, Callable]]] = lambda config: None
  describe: Callable[[Any], str] = lambda config: ''
