"""Exact evaluation: every test example counted once, padded rows masked out."""

import jax
import jax.numpy as jnp

from semimeta_jax import losses
from semimeta_jax import parallel
from semimeta_jax.methods import common


def raw_weights(state):
  """(params, batch_stats) the state trains."""
  return state.params, state.batch_stats


def eval_step(state, batch, *, select=raw_weights):
  """Masked sums over one global batch {'image', 'label', 'mask'}.

  Args:
    state: the TrainState.
    batch: a global evaluation batch; rows with mask False are padding.
    select: `(state) -> (params, batch_stats)`, the weight set to evaluate (a
      `methods.base.WeightSet`'s `select`); default the raw weights.

  Returns:
    {'correct_top1', 'correct_top5', 'loss_sum', 'count'} as float32 scalars.
  """
  params, stats = select(state)
  logits = common.eval_forward(state, params, batch['image'], batch_stats=stats)
  mask = batch['mask'].astype(jnp.float32)
  masked_sum = lambda values: jnp.sum(values * mask)
  return {
      'correct_top1': masked_sum(losses.topk_correct(logits, batch['label'], 1)),
      'correct_top5': masked_sum(losses.topk_correct(logits, batch['label'], 5)),
      'loss_sum': masked_sum(losses.cross_entropy_per_example(logits, batch['label'])),
      'count': jnp.sum(mask),
  }


def evaluate(compiled_eval_step, state, local_batches, mesh) -> dict[str, float]:
  """Runs a compiled `eval_step` over padded batches and returns the errors.

  Args:
    compiled_eval_step: `parallel.jit_eval_step(eval_step, mesh)` (with `select` bound).
    state: the replicated TrainState.
    local_batches: this process's padded numpy batches, or global batches already
      on the mesh (`jax.Array`s); every process yields the same number of batches.
    mesh: the device mesh.

  Returns:
    {'error_top1', 'error_top5'} in percent, 'loss', and 'num_examples'.
  """
  totals = None
  for batch in local_batches:
    if not isinstance(batch['image'], jax.Array):
      batch = parallel.to_global(batch, mesh)
    sums = compiled_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('The evaluation split yielded no batches.')
  totals = jax.tree.map(float, jax.device_get(totals))
  count = totals['count']
  return {
      'error_top1': 100.0 * (1.0 - totals['correct_top1'] / count),
      'error_top5': 100.0 * (1.0 - totals['correct_top5'] / count),
      'loss': totals['loss_sum'] / count,
      'num_examples': count,
  }
