"""Deep Co-Training: the JSD, the FGSM examples, and two networks that train apart."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import validation
from semimeta_jax.methods import co_training
from semimeta_jax.methods import common
from semimeta_jax.methods import second_network
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config


def traceable(step):
  """A plain function around a partial, which chex's trace counter needs."""
  chex.clear_trace_counter()
  return lambda state, batch: step(state, batch)


def initial_state(config):
  model = models.get_model(config, 10)
  init = jax.jit(lambda key: methods.init_train_state(config, model, (8, 8, 1), key, num_classes=10))
  return init(jax.random.key(0))


def run_steps(config, num_steps):
  state = initial_state(config)
  step = jax.jit(chex.assert_max_traces(traceable(methods.make_train_step(config, 10)), n=1))
  batch = synthetic_batch(jax.random.key(1))
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    history.append(jax.tree.map(float, metrics))
  return state, history


def test_jensen_shannon_is_the_mean_of_the_two_kls_to_the_mixture():
  keys = jax.random.split(jax.random.key(0), 2)
  logits1 = 3.0 * jax.random.normal(keys[0], (7, 5))
  logits2 = 3.0 * jax.random.normal(keys[1], (7, 5))
  p, q = numpy_reference.softmax(logits1), numpy_reference.softmax(logits2)
  m = (p + q) / 2
  expected = 0.5 * numpy_reference.kl(p, m) + 0.5 * numpy_reference.kl(q, m)
  got = jax.jit(co_training.jensen_shannon)(logits1, logits2)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-7)
  assert expected > 1e-3  # Two different distributions: the comparison is not of two zeros.
  np.testing.assert_allclose(float(co_training.jensen_shannon(logits1, logits1)), 0.0, atol=1e-6)


def test_soft_cross_entropy_is_its_definition():
  keys = jax.random.split(jax.random.key(2), 2)
  targets, logits = jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (6, 4))
  expected = -np.mean(np.sum(numpy_reference.softmax(targets) * numpy_reference.log_softmax(logits), -1))
  np.testing.assert_allclose(float(co_training.soft_cross_entropy(targets, logits)), expected, rtol=1e-6)


def test_each_fgsm_example_is_its_own_gradient_sign_step():
  config = tiny_config(method='co_training')
  state = initial_state(config)
  batch = synthetic_batch(jax.random.key(3))
  x = jnp.concatenate([batch['labeled']['image'], batch['unlabeled']['image']])
  labels = jnp.concatenate([batch['labeled']['label'], batch['unlabeled']['label']])
  params, stats = second_network.weights(state)  # Against the second network, in evaluation mode.
  logits_fn = lambda images: common.eval_forward(state, params, images, batch_stats=stats)
  epsilon = 0.1
  got = jax.jit(lambda images, y: co_training.fgsm(logits_fn, images, y, epsilon))(x, labels)

  # Separately: one example at a time, the gradient of its own mean cross-entropy.
  def one(image, label):
    loss = lambda im: numpy_free_cross_entropy(logits_fn(im[None]), label[None])
    return jax.grad(loss)(image)

  grads = np.stack([np.asarray(jax.jit(one)(x[i], labels[i])) for i in range(x.shape[0])])
  expected = np.asarray(x) + epsilon * np.sign(grads)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
  # Every pixel moved by exactly eps (no zero gradient here), so the check is not vacuous.
  np.testing.assert_allclose(np.abs(np.asarray(got) - np.asarray(x)), epsilon, rtol=1e-5)


def numpy_loss_diff(logit_s1, logit_s2, perturbed_s1, perturbed_s2, logit_u1, logit_u2, perturbed_u1,
                    perturbed_u2):
  """The reference's `loss_diff` (main.py, commit 1b56dc1) in float64: -(a + b + c + d) / batch_size."""
  term = lambda target, logits: np.sum(numpy_reference.softmax(target) * numpy_reference.log_softmax(logits))
  batch_size = len(logit_s1) + len(logit_u1)
  return -(term(logit_s2, perturbed_s1) + term(logit_s1, perturbed_s2) + term(logit_u2, perturbed_u1)
           + term(logit_u1, perturbed_u2)) / batch_size


