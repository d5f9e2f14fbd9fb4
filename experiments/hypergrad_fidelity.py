"""Hypergradient fidelity: each estimator of g against the exact one, in float32 and bfloat16.

`fidelity` compares every mode with `exact` (K unrolled steps) and with `implicit`
(the K -> infinity limit) in float32 (the ablation's main tables); `half_precision_fidelity` computes every mode with bfloat16
activations (`config.half_precision`, parameters and g stay float32) and compares
it with the float32 `exact` g of the same state, batch and dropout draw: the
evidence for (or against) training the meta step in bf16.
"""

import jax.numpy as jnp
import numpy as np

from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import common
from semimeta_jax.methods import semimeta

APPROXIMATIONS = tuple(mode for mode in hypergrad.MODES if mode != 'exact')
# The references a fidelity row compares with: K unrolled steps, or the implicit limit.
REFERENCES = ('exact', 'implicit')
FIDELITY_FIELDS = ('step', 'lr', 'precision', 'reference', 'forward_mode', 'inner_steps', 'mode',
                   'cosine', 'cosine_min', 'relative_error', 'relative_error_max', 'exact_norm',
                   'reference_norm', 'num_batches')


def variant_config(config, *, mode=None, forward_mode=None, inner_steps=None, half_precision=None):
  """A copy of `config` with the meta step's mode, forward mode, K and precision replaced where given."""
  config = config.copy_and_resolve_references()
  if half_precision is not None:
    config.half_precision = half_precision
  for field, value in (('mode', mode), ('forward_mode', forward_mode), ('inner_steps', inner_steps)):
    if value is not None:
      config.hypergrad[field] = value
  return config


def compare(estimate, exact):
  """Cosine similarity and relative error of two flattened hypergradients."""
  estimate, exact = estimate.ravel(), exact.ravel()
  tiny = jnp.finfo(exact.dtype).tiny
  exact_norm = jnp.linalg.norm(exact)
  return {
      'cosine': jnp.vdot(estimate, exact) / jnp.maximum(jnp.linalg.norm(estimate) * exact_norm, tiny),
      'relative_error': jnp.linalg.norm(estimate - exact) / jnp.maximum(exact_norm, tiny),
  }


def fidelity(state, batch, lr, *, config):
  """Every estimator of g against `exact` on one batch, as the training step would compute g.

  Args:
    state: the TrainState at theta_t.
    batch: {'labeled', 'unlabeled'} global batch.
    lr: the step's learning rate (alpha = lr unless config.hypergrad.inner_lr is set).
    config: the run config; its `hypergrad.forward_mode` is the meta forward and its
      `hypergrad.inner_steps` the K of the `exact` reference (the other modes are K = 1).

  Returns:
    {mode: {'cosine', 'relative_error'}} against `exact` for every mode in
    `hypergrad.MODES` (`exact` against itself included), {'implicit': {mode: ...}}
    the same against `implicit`, and the norms {'exact_norm', 'implicit_norm'}.
  """
  key = state.step_key(common.DROPOUT_META)  # The training step's meta dropout draw.
  grads = {}
  for mode in hypergrad.MODES:
    _, grads[mode], _ = semimeta.meta_pseudo_labels(
        state, batch['labeled'], batch['unlabeled'], lr=lr, key=key,
        config=variant_config(config, mode=mode))
  result = {mode: compare(g, grads['exact']) for mode, g in grads.items()}
  result['against_implicit'] = {mode: compare(g, grads['implicit']) for mode, g in grads.items()}
  result['exact_norm'] = jnp.linalg.norm(grads['exact'])
  result['implicit_norm'] = jnp.linalg.norm(grads['implicit'])
  return result


def half_precision_fidelity(state, batch, lr, *, config, half_apply_fn):
  """Every mode's g with bfloat16 activations against the float32 `exact` g.

  Args:
    state: the TrainState at theta_t (its `apply_fn` the float32 model's).
    batch: {'labeled', 'unlabeled'} global batch.
    lr: the step's learning rate.
    config: the run config (float32); `hypergrad.inner_steps` is the K of the reference.
    half_apply_fn: `apply` of the same model built with `half_precision=True`.

  Returns:
    {mode: {'cosine', 'relative_error'}} of each bf16 mode against float32 `exact`,
    plus {'exact_norm': ||g_exact||}.
  """
  key = state.step_key(common.DROPOUT_META)
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  _, exact, _ = semimeta.meta_pseudo_labels(state, labeled, unlabeled, lr=lr, key=key,
                                            config=variant_config(config, mode='exact'))
  half_state = state.replace(apply_fn=half_apply_fn)
  result = {'exact_norm': jnp.linalg.norm(exact)}
  for mode in hypergrad.MODES:
    _, g, _ = semimeta.meta_pseudo_labels(
        half_state, labeled, unlabeled, lr=lr, key=key,
        config=variant_config(config, mode=mode, half_precision=True))
    result[mode] = compare(g.astype(exact.dtype), exact)
  return result


