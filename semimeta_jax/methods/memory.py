"""MA-DNN: memory-assisted deep networks (Chen, Zhu & Gong, "Semi-Supervised Deep Learning with
Memory", ECCV 2018).

A class memory holds, for each class c, a key k_c (a point in the space of the
pooled features) and a value v_c (a distribution over the classes). It starts at
k_c = 0 and v_c = uniform, lives in `TrainState.extra['ma_dnn']` like batch-norm
statistics (replicated, checkpointed, never differentiated) and is updated from
every labeled batch. The update, the prediction and the loss follow the authors'
TensorFlow code (yanbeic/semi-memory, memory.py):

  * Update, from the labeled examples of this step's forward (features f_i and
    network predictions p_i, no gradient), with n_c the number of examples of
    class c in the batch and eta = `ma_dnn.update_rate` (0.5):
        k_c <- k_c - eta / (1 + n_c) * sum_{i: y_i = c} (k_c - f_i)
        v_c <- normalise(v_c - eta / (1 + n_c) * sum_{i: y_i = c} (v_c - p_i))
    Every term is taken from the memory before the batch (the code's gather then
    scatter_sub), so the result does not depend on the order of the batch; the
    per-class count damps a class seen many times in one batch. A class absent
    from the batch is left exactly as it was.
  * Memory prediction, from the memory after this batch's update (the code reads
    the variables its scatter returns): a labeled example reads its class's value,
    p_mem = v_y; an unlabeled one addresses the keys by its distance
    d_c = sum_j sqrt((f_j - k_cj)^2 + 1e-10) (the code's: an L1 distance smoothed at
    zero), memberships m = clip(softmax(-d), 1e-10, 1) and p_mem = normalise(m V).
  * Loss = CE(labeled) + `ma_dnn.weight` * mean over the joined labeled + unlabeled
    batch of [H(p_mem) + max(p_mem) KL(p_net || p_mem)], with the code's
    H(p) = -sum p log(p + 1e-8) and KL(p || q) = sum p log(p / q + 1e-8). As in the
    code, no gradient reaches the memory (TensorFlow does not differentiate its
    scatter updates), but the unlabeled examples' memberships are functions of
    their features, so H(p_mem) and the divergence also train the features
    towards one key.

The labeled and unlabeled batches go through the network as one batch in training
mode, as the code's towers do. Left out of the authors' recipe: their label
smoothing of 0.001 per class and their clipping of each gradient element to
[-2, 2]; the optimizer and its schedule are this project's shared ones.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import common
from semimeta_jax.methods import options

NAME = 'ma_dnn'
# The authors' constants: the distance's smoothing and the floor of the memberships
# (memory.py), and the guard inside the logarithms of the entropy and divergence (network.py).
DISTANCE_EPSILON = 1e-10
LOG_EPSILON = 1e-8


def config_blocks():
  """The `ma_dnn` block."""
  return {NAME: ml_collections.ConfigDict({
      'update_rate': 0.5,  # eta of the memory update (the authors' default).
      'weight': 1.0,  # Weight of the memory-network loss beside the cross-entropy.
  })}


def validate(config) -> None:
  """`ma_dnn.update_rate` in (0, 1] and `ma_dnn.weight` >= 0."""
  block = config.ma_dnn
  errors.require(0.0 < block.update_rate <= 1.0, 'ma_dnn.update_rate', block.update_rate,
                 'must be in (0, 1] (the authors use 0.5)')
  errors.require(block.weight >= 0.0, 'ma_dnn.weight', block.weight, 'must be >= 0')


def init_memory(num_classes: int, feature_dim: int):
  """The empty memory: zero keys and uniform values."""
  return {'keys': jnp.zeros((num_classes, feature_dim), jnp.float32),
          'values': jnp.full((num_classes, num_classes), 1.0 / num_classes, jnp.float32)}


def init_model_state(config, *, model, image_shape, rng, params, batch_stats, num_classes):
  """{'ma_dnn': memory}, as wide as the classifier's pooled features.

  Raises:
    ValueError: if the number of classes is not given (0).
  """
  del config, model, image_shape, rng, batch_stats
  if num_classes <= 0:
    raise ValueError(f'MA-DNN sizes its memory by the number of classes; got num_classes={num_classes}.')
  return {NAME: init_memory(num_classes, params['head']['fc']['kernel'].shape[0])}


def _normalise_rows(x):
  return x / jnp.sum(x, axis=-1, keepdims=True)


def update_memory(memory, features, predictions, labels, update_rate):
  """The memory after one labeled batch (the authors' update, see the module docstring).

  Args:
    memory: {'keys': [C, D], 'values': [C, C]}.
    features: [B, D] pooled features of the labeled examples.
    predictions: [B, C] the network's softmax on them.
    labels: [B] integer classes.
    update_rate: eta.

  Returns:
    The updated memory. Per class, the batch enters through sums (one-hot products at
    full precision), so the batch's order and sharding change only the rounding.
  """
  keys, values = memory['keys'], memory['values']
  one_hot = jax.nn.one_hot(labels, keys.shape[0], dtype=keys.dtype)  # [B, C]
  counts = jnp.sum(one_hot, axis=0)[:, None]  # n_c
  per_class = lambda x: jnp.matmul(one_hot.T, x.astype(keys.dtype), precision=jax.lax.Precision.HIGHEST)
  step = update_rate / (1.0 + counts)
  # sum_{i: y_i = c} (m_c - x_i) = n_c m_c - sum_{i: y_i = c} x_i: exactly zero for an absent class.
  new_keys = keys - step * (counts * keys - per_class(features))
  new_values = values - step * (counts * values - per_class(predictions))
  return {'keys': new_keys, 'values': _normalise_rows(new_values)}


def content_prediction(memory, features):
  """p_mem of unlabeled examples: the values read through the memberships to the keys.

  Args:
    memory: {'keys': [C, D], 'values': [C, C]} (no gradient is taken through it).
    features: [B, D] pooled features (differentiable).

  Returns:
    [B, C] distributions.
  """
  distances = jnp.sum(jnp.sqrt(jnp.square(features[:, None, :] - memory['keys'][None])
                               + DISTANCE_EPSILON), axis=-1)
  memberships = jnp.clip(jax.nn.softmax(-distances, axis=-1), DISTANCE_EPSILON, 1.0)
  return _normalise_rows(jnp.matmul(memberships, memory['values'], precision=jax.lax.Precision.HIGHEST))


def memory_prediction(memory, labels, unlabeled_features):
  """p_mem of the joined batch: v_y for the labeled rows, then the unlabeled rows'."""
  return jnp.concatenate([memory['values'][labels], content_prediction(memory, unlabeled_features)])


def memory_loss(memory_probs, network_probs):
  """(mean of H(p_mem) + max(p_mem) KL(p_net || p_mem), mean H(p_mem), mean KL), the authors' forms."""
  entropy = -jnp.sum(memory_probs * jnp.log(memory_probs + LOG_EPSILON), axis=-1)
  divergence = jnp.sum(network_probs * jnp.log(network_probs / memory_probs + LOG_EPSILON), axis=-1)
  certainty = jnp.max(memory_probs, axis=-1)
  return jnp.mean(entropy + certainty * divergence), jnp.mean(entropy), jnp.mean(divergence)


def objective(params, state, batch, *, config):
  """CE + weight * the memory-network loss, the memory first updated with this batch.

  Returns:
    (loss, (batch statistics, updated memory, supervised loss, memory loss, memory
    entropy, divergence, logits, memory probabilities)).
  """
  labeled = batch['labeled']
  labels = labeled['label'].astype(jnp.int32)
  num_labeled = labels.shape[0]
  images = jnp.concatenate([labeled['image'], batch['unlabeled']['image']])
  logits, features, stats = common.train_forward_with_features(
      state, params, images, state.batch_stats, state.step_key(common.DROPOUT_UNLABELED))
  network_probs = jax.nn.softmax(losses.at_least_float32(logits))
  features = losses.at_least_float32(features)
  memory = update_memory(state.extra[NAME], jax.lax.stop_gradient(features[:num_labeled]),
                         jax.lax.stop_gradient(network_probs[:num_labeled]), labels,
                         config.ma_dnn.update_rate)
  memory = jax.lax.stop_gradient(memory)
  memory_probs = memory_prediction(memory, labels, features[num_labeled:])
  supervised = losses.cross_entropy(logits[:num_labeled], labels)
  unsupervised, entropy, divergence = memory_loss(memory_probs, network_probs)
  loss = supervised + config.ma_dnn.weight * unsupervised
  return loss, (stats, memory, supervised, unsupervised, entropy, divergence, logits, memory_probs)


def train_step(state, batch, *, config, num_classes):
  """One MA-DNN update. Pure: (state, batch) -> (state, metrics).

  Raises:
    ValueError: if the state keeps no memory (build it with `methods.init_train_state`).
  """
  del num_classes  # The memory's width carries it.
  if NAME not in state.extra:
    raise ValueError('MA-DNN needs a TrainState with its memory (build it with methods.init_train_state).')
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled = labeled['image'].shape[0]
  loss_fn = functools.partial(objective, state=state, batch=batch, config=config)
  (loss, (stats, memory, supervised, unsupervised, entropy, divergence, logits, memory_probs)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  metrics = {
      'loss': loss,
      'supervised_loss': supervised,
      'memory_loss': unsupervised,
      'memory_entropy': entropy,
      'memory_divergence': divergence,
      'learning_rate': options.learning_rate_schedule(config)(state.step),
      'train_accuracy': common.accuracy(logits[:num_labeled], labeled['label']),
  }
  new_state, metrics = common.finish_step(
      state, grads, stats, metrics,
      scored=[('unlabeled_accuracy', logits[num_labeled:], unlabeled),
              ('memory_unlabeled_accuracy', memory_probs[num_labeled:], unlabeled)])
  return new_state.replace(extra=dict(new_state.extra, **{NAME: memory})), metrics


def describe(config) -> str:
  """The memory's settings in the run plan."""
  return f'memory update rate {config.ma_dnn.update_rate}, memory loss weight {config.ma_dnn.weight}'


# Chen et al. (their code): eta = 0.5, weight 1 from the first step, the network evaluated
# through an EMA of its weights (decay 0.9999). Digits: the same memory settings, the EMA at 0.99
# as the other digits presets (1000 steps are too few for 0.9999).
PRESETS = {
    'digits': {'ma_dnn': {'ma_dnn.update_rate': 0.5, 'ma_dnn.weight': 1.0, 'ema.decay': 0.99,
                          'ema.headline': True}},
    'cifar10': {'ma_dnn': {'ma_dnn.update_rate': 0.5, 'ma_dnn.weight': 1.0, 'ema.decay': 0.9999,
                           'ema.headline': True}},
}

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, config_blocks=config_blocks,
    validate=validate, init_model_state=init_model_state, presets=PRESETS, describe=describe)
