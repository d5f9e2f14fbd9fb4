"""A step of each FixMatch-family method: its loss, its gradient and its statistics against USB.

Two steps on a tiny network with hand-built batches carrying 'strong_image'. At each
step the float64 NumPy restatement of USB's code (tests/numpy_reference.py) is run on
the network's own training-mode logits of [labeled; weak; strong]; the step's loss must
equal it, and its gradient (SGD with lr 1, no momentum or decay: the parameter change)
must equal the gradient of a loss whose targets, weights and statistics are those
NumPy constants: so no gradient flows through the weak view. The method's statistics
after each step equal USB's hooks'. The step traces once. End to end (slow): eight
devices give one device's state, and a resumed FlexMatch run its uninterrupted state
and memory.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax.methods import freematch
from tests import conftest
from tests import numpy_reference as ref
from tests import test_train
from tests import test_train_methods
from tests.conftest import synthetic_batch, tiny_config
from tests.tiny_net import tiny_state

NUM_CLASSES, NUM_LABELED, NUM_UNLABELED = 10, 8, 12
NUM_TRAIN, POOL_START, POOL_SIZE = 40, 10, 25  # The pool: train-split indices 10..34.
LAMBDA_U, ENT_RATIO, MOMENTUM, TSA_STEPS = 2.5, 0.3, 0.5, 4

FIELDS = {
    'fixmatch': {'fixmatch.p_cutoff': 0.6, 'fixmatch.lambda_u': LAMBDA_U},
    'uda': {'uda.p_cutoff': 0.5, 'uda.lambda_u': LAMBDA_U, 'uda.tsa_schedule': 'linear',
            'num_train_steps': TSA_STEPS},
    'flexmatch': {'flexmatch.p_cutoff': 0.6, 'flexmatch.lambda_u': LAMBDA_U},
    'freematch': {'freematch.lambda_u': LAMBDA_U, 'freematch.ent_loss_ratio': ENT_RATIO,
                  'freematch.ema_p': MOMENTUM},
    'softmatch': {'softmatch.lambda_u': LAMBDA_U, 'softmatch.ema_p': MOMENTUM},
}


def family_config(method):
  # lr 1, no momentum, no decay: one step's parameter change is minus its gradient.
  return tiny_config(method=method, dropout_rate=0.0, learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                     **FIELDS[method])


def family_state(config):
  state = tiny_state(config, num_classes=NUM_CLASSES)
  # A sharper classifier: the weak view's confidences span both sides of the thresholds.
  params = jax.tree.map(lambda x: x, state.params)
  params['Dense_1']['kernel'] = params['Dense_1']['kernel'] * 6.0
  extra = methods.configure(config).init_extra(num_train=NUM_TRAIN, num_classes=NUM_CLASSES)(
      params, state.batch_stats)
  return state.replace(params=params, extra=extra)


def hand_batch(seed):
  """Labeled + unlabeled rows in the loop's layout, the strong view a different image of each row."""
  rng = np.random.default_rng(seed)
  image = lambda rows: rng.normal(size=(rows, 8, 8, 1)).astype(np.float32)
  weak = image(NUM_UNLABELED)
  indices = rng.choice(np.arange(POOL_START, POOL_START + POOL_SIZE), NUM_UNLABELED, replace=False)
  return {'labeled': {'image': image(NUM_LABELED), 'label': rng.integers(0, NUM_CLASSES, NUM_LABELED),
                      'index': np.arange(NUM_LABELED, dtype=np.int32)},
          'unlabeled': {'image': weak, 'strong_image': weak + 0.8 * image(NUM_UNLABELED),
                        'label': rng.integers(0, NUM_CLASSES, NUM_UNLABELED),
                        'index': indices.astype(np.int32)}}


