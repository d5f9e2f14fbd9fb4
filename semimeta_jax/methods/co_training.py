"""Deep Co-Training (Qiao et al., "Deep Co-Training for Semi-Supervised Image Recognition", ECCV 2018).

Two networks of one architecture, f1 (the run's classifier, `state.params`) and
f2 (`extra['second_network']`, `second_network.py`, with its own optimizer
state), are trained together on

  L = CE(f1(S)) + CE(f2(S)) + lambda_cot(t) JSD(p1(U), p2(U))
      + lambda_dif(t) [H(p2(x), p1(g2(x))) + H(p1(x), p2(g1(x)))],  x over S and U,

with JSD(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2 and H(p, q) = -sum p log q.
g_i(x) = x + eps sign(grad_x CE(f_i(x), y)) is a fast-gradient-sign example against
network i in evaluation mode (running batch-norm averages), with y the true label
on S and network i's own argmax on U. The view-difference term asks each network
to keep its prediction on the other's adversarial examples, which keeps the two
from collapsing into one. Gradients reach both sides of each cross-entropy, as in
the reference PyTorch code (AlanChou/Deep-Co-Training-for-Semi-Supervised-Image-
Recognition, whose step this follows):

  1. training-mode forwards of each network on S and on U (the pseudo-labels are
     the argmax of its training-mode logits on U);
  2. the FGSM examples in evaluation mode, with the running averages those
     forwards just updated; no gradient flows through them;
  3. training-mode forwards of f1 on g2(S), g2(U) and of f2 on g1(S), g1(U).
  Each forward is separate, so batch norm normalises each part with its own
  statistics and updates the running averages once per forward, in that order,
  as four `net(x)` calls in PyTorch do.

lambda_cot = `co_training.lambda_cot` (10) and lambda_dif = `co_training.lambda_dif`
(0.5) are both multiplied by the run's consistency weight w(t)
(`consistency_weight`, 1 in the presets) and its ramp: 'sigmoid' is the paper's
Gaussian ramp-up exp(-5 (1 - t/T)^2). The supervised terms are averaged over S and
the JSD over U; the view-difference term is the sum of its four cross-entropies
over the rows of S and of U divided by |S| + |U|, as the reference's `loss_diff`
(`-(a + b + c + d) / batch_size`), so each S row weighs as much as each U row.

FGSM radius: the reference's latest version (commit 1b56dc1 of its main.py) has
`--epsilon 0.02` on images in [0, 1] (its Normalize transform commented out) and no
clipping, so `co_training.fgsm_epsilon` (0.02) is an L-infinity radius in [0, 1]
pixel units, applied to the standardised inputs as eps / std per channel (the
dataset's normalisation std: 0.02 is 0.053 on digits, about 0.08 on CIFAR-10).
Earlier versions of its main.py used 0.1 on normalised inputs (clipped to [-1, 1]):
`co_training.fgsm_units='standardised'` applies the radius to the standardised
inputs as they are (without the clipping). The paper gives no eps; the
reference's README says 0.02 came from the authors.

Departures: both networks see the same labeled batch (the reference draws S1 and
S2 from two loaders of the same labeled set, shuffled apart), and the CIFAR
schedule of the reference is not copied (the run's own schedule applies).

The pair of networks is kept as two pytrees, not stacked on a leading axis and
vmapped: the step needs the two networks' forwards in a fixed order with each
one's batch statistics, and a vmapped forward would need the batch-norm layers'
axis names to keep the two networks' statistics apart. Measured on CPU (2 shared
cores; the tests' 4-channel ConvLarge on 8x8 inputs, 16 + 16 images; a `jax.jit`
of `methods.make_train_step`): compile 7.3 s, step 33 ms (median of 20).

Evaluation: network 1 is the run's headline ('eval'); network 2 is evaluated as
its own weight set ('eval_second').
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax import schedules
from semimeta_jax.methods import augment
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options
from semimeta_jax.methods import second_network

# Sub-tags of the dropout keys: one per network and per forward.
FIRST, SECOND = 0, 1
CLEAN_LABELED, CLEAN_UNLABELED, ADVERSARIAL_LABELED, ADVERSARIAL_UNLABELED = range(4)


def config_blocks():
  """The `co_training` block: the loss weights and the FGSM radius."""
  return {'co_training': ml_collections.ConfigDict({
      'lambda_cot': 10.0,  # Weight of the Jensen-Shannon co-training term (paper).
      'lambda_dif': 0.5,  # Weight of the view-difference term (paper).
      'fgsm_epsilon': 0.02,  # L-infinity radius of the FGSM examples (reference code, 1b56dc1).
      'fgsm_units': 'pixels',  # Of the radius: 'pixels' ([0, 1] images) or 'standardised' (inputs as seen).
  })}


FGSM_UNITS = ('pixels', 'standardised')


def validate(config) -> None:
  """lambda_cot >= 0, lambda_dif >= 0, fgsm_epsilon > 0, and its units (pixels need the dataset's std).

  Raises:
    errors.ConfigError: naming the field.
  """
  block = config.co_training
  errors.require(block.lambda_cot >= 0, 'co_training.lambda_cot', block.lambda_cot, 'must be >= 0')
  errors.require(block.lambda_dif >= 0, 'co_training.lambda_dif', block.lambda_dif, 'must be >= 0')
  errors.require(block.fgsm_epsilon > 0, 'co_training.fgsm_epsilon', block.fgsm_epsilon, 'must be > 0')
  errors.require(block.fgsm_units in FGSM_UNITS, 'co_training.fgsm_units', block.fgsm_units,
                 f'must be one of {FGSM_UNITS}')
  if block.fgsm_units == 'pixels':
    augment.require_pixel_std(config, 'co_training.fgsm_epsilon', block.fgsm_epsilon)


def fgsm_radius(config, channels: int):
  """The FGSM radius in the standardised units of the inputs: eps / std per channel, or eps as it is.

  Returns:
    A float, or a [channels] array that broadcasts over the images' last axis.
  """
  block = config.co_training
  if block.fgsm_units == 'standardised':
    return block.fgsm_epsilon
  std = augment.pixel_std(config, channels)
  if std is None:
    raise ValueError(f'co_training.fgsm_units=pixels needs the dataset\'s normalisation std '
                     f'({config.data.name!r} registers none); see co_training.validate.')
  return block.fgsm_epsilon / std


def jensen_shannon(logits1: jax.Array, logits2: jax.Array) -> jax.Array:
  """Mean over the batch of JSD(softmax(logits1), softmax(logits2)) = H(m) - (H(p1) + H(p2)) / 2."""
  p1 = jax.nn.softmax(losses.at_least_float32(logits1))
  p2 = jax.nn.softmax(losses.at_least_float32(logits2))
  return losses.entropy((p1 + p2) / 2) - (losses.entropy(p1) + losses.entropy(p2)) / 2


def soft_cross_entropy(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over the batch of H(softmax(target_logits), softmax(logits)); gradients reach both."""
  targets = jax.nn.softmax(losses.at_least_float32(target_logits))
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(losses.at_least_float32(logits)), axis=-1))


