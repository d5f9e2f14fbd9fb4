"""A network far smaller than any ConvLarge, for tests of the methods' math.

Methods are model-agnostic: they only call `state.apply_fn(variables, x, train=...)`.
This MLP has what the math must handle (batch norm with running averages, dropout)
and compiles in a fraction of a ConvLarge's time, even under reverse-over-reverse.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from semimeta_jax import state as state_lib


class TinyNet(nn.Module):
  """Dense(16) -> BatchNorm -> tanh -> Dropout -> Dense(num_classes); tanh keeps it smooth."""
  num_classes: int = 10
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    # PyTorch's defaults, as the project's models.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(jnp.tanh(x))
    return nn.Dense(self.num_classes)(x)


def tiny_state(config, image_shape=(8, 8, 1), seed=0, num_classes=10):
  """A fresh TrainState of `TinyNet` with the config's optimizer."""
  model = TinyNet(num_classes=num_classes, dropout_rate=config.dropout_rate)
  return state_lib.init_train_state(config, model, image_shape, jax.random.key(seed))
