"""Exact evaluation: padded rows never count, in the sums, the count, or the errors.

The model is a stand-in whose logits are its input (plus a bias), so each row's
correctness and loss are known in advance. Padded rows are built to be *correct*
(and, for one, to carry a large loss), so that summing over them shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import evaluation
from semimeta_jax import parallel
from semimeta_jax import state as state_lib
from semimeta_jax.data import eval_batches as data_evaluation
from semimeta_jax.methods import ema

NUM_CLASSES = 6


def logits_model(variables, x, train):
  """Logits = the flattened image + a per-class bias."""
  assert not train
  return x.reshape(x.shape[0], -1) + variables['params']['bias']


def make_state(bias=0.0, ema_bias=None):
  state = state_lib.TrainState.create(
      apply_fn=logits_model, params={'bias': jnp.full((NUM_CLASSES,), bias)}, batch_stats={},
      tx=optax.sgd(0.1), rng=jax.random.key(0))
  if ema_bias is not None:
    state = state.replace(extra={'ema': {'params': {'bias': jnp.full((NUM_CLASSES,), ema_bias)},
                                         'batch_stats': {}}})
  return state


def batch_of(logits, labels, num_valid):
  """A padded evaluation batch: the first `num_valid` rows are real."""
  logits = np.asarray(logits, np.float32)
  return {'image': logits.reshape(len(logits), 1, 1, NUM_CLASSES),
          'label': np.asarray(labels, np.int32),
          'mask': np.arange(len(logits)) < num_valid}


def numpy_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


# Five real rows: rows 0-2 right at top-1; row 3 is the label's 3rd-largest logit
# (top-5 only); row 4 the smallest (wrong at both). Three padded rows: two right at
# top-1, one wrong with a huge loss.
LOGITS = np.array([
    [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 4.0, 1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 3.0],
    [3.0, 2.0, 1.0, 0.0, 0.0, 0.0],
    [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 9.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 40.0],
])
LABELS = np.array([0, 1, 5, 2, 5, 0, 1, 0])
NUM_VALID = 5


def test_eval_step_sums_only_the_real_rows():
  sums = jax.jit(evaluation.eval_step)(make_state(), batch_of(LOGITS, LABELS, NUM_VALID))
  sums = jax.tree.map(float, sums)
  assert sums['count'] == NUM_VALID
  assert sums['correct_top1'] == 3.0
  assert sums['correct_top5'] == 4.0
  expected_loss = numpy_cross_entropy(LOGITS, LABELS)[:NUM_VALID].sum()
  np.testing.assert_allclose(sums['loss_sum'], expected_loss, rtol=1e-5)


def test_eval_step_reads_the_weight_set_it_is_given():
  # A bias of +10 on class 5 makes every real row predict 5: only row 2 and row 4 are labelled 5.
  ema_bias = np.zeros(NUM_CLASSES)
  ema_bias[5] = 10.0
  state = make_state(bias=0.0, ema_bias=ema_bias)
  batch = batch_of(LOGITS, LABELS, NUM_VALID)
  raw = jax.jit(evaluation.eval_step)(state, batch)
  ema_set, = ema.OPTION.weight_sets(None)
  ema_sums = jax.jit(lambda s, b: evaluation.eval_step(s, b, select=ema_set.select))(state, batch)
  assert float(raw['correct_top1']) == 3.0
  assert float(ema_sums['correct_top1']) == 2.0
  expected = numpy_cross_entropy(LOGITS + ema_bias, LABELS)[:NUM_VALID].sum()
  np.testing.assert_allclose(ema_sums['loss_sum'], expected, rtol=1e-5)


def test_evaluate_over_a_mesh_gives_exact_errors_and_loss():
  mesh = parallel.make_mesh()
  batch_size = 8 * len(jax.devices())  # One row per device at least, with padding in the last batch.
  rng = np.random.default_rng(0)
  num_examples = batch_size + 13
  logits = rng.normal(size=(num_examples, NUM_CLASSES)) * 3.0
  labels = rng.integers(0, NUM_CLASSES, num_examples)
  padded_logits = np.concatenate([logits, np.tile(np.eye(NUM_CLASSES)[:1] * 50.0, (batch_size - 13, 1))])
  padded_labels = np.concatenate([labels, np.full(batch_size - 13, 3)])  # Padding: wrong, huge loss.
  batches = [batch_of(padded_logits[:batch_size], padded_labels[:batch_size], batch_size),
             batch_of(padded_logits[batch_size:], padded_labels[batch_size:], 13)]
  compiled = parallel.jit_eval_step(evaluation.eval_step, mesh)
  result = evaluation.evaluate(compiled, make_state(), batches, mesh)

  ranks = (logits > logits[np.arange(num_examples), labels][:, None]).sum(-1)
  assert result['num_examples'] == num_examples
  np.testing.assert_allclose(result['error_top1'], 100.0 * np.mean(ranks >= 1), rtol=1e-6)
  np.testing.assert_allclose(result['error_top5'], 100.0 * np.mean(ranks >= 5), rtol=1e-6)
  np.testing.assert_allclose(result['loss'], numpy_cross_entropy(logits, labels).mean(), rtol=1e-5)


def test_evaluate_without_batches_is_an_error():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match='no batches'):
    evaluation.evaluate(parallel.jit_eval_step(evaluation.eval_step, mesh), make_state(), [], mesh)


class TestPaddedShares:
  """data/eval_batches.py: every example in exactly one batch row, on any process count."""

  @pytest.mark.parametrize('num_examples, process_count, batch_size', [
      (10, 1, 4), (10, 3, 2), (17, 4, 3), (3, 4, 2), (12, 2, 6)])
  def test_shares_cover_every_example_once(self, num_examples, process_count, batch_size):
    images = np.arange(num_examples, dtype=np.uint8).reshape(num_examples, 1, 1, 1)
    labels = np.arange(num_examples)
    num_batches = data_evaluation.num_eval_batches(num_examples, process_count, batch_size)
    seen, stops = [], []
    for process in range(process_count):
      start, stop = data_evaluation.share_bounds(num_examples, process, process_count)
      stops.append((start, stop))
      batches = list(data_evaluation.padded_batches(
          data_evaluation.array_batches(images[start:stop], labels[start:stop], batch_size,
                                        mean=(0.0,), std=(1.0,)),
          num_batches, batch_size, (1, 1, 1)))
      assert len(batches) == num_batches  # The same count on every process.
      for batch in batches:
        assert batch['image'].shape == (batch_size, 1, 1, 1) and batch['mask'].shape == (batch_size,)
        seen.extend(batch['label'][batch['mask']])
        assert np.all(batch['image'][~batch['mask']] == 0) and np.all(batch['label'][~batch['mask']] == 0)
    # Contiguous shares in order, no gaps, and the fewest batches that hold the largest one.
    assert stops[0][0] == 0 and stops[-1][1] == num_examples
    assert all(a[1] == b[0] for a, b in zip(stops, stops[1:]))
    largest = max(stop - start for start, stop in stops)
    assert (num_batches - 1) * batch_size < largest <= num_batches * batch_size
    np.testing.assert_array_equal(np.sort(seen), labels)

  def test_array_batches_normalise_in_order(self):
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    labels = np.array([4, 3, 2, 1, 0])
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    batches = list(data_evaluation.array_batches(images, labels, 2, mean, std))
    assert [len(b['label']) for b in batches] == [2, 2, 1]
    expected = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(np.concatenate([b['image'] for b in batches]), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), labels)
    assert batches[0]['image'].dtype == np.float32 and batches[0]['label'].dtype == np.int32

  def test_padded_batches_copy_real_rows_and_refuse_a_longer_stream(self):
    stream = [{'image': np.full((3, 1, 1, 1), 7.0), 'label': np.array([1, 2, 3])}]
    batch, empty = data_evaluation.padded_batches(stream, 2, 4, (1, 1, 1))
    np.testing.assert_array_equal(batch['mask'], [True, True, True, False])
    np.testing.assert_array_equal(batch['label'], [1, 2, 3, 0])
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], [7.0, 7.0, 7.0, 0.0])
    assert not empty['mask'].any()
    with pytest.raises(ValueError, match='more than 1'):
      list(data_evaluation.padded_batches(stream * 2, 1, 4, (1, 1, 1)))
