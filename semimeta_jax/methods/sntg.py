"""Smooth Neighbors on Teacher Graphs (Luo et al., CVPR 2018), an option of the consistency methods.

The teacher's hard predictions define a graph over the batch: two examples are
neighbours when their labels agree (W = 1), and the student's pooled features of
neighbours are pulled together while those of non-neighbours are pushed at least a
margin apart. As the authors' code (xinmei9322/SNTG, `train_emb.py`):
  * labels: argmax of the teacher's target; the true label on labeled examples;
  * pairs: the first half of a batch against its second half (example i with
    example i + B // 2; an odd batch leaves one example out). The authors' batch is
    drawn from the whole shuffled training set, so its pairs are labeled or
    unlabeled in the data's proportions; here the batch is [labeled; unlabeled], and
    its rows are first put in a random order drawn from the step's key
    (`pair_order`), so that each pair's two members are two rows of the batch drawn
    without replacement: labeled-labeled, labeled-unlabeled and unlabeled-unlabeled
    pairs in the batch's own proportions (with L labeled of B rows, L (L - 1) /
    (B (B - 1)) of the pairs are labeled-labeled), not every pair labeled-unlabeled;
  * d^2 = mean over feature dimensions of (h_i - h_j)^2, d = sqrt(d^2);
  * loss = mean over pairs of W d^2 + (1 - W) max(0, m - d)^2, m = `sntg.margin`;
  * added to the method's loss with weight `sntg.weight` (the authors' coeff_embed,
    0.4) times the host method's full consistency weight w(t) = ramp(t) * w_max
    (`train_emb.py`: `train_loss += unsup_weight * emb_loss * coeff_embed`, with
    `unsup_weight = rampup_value * scaled_unsup_weight_max`). Each host passes the
    weight it puts on its own consistency term: on the digits presets of Pi, TE and
    MT (w_max = 10) the graph term is 4 * ramp(t) * loss; VAT's w_max is 1.
Gradients reach the features of both halves; the labels are constants.

The features are the globally pooled ones of the student's forward
(`common.train_forward_with_features`, the same pass as the student's logits). The
teacher's target is each method's: the second view (Pi-model), the ensemble (Temporal
Ensembling; an example not yet ensembled takes the network's own prediction), the
teacher network (Mean Teacher), the clean prediction (VAT, where the batch is the
labeled batch followed by the unlabeled one). The authors' code has the Pi-model and
Temporal Ensembling with SNTG only; Mean Teacher + SNTG and VAT + Ent + SNTG are
compositions of this framework.
"""

import jax
import jax.numpy as jnp
import ml_collections

from semimeta_jax import errors
from semimeta_jax import schedules
from semimeta_jax.methods import common

# Sub-tag of the step's NOISE key from which the pairs' order is drawn (no method uses it otherwise).
PAIRS_TAG = 0x5A7

# The methods whose objective calls `regularize`: each has a teacher target.
METHODS_WITH_TEACHER = ('pi_model', 'temporal_ensembling', 'mean_teacher', 'vat')

renamed_fields = {}


def config_blocks():
  """The `sntg` block, read by the methods of `METHODS_WITH_TEACHER`."""
  return {'sntg': ml_collections.ConfigDict({
      'weight': 0.0,  # 0 = off; the authors' 0.4, times the host's consistency weight w(t).
      'margin': 1.0,  # Smallest feature distance between non-neighbours.
  })}


def validate(config) -> None:
  """`sntg.weight >= 0` (> 0 only with a method that has a teacher target), `sntg.margin > 0`.

  Raises:
    errors.ConfigError: naming the field.
  """
  block = config.sntg
  errors.require(block.weight >= 0, 'sntg.weight', block.weight, 'must be >= 0 (0 = off)')
  errors.require(block.weight == 0 or config.method in METHODS_WITH_TEACHER, 'sntg.weight',
                 block.weight, f'needs a method with a teacher target, one of {METHODS_WITH_TEACHER} '
                 f'(config.method={config.method!r})')
  errors.require(block.margin > 0, 'sntg.margin', block.margin, 'must be > 0')


def enabled(config) -> bool:
  """Whether the run adds the SNTG term."""
  return config.sntg.weight > 0


