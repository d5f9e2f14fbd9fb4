"""The teacher's feedback in Meta Pseudo Labels: the exact meta-gradient, the paper's, the released code's.

A teacher T_phi labels the unlabeled batch; the student S_theta takes one step on
those labels; the teacher learns from how that step changed the student's labeled
loss L_l. Each variant is written here as a scalar function of the teacher's logits
on the unlabeled batch (a surrogate), whose gradient in those logits is the
feedback; the step pulls it back through the teacher with the teacher's other terms
in one vector-Jacobian product.

- `exact`: soft labels y = softmax(T_phi(x_u) / tau), the student's virtual step
  theta~ = theta - alpha grad_theta L_u(theta; y) on the soft-target cross-entropy
  L_u, and g_y = d L_l(theta~) / d y by the hypergradient engine
  (`hypergrad.hypergradient(..., inner_loss_kind='cross_entropy')`). The teacher's
  meta-gradient is the VJP of phi -> y(phi) applied to g_y, the gradient of the
  surrogate <stop_gradient(g_y), y(phi)>. SemiMeta is the case whose teacher is a
  table of per-example labels (y itself is the parameter).
- `paper` (Pham et al., CVPR 2021, Algorithm 1): a hard label y^ sampled from the
  teacher, the student's real step on CE(y^, S(x_u)), and
  h = eta_S <grad L_l(theta'), grad_theta CE(y^, S(x_u; theta))>; the teacher's
  feedback is h grad_phi CE(y^, T_phi(x_u)). A first-order Taylor expansion gives
  h ~ L_l(theta) - L_l(theta') (old - new): with that sign, h grad_phi CE(y^, T) is a
  one-sample score-function estimate of the gradient of the expected L_l(theta'),
  up to the factor 1 / B_u that the batch-mean CE brings (tests/test_mpl_feedback.py).
  `h_sign` = -1 flips it (the released code's new - old).
- `released_code`: the teacher term h * CE(stop_gradient(softmax(T)), T) with
  h = L_l(new) - L_l(old) minus a moving baseline, as the released
  meta_pseudo_labels code writes it. Its gradient in T is softmax(T) - softmax(T) = 0,
  so as released the teacher learns from its own losses alone; the term is kept so
  that the run shows it.
"""

import jax
import jax.numpy as jnp
import optax

from semimeta_jax import losses
from semimeta_jax.methods import hypergrad

FEEDBACKS = ('exact', 'paper', 'released_code', 'none')
# The engine's modes for the cross-entropy inner loss (`exact` feedback).
LABEL_GRADIENT_MODES = hypergrad.MODES_FOR_INNER_LOSS['cross_entropy']


def soft_labels(teacher_logits: jax.Array, temperature) -> jax.Array:
  """y = softmax(T(x_u) / tau), in at least float32."""
  return jax.nn.softmax(losses.at_least_float32(teacher_logits) / temperature)


def sampled_labels(key: jax.Array, teacher_logits: jax.Array, temperature) -> jax.Array:
  """One hard label per row drawn from softmax(T(x_u) / tau) (int32)."""
  return jax.random.categorical(key, losses.at_least_float32(teacher_logits) / temperature,
                                axis=-1).astype(jnp.int32)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_c targets_c log softmax(logits)_c (the student's L_u)."""
  log_probs = jax.nn.log_softmax(losses.at_least_float32(logits))
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def label_gradient(mode: str, student_apply, theta, x_l, y_l, x_u, targets, *, alpha,
                   inner_steps: int = 1, epsilon: float = 1e-2) -> jax.Array:
  """g_y = d L_l(theta~(y)) / d y for the cross-entropy inner loss, by the engine's `mode`.

  Args:
    mode: static; one of LABEL_GRADIENT_MODES.
    student_apply: `(params, x) -> logits` of the student inside the meta objective.
    theta: the student's parameters.
    x_l, y_l: the labeled batch (integer labels).
    x_u: the unlabeled batch.
    targets: the soft labels y, [B_u, C].
    alpha: the virtual step size.
    inner_steps: static K (unrolled, `exact` only).
    epsilon: static; the finite-difference step relative to ||v||.

  Returns:
    g_y, [B_u, C].
  """
  # The soft labels are not the student's own prediction: theta~ != theta.
  return hypergrad.hypergradient(mode, student_apply, theta, x_l, y_l, x_u, targets, alpha=alpha,
                                 inner_steps=inner_steps, epsilon=epsilon,
                                 theta_tilde_is_theta=False, inner_loss_kind='cross_entropy')


def exact_surrogate(teacher_logits_u: jax.Array, grad_labels: jax.Array, temperature) -> jax.Array:
  """<stop_gradient(g_y), softmax(T / tau)>: its gradient is the VJP of T -> y(T) applied to g_y."""
  return jnp.sum(jax.lax.stop_gradient(grad_labels) * soft_labels(teacher_logits_u, temperature))


def paper_coefficient(new_labeled_grads, unlabeled_grads, student_lr) -> jax.Array:
  """h = eta_S <grad L_l(theta'), grad_theta CE(y^, S(x_u; theta))> (the derivation's sign)."""
  return student_lr * optax.tree.vdot(new_labeled_grads, unlabeled_grads)


def paper_surrogate(teacher_logits_u: jax.Array, hard_labels: jax.Array, coefficient,
                    temperature) -> jax.Array:
  """h * CE(y^, T / tau) averaged over the batch, h held constant."""
  scaled = losses.at_least_float32(teacher_logits_u) / temperature
  return jax.lax.stop_gradient(coefficient) * losses.cross_entropy(scaled, hard_labels)


def released_code_coefficient(new_loss, old_loss, baseline, *, baseline_decay):
  """(h, new baseline): h = (new - old) - b with b moved towards new - old first.

  b <- b - (1 - decay) (b - (new - old)), then h = (new - old) - b, held constant.
  """
  difference = new_loss - old_loss
  baseline = baseline - (1.0 - baseline_decay) * (baseline - difference)
  return jax.lax.stop_gradient(difference - baseline), jax.lax.stop_gradient(baseline)


def released_code_surrogate(teacher_logits_u: jax.Array, coefficient) -> jax.Array:
  """h * CE(stop_gradient(softmax(T)), T) over the batch: a gradient of zero in T, as released."""
  own = jax.lax.stop_gradient(jax.nn.softmax(losses.at_least_float32(teacher_logits_u)))
  return jax.lax.stop_gradient(coefficient) * soft_cross_entropy(teacher_logits_u, own)
