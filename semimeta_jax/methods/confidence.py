"""What the FixMatch family shares (as USB, microsoft/Semi-supervised-learning, defines it).

FixMatch, UDA, FlexMatch, FreeMatch and SoftMatch differ only in how the weak view's
prediction becomes a target and a per-example weight; the step around it is one:
  1. one training-mode forward of [labeled; weak unlabeled; strong unlabeled] joined,
     as USB's `use_cat=True` (its default in every classic-CV config): batch norm
     normalises with the statistics of all three parts, as USB's forward does;
  2. the weak logits are held constant (USB computes its targets from
     `logits_x_ulb_w.detach()` under `no_grad` hooks); the strong logits carry the
     gradient;
  3. the method turns the weak prediction into targets, a weight per row (a 0/1 mask
     or SoftMatch's soft weights) and its statistics after this batch;
  4. loss = supervised + lambda_u * mean over the B_u rows of weight * CE(strong,
     target) (USB's `consistency_loss(..., 'ce', mask)`: divided by B_u, not by the
     number of kept rows), plus a method's own term (FreeMatch's fairness).
The weak view goes through the network in training mode (dropout on, batch norm on
the batch), as USB's `model.train()` forward. USB all-gathers probabilities across
GPUs before updating its statistics; here the step sees the whole global batch in one
`jit`, so the statistics are the same on any device count.
Each method's statistics live in `TrainState.extra[<method name>]`.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import common
from semimeta_jax.methods import options


class Targets(NamedTuple):
  """What a method makes of the weak view's prediction.

  Attributes:
    targets: int [B_u] hard labels or float [B_u, C] distributions (no gradient).
    weight: float [B_u], each row's weight in the consistency loss (a mask or soft).
    state: the method's statistics after this batch (its `TrainState.extra` entry).
    metrics: scalars the method reports (thresholds, statistics).
  """
  targets: jax.Array
  weight: jax.Array
  state: Any
  metrics: dict


def validate_common(config, name: str) -> None:
  """`<name>.lambda_u` >= 0: the fields every member has."""
  block = config[name]
  errors.require(block.lambda_u >= 0, f'{name}.lambda_u', block.lambda_u, 'must be >= 0')


def validate_fraction(config, field: str, *, upper_open: bool = False) -> None:
  """`config.<field>` in [0, 1] (or [0, 1) with `upper_open`: a momentum)."""
  block, leaf = field.split('.')
  value = config[block][leaf]
  ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
  errors.require(ok, field, value, 'must be in [0, 1)' if upper_open else 'must be in [0, 1]')


def probabilities(logits):
  """softmax over the classes, float32 at least (USB's `compute_prob`).

  The step passes it constants (the weak and labeled logits under `stop_gradient`,
  once, in `objective`), as USB's `compute_prob(logits.detach())`.
  """
  return jax.nn.softmax(losses.at_least_float32(logits))


def fixed_threshold_mask(probs, p_cutoff):
  """1.0 where the largest probability reaches `p_cutoff` (USB's FixedThresholdingHook), else 0.0."""
  return (jnp.max(probs, axis=-1) >= p_cutoff).astype(probs.dtype)


def pseudo_labels(source, *, hard: bool, temperature: float = 1.0, from_logits: bool):
  """USB's PseudoLabelingHook.gen_ulb_targets: argmax, or a distribution.

  Args:
    source: logits or probabilities [B, C] (constants: the step's weak view).
    hard: the argmax of `source` (int32 [B]).
    temperature: soft targets from logits are softmax(logits / T).
    from_logits: whether `source` is logits; soft targets from probabilities are those
      probabilities unchanged (USB's `softmax=False`: T is not applied).
  """
  source = losses.at_least_float32(source)
  if hard:
    return jnp.argmax(source, axis=-1).astype(jnp.int32)
  return jax.nn.softmax(source / temperature) if from_logits else source


def consistency_cross_entropy(logits, targets, weight):
  """Mean over the batch of weight * CE(logits, targets) (USB's `consistency_loss(..., 'ce', mask)`).

  Args:
    logits: [B, C] of the strong view.
    targets: int [B] labels or [B, C] distributions (USB's `ce_loss` picks by shape).
    weight: [B], a row's weight (0/1 mask or soft); the sum is divided by B.
  """
  logits = losses.at_least_float32(logits)
  if targets.ndim == logits.ndim:
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  else:
    per_example = losses.cross_entropy_per_example(logits, targets)
  return jnp.mean(weight * per_example)


def ema(average, value, momentum):
  """momentum * average + (1 - momentum) * value (every running statistic of the family)."""
  return momentum * average + (1.0 - momentum) * value


def class_histogram(labels, num_classes, weight=None):
  """Normalised count of each class among `labels` (torch.bincount / its sum), optionally weighted.

  Rows of weight 0 do not count; with no row counted every entry is 0.
  """
  weight = jnp.ones(labels.shape, jnp.float32) if weight is None else weight
  counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(weight.astype(jnp.float32))
  total = jnp.sum(counts)
  return counts / jnp.where(total > 0, total, 1.0)


def init_distribution_alignment(num_classes: int):
  """DistAlignEMAHook's state: p_model unset (`None` in USB: the flag) and a uniform p_target."""
  return {'p_model': jnp.zeros((num_classes,), jnp.float32),
          'p_model_set': jnp.zeros((), jnp.bool_),
          'p_target': jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)}


def distribution_alignment(state, probs_unlabeled, probs_labeled, *, momentum, uniform: bool):
  """USB's DistAlignEMAHook.dist_align: update p_model (and p_target), then align.

  p_model is the first batch's mean probability, then its EMA; p_target stays uniform
  (`uniform`), else it is the EMA of the labeled rows' mean probability ('model').
  Aligned: p * (p_target + 1e-6) / (p_model + 1e-6), renormalised per row.

  Returns:
    (aligned probabilities [B, C], the state after this batch).
  """
  batch_mean = jnp.mean(probs_unlabeled, axis=0)
  p_model = jnp.where(state['p_model_set'], ema(state['p_model'], batch_mean, momentum), batch_mean)
  p_target = state['p_target']
  if not uniform:
    p_target = ema(p_target, jnp.mean(probs_labeled, axis=0), momentum)
  aligned = probs_unlabeled * (p_target + 1e-6) / (p_model + 1e-6)
  aligned = aligned / jnp.sum(aligned, axis=-1, keepdims=True)
  return aligned, {'p_model': p_model, 'p_model_set': jnp.ones((), jnp.bool_), 'p_target': p_target}


def plain_supervised(config, logits, labels, step, num_classes):
  """Mean CE of the labeled rows (every member but UDA with TSA)."""
  del config, step, num_classes
  return losses.cross_entropy(logits, labels), {}


# (config, weak logits, labeled logits, unlabeled part, method state, pool_size) -> Targets.
MakeTargets = Callable[..., Targets]
# (config, strong logits, Targets) -> (term already weighted, metrics).
Regulariser = Callable[..., tuple[jax.Array, dict]]


def objective(params, state, batch, *, config, name, num_classes, make_targets: MakeTargets,
              supervised, regulariser: Optional[Regulariser], pool_size):
  """The family's loss of one step and what it computed on the way (see the module docstring)."""
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  num_labeled, num_unlabeled = labeled['image'].shape[0], unlabeled['image'].shape[0]
  images = jnp.concatenate([labeled['image'], unlabeled['image'], unlabeled['strong_image']])
  logits, stats = common.train_forward(state, params, images, state.batch_stats,
                                       state.step_key(common.DROPOUT_UNLABELED))
  logits = losses.at_least_float32(logits)
  labeled_logits = logits[:num_labeled]
  weak_logits = jax.lax.stop_gradient(logits[num_labeled:num_labeled + num_unlabeled])
  strong_logits = logits[num_labeled + num_unlabeled:]
  made = make_targets(config, weak_logits, jax.lax.stop_gradient(labeled_logits), unlabeled,
                      state.extra[name], pool_size)
  supervised_loss, supervised_metrics = supervised(config, labeled_logits, labeled['label'], state.step,
                                                   num_classes)
  unsupervised = consistency_cross_entropy(strong_logits, made.targets, made.weight)
  loss = supervised_loss + config[name].lambda_u * unsupervised
  own_metrics = {**made.metrics, **supervised_metrics}
  if regulariser is not None:
    term, regulariser_metrics = regulariser(config, strong_logits, made)
    loss = loss + term
    own_metrics.update(regulariser_metrics)
  return loss, (stats, supervised_loss, unsupervised, made, own_metrics, labeled_logits, weak_logits)


def train_step(state, batch, *, config, num_classes, name: str, make_targets: MakeTargets,
               supervised=plain_supervised, regulariser: Optional[Regulariser] = None, pool_size=None):
  """One update of a family member. Pure: (state, batch) -> (state, metrics).

  Args:
    state: the TrainState; `state.extra[name]` holds the method's statistics.
    batch: {'labeled': {'image', 'label', ...}, 'unlabeled': {'image', 'strong_image', 'index', ...}}.
    config: the run configuration; `config[name].lambda_u` weighs the consistency loss.
    num_classes: number of classes.
    name: the method's name (its config block and its `extra` key).
    make_targets: the method's targets and weights from the weak view.
    supervised: `(config, logits, labels, step, num_classes) -> (loss, metrics)`.
    regulariser: an extra term on the strong view, weighted by the method.
    pool_size: the unlabeled pool's size (FlexMatch's unused entries).
  """
  labeled, unlabeled = batch['labeled'], batch['unlabeled']
  loss_fn = functools.partial(objective, state=state, batch=batch, config=config, name=name,
                              num_classes=num_classes, make_targets=make_targets, supervised=supervised,
                              regulariser=regulariser, pool_size=pool_size)
  (loss, (stats, supervised_loss, unsupervised, made, own_metrics, labeled_logits, weak_logits)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  metrics = {
      'loss': loss,
      'supervised_loss': supervised_loss,
      'consistency_loss': unsupervised,
      'consistency_weight': jnp.asarray(config[name].lambda_u, jnp.float32),
      'mask_fraction': jnp.mean(made.weight),  # USB's util_ratio.
      'learning_rate': options.learning_rate_schedule(config)(state.step),
      'train_accuracy': common.accuracy(labeled_logits, labeled['label']),
      **own_metrics,
  }
  new_state, metrics = common.finish_step(state, grads, stats, metrics,
                                          scored=[('pseudo_label_accuracy', weak_logits, unlabeled)])
  return new_state.replace(extra=dict(new_state.extra, **{name: made.state})), metrics


def usb_presets(name: str, method_fields: dict):
  """A member's presets on USB's CIFAR/SVHN/STL-10 recipe and on digits.

  Each dataset's preset is USB's classic-CV recipe where this framework has the field:
  WRN-28-2, SGD lr 0.03 momentum 0.9 with coupled weight decay, 64 labeled + 448 unlabeled
  (uratio 7), 2^20 steps, the EMA of the weights (0.999) evaluated and reported, an
  evaluation (and a checkpoint) every 5120 steps, a log line every 256. Not the
  same: USB's SGD is Nesterov, skips batch norm and biases in the decay, and its cosine
  ends at cos(7 pi / 16) = 0.2 of the peak (here: `cosine` to 0); STL-10 runs
  WRN-37-2 in USB (here WRN-28-2). Digits (1000 steps of 64 + 64, configs/digits.py)
  keep that batch (uratio 1, so every digits row sees the same examples per step;
  `unlabeled_batch_size=448` is USB's 7) and its schedule; only the method's fields.
  """
  usb = {'model': 'wrn28_2', 'learning_rate': 0.03, 'momentum': 0.9, 'weight_decay': 5e-4,
         'lr_schedule': 'cosine', 'warmup_steps': 0, 'num_train_steps': 2 ** 20,
         'labeled_batch_size': 64, 'unlabeled_batch_size': 7 * 64,
         'ema.decay': 0.999, 'ema.headline': True, 'log_every_steps': 256, 'eval_every_steps': 5120,
         'checkpoint_every_steps': 5120, **method_fields}
  by_dataset = {'digits': dict(method_fields), 'cifar10': usb, 'svhn': usb, 'stl10': usb,
                'cifar100': {**usb, 'weight_decay': 1e-3}}
  return {dataset: {name: fields} for dataset, fields in by_dataset.items()}


def strong_view(config) -> bool:
  """Every member reads the strong view."""
  del config
  return True
