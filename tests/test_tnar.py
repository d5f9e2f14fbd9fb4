"""TNAR's perturbations against explicit float64 linear algebra on a tiny decoder and classifier."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from semimeta_jax import errors
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax.methods import common
from semimeta_jax.methods import tnar
from semimeta_jax.methods import vat
from semimeta_jax.models import vae as vae_lib
from tests import numpy_reference
from tests.conftest import synthetic_batch, tiny_config

LATENT, IMAGE, CLASSES, BATCH = 3, (2, 3, 1), 4, 2
DIGITS_STD = 0.37633  # Digits' std of its [0, 1] pixels (data/specs.py).


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def tiny_networks():
  """A nonlinear decoder z [B, 3] -> [B, 2, 3, 1] and classifier [B, 2, 3, 1] -> [B, 4] logits."""
  keys = jax.random.split(jax.random.key(0), 4)
  w1 = jax.random.normal(keys[0], (LATENT, 5), jnp.float64)
  w2 = jax.random.normal(keys[1], (5, 6), jnp.float64) / 2
  c1 = jax.random.normal(keys[2], (6, 7), jnp.float64)
  c2 = jax.random.normal(keys[3], (7, CLASSES), jnp.float64)
  decode = lambda z: (jnp.tanh(z @ w1) @ w2).reshape(z.shape[0], *IMAGE)
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ c1) @ c2
  return decode, logits_fn


def per_example_jacobians(decode, z):
  """[B, 6, 3]: each example's decoder Jacobian, built explicitly (what the method never does)."""
  one = lambda zi: decode(zi[None])[0].reshape(-1)
  return np.stack([np.asarray(jax.jacfwd(one)(zi)) for zi in z])


def inputs():
  decode, logits_fn = tiny_networks()
  z = jax.random.normal(jax.random.key(1), (BATCH, LATENT), jnp.float64)
  x = decode(z) + 0.1 * jax.random.normal(jax.random.key(2), (BATCH, *IMAGE), jnp.float64)
  return decode, logits_fn, z, x


def test_conjugate_gradient_solves_the_explicit_gram_system():
  decode, _, z, _ = inputs()
  b = jax.random.normal(jax.random.key(3), (BATCH, LATENT), jnp.float64)
  solved = tnar.conjugate_gradient(tnar.gram_product(decode, z), b, iterations=LATENT)
  jacobians = per_example_jacobians(decode, z)
  expected = np.stack([np.linalg.solve(j.T @ j, bi) for j, bi in zip(jacobians, np.asarray(b))])
  np.testing.assert_allclose(solved, expected, rtol=1e-8, atol=1e-10)
  # Fewer steps than the dimension do not solve it: the comparison above can fail.
  short = tnar.conjugate_gradient(tnar.gram_product(decode, z), b, iterations=1)
  assert not np.allclose(short, expected, rtol=1e-3)


def test_the_gram_product_equals_the_explicit_one():
  decode, _, z, _ = inputs()
  p = jax.random.normal(jax.random.key(4), (BATCH, LATENT), jnp.float64)
  jacobians = per_example_jacobians(decode, z)
  expected = np.einsum('bij,bik,bk->bj', jacobians, jacobians, np.asarray(p))
  np.testing.assert_allclose(tnar.gram_product(decode, z)(p), expected, rtol=1e-10)


def kl_hessian(logits_fn, clean, x_of_r, dim):
  """Each example's explicit Hessian at r = 0 of KL(p(x) || p(x_of_r(r))) (r is [dim])."""
  hessians = []
  for i in range(BATCH):
    kl = lambda r, i=i: vat.kl_to_clean(clean[i:i + 1], logits_fn(x_of_r(i, r)))
    hessians.append(np.asarray(jax.hessian(kl)(jnp.zeros(dim, jnp.float64))))
  return np.stack(hessians)


def _assert_parallel(a, b, tol=1e-6):
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  cosine = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
  assert cosine > 1 - tol, cosine


