"""Training methods behind one interface (`base.Method`), and the registry of `config.method`.

A method knows the math of one update and nothing of files, devices or logging.
Its module brings everything else it needs: its config block (composed into the
default config by `config_blocks`), its checks, its papers' settings (`presets`)
and its step. The options (`options.py`: the EMA of the weights, fast-SWA) wrap
any method's step and add the weight sets they keep to the evaluation. The loop
receives a `Configured` (the method and its options, checked once) and reads its
attributes without naming either.
"""

import dataclasses
import functools
from typing import Any

import jax

from semimeta_jax import errors
from semimeta_jax import state as state_lib
from semimeta_jax.methods import adanet
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import co_training
from semimeta_jax.methods import dual_student
from semimeta_jax.methods import fixmatch
from semimeta_jax.methods import flexmatch
from semimeta_jax.methods import freematch
from semimeta_jax.methods import mean_teacher
from semimeta_jax.methods import memory
from semimeta_jax.methods import mpl
from semimeta_jax.methods import options as options_lib
from semimeta_jax.methods import pseudo_label
from semimeta_jax.methods import pi_model
from semimeta_jax.methods import semimeta
from semimeta_jax.methods import softmatch
from semimeta_jax.methods import sntg
from semimeta_jax.methods import supervised
from semimeta_jax.methods import temporal_ensembling
from semimeta_jax.methods import tnar
from semimeta_jax.methods import uda
from semimeta_jax.methods import vadd
from semimeta_jax.methods import vat

Method = base.Method
OPTIONS = options_lib.OPTIONS

# One line per method.
_REGISTRY = {method.name: method for method in (
    semimeta.METHOD,
    supervised.METHOD,
    pi_model.METHOD,
    mean_teacher.METHOD,
    temporal_ensembling.METHOD,
    vat.METHOD,
    pseudo_label.METHOD,
    memory.METHOD,
    adanet.METHOD,
    tnar.METHOD,
    co_training.METHOD,
    dual_student.METHOD,
    vadd.METHOD,
    fixmatch.METHOD,
    uda.METHOD,
    flexmatch.METHOD,
    freematch.METHOD,
    softmatch.METHOD,
    mpl.METHOD,
)}

METHOD_NAMES = tuple(_REGISTRY)
# Folded into the run's key for `Method.init_model_state`.
MODEL_STATE_KEY_TAG = 0x5EC0
# The blocks that are neither a method's nor an option's own: shared by several methods.
_SHARED_BLOCKS = (augment, sntg)


def get(name: str) -> base.Method:
  """The registered `Method` called `name`.

  Raises:
    errors.ConfigError: if no method has that name.
  """
  errors.require(name in _REGISTRY, 'method', name, f'expected one of {METHOD_NAMES}')
  return _REGISTRY[name]


def config_blocks() -> dict[str, Any]:
  """Every registered method's, option's and shared config block, by name (fresh copies)."""
  blocks = {}
  providers = [m.config_blocks for m in _REGISTRY.values()] + [o.config_blocks for o in OPTIONS]
  for provider in providers + [shared.config_blocks for shared in _SHARED_BLOCKS]:
    for name, block in provider().items():
      if name in blocks:
        raise ValueError(f'Two registered modules define the config block {name!r}.')
      blocks[name] = block
  return blocks


def renamed_fields() -> dict[str, str]:
  """{earlier dotted field name: current one} over every method, option and shared block."""
  renamed = {}
  for owner in [*_REGISTRY.values(), *OPTIONS, *_SHARED_BLOCKS]:
    renamed.update(owner.renamed_fields)
  return renamed


