"""FreeMatch (Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning",
ICLR 2023), as USB's `algorithms/freematch` defines it.

Self-adaptive thresholding (USB's FreeMatchThresholingHook), with p = softmax(f(weak))
(no gradient) over the whole global batch and m = `ema_p` (0.999):
  1. FIRST the statistics take this batch: time_p <- m time_p + (1 - m) mean(max p)
     (the 0.8 quantile with `use_quantile`; clipped to [0, 0.95] with `clip_thresh`),
     p_model <- m p_model + (1 - m) mean(p), label_hist <- m label_hist + (1 - m)
     hist(argmax p); all start at 1/C;
  2. THEN mask = max p >= time_p * p_model[argmax p] / max(p_model).
Targets: the argmax of the weak logits (`hard_label`), else softmax(logits / T).
The fairness term (USB's `entropy_loss`), only when some row is kept: over the kept
rows of the strong view, with q = softmax(f(strong)), h = hist(argmax q) among them,
  mod_p = SumNorm(p_model / label_hist), mod_q = SumNorm(mean(q) / h) (1/0 -> 0),
  ent = + sum_c mod_p_c log(mod_q_c + 1e-12),
the code's sign: the NEGATIVE cross-entropy of mod_q against mod_p (the paper's
-H(mod_p, mod_q)), added as + ent_loss_ratio * ent. The histograms carry no gradient;
mean(q), and so its normalisation, does.
  loss = CE(labeled) + lambda_u * mean over B_u of mask * CE(f(strong), target)
         + ent_loss_ratio * ent.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import losses
from semimeta_jax.methods import base
from semimeta_jax.methods import confidence

NAME = 'freematch'


def config_blocks():
  """The `freematch` block: USB's classic-CV settings."""
  return {NAME: ml_collections.ConfigDict({
      'lambda_u': 1.0,  # Weight of the consistency loss (USB's ulb_loss_ratio, default 1).
      'ent_loss_ratio': 0.001,  # Weight of the fairness term (USB's configs; its argument default 0.01).
      'ema_p': 0.999,  # Momentum of time_p, p_model and label_hist.
      'use_quantile': False,  # time_p follows the 0.8 quantile of max p instead of its mean.
      'clip_thresh': False,  # time_p clipped to [0, 0.95].
      'hard_label': True,  # Argmax targets; False: softmax(weak logits / T).
      'T': 0.5,  # Temperature of soft targets.
  })}


def validate(config) -> None:
  """Weights >= 0, `freematch.ema_p` in [0, 1), `freematch.T` > 0."""
  block = config[NAME]
  confidence.validate_common(config, NAME)
  confidence.validate_fraction(config, f'{NAME}.ema_p', upper_open=True)
  errors.require(block.ent_loss_ratio >= 0, f'{NAME}.ent_loss_ratio', block.ent_loss_ratio, 'must be >= 0')
  errors.require(block.T > 0, f'{NAME}.T', block.T, 'must be > 0')


def init_extra_state(config, *, num_train: int, num_classes: int):
  """time_p, p_model and label_hist at 1/C (USB's initial values)."""
  del config, num_train
  uniform = jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
  return {NAME: {'time_p': jnp.asarray(1.0 / num_classes, jnp.float32), 'p_model': uniform,
                 'label_hist': uniform}}


def update_statistics(state, probs, *, momentum, use_quantile: bool, clip_thresh: bool):
  """USB's FreeMatchThresholingHook.update on one (global) batch of weak probabilities."""
  max_probs, predicted = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
  level = jnp.quantile(max_probs, 0.8) if use_quantile else jnp.mean(max_probs)
  time_p = confidence.ema(state['time_p'], level, momentum)
  if clip_thresh:
    time_p = jnp.clip(time_p, 0.0, 0.95)
  return {'time_p': time_p,
          'p_model': confidence.ema(state['p_model'], jnp.mean(probs, axis=0), momentum),
          'label_hist': confidence.ema(state['label_hist'],
                                       confidence.class_histogram(predicted, probs.shape[-1]), momentum)}


