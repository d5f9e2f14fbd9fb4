"""torchvision-style ImageNet ResNets (ResNet v1.5), as used by the official ImageNet runs.

Matches `torchvision.models.resnet18/50`: 7x7/2 stem with padding 3, 3x3/2 max pool with
padding 1, the stride on the 3x3 conv of the bottleneck (v1.5), a 1x1 conv + BN projection
shortcut wherever the shape changes, kaiming-normal (fan_out) conv weights, PyTorch's default
Linear init for the classifier. Paddings are explicit, as in PyTorch, because Flax's SAME pads
strided convs asymmetrically and would shift every feature map by one pixel.
"""

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semimeta_jax.models import layers

class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  features: int
  strides: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), padding=1)(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
    return nn.relu(y + _shortcut(self, residual, self.features))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4 (ResNet-50 and deeper)."""

  features: int
  strides: int
  conv: layers.ModuleDef
  norm: layers.ModuleDef
  zero_init_residual: bool = False

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.features, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
    return nn.relu(y + _shortcut(self, residual, self.features * self.expansion))


def _last_scale_init(zero: bool) -> layers.Initializer:
  # Zero-initialising the last BN scale makes each block start as the identity (Goyal et al.,
  # 2017); torchvision's `zero_init_residual`, off by default there as here.
  return nn.initializers.zeros if zero else nn.initializers.ones


def _shortcut(block: nn.Module, x: jax.Array, features: int) -> jax.Array:
  """Identity, or torchvision's 1x1 conv + BN projection when the shape changes."""
  if block.strides == 1 and x.shape[-1] == features:
    return x
  x = block.conv(features, (1, 1), block.strides, name='downsample_conv')(x)
  return block.norm(name='downsample_bn')(x)


class ResNet(nn.Module):
  """ImageNet ResNet; stages of `stage_sizes` blocks with widths w, 2w, 4w, 8w.

  Attributes:
    stage_sizes: number of blocks in each of the four stages.
    block_cls: `BasicBlock` or `Bottleneck`.
    num_classes: number of output logits.
    width: stem width w (64 in torchvision).
    zero_init_residual: zero-initialise the last BN scale of every block.
    dtype: activation dtype (bfloat16 for half precision); parameters stay float32.
    remat_batch_norm: recompute batch norm in the backward pass (`layers.RematBatchNorm`).
  """

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  num_classes: int
  width: int = 64
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  remat_batch_norm: bool = False

  # Every strided conv and pool pads so that it maps n pixels to ceil(n / 2): never to 0.
  min_image_size: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape (batch, num_classes) for NHWC images `x`."""
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
    x = conv(self.width, (7, 7), 2, padding=3, name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    x = check(nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), 'the stem')
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = self.block_cls(
            features=self.width * 2**stage,
            strides=2 if stage > 0 and block == 0 else 1,
            conv=conv,
            norm=norm,
            zero_init_residual=self.zero_init_residual,
            name=f'layer{stage + 1}_{block}',
        )(x)
      x = check(x, f'stage {stage + 1}')
    return layers.PooledClassifier(self.num_classes, name='head')(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