# Datasets whose presets are another dataset's, with the fields that depend on the images
# replaced where a preset sets them: {dataset: (the other dataset, {dotted field: value})}.
# Fashion-MNIST runs digits' schedule (1000 steps, the same warm-up, decays and ramps;
# configs/fashion_mnist.py), so every weight and ramp carries over; its 28x28 images take
# MNIST's 2-pixel translations (digits' 8x8: 1 pixel), and VAT's radius is MNIST's 2.0 in
# [0, 1] pixel units (digits': 2.0 on inputs standardised to MNIST's norm), which on
# standardised Fashion-MNIST (pixel std 0.353) is 2.0 / 0.353 = 5.7, here 6.0. Fully supervised
# labels every training image but the 1000 of the validation split (5900 per class).
PRESETS_FROM = {
    'fashion_mnist': ('digits', {'perturb.max_translation': 2, 'vat.epsilon': 6.0,
                                 'data.num_labels': 59_000}),
}


def presets(dataset: str) -> dict[str, dict[str, Any]]:
  """{preset name: {dotted field: value}} of every method for `dataset` (e.g. 'digits').

  Each preset names its method (`method`). Raises ValueError if two methods declare one name.
  A dataset of `PRESETS_FROM` has another's presets, with its replaced fields.
  """
  if dataset in PRESETS_FROM:
    source, replaced = PRESETS_FROM[dataset]
    return {name: {field: replaced.get(field, value) for field, value in overrides.items()}
            for name, overrides in presets(source).items()}
  found = {}
  for method in _REGISTRY.values():
    for name, overrides in method.presets.get(dataset, {}).items():
      if name in found:
        raise ValueError(f'Two methods declare the {dataset} preset {name!r}.')
      found[name] = {'method': method.name, **overrides}
  # A shared block may compose presets from the methods' (`sntg.derived_presets`).
  for shared in _SHARED_BLOCKS:
    for name, overrides in getattr(shared, 'derived_presets', lambda *_: {})(dataset, found).items():
      if name in found:
        raise ValueError(f'Two modules declare the {dataset} preset {name!r}.')
      found[name] = overrides
  return found


def apply_preset(config, dataset: str, name: str | None):
  """`config` with the overrides of preset `name` for `dataset` (None or '' = unchanged).

  What `--config=configs/digits.py:NAME` runs (the config file passes NAME here).

  Raises:
    errors.ConfigError: if no method declares that preset for `dataset`.
  """
  if not name:
    return config
  known = presets(dataset)
  errors.require(name in known, 'preset', name, f'expected one of {tuple(known)} for {dataset}')
  for field, value in known[name].items():
    target = config
    *parents, leaf = field.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def validate(config) -> None:
  """The checks of `config.method`, of the shared blocks and of every option."""
  get(config.method).validate(config)
  for shared in _SHARED_BLOCKS:
    shared.validate(config)
  for option in OPTIONS:
    option.validate(config)
  options_lib.learning_rate_tail(config)