class UsbReference:
  """USB's train_step of one method, in float64 NumPy, given the three parts' logits."""

  def __init__(self, method):
    self.method = method
    self.flex = ref.UsbFlexMatchHook(POOL_SIZE, NUM_CLASSES)
    self.free = ref.UsbFreeMatchHook(NUM_CLASSES, momentum=MOMENTUM)
    self.align = ref.UsbDistAlignEMA(NUM_CLASSES, momentum=MOMENTUM)
    self.soft = ref.UsbSoftMatchHook(NUM_CLASSES, momentum=MOMENTUM)

  def constants(self, step, labeled, weak, strong, labels, indices):
    """(supervised mask, targets, weights, fairness value, fairness inputs) of this step."""
    probs = ref.softmax(weak)
    supervised_mask, fairness, fairness_inputs = np.ones(len(labels)), 0.0, None
    if self.method in ('fixmatch', 'uda'):
      cutoff = FIELDS[self.method][f'{self.method}.p_cutoff']
      weights = (probs.max(-1) >= cutoff).astype(np.float64)
      targets = probs.argmax(-1) if self.method == 'fixmatch' else probs
      if self.method == 'uda':
        eta = ref.usb_tsa('linear', step, TSA_STEPS, NUM_CLASSES)
        supervised_mask = (ref.softmax(labeled).max(-1) <= eta).astype(np.float64)
    elif self.method == 'flexmatch':
      weights = self.flex.masking(probs, [i - POOL_START for i in indices], 0.6)
      targets = probs.argmax(-1)
    elif self.method == 'freematch':
      weights, targets = self.free.masking(weak), weak.argmax(-1)
      if weights.sum() > 0:
        fairness = ref.usb_freematch_entropy_loss(weights, strong, self.free.p_model, self.free.label_hist)
        fairness_inputs = (weights, self.free.p_model, self.free.label_hist)
    else:
      weights = self.soft.masking(self.align.dist_align(probs, ref.softmax(labeled)))
      targets = weak.argmax(-1)
    return supervised_mask, targets, weights, fairness, fairness_inputs

  def loss(self, labeled, strong, labels, constants):
    supervised_mask, targets, weights, fairness, _ = constants
    supervised = np.mean(supervised_mask * -ref.log_softmax(labeled)[np.arange(len(labels)), labels])
    return supervised + LAMBDA_U * ref.usb_consistency_ce(strong, targets, weights) + ENT_RATIO * fairness


def constant_target_loss(params, state, images, labels, constants):
  """The loss with every target, weight and statistic a constant: the gradient USB's step has."""
  supervised_mask, targets, weights, _, fairness_inputs = constants
  logits, _ = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                             rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
  labeled, strong = logits[:NUM_LABELED], logits[NUM_LABELED + NUM_UNLABELED:]
  supervised = jnp.mean(jnp.asarray(supervised_mask, jnp.float32)
                        * optax.losses.softmax_cross_entropy_with_integer_labels(labeled, labels))
  log_probs = jax.nn.log_softmax(strong)
  targets = jnp.asarray(targets)
  if targets.ndim == 2:
    per_example = -jnp.sum(targets.astype(jnp.float32) * log_probs, -1)
  else:
    per_example = -jnp.take_along_axis(log_probs, targets[:, None], -1)[:, 0]
  loss = supervised + LAMBDA_U * jnp.mean(jnp.asarray(weights, jnp.float32) * per_example)
  if fairness_inputs is not None:  # Its gradient against finite differences: test_fixmatch_family.py.
    mask, p_model, label_hist = (jnp.asarray(x, jnp.float32) for x in fairness_inputs)
    loss = loss + ENT_RATIO * freematch.fairness(mask, strong, p_model, label_hist)
  return loss


_constant_target_grad = jax.jit(jax.grad(constant_target_loss))  # One compile, not op by op.


def check_statistics(method, extra, usb):
  if method == 'flexmatch':
    pool = np.asarray(extra['selected_label'])
    np.testing.assert_array_equal(pool[POOL_START:POOL_START + POOL_SIZE], usb.flex.selected_label)
    np.testing.assert_allclose(extra['classwise_acc'], usb.flex.classwise_acc, rtol=1e-6)
  elif method == 'freematch':
    for ours, theirs in ((extra['time_p'], usb.free.time_p), (extra['p_model'], usb.free.p_model),
                         (extra['label_hist'], usb.free.label_hist)):
      np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  elif method == 'softmatch':
    np.testing.assert_allclose(extra['alignment']['p_model'], usb.align.p_model, rtol=1e-5)
    np.testing.assert_allclose(extra['mu'], usb.soft.mu, rtol=1e-5)
    np.testing.assert_allclose(extra['var'], usb.soft.var, rtol=1e-5)


# Two in the quick tier (the memory over the pool, the soft weights' gradient); the rest compile
# three more steps.
@pytest.mark.parametrize('method', [
    'flexmatch', 'softmatch', *(pytest.param(m, marks=pytest.mark.slow) for m in ('fixmatch', 'uda', 'freematch'))])
