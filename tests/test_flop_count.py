"""FLOP counts against a hand count of ConvLarge, and the MFU peaks."""

import math

import jax
import jax.numpy as jnp
import pytest

from experiments import benchmark_step
from experiments import flop_count
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax.models import convlarge


def convlarge_forward_flops(width=128, size=32, channels=3, num_classes=10):
  """By hand: 2 x multiply-adds of every conv (zero-padded taps included) and the head."""
  w, s = width, size
  macs = s * s * 9 * (channels * w + 2 * w * w)  # Three 3x3 convs at full resolution.
  s //= 2
  macs += s * s * 9 * (w * 2 * w + 2 * (2 * w) ** 2)  # Three at half resolution.
  s = s // 2 - 2  # The VALID 3x3 conv after the second pool.
  macs += s * s * (9 * 2 * w * 4 * w + 4 * w * 2 * w + 2 * w * w)  # 3x3, then two 1x1.
  return 2 * (macs + w * num_classes)


def test_the_convlarge_forward_is_1_46_gflop_per_image():
  model = convlarge.ConvLarge(10)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  forward = lambda v, x: model.apply(v, x, train=False)
  counted = flop_count.count_flops(forward, variables, images)
  assert convlarge_forward_flops() == pytest.approx(1.46e9, rel=0.01)
  assert counted == pytest.approx(convlarge_forward_flops(), rel=0.05)
  # XLA's analysis of the lowered HLO skips the taps in the zero padding: ~6% fewer.
  xla = flop_count.lowered_xla_flops(jax.jit(forward).lower(variables, images))
  assert 0.9 * counted < xla < counted


@pytest.mark.parametrize('mode,low,high', [('supervised', 2.9, 3.05), ('finite_difference', 10.0, 14.0), ('exact', 13.0, 17.0)])
def test_a_training_step_counts_forward_and_backward(mode, low, high):
  config = benchmark_step.make_config(mode, model='convlarge', model_width=0, batch_size=2)
  model = models.get_model(config, 10)
  state = jax.eval_shape(lambda: methods.init_train_state(config, model, (32, 32, 3), jax.random.key(0)))
  batch = jax.eval_shape(lambda: benchmark_step.synthetic_batch(jax.random.key(1), 2, (32, 32, 3), 10))
  counted = flop_count.count_flops(methods.make_train_step(config, 10), state, batch)
  # The supervised step is a forward and a backward (two convs per conv, less the first layer's
  # input gradient) of the labeled batch; the meta step adds forwards and backwards of both.
  per_image = convlarge_forward_flops()
  assert low * 2 * per_image < counted < high * 2 * per_image


def test_peaks_and_unknown_devices():
  assert flop_count.peak_flops('NVIDIA H100 80GB HBM3', True) == 989e12
  assert flop_count.peak_flops('NVIDIA H100 80GB HBM3', False) == 494e12
  assert flop_count.peak_flops('NVIDIA H100 PCIe', True) == 756e12
  assert math.isnan(flop_count.peak_flops('cpu', True))
