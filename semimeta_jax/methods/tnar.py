"""Tangent-Normal Adversarial Regularization with a VAE (TNAR-VAE; Yu et al., CVPR 2019).

The data are taken to lie near a manifold, the image of a VAE's decoder g, trained
first (`python -m semimeta_jax.vae_main`, models/vae.py) and loaded frozen into
`TrainState.extra['vae']` (no gradient reaches it, no optimizer state is kept for
it). For an unlabeled x with code z = mu(x) (the encoder's mean, as the authors):

  tangent: the latent direction r maximising the second-order KL change along the
    manifold per unit of image change, the generalised eigenproblem H_z r = l J^T J r
    (H_z the Hessian in z of KL(p(x) || p(x + g(z + r) - g(z))), J = dg/dz at z).
    Power iteration from a random unit r: r <- normalise(CG(J^T J, normalise(H_z r))),
    `tnar.cg_iterations` conjugate-gradient steps on J^T J, every product by
    jax.jvp then jax.vjp (J is never built). Then x_tan = x + g(z + eps1 r) - g(z).
  normal: VAT's power iteration in input space (`tnar.xi`: a finite difference, or
    0 for the exact Hessian-vector product, as `vat.xi`), with the component along
    the tangent perturbation's direction t = normalise(x_tan - x) projected out of the
    start and of every iterate; x_norm = x + eps2 d, exactly orthogonal to x_tan - x.
    The authors' code approximates the normal space the same way (orthogonality to
    the tangent perturbation, not to the whole of range(J)) but mixes a zeta-sized
    (I - t t^T) d into H d instead of projecting; the projection here enforces that
    orthogonality exactly.

CG is truncated, as the authors' 4 steps in a 512-dimensional code: run to the code's
dimension on a poorly conditioned J^T J (an untrained decoder's), it solves exactly
and so divides float32 rounding by the smallest eigenvalues.

Loss = CE + w(t) * (w_tan KL(sg p(x) || p(x_tan)) + w_norm KL(sg p(x) || p(x_norm)))
       + `tnar.entropy_weight` * entropy of p(x_u),
the unlabeled forwards in training mode without updating the running averages. The
clean forward and the two adversarial forwards each draw their own dropout mask, as
the authors' separate `net.classifier` calls do; the power iterations use the clean
forward's mask (the authors draw a fresh one there too), so that the search follows
the curvature of the KL at the clean prediction and xi = 0 stays its exact limit.

Normalisation (`tnar.normalization`): 'max', the default, is the authors' code: their
`normalizevector` divides by the largest absolute entry and computes the L2 division
without assigning it (train_tnar.py), so every direction has max-norm 1 (its L2 norm
between 1 and sqrt(dim)), in the power iterations, after CG and for the radii: eps1
is the largest entry of the latent step, eps2 the largest pixel change. 'l2' is the
paper's unit L2 vectors. The authors' images are in [0, 1]: the normal search and its
radius work in [0, 1] pixel units (the gradient with respect to the pixels, the
projection and the radius there), converted to the standardised inputs through the
dataset's std per channel (`augment.pixel_std`); the latent radius is in the VAE's
code units under either normalisation.

The VAE is checked against the run before anything is written: `validate` reads
`<tnar.vae_dir>/vae.json` (present, same architecture fields as `config.vae`, same
dataset), the step-0 state building checks the image shape and reads the
checkpoint. An unset `tnar.vae_dir` is refused there too (not in `validate`, so
that a preset's `--dry_run` prints its plan before the VAE exists).
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semimeta_jax import checkpoint
from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import supervised
from semimeta_jax.methods import vat
from semimeta_jax.models import vae as vae_lib

TRAIN_VAE = ('python -m semimeta_jax.vae_main --config=<the same config> --workdir=VAE_DIR, then '
             '--config.tnar.vae_dir=VAE_DIR')


def config_blocks():
  """The `tnar` block (the perturbations) and the `vae` block (the VAE it loads)."""
  return {'tnar': ml_collections.ConfigDict({
      'vae_dir': '',  # The directory `vae_main` trained the VAE in.
      'eps_tangent': 5.0,  # Radius in latent space (authors' code: epsilon1), in `normalization`'s norm.
      'eps_normal': 1.0,  # Radius in [0, 1] pixel units (authors' code: epsilon2), in that norm.
      'normalization': 'max',  # 'max': the authors' code (max-norm 1); 'l2': the paper's unit vectors.
      'xi': 1e-6,  # Finite-difference probe of both power iterations; 0 = exact Hessian products.
      'power_iterations': 1,
      'cg_iterations': 4,
      'weight_tangent': 1.0,
      'weight_normal': 1.0,
      'entropy_weight': 1.0,
  }), 'vae': vae_lib.config_block()}


NORMALIZATIONS = ('max', 'l2')

# Sub-tags of the unlabeled dropout key: each adversarial forward draws its own mask.
TANGENT_PASS, NORMAL_PASS = 1, 2


def max_normalize(d: jax.Array) -> jax.Array:
  """Each example divided by its largest absolute entry (the authors' `normalizevector`)."""
  largest = jnp.max(jnp.abs(d), axis=tuple(range(1, d.ndim)), keepdims=True)
  return d / jnp.maximum(largest, jnp.finfo(d.dtype).tiny)


def normalizer(normalization: str):
  """The per-example normalisation named by `tnar.normalization`."""
  return {'max': max_normalize, 'l2': vat.normalize}[normalization]


def _saved_vae(config) -> dict:
  """The description in `tnar.vae_dir`, checked against `config.vae` and `config.data`."""
  vae_dir = config.tnar.vae_dir
  require = errors.require
  require(bool(vae_dir), 'tnar.vae_dir', vae_dir, f'TNAR needs a trained VAE: {TRAIN_VAE}')
  description = vae_lib.read_description(vae_dir)
  require(description is not None, 'tnar.vae_dir', vae_dir,
          f'holds no trained VAE (no readable {vae_lib.DESCRIPTION_FILE}); train one: {TRAIN_VAE}')
  require(os.path.isdir(os.path.join(vae_dir, checkpoint._CHECKPOINT_DIR)),  # pylint: disable=protected-access
          'tnar.vae_dir', vae_dir, f'has {vae_lib.DESCRIPTION_FILE} but no checkpoints; train it again')
  for field in vae_lib.ARCHITECTURE_FIELDS:
    require(description.get(field) == config.vae[field], f'vae.{field}', config.vae[field],
            f'the VAE in {vae_dir} has {field}={description.get(field)!r}; set the same value or '
            'train a VAE with this one')
  require(description.get('dataset') == config.data.name, 'tnar.vae_dir', vae_dir,
          f'holds a VAE of dataset {description.get("dataset")!r}, not {config.data.name!r}')
  return description


def validate(config) -> None:
  """The tnar and vae fields, and the saved VAE's description when `tnar.vae_dir` is set."""
  require, block = errors.require, config.tnar
  vae_lib.validate(config)
  for name in ('eps_tangent', 'eps_normal'):
    require(block[name] > 0, f'tnar.{name}', block[name], 'must be > 0')
  require(block.xi >= 0, 'tnar.xi', block.xi, 'must be >= 0 (0 = exact Hessian-vector product)')
  require(block.normalization in NORMALIZATIONS, 'tnar.normalization', block.normalization,
          f'must be one of {NORMALIZATIONS}')
  augment.require_pixel_std(config, 'tnar.eps_normal', block.eps_normal)
  for name in ('power_iterations', 'cg_iterations'):
    require(isinstance(block[name], int) and block[name] >= 1, f'tnar.{name}', block[name],
            'must be an integer >= 1')
  for name in ('weight_tangent', 'weight_normal', 'entropy_weight'):
    require(block[name] >= 0, f'tnar.{name}', block[name], 'must be >= 0')
  if block.vae_dir:
    _saved_vae(config)


def load_vae_params(config, image_shape):
  """The trained VAE's parameters (host arrays), after every check against the run.

  Raises:
    errors.ConfigError: no VAE, another architecture, dataset or image shape, or an
      unreadable checkpoint.
  """
  description = _saved_vae(config)
  vae_dir = config.tnar.vae_dir
  errors.require(list(description.get('image_shape', ())) == list(image_shape), 'tnar.vae_dir', vae_dir,
                 f'holds a VAE of {description.get("image_shape")} images; this run\'s are '
                 f'{list(image_shape)}')
  # Called while the step-0 state is traced under jit: read the files eagerly.
  with jax.ensure_compile_time_eval():
    target = jax.eval_shape(functools.partial(vae_lib.init_train_state, description, tuple(image_shape)),
                            jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    try:
      with checkpoint.Checkpointer(vae_dir, keep=1, read_only=True) as checkpointer:
        restored = checkpointer.restore(target)
    except (FileNotFoundError, errors.UserError, ValueError) as error:
      raise errors.ConfigError(f'config.tnar.vae_dir={vae_dir!r}: its VAE checkpoint cannot be read '
                               f'({error}); train it again: {TRAIN_VAE}.') from None
    return jax.tree.map(np.asarray, jax.device_get(restored.params))


def init_model_state(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """`extra['vae']`: the frozen VAE's parameters (no optimizer state)."""
  del model, rng, params, batch_stats, num_classes
  return {'vae': load_vae_params(config, image_shape)}


def _dot(a, b):
  """Per-example inner products over every axis but the first, shaped to broadcast against a."""
  return jnp.sum(a * b, axis=tuple(range(1, a.ndim)), keepdims=True)


def conjugate_gradient(matvec, b, iterations: int):
  """Solves A v = b for each example by `iterations` CG steps from v = 0.

  Args:
    matvec: `p -> A p` on [B, ...], A symmetric positive semi-definite per example.
    b: [B, ...] right-hand sides.
    iterations: static number of steps (exact after dim steps in exact arithmetic).

  Returns:
    [B, ...] the iterates; an example whose residual or curvature vanished stops there.
  """
  v, residual, direction = jnp.zeros_like(b), b, b
  squared = _dot(residual, residual)
  for _ in range(iterations):
    product = matvec(direction)
    curvature = _dot(direction, product)
    alpha = jnp.where(curvature > 0, squared / jnp.where(curvature > 0, curvature, 1), 0)
    v = v + alpha * direction
    residual = residual - alpha * product
    new_squared = _dot(residual, residual)
    beta = jnp.where(squared > 0, new_squared / jnp.where(squared > 0, squared, 1), 0)
    direction = residual + beta * direction
    squared = new_squared
  return v


def gram_product(decode, z):
  """`p -> J^T J p` with J = d decode / dz at z, by one jvp and one vjp (J never built)."""
  _, pullback = jax.vjp(decode, z)
  return lambda p: pullback(jax.jvp(decode, (z,), (p,))[1])[0]


def _curvature_product(kl, d, xi: float):
  """H d of the KL at 0 (up to a positive factor): the finite difference at xi d, or exact."""
  if xi > 0:
    return jax.grad(kl)(xi * d)
  return jax.jvp(jax.grad(kl), (jnp.zeros_like(d),), (d,))[1]


def tangent_perturbation(logits_fn, clean_logits, x, decode, z, key, *, epsilon: float, xi: float,
                         power_iterations: int, cg_iterations: int, normalization: str = 'l2'):
  """g(z + eps r) - g(z) with r the adversarial direction along the manifold.

  Args:
    logits_fn: `x -> logits`, the classifier as the step sees it.
    clean_logits: logits_fn(x), held fixed.
    x: [B, ...] inputs; z: [B, latent] their codes; decode: `z -> images`, per example.
    key: PRNG key of the random start.
    epsilon, xi, power_iterations, cg_iterations: static; see the module docstring.
    normalization: static; 'max' (the authors' code) or 'l2' (the paper): the latent step
      eps r has that norm eps.

  Returns:
    [B, ...] the tangent perturbation of x (no gradient flows through it).
  """
  normalize = normalizer(normalization)
  reconstruction = decode(z)
  kl = lambda r: vat.kl_to_clean(clean_logits, logits_fn(x + decode(z + r) - reconstruction))
  gram = gram_product(decode, z)
  r = normalize(jax.random.normal(key, z.shape, z.dtype))
  for _ in range(power_iterations):
    h_r = normalize(jax.lax.stop_gradient(_curvature_product(kl, r, xi)))
    r = normalize(jax.lax.stop_gradient(conjugate_gradient(gram, h_r, cg_iterations)))
  return jax.lax.stop_gradient(decode(z + epsilon * r) - reconstruction)


def normal_perturbation(logits_fn, clean_logits, x, tangent, key, *, epsilon: float, xi: float,
                        power_iterations: int, normalization: str = 'l2', pixel_std=None):
  """eps d with d VAT's adversarial direction orthogonal to `tangent` (per example), in pixel units.

  Args:
    logits_fn, clean_logits, x, tangent: as `tangent_perturbation`'s, and its result.
    key: PRNG key of the random start.
    epsilon, xi, power_iterations: static; see the module docstring.
    normalization: static; 'max' (the authors' code: the largest pixel change is eps) or
      'l2' (the paper: the L2 norm is eps).
    pixel_std: None (the search and eps in the inputs' own units) or the per-channel std
      of the [0, 1] pixels: the search, the projection and eps in [0, 1] pixel units.

  Returns:
    [B, ...] the normal perturbation of x in the inputs' units (no gradient flows through it).
  """
  normalize = normalizer(normalization)
  std = 1.0 if pixel_std is None else jnp.asarray(pixel_std, x.dtype)
  # In pixel units: a pixel step r is r / std in the inputs.
  unit_tangent = vat.normalize(tangent * std)
  project = lambda v: v - _dot(v, unit_tangent) * unit_tangent
  kl = lambda r: vat.kl_to_clean(clean_logits, logits_fn(x + r / std))
  d = normalize(project(jax.random.normal(key, x.shape, x.dtype)))
  for _ in range(power_iterations):
    d = normalize(project(jax.lax.stop_gradient(_curvature_product(kl, d, xi))))
  # A last projection: normalising rescales, and the float error of one projection is relative.
  return jax.lax.stop_gradient(epsilon * normalize(project(d)) / std)


def frozen_vae(state, config, image_shape):
  """(encode, decode) of the frozen VAE in `state.extra['vae']`; constants for the optimizer."""
  model = vae_lib.from_fields(config.vae, image_shape)
  variables = {'params': jax.lax.stop_gradient(state.extra['vae'])}
  encode = lambda x: model.apply(variables, x, method=vae_lib.VAE.encode)[0]
  decode = lambda z: model.apply(variables, z, method=vae_lib.VAE.decode)
  return encode, decode


def objective(params, state, batch, *, weight, config):
  """The TNAR loss. Returns (loss, (stats, supervised, tangent, normal, entropy, clean))."""
  labeled, x_u = batch['labeled'], batch['unlabeled']['image']
  block = config.tnar
  logits_l, stats = common.train_forward(state, params, labeled['image'], state.batch_stats,
                                         state.step_key(common.DROPOUT_LABELED))
  supervised = losses.cross_entropy(logits_l, labeled['label'])
  # Each forward's own dropout mask: the clean one (shared by the power iterations), the tangent
  # pass's and the normal pass's.
  logits_fn = lambda p, x, *tags: common.train_forward(
      state, p, x, stats, state.step_key(common.DROPOUT_UNLABELED, *tags))[0]
  clean = logits_fn(params, x_u)
  encode, decode = frozen_vae(state, config, x_u.shape[1:])
  decode_like_x = lambda z: decode(z).astype(x_u.dtype)
  tangent_key, normal_key = jax.random.split(state.step_key(common.NOISE))
  fixed = functools.partial(logits_fn, jax.lax.stop_gradient(params))
  tangent = tangent_perturbation(
      fixed, clean, x_u, decode_like_x, encode(x_u), tangent_key, epsilon=block.eps_tangent,
      xi=block.xi, power_iterations=block.power_iterations, cg_iterations=block.cg_iterations,
      normalization=block.normalization)
  normal = normal_perturbation(fixed, clean, x_u, tangent, normal_key, epsilon=block.eps_normal,
                               xi=block.xi, power_iterations=block.power_iterations,
                               normalization=block.normalization,
                               pixel_std=augment.pixel_std(config, x_u.shape[-1]))
  tangent_loss = vat.kl_to_clean(clean, logits_fn(params, x_u + tangent, TANGENT_PASS))
  normal_loss = vat.kl_to_clean(clean, logits_fn(params, x_u + normal, NORMAL_PASS))
  entropy = losses.entropy(jax.nn.softmax(losses.at_least_float32(clean)))
  loss = (supervised + weight * (block.weight_tangent * tangent_loss + block.weight_normal * normal_loss)
          + block.entropy_weight * entropy)
  return loss, (stats, supervised, tangent_loss, normal_loss, entropy, clean)


def train_step(state, batch, *, config, num_classes):
  """One TNAR-VAE update. Pure: (state, batch) -> (state, metrics)."""
  del num_classes
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, weight=weight, config=config)
  (loss, (stats, supervised, tangent, normal, entropy, clean)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'supervised_loss': supervised, 'tangent_loss': tangent,
             'normal_loss': normal, 'entropy_loss': entropy, 'learning_rate': lr,
             'consistency_weight': weight}
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('unlabeled_accuracy', clean, batch['unlabeled'])])