@pytest.mark.slow
def test_the_tangent_perturbation_is_the_top_generalised_eigenvector_in_the_tangent_space():
  decode, logits_fn, z, x = inputs()
  clean = logits_fn(x)
  epsilon = 1e-5
  tangent = tnar.tangent_perturbation(logits_fn, clean, x, decode, z, jax.random.key(5), epsilon=epsilon,
                                      xi=0.0, power_iterations=60, cg_iterations=LATENT)
  jacobians = per_example_jacobians(decode, z)
  # x_of_r: the perturbation along the manifold, x + g(z + r) - g(z), of example i.
  hessians = kl_hessian(logits_fn, clean,
                        lambda i, r: x[i:i + 1] + decode(z[i:i + 1] + r) - decode(z[i:i + 1]), LATENT)
  for i in range(BATCH):
    flat = np.asarray(tangent[i]).reshape(-1)
    j = jacobians[i]
    # In the tangent space: the residual of its projection onto range(J) vanishes (to O(eps)).
    projection = j @ np.linalg.lstsq(j, flat, rcond=None)[0]
    assert np.linalg.norm(flat - projection) < 1e-4 * np.linalg.norm(flat)
    # Its latent direction: the top eigenvector of H v = l J^T J v, by dense eigensolve.
    latent = np.linalg.lstsq(j, flat, rcond=None)[0]
    _, vectors = scipy.linalg.eigh(hessians[i], j.T @ j)
    _assert_parallel(latent, vectors[:, -1])
    np.testing.assert_allclose(np.linalg.norm(latent), epsilon, rtol=1e-4)


@pytest.mark.slow
def test_the_normal_perturbation_is_orthogonal_to_the_tangent_one_and_vats_projected_direction():
  decode, logits_fn, z, x = inputs()
  clean = logits_fn(x)
  tangent = tnar.tangent_perturbation(logits_fn, clean, x, decode, z, jax.random.key(5), epsilon=0.5,
                                      xi=0.0, power_iterations=2, cg_iterations=LATENT)
  normal = tnar.normal_perturbation(logits_fn, clean, x, tangent, jax.random.key(6), epsilon=2.0, xi=0.0,
                                    power_iterations=60)
  dim = int(np.prod(IMAGE))
  hessians = kl_hessian(logits_fn, clean, lambda i, r: x[i:i + 1] + r.reshape(1, *IMAGE), dim)
  for i in range(BATCH):
    n, t = np.asarray(normal[i]).reshape(-1), np.asarray(tangent[i]).reshape(-1)
    np.testing.assert_allclose(np.linalg.norm(n), 2.0, rtol=1e-10)
    assert abs(n @ t) < 1e-10 * np.linalg.norm(n) * np.linalg.norm(t)
    # VAT's direction within the complement of t: the top eigenvector of (I - tt^T) H (I - tt^T).
    unit = t / np.linalg.norm(t)
    projector = np.eye(dim) - np.outer(unit, unit)
    _, vectors = np.linalg.eigh(projector @ hessians[i] @ projector)
    _assert_parallel(n, vectors[:, -1])
    # And not VAT's unconstrained one: the projection changed the answer.
    _, free = np.linalg.eigh(hessians[i])
    assert abs(free[:, -1] @ n) / np.linalg.norm(n) < 1 - 1e-3


@pytest.mark.parametrize('preset', ['digits', 'cifar10'])
def test_the_radii_in_the_references_units_are_the_presets(preset):
  # The preset's eps1 is the largest entry of the latent step, eps2 the largest change of a [0, 1]
  # pixel (the authors' max-norm normalisation); a linear decoder makes the latent step readable.
  fields = methods.presets(preset)['tnar_vae']
  assert fields['tnar.normalization'] == 'max'
  eps_tangent, eps_normal = fields['tnar.eps_tangent'], fields['tnar.eps_normal']
  _, logits_fn, z, x = inputs()
  weights = jax.random.normal(jax.random.key(8), (LATENT, 6), jnp.float64)
  decode = lambda codes: (codes @ weights).reshape(codes.shape[0], *IMAGE)
  clean = logits_fn(x)
  tangent = tnar.tangent_perturbation(logits_fn, clean, x, decode, z, jax.random.key(5), epsilon=eps_tangent,
                                      xi=0.0, power_iterations=2, cg_iterations=LATENT, normalization='max')
  config = tiny_config(method='tnar_vae', **{'data.name': preset})
  std = tnar.augment.pixel_std(config, 1)
  normal = tnar.normal_perturbation(logits_fn, clean, x, tangent, jax.random.key(6), epsilon=eps_normal,
                                    xi=0.0, power_iterations=2, normalization='max', pixel_std=std)
  latent = np.linalg.lstsq(np.asarray(weights).T, np.asarray(tangent).reshape(BATCH, -1).T, rcond=None)[0].T
  np.testing.assert_allclose(np.max(np.abs(latent), axis=1), eps_tangent, rtol=1e-8)
  pixels = np.asarray(normal) * np.asarray(std, np.float64)
  np.testing.assert_allclose(np.max(np.abs(pixels), axis=(1, 2, 3)), eps_normal, rtol=1e-8)
  # Orthogonal to the tangent step in [0, 1] pixel units, where the search runs.
  flat_t = (np.asarray(tangent) * np.asarray(std, np.float64)).reshape(BATCH, -1)
  assert np.all(np.abs(np.sum(pixels.reshape(BATCH, -1) * flat_t, 1)) < 1e-10 * np.linalg.norm(flat_t, axis=1))
  # The paper's form keeps the same radius numbers as L2 norms.
  l2 = tnar.normal_perturbation(logits_fn, clean, x, tangent, jax.random.key(6), epsilon=eps_normal, xi=0.0,
                                power_iterations=2, normalization='l2', pixel_std=std)
  np.testing.assert_allclose(np.linalg.norm((np.asarray(l2) * np.asarray(std)).reshape(BATCH, -1), axis=1),
                             eps_normal, rtol=1e-8)


