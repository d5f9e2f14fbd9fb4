"""Building blocks shared by the classifiers: PyTorch-matching batch norm, initialisers, head.

The reference implementations are PyTorch models (the official ConvLarge, torchvision's ResNets,
the PyTorch FixMatch Wide ResNet), so the defaults here reproduce PyTorch's conventions rather
than Flax's.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from semimeta_jax import errors

Dtype = Any
Initializer = Callable[..., jax.Array]
ModuleDef = Callable[..., nn.Module]

# PyTorch's default Conv2d / Linear weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)),
# which is a variance-scaling uniform with scale 1/3.
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') as torchvision and the
# SSL Wide ResNets use it: an untruncated normal ('normal'; Flax's own defaults truncate).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# torch.nn.init.xavier_normal_, again untruncated.
xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default Linear / Conv2d bias init, U(+-1/sqrt(fan_in)).

  The bias shape alone does not carry the fan-in, hence the closure.

  Args:
    fan_in: number of inputs of the layer.

  Returns:
    An initializer with the `(key, shape, dtype)` signature.
  """
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# Flax's momentum of the running averages (PyTorch's 0.1); fast-SWA's statistics pass reads it.
BN_MOMENTUM = 0.9


# nn.BatchNorm under per-layer rematerialisation: its backward keeps only the layer's input and
# recomputes the normalisation from it, where nn.BatchNorm keeps the centred input and the
# normalised value, both float32 even under bfloat16 activations (the statistics are float32).
# The class keeps nn.BatchNorm's name, so automatically named layers, their variables and
# checkpoints are the same with and without it.
RematBatchNorm = nn.remat(nn.BatchNorm)
RematBatchNorm.__name__ = RematBatchNorm.__qualname__ = 'BatchNorm'


def batch_norm(train: bool, dtype: Dtype, remat: bool = False) -> Callable[..., nn.BatchNorm]:
  """Returns a BatchNorm constructor with PyTorch's defaults.

  eps 1e-5 and running averages updated by 0.1 of the batch statistic (PyTorch momentum 0.1 is
  Flax momentum 0.9). No `axis_name`: training runs under `jax.jit` with the batch sharded over
  a device mesh, so the compiler already computes global (synchronised) batch statistics.
  One difference remains: PyTorch moves the running variance towards the unbiased batch
  variance, Flax towards the biased one; over the N*H*W values per channel the factor
  n / (n - 1) is negligible.

  Args:
    train: whether to normalise with batch statistics (and update the running averages) rather
      than with the running averages.
    dtype: computation dtype of the output; statistics are reduced in float32 and the scale and
      bias parameters stay float32.
    remat: recompute the normalisation in the backward pass (`RematBatchNorm`): the same
      values and gradients, less memory kept between the forward and backward passes.

  Returns:
    `functools.partial(nn.BatchNorm, ...)`; further keyword arguments (e.g. `scale_init`, `name`)
    may be given when calling it.
  """
  return functools.partial(
      RematBatchNorm if remat else nn.BatchNorm,
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=1e-5,
      dtype=dtype,
  )


# The name under which `PooledClassifier` sows its input features.
POOLED_FEATURES = 'pooled_features'


def pooled_features(intermediates) -> jax.Array:
  """The pooled features a forward with `mutable=['intermediates']` sowed.

  Every model ends in one `PooledClassifier` named 'head'.
  """
  return intermediates['head'][POOLED_FEATURES][0]


class PooledClassifier(nn.Module):
  """Global average pooling followed by a float32 linear layer.

  The head runs in float32 even when the body runs in bfloat16, so logits (and the softmax
  targets and losses built on them) keep full precision at negligible cost. The pooled
  features (batch, channels) are sown into the `intermediates` collection as
  `POOLED_FEATURES`, so methods that need them (SNTG, adversarial dropout, feature
  discriminators) read them from the same forward with `mutable=['intermediates']`.

  Attributes:
    num_classes: number of output logits.
    kernel_init: weight initializer; PyTorch's Linear default unless given.
    bias_init: bias initializer; `None` means PyTorch's Linear default, which depends on the
      fan-in and is therefore built at call time.
  """

  num_classes: int
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # At least float32 (float64 stays float64, for numerical checks).
    head_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = jnp.mean(x.astype(head_dtype), axis=(1, 2))
    self.sow('intermediates', POOLED_FEATURES, x)
    bias_init = self.bias_init or torch_default_bias_init(x.shape[-1])
    return nn.Dense(
        self.num_classes,
        dtype=head_dtype,
        kernel_init=self.kernel_init,
        bias_init=bias_init,
        name='fc',
    )(x)


class InputTooSmallError(errors.ConfigError):
  """The images are too small for the model: a feature map after some stage is empty."""


def require_feature_map(x: jax.Array, model: nn.Module, stage: str, image_hw: tuple[int, int],
                        min_image_size: int) -> jax.Array:
  """Returns `x` (NHWC); raises `InputTooSmallError` if its spatial map is empty.

  Shapes are static, so this runs once, while the model is traced (at
  initialisation): an empty map would otherwise reach the global mean of the
  head, whose mean of nothing is NaN, and the run would stop as a diverged one.

  Args:
    x: the activations after `stage`.
    model: the module checking its input (named in the message).
    stage: where in the model `x` comes from.
    image_hw: (height, width) of the images the model was given.
    min_image_size: the smallest height and width the model works with.
  """
  height, width = x.shape[1:3]
  if height < 1 or width < 1:
    raise InputTooSmallError(
        f'{type(model).__name__} cannot read {image_hw[0]}x{image_hw[1]} images: the feature '
        f'map after {stage} is {height}x{width}, empty. It needs images of at least '
        f'{min_image_size}x{min_image_size}.')
  return x
