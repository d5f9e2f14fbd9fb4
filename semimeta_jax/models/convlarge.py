"""ConvLarge (CNN-13), the standard SSL benchmark network, as in the official SemiMeta code.

Layer order, padding, pooling and initialisation follow the official PyTorch `ConvLarge`
(`stochastic=True, top_bn=False`): every conv has no bias and is followed by batch norm and
LeakyReLU(0.1); each 2x2 max pool is followed by channel dropout (PyTorch `Dropout2d`); the
weights keep PyTorch's default initialisation.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semimeta_jax.models import layers


class ConvLarge(nn.Module):
  """CNN-13 with channel widths w, 2w, 4w, 2w, w.

  At the default width 128 and 10 classes it has 3,121,802 parameters, as the official model.

  Attributes:
    num_classes: number of output logits.
    width: channel count of the first stage (128 in the literature).
    dropout_rate: probability of dropping a whole feature map after each pool.
    small_input: use SAME instead of VALID padding for the 3x3 conv after the second pool, so
      that 8x8 inputs (2x2 maps there) still work; 32x32 inputs use the official VALID conv.
    dtype: activation dtype (bfloat16 for half precision); parameters stay float32.
    remat_batch_norm: recompute batch norm in the backward pass (`layers.RematBatchNorm`).
  """

  num_classes: int
  width: int = 128
  dropout_rate: float = 0.5
  small_input: bool = False
  dtype: Any = jnp.float32
  remat_batch_norm: bool = False

  @property
  def min_image_size(self) -> int:
    """The smallest height and width that leave every feature map non-empty.

    Two 2x2 pools floor the size twice; the official VALID 3x3 conv after them
    then needs a 3x3 map (12x12 images), the SAME one of `small_input` a 1x1 map.
    """
    return 4 if self.small_input else 12

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns float32 logits of shape (batch, num_classes) for NHWC images `x`."""
    norm = layers.batch_norm(train, self.dtype, self.remat_batch_norm)

    def conv_bn_lrelu(x, features, kernel_size, padding):
      x = nn.Conv(
          features,
          (kernel_size, kernel_size),
          padding=padding,
          use_bias=False,
          dtype=self.dtype,
          kernel_init=layers.torch_default_kernel_init,
      )(x)
      return nn.leaky_relu(norm()(x), negative_slope=0.1)

    def pool_and_drop(x):
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      # Dropout2d: one Bernoulli draw per (example, channel), shared over the spatial axes.
      return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)

    image_hw = x.shape[1:3]
    check = lambda x, stage: layers.require_feature_map(x, self, stage, image_hw,
                                                        self.min_image_size)
    w = self.width
    for _ in range(3):
      x = conv_bn_lrelu(x, w, 3, padding=1)
    x = check(pool_and_drop(x), 'the first 2x2 pool')
    for _ in range(3):
      x = conv_bn_lrelu(x, 2 * w, 3, padding=1)
    x = check(pool_and_drop(x), 'the second 2x2 pool')
    padding = 1 if self.small_input else 0
    x = conv_bn_lrelu(x, 4 * w, 3, padding=padding)
    x = check(x, 'the 3x3 conv after the second pool' + ('' if padding else ' (VALID padding)'))
    x = conv_bn_lrelu(x, 2 * w, 1, padding=0)
    x = conv_bn_lrelu(x, w, 1, padding=0)
    return layers.PooledClassifier(self.num_classes, name='head')(x)
