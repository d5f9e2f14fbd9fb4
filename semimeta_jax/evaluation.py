"""Exact evaluation: every test example counted once, padded rows masked out."""

import jax
import jax.numpy as jnp

from semimeta_jax import losses
from semimeta_jax import parallel
from semimeta_jax.methods import common


def eval_step(state, batch, *, use_ema: bool = False, use_swa: bool = False):
  """Masked sums over one global batch {'image', 'label', 'mask'}.

  Args:
    state: the TrainState.
    batch: a global evaluation batch; rows with mask False are padding.
    use_ema: evaluate the EMA weights instead of the raw ones.
    use_swa: evaluate fast-SWA's averaged weights with their recomputed statistics.

  Returns:
    {'correct_top1', 'correct_top5', 'loss_sum', 'count'} as float32 scalars.
  """
  if use_swa:
    params, stats = state.swa['params'], state.swa['batch_stats']
  elif use_ema:
    params, stats = state.ema_params, state.ema_batch_stats
  else:
    params, stats = state.params, state.batch_stats
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
    compiled_eval_step: `parallel.jit_eval_step(eval_step, mesh)` (with `use_ema` bound).
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