def test_the_view_difference_is_the_references_sum_over_s_and_u_divided_by_their_size():
  # |S| = 3 and |U| = 9, as unequal as the reference's 8 of 100: a mean over each part would weigh
  # an S row three times a U row.
  shapes = {'clean_s': 3, 'adv_s': 3, 'clean_u': 9, 'adv_u': 9}
  keys = iter(jax.random.split(jax.random.key(9), 8))
  logits = {name: {net: 2.0 * jax.random.normal(next(keys), (rows, 6)) for net in (0, 1)}
            for name, rows in shapes.items()}
  got = jax.jit(co_training.view_difference)(logits['clean_s'], logits['adv_s'], logits['clean_u'],
                                             logits['adv_u'])
  clean_s, adv_s, clean_u, adv_u = (logits[name] for name in shapes)
  expected = numpy_loss_diff(clean_s[0], clean_s[1], adv_s[0], adv_s[1], clean_u[0], clean_u[1], adv_u[0],
                             adv_u[1])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize('units', ['pixels', 'standardised'])
def test_the_fgsm_step_has_the_radius_in_its_units(units):
  # CIFAR-10's three channels: the radius in [0, 1] pixels is eps / std in the standardised inputs.
  config = tiny_config(method='co_training', **{'data.name': 'cifar10', 'co_training.fgsm_epsilon': 0.02,
                                                'co_training.fgsm_units': units})
  x = jax.random.normal(jax.random.key(4), (5, 4, 4, 3))
  weights = jax.random.normal(jax.random.key(5), (48, 10))
  logits_fn = lambda images: jnp.tanh(images.reshape(images.shape[0], -1)) @ weights
  labels = jnp.arange(5)
  radius = co_training.fgsm_radius(config, 3)
  step = np.asarray(co_training.fgsm(logits_fn, x, labels, radius)) - np.asarray(x)
  std = np.array([0.24703223, 0.24348513, 0.26158784]) if units == 'pixels' else np.ones(3)
  # Every pixel moves by exactly eps in these units, so the L-infinity norm per example is eps.
  np.testing.assert_allclose(np.abs(step) * std, 0.02, rtol=1e-5)
  np.testing.assert_allclose(np.max(np.abs(step * std), axis=(1, 2, 3)), 0.02, rtol=1e-5)


def test_pixel_units_on_a_dataset_without_a_registered_std_are_one_config_error():
  config = tiny_config(method='co_training', **{'data.name': 'mnist'})
  with pytest.raises(validation.ConfigError, match=r"config\.co_training\.fgsm_epsilon=0\.02: .*pixel units"):
    validation.validate_config(config)
  validation.validate_config(tiny_config(method='co_training', **{'data.name': 'mnist',
                                                                   'co_training.fgsm_units': 'standardised'}))


def numpy_free_cross_entropy(logits, labels):
  """-log softmax(logits)[label], written out (not the library's loss)."""
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1).sum()