def test_a_step_is_usbs_loss_gradient_and_statistics_and_traces_once(method):
  config = family_config(method)
  state = family_state(config)
  chex.clear_trace_counter()
  train_step = methods.make_train_step(config, NUM_CLASSES, pool_size=POOL_SIZE)
  step = jax.jit(chex.assert_max_traces(lambda s, b: train_step(s, b), n=1))
  usb = UsbReference(method)
  kept = []
  for t, seed in enumerate((1, 2)):
    batch = hand_batch(seed)
    labeled, unlabeled = batch['labeled'], batch['unlabeled']
    images = np.concatenate([labeled['image'], unlabeled['image'], unlabeled['strong_image']])
    logits = ref.train_mode_logits(state, state.params, images)
    parts = np.split(logits, [NUM_LABELED, NUM_LABELED + NUM_UNLABELED])
    constants = usb.constants(t, parts[0], parts[1], parts[2], labeled['label'], unlabeled['index'])
    new_state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_allclose(metrics['loss'], usb.loss(parts[0], parts[2], labeled['label'], constants),
                               rtol=2e-5)
    grads = jax.tree.map(lambda before, after: before - after, state.params, new_state.params)
    expected = _constant_target_grad(state.params, state, images, labeled['label'], constants)
    chex.assert_trees_all_close(grads, expected, rtol=1e-3, atol=2e-6)
    check_statistics(method, new_state.extra[method], usb)
    kept.append(float(metrics['mask_fraction']))
    state = new_state
  assert int(state.step) == 2
  if method in ('fixmatch', 'uda', 'freematch'):
    assert any(0 < fraction < 1 for fraction in kept), kept  # Both kinds of rows are there.
  if method == 'freematch':
    assert float(metrics['fairness_loss']) != 0.0


def strong_batch(seed):
  """`synthetic_batch` (unlabeled train-split indices 16..31) with a strong view of each unlabeled row."""
  batch = jax.tree.map(np.asarray, synthetic_batch(jax.random.key(seed)))
  noise = np.random.default_rng(seed).normal(size=batch['unlabeled']['image'].shape).astype(np.float32)
  batch['unlabeled']['strong_image'] = batch['unlabeled']['image'] + noise
  return batch


def two_steps(config, mesh, batches, pool_size=24):
  """Two steps on `mesh` from the same initial state; (state, metrics) after the second."""
  model = models.get_model(config, NUM_CLASSES)
  init = parallel.jit_replicated_init(
      lambda key: methods.init_train_state(config, model, (8, 8, 1), key, num_train=32,
                                           num_classes=NUM_CLASSES), mesh)
  state = init(jax.random.key(0))
  step = parallel.jit_train_step(methods.make_train_step(config, NUM_CLASSES, pool_size), mesh)
  for batch in batches:
    state, metrics = step(state, parallel.to_global(batch, mesh))
  return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize('method', sorted(FIELDS))
def test_eight_devices_match_one(method):
  config = tiny_config(method=method, **{**FIELDS[method], 'flexmatch.p_cutoff': 0.2})
  batches = [strong_batch(1), strong_batch(2)]
  state8, metrics8 = two_steps(config, parallel.make_mesh(conftest.cpu_devices(8)), batches)
  state1, metrics1 = two_steps(config, parallel.make_mesh(conftest.cpu_devices(1)), batches)
  chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state8.extra, state1.extra, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=1e-4, atol=1e-6)
  if method == 'flexmatch':  # The memory is written: the comparison is of something.
    assert int(jnp.sum(state1.extra['flexmatch']['selected_label'] >= 0)) > 0


@pytest.mark.slow
def test_flexmatch_resumes_to_the_uninterrupted_state_and_memory(tmp_path):
  # A low p_cutoff: an untrained network's predictions fill the memory within the run.
  fields = {'method': 'flexmatch', 'flexmatch.p_cutoff': 0.15}
  config = test_train.mock_config(tmp_path, **fields)
  reference = test_train.run(config, tmp_path / 'whole')
  assert reference['completed']
  test_train.run(test_train.mock_config(tmp_path, num_train_steps=3, **fields), tmp_path / 'resumed')
  test_train.run(config, tmp_path / 'resumed')
  whole = test_train_methods.saved_state(config, tmp_path / 'whole')
  resumed = test_train_methods.saved_state(config, tmp_path / 'resumed')
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.extra, whole.extra)
  memory = np.asarray(jax.device_get(whole.extra['flexmatch']['selected_label']))
  assert (memory >= 0).sum() > 0 and (memory == -1).sum() > 0
