"""SemiMeta (Algorithm 1): meta-learned pseudo-labels, mix-up, and a ramped consistency term.

One training step:
  1. ytil = softmax(f(x_u; theta)) in evaluation mode (no gradient).
  2. g = d L_l(theta~(ytil)) / d ytil by `config.hypergrad.mode`, with the bi-level
     objective evaluated in `config.hypergrad.forward_mode` ('eval' is the official
     setting; 'train' turns dropout and batch statistics on, so theta~ != theta).
  3. yhat = project(ytil - beta g), g first rescaled to the K = 1 hypergradient's norm
     where `config.hypergrad.meta_step_scale='first_step_norm'` (horizon ablations).
  4. theta <- SGD step on KL(mix target || f(x_mix)) + w(t) ||softmax(f(x_u)) - yhat||^2
     (or CE on the labeled batch without mix-up), two training-mode forwards.

With `semimeta.strong_view=True` (a composition of this framework's; neither paper has it) the
meta-learned pseudo-label of the weak view supervises the prediction of the strong view, as
FixMatch's weak-view label supervises its strong view: in step 4 f(x_u) is the forward of
`batch['unlabeled']['strong_image']` (RandAugment, `data/strong_view.py`); steps 1-3 and the
mix-up keep the weak view, so the meta step is the official one.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import hypergrad
from semimeta_jax.methods import options

FORWARD_MODES = ('eval', 'train')
# How the hypergradient is scaled before the step beta: as the estimator gives it
# (the official beta assumes the K = 1 scale), or to the norm of the K = 1 one.
META_STEP_SCALES = ('none', 'first_step_norm')


def config_blocks():
  """The `hypergrad` block (the pseudo-label meta step) and the `semimeta` block (mix-up)."""
  return {
      'hypergrad': ml_collections.ConfigDict({
          # exact | first_order | jvp | finite_difference | neumann | implicit
          'mode': 'finite_difference',
          'inner_steps': 1,  # K virtual SGD steps (`exact` unrolled, `neumann` in output space).
          'inner_lr': 0.0,  # alpha; 0 = the current learning rate (official).
          'meta_lr': 0.0,  # beta; 0 = lr_t * B_u / alpha_t, the official update.
          'epsilon': 1e-2,  # Finite-difference step, relative to ||v||.
          'cg_iterations': 20,  # Conjugate-gradient steps of `implicit`.
          'cg_damping': 1e-4,  # `implicit` solves (J J^T + damping I) g = J v.
          # Loop iterations of `neumann`/`implicit` unrolled into one (0 = all): the same
          # values, faster on XLA:CPU, slower to compile.
          'loop_unroll': 1,
          'meta_step_scale': 'none',  # none | first_step_norm (see hypergrad.match_first_step_norm)
          'forward_mode': 'eval',  # eval (official: running BN stats, no dropout) | train
          'projection': 'relu_normalize',  # relu_normalize (official) | simplex
          'diagnostics_every_steps': 0,  # > 0: log cosine(mode, exact) every N steps.
      }),
      'semimeta': ml_collections.ConfigDict({
          'mixup': True,
          'mixup_alpha': 1.0,  # Beta(a, a) for the per-example mix-up coefficient.
          # The consistency term on the strong view (RandAugment) of the unlabeled rows.
          'strong_view': False,
      }),
  }


def validate(config) -> None:
  """The `hypergrad` block and the mix-up fields.

  Raises:
    errors.ConfigError: naming the first unusable field.
  """
  require, hg = errors.require, config.hypergrad
  for field, choices in (('mode', hypergrad.MODES), ('forward_mode', FORWARD_MODES),
                         ('projection', hypergrad.PROJECTIONS),
                         ('meta_step_scale', META_STEP_SCALES)):
    require(hg[field] in choices, f'hypergrad.{field}', hg[field], f'expected one of {choices}')
  require(isinstance(hg.inner_steps, int) and hg.inner_steps >= 1, 'hypergrad.inner_steps',
          hg.inner_steps, 'must be an integer >= 1')
  require(hg.inner_steps == 1 or hg.mode in hypergrad.MULTI_STEP_MODES, 'hypergrad.inner_steps',
          hg.inner_steps, f'K > 1 virtual steps need hypergrad.mode in {hypergrad.MULTI_STEP_MODES} '
          f'(mode {hg.mode!r} is not a K-step estimator)')
  require(isinstance(hg.cg_iterations, int) and hg.cg_iterations >= 1, 'hypergrad.cg_iterations',
          hg.cg_iterations, 'must be an integer >= 1 (conjugate-gradient steps of mode "implicit")')
  require(isinstance(hg.loop_unroll, int) and hg.loop_unroll >= 0, 'hypergrad.loop_unroll',
          hg.loop_unroll, 'must be an integer >= 0 (1 = a rolled loop, 0 = fully unrolled)')
  require(hg.cg_damping >= 0, 'hypergrad.cg_damping', hg.cg_damping,
          'must be >= 0 (added to the Gram matrix J J^T of mode "implicit")')
  require(hg.inner_lr >= 0, 'hypergrad.inner_lr', hg.inner_lr, 'must be >= 0 (0 = the learning rate)')
  require(hg.meta_lr >= 0, 'hypergrad.meta_lr', hg.meta_lr, 'must be >= 0 (0 = the official value)')
  require(hg.epsilon > 0, 'hypergrad.epsilon', hg.epsilon, 'must be > 0')
  require(isinstance(hg.diagnostics_every_steps, int) and hg.diagnostics_every_steps >= 0,
          'hypergrad.diagnostics_every_steps', hg.diagnostics_every_steps, 'must be an integer >= 0')
  require(hg.mode != 'implicit' or hg.meta_lr > 0 or hg.meta_step_scale == 'first_step_norm',
          'hypergrad.meta_lr', hg.meta_lr,
          'must be > 0 with hypergrad.mode="implicit": the official beta (meta_lr = 0) assumes the '
          'scale of the K = 1 hypergradient, and the implicit one does not depend on alpha '
          '(or set hypergrad.meta_step_scale="first_step_norm" to rescale it to that scale)')
  if config.semimeta.mixup:
    require(config.semimeta.mixup_alpha > 0, 'semimeta.mixup_alpha', config.semimeta.mixup_alpha,
            'must be > 0')
    require(config.labeled_batch_size == config.unlabeled_batch_size, 'unlabeled_batch_size',
            config.unlabeled_batch_size,
            f'mix-up pairs the i-th labeled with the i-th unlabeled example, so it must equal '
            f'config.labeled_batch_size={config.labeled_batch_size}')


def meta_pseudo_labels(state, labeled, unlabeled, *, lr, key, config):
  """Steps 1-3: the initial pseudo-labels, their hypergradient, and the updated ones.

  Args:
    state: the TrainState at theta_t.
    labeled: {'image', 'label'} global labeled batch.
    unlabeled: {'image'} global unlabeled batch.
    lr: the learning rate of this step (the default inner step size alpha).
    key: dropout key of the training-mode meta forward.
    config: the run configuration (its `hypergrad` block is read).

  Returns:
    (ytil, g, yhat), each [B_u, num_classes].
  """
  hg = config.hypergrad
  x_u = unlabeled['image']
  ytil = jax.nn.softmax(losses.at_least_float32(common.eval_forward(state, state.params, x_u)))
  ytil = jax.lax.stop_gradient(ytil)

  if hg.forward_mode == 'eval':
    apply_fn = functools.partial(common.eval_forward, state)
  else:
    # The running averages that a training-mode forward would update are dropped:
    # the meta step only reads the network, the real update below writes it.
    apply_fn = lambda params, x: common.train_forward(state, params, x, state.batch_stats, key)[0]

  alpha = hg.inner_lr if hg.inner_lr > 0 else lr
  beta = hg.meta_lr if hg.meta_lr > 0 else hypergrad.official_meta_lr(lr, alpha, x_u.shape[0])
  # In evaluation mode ytil is the prediction of the very forward inside L_u, so
  # grad L_u(theta, ytil) = 0 and theta~ = theta: jvp/finite_difference skip it.
  theta_tilde_is_theta = hg.forward_mode == 'eval'
  grad = hypergrad.hypergradient(
      hg.mode, apply_fn, state.params, labeled['image'], labeled['label'], x_u, ytil,
      alpha=alpha, inner_steps=hg.inner_steps, epsilon=hg.epsilon,
      theta_tilde_is_theta=theta_tilde_is_theta, cg_iterations=hg.cg_iterations,
      cg_damping=hg.cg_damping, loop_unroll=hg.loop_unroll)
  if (hg.meta_step_scale == 'first_step_norm'
      and not hypergrad.is_first_step_hypergradient(hg.mode, hg.inner_steps)):
    first_step = hypergrad.hypergradient(
        'jvp', apply_fn, state.params, labeled['image'], labeled['label'], x_u, ytil,
        alpha=alpha, theta_tilde_is_theta=theta_tilde_is_theta)
    grad = hypergrad.match_first_step_norm(grad, first_step)
  yhat = hypergrad.update_pseudo_labels(ytil, grad, beta=beta, projection=hg.projection)
  return ytil, grad, yhat


def mixup(labeled, unlabeled_image, yhat, *, num_classes, concentration, key):
  """The official mix-up: the i-th labeled with the i-th unlabeled example, lambda_i ~ Beta(a, a).

  `concentration` is a = `config.semimeta.mixup_alpha` (named apart from the inner step alpha).
  """
  lam = jax.random.beta(key, concentration, concentration, (labeled['image'].shape[0],))
  lam_image = lam.reshape((-1,) + (1,) * (labeled['image'].ndim - 1))
  image = lam_image * labeled['image'] + (1.0 - lam_image) * unlabeled_image
  onehot = jax.nn.one_hot(labeled['label'], num_classes)
  target = lam[:, None] * onehot + (1.0 - lam[:, None]) * yhat
  return image, target


def train_step(state, batch, *, config, num_classes):
  """One SemiMeta update. Pure: (state, batch) -> (state, metrics)."""
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  lr = options.learning_rate_schedule(config)(state.step)
  weight = schedules.consistency_weight_schedule(config)(state.step)
  key = state.step_key

  ytil, grad, yhat = meta_pseudo_labels(
      state, labeled, unlabeled, lr=lr, key=key(common.DROPOUT_META), config=config)

  def loss_fn(params):
    if config.semimeta.mixup:
      image, target = mixup(labeled, unlabeled['image'], yhat, num_classes=num_classes,
                            concentration=config.semimeta.mixup_alpha, key=key(common.MIXUP))
      logits, stats = common.train_forward(state, params, image, state.batch_stats,
                                           key(common.DROPOUT_LABELED))
      supervised = losses.kl_divergence(target, logits)
    else:
      logits, stats = common.train_forward(state, params, labeled['image'], state.batch_stats,
                                           key(common.DROPOUT_LABELED))
      supervised = losses.cross_entropy(logits, labeled['label'])
    # A second forward with its own batch statistics, as the official step does.
    consistency_view = unlabeled['strong_image' if config.semimeta.strong_view else 'image']
    unlabeled_logits, stats = common.train_forward(state, params, consistency_view, stats,
                                                   key(common.DROPOUT_UNLABELED))
    consistency = losses.probability_mse(unlabeled_logits, yhat)
    return supervised + weight * consistency, (stats, supervised, consistency, unlabeled_logits)

  grads, (stats, supervised, consistency, unlabeled_logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': supervised + weight * consistency,
      'supervised_loss': supervised,
      'consistency_loss': consistency,
      'learning_rate': lr,
      'consistency_weight': weight,
      'pseudo_label_entropy': losses.entropy(yhat),
      'pseudo_label_change': jnp.mean(jnp.sum(jnp.abs(yhat - ytil), axis=-1)),
      'hypergradient_norm': jnp.linalg.norm(grad),
  }
  return common.finish_step(state, grads, stats, metrics,
                            scored=[('pseudo_label_accuracy', yhat, unlabeled),
                                    ('initial_pseudo_label_accuracy', ytil, unlabeled),
                                    ('unlabeled_accuracy', unlabeled_logits, unlabeled)])


def hypergradient_fidelity(state, batch, *, config):
  """How close this run's hypergradient estimator is to the exact one, on one batch.

  Computes g with `config.hypergrad.mode` and with `exact` (same state, batch,
  forward and keys as the training step would use) and compares them.

  Returns:
    {'cosine': cos(g_mode, g_exact), 'relative_error': ||g_mode - g_exact|| / ||g_exact||}.
  """
  lr = options.learning_rate_schedule(config)(state.step)
  exact_config = config.copy_and_resolve_references()
  exact_config.hypergrad.mode = 'exact'
  grads = []
  for cfg in (config, exact_config):
    _, grad, _ = meta_pseudo_labels(state, batch['labeled'], batch['unlabeled'], lr=lr,
                                    key=state.step_key(common.DROPOUT_META), config=cfg)
    grads.append(grad.ravel())
  estimate, exact = grads
  tiny = jnp.finfo(exact.dtype).tiny
  norms = jnp.linalg.norm(estimate) * jnp.linalg.norm(exact)
  return {
      'cosine': jnp.vdot(estimate, exact) / jnp.maximum(norms, tiny),
      'relative_error': jnp.linalg.norm(estimate - exact) / jnp.maximum(jnp.linalg.norm(exact), tiny),
  }


def describe(config) -> str:
  """The meta step's settings, for the run plan."""
  hg = config.hypergrad
  horizon = 'K=inf (implicit)' if hg.mode == 'implicit' else f'K={hg.inner_steps}'
  scale = ', scaled to the K=1 norm' if hg.meta_step_scale == 'first_step_norm' else ''
  strong = ', consistency on the strong view' if config.semimeta.strong_view else ''
  return f'hypergradient {hg.mode}, {horizon}, meta forward {hg.forward_mode}{scale}{strong}'


# The official recipe is the default config's (configs/default.py, CIFAR-10) and configs/digits.py's.
# `semimeta_strong`: the same with the consistency term on the strong view.
PRESETS = {dataset: {'semimeta': {}, 'semimeta_strong': {'semimeta.strong_view': True}}
           for dataset in ('digits', 'cifar10', 'cifar100', 'svhn', 'stl10')}
PRESETS['imagenet'] = {'semimeta': {}}

METHOD = base.Method(
    name='semimeta',
    train_step=train_step,
    uses_unlabeled=True,
    strong_view=lambda config: config.semimeta.strong_view,
    config_blocks=config_blocks,
    renamed_fields={'mixup': 'semimeta.mixup', 'mixup_alpha': 'semimeta.mixup_alpha',
                    'hypergrad_diagnostics_every_steps': 'hypergrad.diagnostics_every_steps'},
    validate=validate,
    diagnostics=hypergradient_fidelity,
    diagnostics_every_steps=lambda config: config.hypergrad.diagnostics_every_steps,
    diagnostics_prefix='hypergrad',
    describe=describe,
    presets=PRESETS)