@pytest.mark.slow
def test_without_the_co_training_terms_network_one_takes_the_supervised_step():
  # lambda_cot = lambda_dif = 0 leaves CE(f1) + CE(f2): the first network's update is the
  # supervised method's (no dropout, so the two steps draw nothing that differs).
  base = dict(dropout_rate=0.0, **{'co_training.lambda_cot': 0.0, 'co_training.lambda_dif': 0.0})
  co_config = tiny_config(method='co_training', **base)
  sup_config = tiny_config(method='supervised', dropout_rate=0.0)
  batch = synthetic_batch(jax.random.key(4))
  co_state = initial_state(co_config)
  sup_state = initial_state(sup_config)
  chex.assert_trees_all_equal(co_state.params, sup_state.params)  # The same first network.
  co_after, _ = jax.jit(methods.make_train_step(co_config, 10))(co_state, batch)
  sup_after, _ = jax.jit(methods.make_train_step(sup_config, 10))(sup_state, batch)
  chex.assert_trees_all_close(co_after.params, sup_after.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_both_networks_train_and_stay_different():
  config = tiny_config(method='co_training')
  start = initial_state(config)
  state, history = run_steps(config, 4)
  first0, second0 = start.params, second_network.weights(start)[0]
  first, second = state.params, second_network.weights(state)[0]
  changed = lambda a, b: any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(first, first0) and changed(second, second0)
  assert changed(first, second)
  # The second network's own optimizer took the same number of steps as the first's.
  counts = lambda opt_state: [int(leaf) for leaf in jax.tree.leaves(opt_state) if jnp.ndim(leaf) == 0]
  assert counts(state.extra[second_network.KEY]['opt_state']) == counts(state.opt_state)
  assert all(np.isfinite(row['loss']) and row['dif_loss'] > 0 and row['cot_loss'] >= 0 for row in history)
  required = {'supervised_loss', 'cot_loss', 'dif_loss', 'lambda_cot', 'lambda_dif', 'agreement',
              'unlabeled_accuracy', 'second_unlabeled_accuracy'}
  assert required <= set(history[0])


def test_the_second_network_is_evaluated_as_its_own_weight_set():
  configured = methods.configure(tiny_config(method='co_training'))
  assert [ws.prefix for ws in configured.weight_sets()] == ['eval', 'eval_second']
  assert configured.headline == 'eval'


@pytest.mark.parametrize('field,value', [('co_training.lambda_cot', -1.0), ('co_training.lambda_dif', -0.1),
                                         ('co_training.fgsm_epsilon', 0.0),
                                         ('co_training.fgsm_units', 'normalised')])
def test_bad_fields_are_one_config_error(field, value):
  with pytest.raises(errors.ConfigError, match=field.replace('.', r'\.')):
    validation.validate_config(tiny_config(method='co_training', **{field: value}))


@pytest.mark.slow
def test_the_terms_and_statistics_equal_the_forward_chain_rebuilt():
  # No dropout: each training-mode forward is a function of its images and its running averages.
  config = tiny_config(method='co_training', dropout_rate=0.0, **{
      'data.name': 'digits', 'co_training.lambda_cot': 3.0, 'co_training.lambda_dif': 0.7,
      'co_training.fgsm_epsilon': 0.05})
  state = initial_state(config)
  batch = synthetic_batch(jax.random.key(5))
  new_state, metrics = jax.jit(methods.make_train_step(config, 10))(state, batch)
  x_s, y_s, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']

  def train_forward(net, x):
    logits, updates = state.apply_fn({'params': net['params'], 'batch_stats': net['batch_stats']}, x,
                                     train=True, rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    net['batch_stats'] = updates['batch_stats']  # Each forward moves the running averages in turn.
    return np.asarray(logits, np.float64)

  def fgsm_examples(net, pseudo_labels):
    """Each example's own sign-gradient step against `net` in evaluation mode, by jax.grad per example."""
    variables = {'params': net['params'], 'batch_stats': net['batch_stats']}
    images = jnp.concatenate([x_s, x_u])
    labels = jnp.concatenate([y_s, jnp.asarray(pseudo_labels)])
    own_loss = lambda image, label: -jax.nn.log_softmax(state.apply_fn(variables, image[None], train=False))[
        0, label]
    grads = jax.jit(jax.vmap(jax.grad(own_loss)))(images, labels)
    return images + (0.05 / 0.37633) * jnp.sign(grads)  # 0.05 in [0, 1] pixels over digits' std.

  first = {'params': state.params, 'batch_stats': state.batch_stats}
  params2, stats2 = second_network.weights(state)
  second = {'params': params2, 'batch_stats': stats2}
  clean_s = [train_forward(net, x_s) for net in (first, second)]
  clean_u = [train_forward(net, x_u) for net in (first, second)]
  against = [fgsm_examples(net, logits.argmax(-1)) for net, logits in zip((first, second), clean_u)]
  # Network 1 on network 2's examples and network 2 on network 1's: S, then U.
  adv_s = [train_forward(net, examples[:16]) for net, examples in ((first, against[1]), (second, against[0]))]
  adv_u = [train_forward(net, examples[16:]) for net, examples in ((first, against[1]), (second, against[0]))]

  p1, p2 = (numpy_reference.softmax(logits) for logits in clean_u)
  mixture = (p1 + p2) / 2
  want_cot = 0.5 * numpy_reference.kl(p1, mixture) + 0.5 * numpy_reference.kl(p2, mixture)
  want_dif = numpy_loss_diff(clean_s[0], clean_s[1], adv_s[0], adv_s[1], clean_u[0], clean_u[1], adv_u[0],
                             adv_u[1])
  want_supervised = sum(numpy_reference.cross_entropy(logits, y_s) for logits in clean_s)
  assert want_cot > 1e-4 and want_dif > 0
  np.testing.assert_allclose([metrics['supervised_loss'], metrics['cot_loss'], metrics['dif_loss']],
                             [want_supervised, want_cot, want_dif], rtol=1e-4)
  np.testing.assert_allclose(float(metrics['lambda_cot']), 3.0, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], want_supervised + 3.0 * want_cot + 0.7 * want_dif, rtol=1e-5)
  # Each network keeps the running averages of its own four forwards.
  chex.assert_trees_all_close(new_state.batch_stats, first['batch_stats'], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(second_network.weights(new_state)[1], second['batch_stats'], rtol=1e-5,
                              atol=1e-6)