@dataclasses.dataclass(frozen=True)
class Configured:
  """A method with the options a config turns on, built once from a checked config.

  Attributes:
    method: the `Method` of `config.method`.
    config: the run configuration.
    options: the options this config enables, in registry order.
  """
  method: base.Method
  config: Any
  options: tuple[base.Option, ...]

  @property
  def uses_unlabeled(self) -> bool:
    return self.method.uses_unlabeled

  @property
  def strong_view(self) -> bool:
    """Whether the unlabeled batches must carry the strong view ('strong_image')."""
    return self.method.uses_unlabeled and self.method.strong_view(self.config)

  def make_train_step(self, num_classes: int, pool_size: int | None = None):
    """`train_step(state, batch) -> (state, metrics)`, the options' updates after the method's.

    `pool_size` (the unlabeled pool's size) is bound for a method that `reads_pool_size`.
    """
    bound = {}
    if self.method.reads_pool_size:
      if pool_size is None:
        raise ValueError(f'{self.method.name} reads the unlabeled pool size: pass pool_size.')
      bound['pool_size'] = int(pool_size)
    step = functools.partial(self.method.train_step, config=self.config, num_classes=num_classes,
                             **bound)
    for option in self.options:
      step = option.wrap(step, self.config, self.method)
    return step

  def init_extra(self, *, num_train: int, num_classes: int, model=None, image_shape=None,
                 rng=None):
    """`(params, batch_stats) -> extra`: the method's state and each option's.

    `model`, `image_shape` and `rng` are needed only by a method with an
    `init_model_state` (what it builds from the model: a second network, ...).
    """
    own = self.method.init_extra_state(self.config, num_train=num_train, num_classes=num_classes)

    def extra(params, batch_stats):
      from_model = {}
      if self.method.init_model_state is not None:
        from_model = self.method.init_model_state(
            self.config, model=model, image_shape=image_shape, rng=rng, params=params,
            batch_stats=batch_stats, num_classes=num_classes)
      return {**own, **from_model,
              **{o.name: o.init_state(self.config, params, batch_stats) for o in self.options}}
    return extra

  def init_train_state(self, model, image_shape, rng, *, num_train: int = 0, num_classes: int = 0,
                       tx=None) -> state_lib.TrainState:
    """The step-0 state with everything the method and its options keep (see `init_train_state`)."""
    # The method's own networks draw from a key the classifier's initialisation never sees.
    model_key = jax.random.fold_in(rng, MODEL_STATE_KEY_TAG)
    return state_lib.init_train_state(
        self.config, model, image_shape, rng, tx=tx if tx is not None else options_lib.optimizer(self.config),
        extra=self.init_extra(num_train=num_train, num_classes=num_classes, model=model,
                              image_shape=image_shape, rng=model_key))

  def weight_sets(self) -> list[base.WeightSet]:
    """The weight sets to evaluate: the raw weights ('eval'), the method's own, then each option's."""
    raw = base.WeightSet(prefix='eval', select=lambda state: (state.params, state.batch_stats))
    return [raw] + self.method.weight_sets(self.config) + [ws for option in self.options for ws in option.weight_sets(self.config)]

  @property
  def headline(self) -> str:
    """The prefix of the weight set whose error the run reports: the last option that claims it."""
    claims = [option.weight_sets(self.config)[0].prefix for option in self.options
              if option.headline(self.config)]
    return claims[-1] if claims else 'eval'

  def describe(self) -> str:
    """The method and its options, in one line of the run plan."""
    parts = [self.method.describe(self.config)] + [o.describe(self.config) for o in self.options]
    parts += [shared.describe(self.config) for shared in _SHARED_BLOCKS if hasattr(shared, 'describe')]
    details = '; '.join(part for part in parts if part)
    return self.method.name + (f' ({details})' if details else '')


def configure(config) -> Configured:
  """The `Configured` method of a config, after its checks (`validate`).

  Raises:
    errors.ConfigError: if `config.method` is unknown or a field is unusable.
  """
  method = get(config.method)
  validate(config)
  return Configured(method=method, config=config,
                    options=tuple(o for o in OPTIONS if o.enabled(config, method)))


def make_train_step(config, num_classes: int, pool_size: int | None = None):
  """Returns `train_step(state, batch) -> (state, metrics)` for `config.method` and its options.

  `pool_size`: the unlabeled pool's size, for a method that `reads_pool_size`.

  Raises:
    errors.ConfigError: if `config.method` is unknown or its fields are unusable.
  """
  return configure(config).make_train_step(num_classes, pool_size)


def init_train_state(config, model, image_shape, rng, *, num_train: int = 0, num_classes: int = 0,
                     tx=None) -> state_lib.TrainState:
  """The step-0 state with everything `config.method` and its options keep.

  Args:
    config: the run configuration.
    model: the Flax classifier.
    image_shape: (H, W, C) of one input.
    rng: the run's base key (typed).
    num_train: size of the training split (per-example buffers are this long).
    num_classes: number of classes (width of per-example buffers).
    tx: the optimizer; default from `config` (with the options' schedule tail).
  """
  return configure(config).init_train_state(model, image_shape, rng, num_train=num_train,
                                            num_classes=num_classes, tx=tx)


def learning_rate_schedule(config):
  """The learning rate of each step, options' tail included (`options.learning_rate_schedule`)."""
  return options_lib.learning_rate_schedule(config)
