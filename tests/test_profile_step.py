"""experiments/profile_step.py: HLO instructions to categories, and a traced split that adds up."""

import math

import pytest

from experiments import profile_step

HLO = """
%fused_computation (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}
}

%fused_computation.1 (p.1: f32[4,8]) -> f32[4] {
  %p.1 = f32[4,8]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(%p.1, %c), dimensions={1}, to_apply=%add
}

%fused_computation.2 (p.2: f32[4,8]) -> f32[4,8] {
  %p.2 = f32[4,8]{1,0} parameter(0)
  ROOT %m = f32[4,8]{1,0} multiply(%p.2, %p.2)
}

ENTRY %main (x: f32[4,8], w: f32[3,3,8,8]) -> f32[4] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %custom-call.3 = (f32[4,8]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %convolution.1 = f32[4,8]{1,0} convolution(%x, %w), window={size=3x3}
  %transpose_fusion = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation
  %reduce_fusion.2 = f32[4]{0} fusion(%x), kind=kInput, calls=%fused_computation.1
  %loop_multiply_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.2
  %all-reduce.1 = f32[4]{0} all-reduce(%reduce_fusion.2), replica_groups={}, to_apply=%add
  ROOT %dot.4 = f32[4]{0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_instructions_get_the_category_of_what_they_compute():
  categories = profile_step.instruction_categories(HLO)
  assert categories['custom_call_3'] == 'convolution'  # cuDNN's convolution on GPU.
  assert categories['convolution_1'] == 'convolution'
  assert categories['transpose_fusion'] == 'layout'
  assert categories['reduce_fusion_2'] == 'reduction'
  assert categories['loop_multiply_fusion'] == 'elementwise'
  assert categories['all_reduce_1'] == 'collective'
  assert categories['dot_4'] == 'matmul'


def test_device_kernels_are_attributed_by_their_hlo_op():
  categories = profile_step.instruction_categories(HLO)
  events = [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
      # A cuDNN kernel's own name says nothing; its hlo_op does.
      {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'sm90_xmma_fprop', 'dur': 300,
       'args': {'hlo_op': 'custom-call.3'}},
      {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'loop_multiply_fusion', 'dur': 100},
      {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'memcpy', 'dur': 7},
      # No hlo_op (a kernel replayed in a CUDA graph): its name says it is a convolution.
      {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'sm90_xmma_wgrad_implicit_gemm_bf16', 'dur': 50},
      # The host's launch of the same operation is not counted twice.
      {'ph': 'X', 'pid': 2, 'tid': 5, 'name': 'loop_multiply_fusion', 'dur': 40},
  ]
  totals, by_name, unmatched, top = profile_step.attribute(events, categories)
  assert math.isclose(totals['convolution'], 350e-6) and math.isclose(totals['elementwise'], 100e-6)
  assert set(totals) == {'convolution', 'elementwise'} and math.isclose(by_name, 50e-6)
  assert math.isclose(unmatched, 7e-6) and list(top) == ['memcpy']


@pytest.mark.slow
def test_small_cpu_profile_adds_up(tmp_path):
  (row,) = profile_step.main(['--small', '--modes=supervised', '--steps=1', f'--out={tmp_path}'])
  shares = [row[f'{c}_percent'] for c in profile_step.CATEGORIES]
  assert math.isclose(sum(shares), 100.0, rel_tol=1e-6)
  assert row['convolution_percent'] > 20  # ConvLarge is mostly convolutions, on any backend.
  assert (tmp_path / 'profile_step_small_b32_cpu.md').exists()