def soft_cross_entropy_per_example(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Per example, H(softmax(target_logits), softmax(logits)); gradients reach both."""
  targets = jax.nn.softmax(losses.at_least_float32(target_logits))
  return -jnp.sum(targets * jax.nn.log_softmax(losses.at_least_float32(logits)), axis=-1)


def view_difference(clean_s, adv_s, clean_u, adv_u) -> jax.Array:
  """The reference's `loss_diff`: the summed cross-entropies over S and U, divided by |S| + |U|.

  Args:
    clean_s, clean_u: {net: logits of network net on S, on U}.
    adv_s, adv_u: {net: logits of network net on the other network's FGSM examples of S, of U}.

  Returns:
    [sum over x in S and U of H(p2(x), p1(g2(x))) + H(p1(x), p2(g1(x)))] / (|S| + |U|).
  """
  other = {FIRST: SECOND, SECOND: FIRST}
  total = sum(jnp.sum(soft_cross_entropy_per_example(clean[other[net]], adv[net]))
              for clean, adv in ((clean_s, adv_s), (clean_u, adv_u)) for net in (FIRST, SECOND))
  return total / (clean_s[FIRST].shape[0] + clean_u[FIRST].shape[0])


def fgsm(logits_fn, x: jax.Array, labels: jax.Array, epsilon) -> jax.Array:
  """x + eps sign(grad_x sum CE(logits_fn(x), labels)), held constant (no gradient flows through it).

  `epsilon` is a float or a per-channel array (broadcast over the last axis).

  `logits_fn` must treat examples independently (evaluation mode), so the summed
  loss gives each example the gradient of its own loss.
  """
  loss = lambda inputs: jnp.sum(losses.cross_entropy_per_example(logits_fn(inputs), labels))
  return jax.lax.stop_gradient(x + epsilon * jnp.sign(jax.grad(loss)(x)))


def objective(pair, state, batch, *, lambda_cot, lambda_dif, epsilon):
  """The co-training loss of both networks.

  Args:
    pair: {'first': params of f1, 'second': params of f2} (differentiated).
    state: the TrainState (batch statistics of both networks, keys).
    batch: {'labeled': {'image', 'label'}, 'unlabeled': {'image'}}.
    lambda_cot: weight of the JSD term at this step.
    lambda_dif: weight of the view-difference term at this step.
    epsilon: FGSM radius in the inputs' units (a float or per channel, `fgsm_radius`).

  Returns:
    (loss, aux) with aux = (batch statistics of f1, of f2, {term: value},
    {name: logits}).
  """
  labeled, x_u = batch['labeled'], batch['unlabeled']['image']
  x_s, y_s = labeled['image'], labeled['label']
  num_labeled = x_s.shape[0]
  stats = {FIRST: state.batch_stats, SECOND: second_network.weights(state)[1]}
  params = {FIRST: pair['first'], SECOND: pair['second']}

  def forward(net, x, part):
    logits, stats[net] = common.train_forward(state, params[net], x, stats[net],
                                              state.step_key(common.DROPOUT_LABELED, net, part))
    return logits

  clean_s = {net: forward(net, x_s, CLEAN_LABELED) for net in (FIRST, SECOND)}
  clean_u = {net: forward(net, x_u, CLEAN_UNLABELED) for net in (FIRST, SECOND)}

  def adversarial(net):
    # Evaluation mode: with the running averages the clean forwards just updated.
    frozen = jax.lax.stop_gradient((params[net], stats[net]))
    logits_fn = lambda x: common.eval_forward(state, frozen[0], x, batch_stats=frozen[1])
    pseudo = jnp.argmax(clean_u[net], axis=-1)
    return fgsm(logits_fn, jnp.concatenate([x_s, x_u]), jnp.concatenate([y_s, pseudo]), epsilon)

  against = {FIRST: adversarial(FIRST), SECOND: adversarial(SECOND)}
  other = {FIRST: SECOND, SECOND: FIRST}
  # f_i on the other's adversarial examples: g2 for f1, g1 for f2.
  adv_s = {net: forward(net, against[other[net]][:num_labeled], ADVERSARIAL_LABELED)
           for net in (FIRST, SECOND)}
  adv_u = {net: forward(net, against[other[net]][num_labeled:], ADVERSARIAL_UNLABELED)
           for net in (FIRST, SECOND)}

  supervised = losses.cross_entropy(clean_s[FIRST], y_s) + losses.cross_entropy(clean_s[SECOND], y_s)
  cot = jensen_shannon(clean_u[FIRST], clean_u[SECOND])
  dif = view_difference(clean_s, adv_s, clean_u, adv_u)
  loss = supervised + lambda_cot * cot + lambda_dif * dif
  terms = {'supervised_loss': supervised, 'cot_loss': cot, 'dif_loss': dif}
  logits = {'labeled': clean_s[FIRST], 'unlabeled': clean_u[FIRST],
            'second_labeled': clean_s[SECOND], 'second_unlabeled': clean_u[SECOND]}
  return loss, (stats[FIRST], stats[SECOND], terms, logits)


def train_step(state, batch, *, config, num_classes):
  """One Deep Co-Training update of both networks. Pure: (state, batch) -> (state, metrics).

  Raises:
    ValueError: if the state has no second network (build it with `methods.init_train_state`).
  """
  del num_classes  # The labels carry it.
  if second_network.KEY not in state.extra:
    raise ValueError('Deep Co-Training needs a TrainState with a second network '
                     '(build it with methods.init_train_state).')
  block = config.co_training
  lr = options.learning_rate_schedule(config)(state.step)
  ramp = schedules.consistency_weight_schedule(config)(state.step)
  loss_fn = functools.partial(objective, state=state, batch=batch, lambda_cot=block.lambda_cot * ramp,
                              lambda_dif=block.lambda_dif * ramp,
                              epsilon=fgsm_radius(config, batch['labeled']['image'].shape[-1]))
  pair = {'first': state.params, 'second': second_network.weights(state)[0]}
  (loss, (stats1, stats2, terms, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(pair)
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  metrics = {
      'loss': loss, **terms,
      'learning_rate': lr,
      'lambda_cot': block.lambda_cot * ramp,
      'lambda_dif': block.lambda_dif * ramp,
      'train_accuracy': common.accuracy(logits['labeled'], labeled['label']),
      'second_train_accuracy': common.accuracy(logits['second_labeled'], labeled['label']),
      # How often the two networks agree on U: 1 would mean they have collapsed into one.
      'agreement': jnp.mean((jnp.argmax(logits['unlabeled'], -1)
                             == jnp.argmax(logits['second_unlabeled'], -1)).astype(jnp.float32)),
  }
  extra = second_network.apply_gradients(state, grads['second'], stats2)
  new_state, metrics = common.finish_step(
      state, grads['first'], stats1, metrics,
      scored=[('unlabeled_accuracy', logits['unlabeled'], unlabeled),
              ('second_unlabeled_accuracy', logits['second_unlabeled'], unlabeled)])
  return new_state.replace(extra=extra), metrics


# Qiao et al.: lambda_cot 10, lambda_dif 0.5, eps 0.02 on [0, 1] images (reference 1b56dc1), Gaussian ramp-up over the first 80 of 600
# epochs (about 13%). Digits: the same weights, the ramp over the digits run's first 200 steps.
_RAMP = {'consistency_rampup': 'sigmoid', 'consistency_weight': 1.0}
PRESETS = {
    'digits': {'co_training': {**_RAMP, 'consistency_rampup_steps': 200}},
    # CIFAR-10: the ramp over the same share (80/600) of configs/cifar10.py's 400k steps.
    'cifar10': {'co_training': {**_RAMP, 'consistency_rampup_steps': 400_000 * 80 // 600}},
    # ImageNet (ResNet-18, 10% labels): the CIFAR weights and radius; the ramp over the first
    # 80 of the 600 epochs, as the reference's warm-up (configs/imagenet.py counts it in steps).
    'imagenet': {'co_training': {**_RAMP, 'rampup_epochs': 80}},
}

METHOD = base.Method(
    name='co_training', train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=second_network.init,
    weight_sets=lambda config: [second_network.weight_set()],
    describe=lambda config: (f'lambda_cot={config.co_training.lambda_cot}, '
                             f'lambda_dif={config.co_training.lambda_dif}, '
                             f'fgsm_epsilon={config.co_training.fgsm_epsilon}'),
    presets=PRESETS)