def describe(config) -> str:
  """The perturbations and the VAE, in the run plan."""
  block = config.tnar
  return (f'eps tangent {block.eps_tangent} (latent), normal {block.eps_normal} ([0, 1] pixels), '
          f'{block.normalization} normalisation, '
          f'{block.power_iterations} power / {block.cg_iterations} CG iterations, VAE '
          f'{block.vae_dir or "(tnar.vae_dir not set)"}')


def vae_input_config(config):
  """The run's config as the VAE's trainer (`vae_main`) reads its input: `vae.batch_size` images a step.

  TNAR-VAE's own checks need a trained VAE, which this config is about to train, so
  the shared fields are checked under a method that has no checks of its own.
  """
  vae_config = config.copy_and_resolve_references()
  with vae_config.unlocked():
    vae_config.method = supervised.METHOD.name
    vae_config.unlabeled_batch_size = config.vae.batch_size
  return vae_config


# Two commands, one config (the preset sets the `vae` block both read):
#   python -m semimeta_jax.vae_main --config=configs/digits.py:tnar_vae --workdir=runs/vae_digits
#   python -m semimeta_jax.main --config=configs/digits.py:tnar_vae --workdir=runs/tnar_digits \
#       --config.tnar.vae_dir=runs/vae_digits
# CIFAR-10: the authors' train_tnar.py (weights 1, entropy 1, one power iteration, 4 CG steps,
# xi 1e-6, eps1 = 5 and eps2 = 1 with their max-norm normalisation, eps2 in [0, 1] pixels) and
# train_vae.py (conv VAE, latent 512, Adam 1e-3, batch 128, 121 x 400 steps; its KL weight 0.5
# on a Bernoulli likelihood has no counterpart here). Digits, not tuned: an MLP VAE with a
# 16-dimensional code, the authors' eps1 = 5 and eps2 = 1 under their normalisation (relative
# to the data, about the same sizes: a max-normalised direction of 64 pixels has an L2 norm
# about 3 times its largest entry, near a digit's own L2 norm of about 4 in [0, 1] pixels, as
# 3072 CIFAR-10 pixels give about 16 against an image's 28; a latent step of max-norm 5 is
# 1.5 to 2.5 times a unit Gaussian code's norm in 512 as in 16 dimensions), and the exact
# Hessian products (xi = 0), as VAT's digits preset.
_COMMON = {'consistency_weight': 1.0, 'consistency_rampup_steps': 0}

PRESETS = {
    'digits': {'tnar_vae': {**_COMMON, 'tnar.eps_tangent': 5.0, 'tnar.eps_normal': 1.0,
                            'tnar.normalization': 'max', 'tnar.xi': 0.0,
                            'vae.architecture': 'mlp', 'vae.latent_dim': 16, 'vae.width': 128,
                            'vae.batch_size': 64, 'vae.num_train_steps': 2000}},
    'cifar10': {'tnar_vae': {**_COMMON, 'tnar.eps_tangent': 5.0, 'tnar.eps_normal': 1.0,
                             'tnar.normalization': 'max', 'tnar.xi': 1e-6, 'vae.architecture': 'conv',
                             'vae.latent_dim': 512, 'vae.width': 128, 'vae.batch_size': 128,
                             'vae.num_train_steps': 48_400}},
}

METHOD = base.Method(
    name='tnar_vae', train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=init_model_state, presets=PRESETS, describe=describe)