def self_adaptive_mask(probs, state):
  """max p >= time_p * p_model[argmax p] / max(p_model), with the statistics after this batch."""
  max_probs, predicted = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
  scaled = state['p_model'] / jnp.max(state['p_model'])
  return (max_probs >= state['time_p'] * scaled[predicted]).astype(probs.dtype)


def _inverse_or_zero(x):
  """1 / x with 1 / 0 = 0 (USB's `replace_inf_to_zero(1 / x)`)."""
  return jnp.where(x == 0, 0.0, 1.0 / jnp.where(x == 0, 1.0, x))


def fairness(mask, strong_logits, p_model, label_hist):
  """USB's `entropy_loss` over the rows with mask 1 (0 when none): + sum mod_p log(mod_q + 1e-12)."""
  keep = (mask > 0).astype(jnp.float32)
  kept = jnp.sum(keep)
  probs = jax.nn.softmax(losses.at_least_float32(strong_logits))
  hist = confidence.class_histogram(jnp.argmax(probs, axis=-1), probs.shape[-1], weight=keep)
  mod_p = p_model * _inverse_or_zero(label_hist)
  mod_p = jax.lax.stop_gradient(mod_p / jnp.sum(mod_p))
  mean_q = jnp.sum(keep[:, None] * probs, axis=0) / jnp.where(kept > 0, kept, 1.0)
  mod_q = mean_q * jax.lax.stop_gradient(_inverse_or_zero(hist))
  mod_q = mod_q / jnp.where(kept > 0, jnp.sum(mod_q), 1.0)
  return jnp.where(kept > 0, jnp.sum(mod_p * jnp.log(mod_q + 1e-12)), 0.0)


def make_targets(config, weak_logits, labeled_logits, unlabeled, state, pool_size):
  """The statistics updated with this batch first, then the mask and the targets."""
  del labeled_logits, unlabeled, pool_size
  block = config[NAME]
  probs = confidence.probabilities(weak_logits)
  state = update_statistics(state, probs, momentum=block.ema_p, use_quantile=block.use_quantile,
                            clip_thresh=block.clip_thresh)
  mask = self_adaptive_mask(probs, state)
  targets = confidence.pseudo_labels(weak_logits, hard=block.hard_label, temperature=block.T,
                                     from_logits=True)
  return confidence.Targets(targets, mask, state, {'time_p': state['time_p']})


def regulariser(config, strong_logits, made):
  """ent_loss_ratio * the fairness term, with this batch's p_model and label_hist."""
  term = fairness(made.weight, strong_logits, made.state['p_model'], made.state['label_hist'])
  return config[NAME].ent_loss_ratio * term, {'fairness_loss': term}


train_step = functools.partial(confidence.train_step, name=NAME, make_targets=make_targets,
                               regulariser=regulariser)

# USB's classic-CV configs (every dataset and label count): ema_p 0.999, ent_loss_ratio 0.001,
# no quantile, no clipping, hard labels; lambda_u its default 1.
PRESETS = confidence.usb_presets(
    NAME, {f'{NAME}.lambda_u': 1.0, f'{NAME}.ent_loss_ratio': 0.001, f'{NAME}.ema_p': 0.999,
           f'{NAME}.use_quantile': False, f'{NAME}.clip_thresh': False, f'{NAME}.hard_label': True})

METHOD = base.Method(
    name=NAME, train_step=train_step, uses_unlabeled=True, strong_view=confidence.strong_view,
    config_blocks=config_blocks, validate=validate, init_extra_state=init_extra_state,
    presets=PRESETS,
    describe=lambda config: (f'lambda_u {config[NAME].lambda_u}, ent_loss_ratio '
                             f'{config[NAME].ent_loss_ratio}, ema_p {config[NAME].ema_p}'))
