"""Classifiers, selected by name from the config.

Every model is a Flax linen module called as `model.apply(variables, x, train=...)` on NHWC
images; it returns float32 logits and keeps its batch-norm running averages in the
`batch_stats` collection (updated when `train=True` and `mutable=['batch_stats']`). Dropout,
where a model has it, draws from the `dropout` RNG stream in training mode only.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax.models import convlarge
from semimeta_jax.models import layers
from semimeta_jax.models import resnet
from semimeta_jax.models import wide_resnet

_MODELS = {
    'convlarge': convlarge.ConvLarge,
    # 8x8 inputs (scikit-learn digits): narrower, and the conv after the 2x2 map keeps its size.
    'convlarge_digits': functools.partial(convlarge.ConvLarge, width=32, small_input=True),
    'resnet18': resnet.ResNet18,
    'resnet50': resnet.ResNet50,
    'wrn28_2': wide_resnet.WRN28_2,
}

MODEL_NAMES = tuple(_MODELS)
# The variant of a model family for inputs smaller than the original's minimum.
_SMALL_INPUT_VARIANTS = {'convlarge': 'convlarge_digits'}

InputTooSmallError = layers.InputTooSmallError
# `config.remat`: what a training forward keeps for its backward pass. 'none' keeps every
# activation; 'batch_norm' keeps each batch norm's input only and recomputes the rest.
REMAT_POLICIES = ('none', 'batch_norm')

# Only ConvLarge has dropout; the ResNets are used without it, as in their references.
_TAKES_DROPOUT = ('convlarge', 'convlarge_digits')
_TAKES_ZERO_INIT_RESIDUAL = ('resnet18', 'resnet50')


def get_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the classifier named by `config.model`.

  Args:
    config: reads `model` (one of `MODEL_NAMES`), `model_width` (0 keeps the model's own
      default width), `dropout_rate` (ConvLarge only), `half_precision` (bfloat16
      activations; parameters and logits stay float32) and, for the ResNets, the optional
      `zero_init_residual` and `remat` (one of `REMAT_POLICIES`, default 'none').
    num_classes: number of output logits.

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: if `config.model` is not a registered name.
  """
  name = config.model
  if name not in _MODELS:
    raise ValueError(f'Unknown model {name!r}; registered models: {", ".join(MODEL_NAMES)}.')
  kwargs = {'dtype': jnp.bfloat16 if config.half_precision else jnp.float32,
            'remat_batch_norm': config.get('remat', 'none') == 'batch_norm'}
  if config.model_width:
    kwargs['width'] = config.model_width
  if name in _TAKES_DROPOUT:
    kwargs['dropout_rate'] = config.dropout_rate
  if name in _TAKES_ZERO_INIT_RESIDUAL:
    kwargs['zero_init_residual'] = config.zero_init_residual
  return _MODELS[name](num_classes=num_classes, **kwargs)


def check_image_shape(config: ml_collections.ConfigDict, image_shape, num_classes: int) -> None:
  """Raises `InputTooSmallError` if `config.model` leaves an empty feature map on these images.

  Traces the model's initialisation on one image (no computation), so the
  check is the model's own (`layers.require_feature_map` after each stage):
  call it where the dataset's image shape is known and nothing is written yet.

  Args:
    config: the run configuration (reads the fields `get_model` reads).
    image_shape: (height, width, channels) of the images the model will see.
    num_classes: number of output logits.
  """
  model = get_model(config, num_classes)
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  try:
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  except InputTooSmallError as error:
    fixes = [f'a larger config.data.image_size (at least {model.min_image_size}; image folders '
             'and ImageNet are resized to it)']
    variant = _SMALL_INPUT_VARIANTS.get(config.model)
    if variant is not None:
      smallest = get_model(ml_collections.ConfigDict({**config.to_dict(), 'model': variant}),
                           num_classes).min_image_size
      if min(image_shape[:2]) >= smallest:
        fixes.append(f'config.model={variant!r}, the variant for small inputs (from '
                     f'{smallest}x{smallest})')
    raise InputTooSmallError(f'config.model={config.model!r}: {error} Use '
                             f'{" or ".join(fixes)}.') from None
