"""The FixMatch family's targets, masks, weights and statistics against USB's hooks restated in NumPy.

Each method's `make_targets` runs on fixed logits (jitted once per test), over several
batches where it keeps statistics, and is compared with `tests/numpy_reference.py`'s
float64 restatement of USB's code (FixedThresholdingHook, PseudoLabelingHook, UDA's TSA,
FlexMatchThresholdingHook, FreeMatchThresholingHook and its entropy_loss,
DistAlignEMAHook, SoftMatchWeightingHook).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import validation
from semimeta_jax.methods import confidence
from semimeta_jax.methods import fixmatch
from semimeta_jax.methods import flexmatch
from semimeta_jax.methods import freematch
from semimeta_jax.methods import softmatch
from semimeta_jax.methods import uda
from tests import numpy_reference as ref
from tests.conftest import tiny_config

C = 6


def logits_batch(seed, rows=16, scale=3.0):
  """Logits whose softmax spans confident and unconfident rows."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(rows, C)) * scale
  logits[::4] *= 3.0  # Some rows very confident.
  return logits.astype(np.float32)


def targets_fn(module, config, pool_size=None):
  """The method's make_targets, jitted, on (weak logits, labeled logits, indices, state)."""
  def run(weak, labeled, indices, state):
    return module.make_targets(config, weak, labeled, {'index': indices}, state, pool_size)
  return jax.jit(run)


def test_consistency_loss_divides_by_the_batch_for_hard_and_soft_targets():
  strong, weak = logits_batch(0), logits_batch(1)
  mask = (np.arange(16) % 3 == 0).astype(np.float32)
  labels = np.argmax(weak, -1)
  np.testing.assert_allclose(confidence.consistency_cross_entropy(strong, labels, mask),
                             ref.usb_consistency_ce(strong, labels, mask), rtol=1e-5)
  soft = ref.softmax(weak).astype(np.float32)
  np.testing.assert_allclose(confidence.consistency_cross_entropy(strong, soft, mask),
                             ref.usb_consistency_ce(strong, soft, mask), rtol=1e-5)


