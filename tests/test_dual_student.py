"""Dual Student: the stability mask and the "less stable learns" rule against the authors' loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import validation
from semimeta_jax.methods import augment
from semimeta_jax.methods import common
from semimeta_jax.methods import dual_student
from semimeta_jax.methods import second_network
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config
from tests.test_co_training import initial_state, run_steps

THRESHOLD = 0.8
NUM_LABELED, NUM_UNLABELED, NUM_CLASSES = 4, 28, 5
SEEDS = range(4)


def softmax_mse_rows(a, b):
  """Per row: sum over classes of (softmax(a) - softmax(b))^2 / num_classes (the authors' criterion)."""
  return np.sum(np.square(numpy_reference.softmax(a) - numpy_reference.softmax(b)), -1) / a.shape[-1]


def authors_loop(l_class, r_class, le_class, re_class, l_cons, r_cons):
  """dual_student.py's target loop, example by example, in float64.

  Returns (l stable, r stable, l learns from r, r learns from l, l loss, r loss): a
  student learns from the other where its target row is the other's class logits.
  """
  batch = l_class.shape[0]
  p = lambda logits: numpy_reference.softmax(logits)
  l_v, r_v, le_v, re_v = (p(x).max(-1) for x in (l_class, r_class, le_class, re_class))
  l_i, r_i, le_i, re_i = (p(x).argmax(-1) for x in (l_class, r_class, le_class, re_class))
  l_mask, r_mask, le_mask, re_mask = (v > THRESHOLD for v in (l_v, r_v, le_v, re_v))
  tar_l, tar_r = l_class.copy(), r_class.copy()  # Targets of r and of l.
  l_stable_all, r_stable_all = np.zeros(batch, bool), np.zeros(batch, bool)
  for sdx in range(batch):
    l_stable = False
    if not l_mask[sdx] and not le_mask[sdx]:
      tar_l[sdx] = r_cons[sdx]
    elif l_i[sdx] != le_i[sdx]:
      tar_l[sdx] = r_cons[sdx]
    else:
      l_stable = True
    r_stable = False
    if not r_mask[sdx] and not re_mask[sdx]:
      tar_r[sdx] = l_cons[sdx]
    elif r_i[sdx] != re_i[sdx]:
      tar_r[sdx] = l_cons[sdx]
    else:
      r_stable = True
    if l_stable and r_stable:
      l_sample = softmax_mse_rows(l_cons[sdx:sdx + 1], le_class[sdx:sdx + 1])[0]
      r_sample = softmax_mse_rows(r_cons[sdx:sdx + 1], re_class[sdx:sdx + 1])[0]
      if l_sample < r_sample:
        tar_r[sdx] = l_cons[sdx]
      elif l_sample > r_sample:
        tar_l[sdx] = r_cons[sdx]
    l_stable_all[sdx], r_stable_all[sdx] = l_stable, r_stable
  # The labeled rows (after the unlabeled ones in the authors' batches; first here) learn nothing.
  tar_l[:NUM_LABELED] = r_cons[:NUM_LABELED]
  tar_r[:NUM_LABELED] = l_cons[:NUM_LABELED]
  share = NUM_UNLABELED / batch
  r_loss = share * np.sum(softmax_mse_rows(r_cons, tar_l)) / NUM_UNLABELED
  l_loss = share * np.sum(softmax_mse_rows(l_cons, tar_r)) / NUM_UNLABELED
  r_learns = np.all(tar_l == l_class, -1) & ~np.all(tar_l == r_cons, -1)
  l_learns = np.all(tar_r == r_class, -1) & ~np.all(tar_r == l_cons, -1)
  return l_stable_all, r_stable_all, l_learns, r_learns, l_loss, r_loss


def crafted_logits(seed):
  """Logits where every case occurs: confident or not, same or other argmax, tied distances."""
  rng = np.random.default_rng(seed)
  batch = NUM_LABELED + NUM_UNLABELED
  scale = rng.choice([0.5, 6.0], size=(batch, 1))  # Confident rows (max prob > 0.8) and unsure ones.
  l_class = scale * rng.normal(size=(batch, NUM_CLASSES))
  r_class = scale * rng.normal(size=(batch, NUM_CLASSES))
  # The other view: close to the own one (same argmax) on most rows, unrelated on some.
  close = rng.random((batch, 1)) < 0.7
  le_class = np.where(close, l_class + 0.1 * rng.normal(size=l_class.shape), rng.normal(size=l_class.shape))
  re_class = np.where(close, r_class + 0.1 * rng.normal(size=r_class.shape), rng.normal(size=r_class.shape))
  l_cons = l_class + 0.5 * rng.normal(size=l_class.shape)
  r_cons = r_class + 0.5 * rng.normal(size=r_class.shape)
  # Two rows where the students are identical: equal distances, so both learn.
  for row in (NUM_LABELED, NUM_LABELED + 1):
    l_class[row] = r_class[row] = 6.0 * np.eye(NUM_CLASSES)[row % NUM_CLASSES]
    le_class[row] = re_class[row] = l_class[row]
    l_cons[row] = r_cons[row] = l_class[row] + 0.3
  return [x.astype(np.float32) for x in (l_class, r_class, le_class, re_class, l_cons, r_cons)]


@pytest.mark.parametrize('seed', SEEDS)
def test_stability_and_who_learns_equal_the_authors_loop(seed):
  l_class, r_class, le_class, re_class, l_cons, r_cons = crafted_logits(seed)
  first, second = dual_student.FIRST, dual_student.SECOND
  losses, masks = jax.jit(lambda *a: dual_student.stabilization_losses(
      {first: a[0], second: a[1]}, {first: a[4], second: a[5]}, {first: a[2], second: a[3]},
      num_labeled=NUM_LABELED, threshold=THRESHOLD))(l_class, r_class, le_class, re_class, l_cons, r_cons)
  as64 = lambda x: np.asarray(x, np.float64)
  l_stable, r_stable, l_learns, r_learns, l_loss, r_loss = authors_loop(
      *(as64(x) for x in (l_class, r_class, le_class, re_class, l_cons, r_cons)))
  unlabeled = slice(NUM_LABELED, None)
  np.testing.assert_array_equal(np.asarray(masks['first_stable'])[unlabeled], l_stable[unlabeled])
  np.testing.assert_array_equal(np.asarray(masks['second_stable'])[unlabeled], r_stable[unlabeled])
  np.testing.assert_array_equal(np.asarray(masks['first_learns']), l_learns)
  np.testing.assert_array_equal(np.asarray(masks['second_learns']), r_learns)
  np.testing.assert_allclose(float(losses[first]), l_loss, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(float(losses[second]), r_loss, rtol=1e-5, atol=1e-9)


def test_the_crafted_examples_hold_every_case_of_the_rule():
  cases = set()
  for seed in SEEDS:
    as64 = [np.asarray(x, np.float64) for x in crafted_logits(seed)]
    l_stable, r_stable, l_learns, r_learns = (x[NUM_LABELED:] for x in authors_loop(*as64)[:4])
    for row in range(NUM_UNLABELED):
      cases.add((bool(l_stable[row]), bool(r_stable[row]), bool(l_learns[row]), bool(r_learns[row])))
  # Neither stable; one stable (the other learns); both stable with the less stable one learning,
  # either way round; both stable at equal distances (both learn).
  assert {(False, False, False, False), (True, False, False, True), (False, True, True, False),
          (True, True, True, False), (True, True, False, True), (True, True, True, True)} <= cases


def test_stability_needs_the_same_argmax_and_one_confident_view():
  confident, unsure = jnp.array([[4.0, 0.0, 0.0]]), jnp.array([[0.3, 0.0, 0.0]])
  other_class = jnp.array([[0.0, 4.0, 0.0]])
  assert bool(dual_student.stable(confident, unsure, THRESHOLD)[0])  # One view confident suffices.
  assert not bool(dual_student.stable(unsure, unsure, THRESHOLD)[0])
  assert not bool(dual_student.stable(confident, other_class, THRESHOLD)[0])


@pytest.mark.slow
def test_both_students_and_their_heads_train_and_stay_different():
  # Threshold 0 and near-identical views: stability comes down to the same argmax on both views.
  config = tiny_config(method='dual_student', dropout_rate=0.0, **{
      'dual_student.stable_threshold': 0.0, 'perturb.max_translation': 0, 'perturb.noise_std': 0.01})
  start = initial_state(config)
  state, history = run_steps(config, 4)
  changed = lambda a, b: any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(state.params, start.params)
  assert changed(second_network.weights(state)[0], second_network.weights(start)[0])
  heads, heads0 = state.extra[dual_student.HEADS]['params'], start.extra[dual_student.HEADS]['params']
  assert changed(heads[dual_student.FIRST], heads0[dual_student.FIRST])
  assert changed(heads[dual_student.SECOND], heads0[dual_student.SECOND])
  assert changed(state.params, second_network.weights(state)[0])
  assert all(np.isfinite(row['loss']) for row in history)
  assert any(row['first_learns'] + row['second_learns'] > 0 for row in history)
  assert any(row['first_stabilization_loss'] + row['second_stabilization_loss'] > 0 for row in history)


def test_the_second_student_is_evaluated_as_its_own_weight_set():
  configured = methods.configure(tiny_config(method='dual_student'))
  assert [ws.prefix for ws in configured.weight_sets()] == ['eval', 'eval_second']


@pytest.mark.parametrize('field,value', [('dual_student.stable_threshold', 1.0),
                                         ('dual_student.stabilization_weight', -1.0),
                                         ('dual_student.consistency_weight', -1.0)])
def test_bad_fields_are_one_config_error(field, value):
  with pytest.raises(errors.ConfigError, match=field.replace('.', r'\.')):
    validation.validate_config(tiny_config(method='dual_student', **{field: value}))


@pytest.mark.slow
def test_each_students_terms_are_rebuilt_from_its_own_and_the_other_view():
  # Threshold 0 and near-identical views: stable examples exist, so the stabilisation term counts.
  config = tiny_config(method='dual_student', dropout_rate=0.0, **{
      'dual_student.stable_threshold': 0.0, 'dual_student.logit_distance_weight': 0.3,
      'perturb.max_translation': 0, 'perturb.noise_std': 0.01})
  state = initial_state(config)
  batch = synthetic_batch(jax.random.key(6))
  heads = state.extra[dual_student.HEADS]['params']
  trainable = {'first': state.params, 'second': second_network.weights(state)[0], 'heads': heads}
  total, (_, _, terms, _) = jax.jit(lambda t: dual_student.objective(
      t, state, batch, consistency_weight=2.0, stabilization_weight=5.0, config=config))(trainable)

  images = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  perturb = augment.from_config(config)
  # Each student's own view comes from its own key: student 1 sees view 0, student 2 view 1.
  views = [perturb(state.step_key(common.NOISE, tag), images) for tag in (0, 1)]
  stats = [state.batch_stats, second_network.weights(state)[1]]
  students = (dual_student.FIRST, dual_student.SECOND)
  class_logits, cons_logits = {}, {}
  for s, student in enumerate(students):
    for view in (s, 1 - s):  # Its own view, then the other student's.
      logits, features, _ = common.train_forward_with_features(state, trainable[student], views[view],
                                                               stats[s], jax.random.key(0))
      head = jax.tree.map(lambda a: np.asarray(a, np.float64), heads[student])
      class_logits[student, view == s] = np.asarray(logits, np.float64)
      cons_logits[student, view == s] = np.asarray(features, np.float64) @ head['kernel'] + head['bias']
  stabilization, masks = dual_student.stabilization_losses(
      {s: class_logits[s, True] for s in students}, {s: cons_logits[s, True] for s in students},
      {s: class_logits[s, False] for s in students}, num_labeled=16, threshold=0.0)
  assert np.any(np.asarray(masks['first_learns']) | np.asarray(masks['second_learns']))
  want_total = 0.0
  for s in students:
    own, cons, other = class_logits[s, True], cons_logits[s, True], class_logits[s, False]
    want = {'supervised_loss': numpy_reference.cross_entropy(own[:16], batch['labeled']['label']),
            'logit_distance': np.mean(np.square(own - cons)),
            'consistency_loss': np.mean(np.square(numpy_reference.softmax(cons)
                                                  - numpy_reference.softmax(other))),
            'stabilization_loss': float(stabilization[s])}
    assert want['stabilization_loss'] > 0
    for name, value in want.items():
      np.testing.assert_allclose(float(terms[f'{s}_{name}']), value, rtol=1e-4, atol=1e-9, err_msg=name)
    want_total += (want['supervised_loss'] + 0.3 * want['logit_distance'] + 2.0 * want['consistency_loss']
                   + 5.0 * want['stabilization_loss'])
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)


def identify_view(image, view, max_translation):
  """(dy, dx, flipped) of the one translation-then-flip of `image` that gives `view` (float64)."""
  padded = np.pad(image, ((max_translation,) * 2, (max_translation,) * 2, (0, 0)), mode='reflect')
  height, width = image.shape[:2]
  found = [(dy - max_translation, dx - max_translation, flipped)
           for dy in range(2 * max_translation + 1) for dx in range(2 * max_translation + 1)
           for flipped in (False, True)
           if np.allclose((lambda c: c[:, ::-1] if flipped else c)(padded[dy:dy + height, dx:dx + width]),
                          view, atol=1e-6)]
  assert len(found) == 1, found  # Random pixels: exactly one transform explains each view.
  return found[0]


@pytest.mark.parametrize('dataset', ['cifar10', 'digits'])
def test_the_two_views_translate_and_flip_each_example_independently(dataset):
  fields = methods.presets(dataset)['dual_student']
  config = tiny_config(**fields)
  max_translation = {'cifar10': 4, 'digits': 1}[dataset]
  assert config.perturb.max_translation == max_translation and not config.data.augment
  assert config.perturb.noise_std == 0.0
  images = jax.random.uniform(jax.random.key(0), (48, 12, 12, 1))
  state = initial_state(tiny_config(method='dual_student'))
  views = jax.jit(lambda s, x: dual_student.student_views(config, s, x))(state, images)
  draws = {s: [identify_view(np.asarray(images[i]), np.asarray(views[s][i]), max_translation)
               for i in range(len(images))] for s in views}
  first, second = (np.array(draws[s], dtype=float) for s in (dual_student.FIRST, dual_student.SECOND))
  # Per example, the two views' translations differ in most examples (equal with probability
  # 1 / (2 t + 1)^2), and every shift up to t is drawn.
  differs = np.any(first[:, :2] != second[:, :2], axis=1)
  assert differs.mean() > 0.6, differs.mean()
  assert np.abs(first[:, :2]).max() == max_translation and np.abs(second[:, :2]).max() == max_translation
  if dataset == 'cifar10':
    # Flipped independently: each view flips about half of the examples, and the two views'
    # flips disagree on about half of them.
    for flips in (first[:, 2], second[:, 2]):
      assert 0.25 < flips.mean() < 0.75
    assert 0.25 < np.mean(first[:, 2] != second[:, 2]) < 0.75
  else:
    assert not first[:, 2].any() and not second[:, 2].any()  # Digits are never mirrored.
