"""FLOPs of a JAX function from its convolutions and matrix products, on any backend.

XLA's cost analysis of a compiled GPU step leaves out the convolutions it hands
to cuDNN (ConvLarge's supervised step: 2.5 GFLOP reported for ~562), and its
analysis of the lowered HLO counts only the taps that land inside the zero
padding's borders. Here every `conv_general_dilated` and `dot_general` of the
function's jaxpr is counted densely, 2 FLOPs per multiply-add, the way
hardware peaks and the literature's model sizes count them (ConvLarge: 1.46
GFLOP per 32x32 image forward). Elementwise work (batch norm, activations,
the optimizer) is not counted; it is well under 1% of ConvLarge's.

MFU = achieved / peak dense FLOP/s of the device at the step's precision.
"""

import math

import jax
from jax.extend import core as jex_core

# Dense peak TFLOP/s per device kind (substring of `device_kind`), by precision: bf16, and float32
# matmuls as JAX runs them by default on these GPUs (TF32 tensor cores), and strict fp32.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bf16': 756.0, 'tf32': 378.0, 'fp32': 51.0}),
    ('H100', {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0}),  # SXM.
    ('H200', {'bf16': 989.0, 'tf32': 494.0, 'fp32': 67.0}),
    ('A100', {'bf16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
)


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  rhs_out_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  # Multiply-adds per output element: input features of its group x kernel taps.
  per_output = math.prod(rhs.shape) / rhs.shape[rhs_out_dim]
  # A dilated input (the input gradient of a strided conv) is mostly inserted zeros, which
  # no convolution kernel multiplies.
  dilation = math.prod(eqn.params.get('lhs_dilation') or (1,))
  del lhs
  return 2.0 * math.prod(out.shape) * per_output / dilation


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr) -> float:
  """Dense FLOPs of the convolutions and matrix products of a jaxpr, sub-jaxprs included.

  A scan counts its body `length` times, a conditional its costliest branch, a
  while loop its body once (its trip count is not known before it runs).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'cond':
      total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params['branches'])
    else:
      inner = sum(jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
      total += inner * (eqn.params.get('length', 1) if name == 'scan' else 1)
  return total


def count_flops(fn, *args, **kwargs) -> float:
  """Dense FLOPs of the convolutions and matrix products of `fn(*args, **kwargs)` (traced only)."""
  return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)


def lowered_xla_flops(lowered) -> float:
  """XLA's cost analysis of the lowered (pre-backend) HLO; NaN where it gives none."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else float('nan')


def peak_flops(device_kind: str, half_precision: bool) -> float:
  """Dense peak FLOP/s of `device_kind` at the step's precision (bf16, else TF32); NaN if unknown."""
  for name, peaks in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return 1e12 * peaks['bf16' if half_precision else 'tf32']
  return float('nan')