def test_the_finite_difference_probe_approximates_the_exact_directions():
  decode, logits_fn, z, x = inputs()
  clean = logits_fn(x)
  common = dict(epsilon=0.5, power_iterations=3, cg_iterations=LATENT)
  exact = tnar.tangent_perturbation(logits_fn, clean, x, decode, z, jax.random.key(7), xi=0.0, **common)
  probed = tnar.tangent_perturbation(logits_fn, clean, x, decode, z, jax.random.key(7), xi=1e-6, **common)
  chex.assert_trees_all_close(probed, exact, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('field,value', [('tnar.eps_tangent', 0.0), ('tnar.eps_normal', -1.0),
                                         ('tnar.xi', -1e-6), ('tnar.cg_iterations', 0),
                                         ('tnar.power_iterations', 0), ('tnar.weight_normal', -1.0),
                                         ('tnar.normalization', 'linf'),
                                         ('vae.latent_dim', 0)])
def test_bad_fields_are_named(field, value):
  with pytest.raises(errors.ConfigError, match=f'config.{field}='):
    tnar.validate(tiny_config(method='tnar_vae', **{field: value}))


def test_a_dataset_without_a_registered_std_is_one_error():
  with pytest.raises(errors.ConfigError, match=r'config\.tnar\.eps_normal=1\.0: .*pixel units.*mnist'):
    tnar.validate(tiny_config(method='tnar_vae', **{'data.name': 'mnist'}))


def tnar_state(config, image_shape=(8, 8, 1)):
  """A classifier's step-0 state holding a freshly initialised VAE of `config.vae`."""
  classifier_config = tiny_config(method='supervised', dropout_rate=config.dropout_rate)
  state = methods.init_train_state(classifier_config, models.get_model(classifier_config, 10), image_shape,
                                   jax.random.key(0), num_classes=10)
  vae = vae_lib.from_fields(config.vae, image_shape)
  vae_params = vae.init(jax.random.key(1), jnp.zeros((1, *image_shape)), jnp.zeros((1, LATENT)))['params']
  return state.replace(extra={'vae': vae_params})


@pytest.mark.slow
def test_the_clean_and_the_two_adversarial_forwards_draw_their_own_dropout_masks():
  # Radii far below any effect (1e-12): each KL then measures only how the adversarial forward's
  # dropout mask differs from the clean one's. One shared mask would make both KLs vanish.
  config = tiny_config(method='tnar_vae', dropout_rate=0.5, **{
      'data.name': 'digits', 'vae.architecture': 'mlp', 'vae.latent_dim': LATENT, 'vae.width': 5,
      'tnar.eps_tangent': 1e-12, 'tnar.eps_normal': 1e-12, 'tnar.xi': 0.0, 'tnar.cg_iterations': 1})
  state = tnar_state(config)
  batch = synthetic_batch(jax.random.key(2))
  _, (_, _, tangent_loss, normal_loss, _, _) = jax.jit(
      lambda s: tnar.objective(s.params, s, batch, weight=1.0, config=config))(state)
  assert float(tangent_loss) > 1e-4 and float(normal_loss) > 1e-4
  # And the two adversarial forwards' masks differ from each other.
  assert abs(float(tangent_loss) - float(normal_loss)) > 1e-6 * float(tangent_loss)
  without = tiny_config(method='tnar_vae', dropout_rate=0.0, **{
      'data.name': 'digits', 'vae.architecture': 'mlp', 'vae.latent_dim': LATENT, 'vae.width': 5,
      'tnar.eps_tangent': 1e-12, 'tnar.eps_normal': 1e-12, 'tnar.xi': 0.0, 'tnar.cg_iterations': 1})
  _, (_, _, tangent_loss, normal_loss, _, _) = jax.jit(
      lambda s: tnar.objective(s.params, s, batch, weight=1.0, config=without))(tnar_state(without))
  # Without dropout the KLs are float32 rounding only.
  assert float(tangent_loss) < 1e-6 and float(normal_loss) < 1e-6


def test_a_missing_vae_is_one_error_naming_the_command(tmp_path):
  config = tiny_config(method='tnar_vae', **{'tnar.vae_dir': str(tmp_path / 'absent')})
  with pytest.raises(errors.ConfigError, match='holds no trained VAE.*vae_main'):
    tnar.validate(config)
  with pytest.raises(errors.ConfigError, match="config.tnar.vae_dir='': TNAR needs a trained VAE"):
    tnar.load_vae_params(tiny_config(method='tnar_vae'), (8, 8, 1))


@pytest.mark.slow
def test_the_loss_weighs_the_two_kls_and_the_entropy_at_the_vae_code():
  # Distinct weights, so that a swapped or dropped one changes the total; no dropout, so that the
  # training-mode forwards are functions of their images only.
  config = tiny_config(method='tnar_vae', dropout_rate=0.0, **{
      'data.name': 'digits', 'vae.architecture': 'mlp', 'vae.latent_dim': LATENT, 'vae.width': 5, 'tnar.eps_tangent': 0.7,
      'tnar.eps_normal': 1.3, 'tnar.xi': 0.0, 'tnar.cg_iterations': 2, 'tnar.weight_tangent': 0.3,
      'tnar.weight_normal': 1.7, 'tnar.entropy_weight': 0.45})
  state = tnar_state(config)
  vae_params = state.extra['vae']
  vae = vae_lib.from_fields(config.vae, (8, 8, 1))
  batch = synthetic_batch(jax.random.key(2))
  loss, (_, supervised, tangent_loss, normal_loss, entropy, _) = jax.jit(
      lambda s: tnar.objective(s.params, s, batch, weight=0.6, config=config))(state)

  # The code: the encoder's mean, written out in NumPy (leaky ReLU 0.1 hidden layer, then to_mu).
  x_u = np.asarray(batch['unlabeled']['image'], np.float64)
  layer = lambda h, name: h @ np.float64(vae_params[name]['kernel']) + np.float64(vae_params[name]['bias'])
  hidden = layer(x_u.reshape(len(x_u), -1), 'enc_hidden')
  code = layer(np.where(hidden > 0, hidden, 0.1 * hidden), 'to_mu')
  # The perturbations from that code, by the functions the tests above check.
  decode = lambda z: vae.apply({'params': vae_params}, z, method=vae_lib.VAE.decode)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits_fn = lambda x: state.apply_fn(variables, x, train=True, rngs={'dropout': jax.random.key(0)},
                                       mutable=['batch_stats'])[0]
  clean = logits_fn(x_u)
  tangent_key, normal_key = jax.random.split(state.step_key(common.NOISE))
  tangent = tnar.tangent_perturbation(logits_fn, clean, x_u, decode, jnp.asarray(code), tangent_key,
                                      epsilon=0.7, xi=0.0, power_iterations=1, cg_iterations=2,
                                      normalization='max')
  normal = tnar.normal_perturbation(logits_fn, clean, x_u, tangent, normal_key, epsilon=1.3, xi=0.0,
                                    power_iterations=1, normalization='max', pixel_std=[DIGITS_STD])
  p_clean = numpy_reference.softmax(clean)
  want_tangent = numpy_reference.kl(p_clean, numpy_reference.softmax(logits_fn(x_u + np.asarray(tangent))))
  want_normal = numpy_reference.kl(p_clean, numpy_reference.softmax(logits_fn(x_u + np.asarray(normal))))
  want_entropy = numpy_reference.entropy(p_clean)
  labeled = batch['labeled']
  want_supervised = numpy_reference.cross_entropy(
      numpy_reference.train_mode_logits(state, state.params, labeled['image']), labeled['label'])
  assert min(want_tangent, want_normal, want_entropy) > 1e-6  # Every term counts in the total.
  np.testing.assert_allclose([supervised, tangent_loss, normal_loss, entropy],
                             [want_supervised, want_tangent, want_normal, want_entropy], rtol=1e-4)
  np.testing.assert_allclose(
      loss, want_supervised + 0.6 * (0.3 * want_tangent + 1.7 * want_normal) + 0.45 * want_entropy, rtol=1e-5)