@pytest.mark.parametrize('hard', [True, False])
def test_fixmatch_masks_at_p_cutoff_and_targets_the_argmax_or_the_probabilities(hard):
  config = tiny_config(method='fixmatch', **{'fixmatch.p_cutoff': 0.9, 'fixmatch.hard_label': hard,
                                             'fixmatch.T': 0.3})
  weak, strong = logits_batch(2), logits_batch(3)
  made = targets_fn(fixmatch, config)(weak, weak[:4], jnp.arange(16), {})
  probs = ref.softmax(weak)
  mask = (probs.max(-1) >= 0.9).astype(np.float64)
  assert 0 < mask.mean() < 1
  np.testing.assert_array_equal(made.weight, mask)
  # USB passes probabilities with softmax=False: soft targets are p, T never applied.
  want = ref.usb_gen_ulb_targets(probs, use_hard_label=hard, T=0.3, apply_softmax=False)
  np.testing.assert_allclose(made.targets, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(confidence.consistency_cross_entropy(strong, made.targets, made.weight),
                             ref.usb_consistency_ce(strong, want, mask), rtol=1e-5)


@pytest.mark.parametrize('sharpen', [False, True])
def test_uda_targets_are_the_probabilities_unless_sharpened(sharpen):
  config = tiny_config(method='uda', **{'uda.p_cutoff': 0.7, 'uda.T': 0.4, 'uda.sharpen': sharpen})
  weak = logits_batch(4)
  made = targets_fn(uda, config)(weak, weak[:4], jnp.arange(16), {})
  probs = ref.softmax(weak)
  np.testing.assert_array_equal(made.weight, (probs.max(-1) >= 0.7).astype(np.float32))
  want = ref.softmax(weak / 0.4) if sharpen else probs
  np.testing.assert_allclose(made.targets, want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(ref.softmax(weak / 0.4), probs, atol=1e-2)  # The two differ.


@pytest.mark.parametrize('schedule', ['none', 'linear', 'exp', 'log'])
def test_uda_tsa_masks_the_labeled_rows_above_its_threshold(schedule):
  config = tiny_config(method='uda', num_train_steps=50, **{'uda.tsa_schedule': schedule})
  logits, labels = logits_batch(5, scale=1.5), np.arange(16) % C
  supervised = jax.jit(lambda z, y, t: uda.supervised(config, z, y, t, C))
  fractions = []
  for step in (0, 10, 30, 49):
    eta = ref.usb_tsa(schedule, step, 50, C)
    np.testing.assert_allclose(uda.tsa_threshold(schedule, step, 50, C), eta, rtol=1e-6)
    keep = ref.softmax(logits).max(-1) <= eta
    per_example = -ref.log_softmax(logits)[np.arange(16), labels]
    loss, metrics = supervised(logits, labels, step)
    np.testing.assert_allclose(loss, np.mean(per_example * keep), rtol=1e-5)
    np.testing.assert_allclose(metrics['tsa_fraction'], keep.mean())
    fractions.append(keep.mean())
  if schedule != 'none':
    assert any(0 < f < 1 for f in fractions)  # Some rows above eta, some below.


def flexmatch_run(batches, *, thresh_warmup, p_cutoff=0.7, num_train=16, pool=range(4, 12)):
  """(our masks, states) and (USB's masks, hook) over `batches` of (logits, train-split indices)."""
  config = tiny_config(method='flexmatch', **{'flexmatch.p_cutoff': p_cutoff,
                                              'flexmatch.thresh_warmup': thresh_warmup})
  pool = list(pool)
  run = targets_fn(flexmatch, config, pool_size=len(pool))
  state = flexmatch.init_extra_state(config, num_train=num_train, num_classes=C)['flexmatch']
  hook = ref.UsbFlexMatchHook(len(pool), C, thresh_warmup=thresh_warmup)
  ours, theirs = [], []
  for logits, indices in batches:
    made = run(logits, logits[:2], jnp.asarray(indices, jnp.int32), state)
    state = made.state
    ours.append((np.asarray(made.weight), state))
    # USB's memory is the pool alone: position = the index's place in the pool.
    theirs.append((hook.masking(ref.softmax(logits), [pool.index(i) for i in indices], p_cutoff),
                   list(hook.selected_label), hook.classwise_acc.copy()))
  return ours, theirs


@pytest.mark.parametrize('thresh_warmup', [True, False])
def test_flexmatch_memory_and_thresholds_follow_usb_over_several_steps(thresh_warmup):
  rng = np.random.default_rng(6)
  batches = []
  for step in range(6):
    indices = rng.choice(np.arange(4, 12), size=6, replace=False)
    logits = logits_batch(10 + step, rows=6, scale=2.0)
    if step == 2:  # One index twice, both rows confident, of classes 1 then 3: the later one stands.
      indices[5] = indices[1]
      logits[1], logits[5] = np.eye(C)[1] * 9.0, np.eye(C)[3] * 9.0
    batches.append((logits, indices))
  ours, theirs = flexmatch_run(batches, thresh_warmup=thresh_warmup)
  # The first step: every entry -1, sigma 0, threshold 0: every row is kept.
  np.testing.assert_array_equal(ours[0][0], np.ones(6))
  for (mask, state), (usb_mask, usb_memory, usb_acc) in zip(ours, theirs):
    np.testing.assert_array_equal(mask, usb_mask)
    np.testing.assert_array_equal(np.asarray(state['selected_label'])[4:12], usb_memory)
    np.testing.assert_allclose(state['classwise_acc'], usb_acc, rtol=1e-6)
  assert ours[2][1]['selected_label'][batches[2][1][1]] == 3
  assert (np.asarray(ours[-1][1]['selected_label'])[[0, 1, 2, 3, 12, 13, 14, 15]] == -1).all()
  assert any(0 < m.mean() < 1 for m, _ in ours[1:])  # The flexible thresholds cut somewhere.


def test_flexmatch_same_index_twice_keeps_the_last_selected_row():
  memory = jnp.full((5,), -1, jnp.int32)
  indices = jnp.asarray([3, 1, 3, 3, 1])
  predicted = jnp.asarray([0, 1, 2, 4, 5])
  selected = jnp.asarray([True, True, True, False, False])
  # Index 3: rows 0 and 2 selected, row 3 not: row 2 writes. Index 1: only row 1 is selected.
  np.testing.assert_array_equal(flexmatch.remember(memory, indices, predicted, selected), [-1, 1, -1, 2, -1])


def test_flexmatch_sigma_is_kept_when_one_count_fills_the_pool():
  # A pool of 3 entries: after step 1, classes (2, 3, -1) and sigma [0, 0, 1, 1, 0, 0]; after step 2
  # every entry is class 2, a count equal to the pool: USB's guard keeps sigma from step 1 (not
  # [0, 0, 1, 0, 0, 0], what the memory alone would give).
  confident = lambda cls: np.eye(C, dtype=np.float32)[cls] * 20.0
  batches = [(np.stack([confident(2), confident(3)]), [0, 1]),
             (np.stack([confident(2), confident(2)]), [1, 2])]
  ours, theirs = flexmatch_run(batches, thresh_warmup=True, num_train=3, pool=range(3))
  np.testing.assert_array_equal(ours[1][1]['selected_label'], [2, 2, 2])
  np.testing.assert_allclose(ours[1][1]['classwise_acc'], theirs[1][2])
  np.testing.assert_allclose(ours[1][1]['classwise_acc'], [0, 0, 1, 1, 0, 0])


def test_flexmatch_mask_is_the_convex_mapping_of_sigma():
  config = tiny_config(method='flexmatch', **{'flexmatch.p_cutoff': 0.9})
  sigma = np.asarray([0.0, 0.2, 0.5, 0.8, 1.0, 0.35], np.float32)
  state = {'selected_label': jnp.full((64,), -1, jnp.int32), 'classwise_acc': jnp.asarray(sigma)}
  logits = logits_batch(60, rows=64, scale=2.5)
  made = targets_fn(flexmatch, config, pool_size=64)(logits, logits[:2], jnp.arange(64), state)
  hook = ref.UsbFlexMatchHook(64, C)
  hook.classwise_acc = sigma.astype(np.float64)
  want = hook.masking(ref.softmax(logits), list(range(64)), 0.9)
  np.testing.assert_array_equal(made.weight, want)
  # Some row lies between the convex threshold tau s / (2 - s) and the linear one tau s.
  probs = ref.softmax(logits)
  s = sigma[probs.argmax(-1)]
  assert np.any((probs.max(-1) >= 0.9 * s / (2 - s)) & (probs.max(-1) < 0.9 * s))


@pytest.mark.parametrize('use_quantile,clip_thresh,momentum', [(False, False, 0.6), (True, True, 0.2)])
def test_freematch_statistics_update_before_the_mask_as_usb(use_quantile, clip_thresh, momentum):
  config = tiny_config(method='freematch', **{'freematch.ema_p': momentum, 'freematch.use_quantile': use_quantile,
                                              'freematch.clip_thresh': clip_thresh})
  run = targets_fn(freematch, config)
  state = freematch.init_extra_state(config, num_train=0, num_classes=C)['freematch']
  hook = ref.UsbFreeMatchHook(C, momentum=momentum, use_quantile=use_quantile, clip_thresh=clip_thresh)
  masks = []
  for step in range(5):
    logits = logits_batch(20 + step, scale=4.0 + 2 * step)
    made = run(logits, logits[:2], jnp.arange(16), state)
    state = made.state
    masks.append(hook.masking(logits))
    np.testing.assert_array_equal(made.weight, masks[-1])
    np.testing.assert_allclose(state['time_p'], hook.time_p, rtol=1e-5)
    np.testing.assert_allclose(state['p_model'], hook.p_model, rtol=1e-5)
    np.testing.assert_allclose(state['label_hist'], hook.label_hist, rtol=1e-5)
    np.testing.assert_array_equal(made.targets, np.argmax(logits, -1))
  assert any(0 < m.mean() < 1 for m in masks)
  if clip_thresh:
    assert float(state['time_p']) == pytest.approx(0.95)  # Clipped: the 0.8 quantile is ~1.


def fairness_inputs(seed):
  rng = np.random.default_rng(seed)
  strong = logits_batch(seed, scale=2.0)
  strong[:, 5] -= 6.0  # No row predicts class 5: its histogram entry is 0 (1/0 -> 0).
  mask = (rng.random(16) < 0.5).astype(np.float32)
  p_model = rng.dirichlet(np.ones(C)).astype(np.float32)
  label_hist = rng.dirichlet(np.ones(C)).astype(np.float32)
  return mask, strong, p_model, label_hist


def test_freematch_fairness_is_usbs_entropy_loss_with_its_sign():
  mask, strong, p_model, label_hist = fairness_inputs(30)
  value = freematch.fairness(mask, strong, p_model, label_hist)
  want = ref.usb_freematch_entropy_loss(mask, strong, p_model, label_hist)
  assert want < 0  # + sum p log q: the negative cross-entropy, as USB's code.
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert float(freematch.fairness(np.zeros(16, np.float32), strong, p_model, label_hist)) == 0.0


def test_freematch_fairness_gradient_matches_finite_differences_of_usbs_loss():
  mask, strong, p_model, label_hist = fairness_inputs(31)
  grad = jax.grad(freematch.fairness, argnums=1)(mask, strong, p_model, label_hist)
  strong64, eps = strong.astype(np.float64), 1e-6
  numeric = np.zeros_like(strong64)
  for i, j in np.ndindex(*strong.shape):
    if mask[i] == 0:
      continue  # Rows out of the mask are not in the loss (their gradient is checked to be 0).
    up, down = strong64.copy(), strong64.copy()
    up[i, j] += eps
    down[i, j] -= eps
    numeric[i, j] = (ref.usb_freematch_entropy_loss(mask, up, p_model, label_hist)
                     - ref.usb_freematch_entropy_loss(mask, down, p_model, label_hist)) / (2 * eps)
  assert np.abs(numeric).max() > 1e-3
  np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize('per_class,uniform', [(False, True), (True, False)])
def test_softmatch_alignment_and_gaussian_follow_usb_over_several_steps(per_class, uniform):
  config = tiny_config(method='softmatch', **{'softmatch.ema_p': 0.6, 'softmatch.n_sigma': 2.0,
                                              'softmatch.per_class': per_class,
                                              'softmatch.dist_uniform': uniform})
  run = targets_fn(softmatch, config)
  state = softmatch.init_extra_state(config, num_train=0, num_classes=C)['softmatch']
  align = ref.UsbDistAlignEMA(C, momentum=0.6, p_target_type='uniform' if uniform else 'model')
  hook = ref.UsbSoftMatchHook(C, n_sigma=2, momentum=0.6, per_class=per_class)
  moved = []
  for step in range(5):
    weak, labeled = logits_batch(40 + step, rows=24), logits_batch(50 + step, rows=4)
    weak[:, 0] += 3.0  # A skewed p_model, which the alignment corrects.
    made = run(weak, labeled, jnp.arange(24), state)
    state = made.state
    aligned = align.dist_align(ref.softmax(weak), ref.softmax(labeled))
    weight = hook.masking(aligned)
    np.testing.assert_allclose(state['alignment']['p_model'], align.p_model, rtol=1e-5)
    np.testing.assert_allclose(state['alignment']['p_target'], align.p_target, rtol=1e-5)
    np.testing.assert_allclose(state['mu'], hook.mu, rtol=1e-5)
    np.testing.assert_allclose(state['var'], hook.var, rtol=1e-5)
    np.testing.assert_allclose(made.weight, weight, rtol=1e-4, atol=1e-6)
    # The targets come from the unaligned logits.
    np.testing.assert_array_equal(made.targets, np.argmax(weak, -1))
    moved.append(not np.array_equal(np.argmax(aligned, -1), np.argmax(weak, -1)))
    if step == 0:  # USB's p_model starts as the first batch's mean.
      np.testing.assert_allclose(state['alignment']['p_model'], ref.softmax(weak).mean(0), rtol=1e-5)
  assert 0.05 < float(np.mean(made.weight)) < 0.95
  assert any(moved)  # The alignment moves some argmax: the targets are not the aligned ones.


@pytest.mark.parametrize('method,field,value', [
    ('fixmatch', 'fixmatch.p_cutoff', 1.5), ('uda', 'uda.tsa_schedule', 'cosine'),
    ('flexmatch', 'flexmatch.lambda_u', -1.0), ('freematch', 'freematch.ema_p', 1.0),
    ('softmatch', 'softmatch.n_sigma', 0.0)])
def test_a_bad_field_is_named(method, field, value):
  with pytest.raises(validation.ConfigError, match=f'config.{field}'):
    validation.validate_config(tiny_config(method=method, **{field: value}))


USB_FIELDS = {
    'fixmatch': {'fixmatch.p_cutoff': 0.95, 'fixmatch.hard_label': True},
    'uda': {'uda.p_cutoff': 0.8, 'uda.T': 0.4, 'uda.sharpen': False, 'uda.tsa_schedule': 'none'},
    'flexmatch': {'flexmatch.p_cutoff': 0.95, 'flexmatch.thresh_warmup': True},
    'freematch': {'freematch.ent_loss_ratio': 0.001, 'freematch.ema_p': 0.999, 'freematch.use_quantile': False},
    'softmatch': {'softmatch.ema_p': 0.999, 'softmatch.n_sigma': 2.0, 'softmatch.dist_uniform': True},
}


@pytest.mark.parametrize('dataset', ['digits', 'cifar10', 'cifar100', 'svhn', 'stl10'])
def test_the_presets_are_usbs_classic_cv_settings(dataset):
  import importlib  # pylint: disable=g-import-not-at-top
  for method, fields in USB_FIELDS.items():
    config = importlib.import_module(f'configs.{dataset}').get_config(method)
    configured = validation.validate_config(config)
    assert configured.method.name == method and configured.strong_view
    assert config[method].lambda_u == 1.0
    for field, value in fields.items():
      block, leaf = field.split('.')
      assert config[block][leaf] == value, (dataset, field)
    if dataset == 'digits':  # Digits' own batch and schedule (uratio 1).
      assert (config.labeled_batch_size, config.unlabeled_batch_size, config.num_train_steps) == (64, 64, 1000)
      continue
    assert (config.labeled_batch_size, config.unlabeled_batch_size) == (64, 7 * 64)  # uratio 7.
    assert (config.model, config.learning_rate, config.num_train_steps) == ('wrn28_2', 0.03, 2 ** 20)
    assert config.weight_decay == (1e-3 if dataset == 'cifar100' else 5e-4)
    assert config.ema.decay == 0.999 and config.ema.headline