def hard_labels(target_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The teacher's argmax on every row, the true label on the first `len(labels)` rows (constant)."""
  predicted = jnp.argmax(jax.lax.stop_gradient(target_logits), axis=-1).astype(labels.dtype)
  return jax.lax.stop_gradient(predicted.at[:labels.shape[0]].set(labels))


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(x) with a zero (not infinite) gradient at x = 0: two identical features stay finite."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def graph_loss(features: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
  """Mean over pairs (i, i + B // 2) of W d^2 + (1 - W) max(0, margin - d)^2.

  Args:
    features: [B, D] features; gradients flow into both halves.
    labels: [B] integer labels (held constant).
    margin: the distance non-neighbours are pushed to.

  Returns:
    The scalar loss, in at least float32.
  """
  half = features.shape[0] // 2
  features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  distance2 = jnp.mean(jnp.square(features[:half] - features[half:2 * half]), axis=-1)
  neighbours = (labels[:half] == labels[half:2 * half]).astype(features.dtype)
  pushed = jnp.square(jnp.maximum(margin - _safe_sqrt(distance2), 0.0))
  return jnp.mean(neighbours * distance2 + (1.0 - neighbours) * pushed)


def pair_order(state, batch_size: int) -> jax.Array:
  """The random order of the batch's rows before pairing, drawn from the step's key."""
  return jax.random.permutation(state.step_key(common.NOISE, PAIRS_TAG), batch_size)


def rampup(config, step) -> jax.Array:
  """r(t) in [0, 1]: the consistency ramp-up of `config` without its maximum weight."""
  unit = ml_collections.ConfigDict({'consistency_weight': 1.0,
                                    'consistency_rampup': config.consistency_rampup,
                                    'consistency_rampup_steps': config.consistency_rampup_steps})
  return schedules.consistency_weight_schedule(unit)(step)


def student_forward(config, state, params, x, batch_stats, dropout_key):
  """`common.train_forward`, with the pooled features of the same pass when SNTG is on.

  Returns:
    (logits, features or None when SNTG is off, batch statistics).
  """
  if not enabled(config):
    return (lambda logits, stats: (logits, None, stats))(
        *common.train_forward(state, params, x, batch_stats, dropout_key))
  return common.train_forward_with_features(state, params, x, batch_stats, dropout_key)


def regularize(loss, config, state, consistency_weight, features, target_logits, labels):
  """`loss` plus the weighted SNTG term when `config.sntg.weight > 0`.

  The term is `sntg.weight` * `consistency_weight` * the graph loss over the pairs of
  the batch's rows in the random order `pair_order`.

  Args:
    loss: the method's loss.
    config: the run configuration (the `sntg` block).
    state: the TrainState (the step's key orders the pairs).
    consistency_weight: the host's weight on its consistency term at this step, w(t) =
      ramp(t) * w_max (traced).
    features: [B, D] pooled features of the student's forward (`student_forward`).
    target_logits: [B, K] the teacher's target (logits or probabilities: only the argmax is read).
    labels: [L] true labels of the first L rows.

  Returns:
    (loss, aux tail): the tail is `({'sntg_loss': unweighted term, 'sntg_weight': its weight},)`
    when SNTG is on and `()` when it is off, so an objective's auxiliary outputs keep their
    layout for every run without SNTG (`metrics` reads the tail back).
  """
  if not enabled(config):
    return loss, ()
  order = pair_order(state, features.shape[0])
  term = graph_loss(features[order], hard_labels(target_logits, labels)[order], config.sntg.margin)
  weight = config.sntg.weight * consistency_weight
  return loss + weight * term, ({'sntg_loss': term, 'sntg_weight': weight},)


def metrics(aux_tail) -> dict:
  """The SNTG metrics of a `regularize` aux tail ({} when SNTG is off)."""
  return dict(aux_tail[0]) if aux_tail else {}


def joined(*features):
  """The features of several forwards as one batch, in order (None when SNTG is off)."""
  return None if any(f is None for f in features) else jnp.concatenate(features)


# {preset: the method preset it extends}: each with the paper's SNTG weight.
_EXTENDED_PRESETS = {'pi_sntg': 'pi_model', 'te_sntg': 'temporal_ensembling',
                     'mt_sntg': 'mean_teacher', 'vat_ent_sntg': 'vat_ent'}


def derived_presets(dataset: str, method_presets) -> dict:
  """{'pi_sntg', 'te_sntg', 'mt_sntg', 'vat_ent_sntg'}: the methods' presets plus `sntg.weight` 0.4.

  Args:
    dataset: e.g. 'digits'.
    method_presets: {preset name: {dotted field: value}} of the methods for `dataset`.
  """
  del dataset  # The methods' presets carry it.
  return {name: {**method_presets[base_name], 'sntg.weight': 0.4}
          for name, base_name in _EXTENDED_PRESETS.items() if base_name in method_presets}


def describe(config) -> str:
  """The SNTG term in the run plan ('' when off)."""
  if not enabled(config):
    return ''
  return f'SNTG weight {config.sntg.weight} x consistency weight, margin {config.sntg.margin}'