def fidelity_rows(per_batch, *, step: int, lr: float, forward_mode: str, inner_steps: int,
                  precision: str = 'fp32', reference: str = 'exact'):
  """Rows (FIDELITY_FIELDS), one per mode, of `fidelity` results over batches: mean and worst case.

  `reference` 'implicit' reads the comparisons with `implicit` (float32 `fidelity` only).
  """
  if reference not in REFERENCES:
    raise ValueError(f'Unknown fidelity reference {reference!r}; expected one of {REFERENCES}.')
  select = (lambda r: r) if reference == 'exact' else (lambda r: r['against_implicit'])
  rows = []
  for mode in hypergrad.MODES:
    cosines = np.array([select(r)[mode]['cosine'] for r in per_batch], np.float64)
    errors = np.array([select(r)[mode]['relative_error'] for r in per_batch], np.float64)
    rows.append({
        'step': step, 'lr': lr, 'precision': precision, 'reference': reference,
        'forward_mode': forward_mode, 'inner_steps': inner_steps,
        'mode': mode, 'cosine': cosines.mean(), 'cosine_min': cosines.min(),
        'relative_error': errors.mean(), 'relative_error_max': errors.max(),
        'exact_norm': float(np.mean([r['exact_norm'] for r in per_batch])),
        'reference_norm': float(np.mean([r[f'{reference}_norm'] for r in per_batch])),
        'num_batches': len(per_batch)})
  return rows


def fidelity_table(rows, reference: str = 'exact') -> str:
  """Markdown: one line per (forward mode, K, approximation); a cell per step, 'cosine / rel. error'.

  Rows of float32 against `reference` only; the reference itself gets no line.
  """
  rows = [r for r in rows if r.get('precision', 'fp32') == 'fp32'
          and r.get('reference', 'exact') == reference]
  steps = sorted({row['step'] for row in rows})
  cells = {(r['forward_mode'], r['inner_steps'], r['mode'], r['step']): r for r in rows}
  lines = ['| meta forward | K | mode | ' + ' | '.join(f'step {s}' for s in steps) + ' |',
           '|---|---|---|' + '---|' * len(steps)]
  for fwd, k in dict.fromkeys((r['forward_mode'], r['inner_steps']) for r in rows):
    for mode in (m for m in hypergrad.MODES if m != reference):
      values = [cells.get((fwd, k, mode, s)) for s in steps]
      text = ['-' if v is None else f'{v["cosine"]:.5f} / {v["relative_error"]:.2e}' for v in values]
      lines.append(f'| {fwd} | {k} | {mode} | ' + ' | '.join(text) + ' |')
  return '\n'.join(lines)


def half_precision_table(rows) -> str:
  """Markdown: each mode in bf16 against float32 `exact`, one line per (forward mode, K, mode)."""
  rows = [r for r in rows if r.get('precision') == 'bf16']
  steps = sorted({row['step'] for row in rows})
  cells = {(r['forward_mode'], r['inner_steps'], r['mode'], r['step']): r for r in rows}
  lines = ['| meta forward | K | mode (bf16) | ' + ' | '.join(f'step {s}' for s in steps) + ' |',
           '|---|---|---|' + '---|' * len(steps)]
  for fwd, k in dict.fromkeys((r['forward_mode'], r['inner_steps']) for r in rows):
    for mode in hypergrad.MODES:
      values = [cells.get((fwd, k, mode, s)) for s in steps]
      text = ['-' if v is None else f'{v["cosine"]:.5f} / {v["relative_error"]:.2e}' for v in values]
      lines.append(f'| {fwd} | {k} | {mode} | ' + ' | '.join(text) + ' |')
  return '\n'.join(lines)
