"""Wide ResNet 28-2 as in the MixMatch / FixMatch SSL literature.

Pre-activation blocks (BN, LeakyReLU(0.1), conv), a 16-channel 3x3 stem, three groups of four
blocks with widths w, 2w, 4w (w = 32 for WRN-28-2), a final BN + LeakyReLU, global average pool
and a linear classifier: 1,467,610 parameters for 10 classes, as the PyTorch FixMatch model.

The forward pass follows the original FixMatch (TensorFlow) `residual`: every block's first conv
reads the pre-activated input, and only the first block (`activate_before_residual`) also feeds
that activation to the shortcut. The popular PyTorch port instead bypasses BN + activation in the
strided transition blocks (its `bn1` there is computed and discarded), a quirk not reproduced
here; the parameter count is the same. Convs have no bias (each output reaches a BN before it is
used) and are kaiming-normal fan_out; the classifier is xavier-normal with zero bias, as both
references do.
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from semimeta_jax.models import layers

def _lrelu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, negative_slope=0.1)


class PreActBlock(nn.Module):
  """BN-act-conv3x3(stride)-BN-act-conv3x3 plus a shortcut (1x1 conv when the shape changes)."""

  features: int
  strides: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x
    x = _lrelu(self.norm()(x))
    if self.activate_before_residual:
      shortcut = x
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(x)
    y = _lrelu(self.norm()(y))
    y = self.conv(self.features, (3, 3), padding=1)(y)
    if shortcut.shape[-1] != self.features:
      shortcut = self.conv(self.features, (1, 1), self.strides, name='shortcut_conv')(shortcut)
    return shortcut + y


class WideResNet(nn.Module):
  """Pre-activation Wide ResNet for 32x32 inputs.

  Attributes:
    num_classes: number of output logits.
    depth: 6n + 4 layers, n blocks per group (28 -> 4).
    width: channels of the first group, 16 * widen factor (32 for WRN-28-2).
    stem_width: channels of the stem conv (16 for every widen factor in the literature).
    dtype: activation dtype (bfloat16 for half precision); parameters stay float32.
    remat_batch_norm: recompute batch norm in the backward pass (`layers.RematBatchNorm`).
  """

  num_classes: int
  depth: int = 28
  width: int = 32
  stem_width: int = 16
  dtype: Any = jnp.float32
  remat_batch_norm: bool = False

  # The strided 3x3 convs pad by 1 and map n pixels to ceil(n / 2): never to 0.
  min_image_size: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape (batch, num_classes) for NHWC images `x`."""
    if (self.depth - 4) % 6:
      raise ValueError(f'Wide ResNet depth must be 6n + 4, got {self.depth}.')
    blocks_per_group = (self.depth - 4) // 6
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        padding=0,
        dtype=self.dtype,
        kernel_init=layers.kaiming_normal_fan_out,
    )
    norm = layers.batch_norm(train, self.dtype, self.remat_batch_norm)

    image_hw = x.shape[1:3]
    check = lambda x, stage: layers.require_feature_map(x, self, stage, image_hw,
                                                        self.min_image_size)
    x = check(conv(self.stem_width, (3, 3), padding=1, name='stem_conv')(x), 'the stem')
    for group in range(3):
      for block in range(blocks_per_group):
        x = PreActBlock(
            features=self.width * 2**group,
            strides=2 if group > 0 and block == 0 else 1,
            conv=conv,
            norm=norm,
            activate_before_residual=group == 0 and block == 0,
            name=f'group{group + 1}_{block}',
        )(x)
      x = check(x, f'group {group + 1}')
    x = _lrelu(norm(name='final_bn')(x))
    return layers.PooledClassifier(
        self.num_classes,
        kernel_init=layers.xavier_normal,
        bias_init=nn.initializers.zeros,
        name='head',
    )(x)


WRN28_2 = functools.partial(WideResNet, depth=28, width=32)
