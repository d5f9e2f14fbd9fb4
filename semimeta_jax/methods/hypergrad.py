"""The pseudo-label hypergradient of SemiMeta, in six ways, and the pseudo-label update.

Algorithm 1 of the paper, steps 2-7, for any model given as `apply_fn(params, x) -> logits`:

  ytil   = softmax(f(x_u; theta))                                    (no gradient)
  L_u    = (1/B_u) sum_i ||softmax(f(x_u_i; theta)) - ytil_i||^2      (inner loss)
  theta~ = theta - alpha * grad_theta L_u(theta, ytil)                (virtual step, K times)
  L_l    = mean_k CE(f(x_l_k; theta~), y_k)                           (outer loss)
  g      = d L_l(theta~(ytil)) / d ytil                               (hypergradient)
  yhat   = project(ytil - beta * g)

`hypergradient(mode, ...)` computes g by one of:
  exact              reverse-over-reverse through K unrolled virtual steps;
  first_order        -alpha d/dytil <sg(grad L_l(theta)), grad_theta L_u(theta, ytil)>;
  jvp                (2 alpha / B_u) J_i u with u = grad L_l(theta~), one forward-mode product;
                     exact for K = 1 because grad_theta L_u is affine in ytil;
  finite_difference  the official central difference of softmax(f) along v = grad L_l,
                     eps = epsilon / ||v||, rescaled to exact-hypergradient units;
  neumann            c sum_{k<K} (I - c J J^T)^k J v in output space: equal to `exact`
                     with K steps where the residual of L_u is zero (evaluation-mode
                     meta forward), at the memory of K = 1;
  implicit           (J J^T + damping I)^{-1} J v by conjugate gradient: the K -> infinity
                     limit, the implicit-function-theorem hypergradient.
(`hypergrad_output_space` derives the last two; with a non-zero residual they are
Gauss-Newton approximations.)

The inner loss is SemiMeta's squared error by default (`inner_loss='probability_mse'`).
`inner_loss='cross_entropy'` takes L_u = -(1/B_u) sum_i sum_c ytil_ic log p_ic(theta)
instead (soft-target cross-entropy, Meta Pseudo Labels' student step). Its theta-gradient
is linear in ytil too, d theta~ / d ytil_ic = (alpha / B_u) grad_theta log p_ic, so the
K = 1 formulas hold with log-softmax outputs and half the scale: `jvp` is
g = (alpha / B_u) J_log u and `finite_difference` differences log-softmax outputs.
`neumann` and `implicit` do not carry over: they use the Gauss-Newton Hessian of the
squared error, (2 / B_u) J^T J, while the cross-entropy's is (1 / B_u) J_z^T (diag p -
p p^T) J_z in the logits' Jacobian J_z, and its residual is zero only where ytil is the
network's own prediction.

Every function is pure and jit-able; static arguments are keyword-only Python values.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from semimeta_jax.methods import hypergrad_output_space
from semimeta_jax import losses

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

MODES = ('exact', 'first_order', 'jvp', 'finite_difference', 'neumann', 'implicit')
# The modes that follow K > 1 virtual steps; the others are K = 1 formulas.
MULTI_STEP_MODES = ('exact', 'neumann')
INNER_LOSSES = ('probability_mse', 'cross_entropy')
# The modes whose derivation holds for each inner loss (see the module docstring).
MODES_FOR_INNER_LOSS = {
    'probability_mse': MODES,
    'cross_entropy': ('exact', 'first_order', 'jvp', 'finite_difference'),
}
# d grad_theta L_u / d ytil = -(scale / B_u) J^T, J the Jacobian of the outputs of `_unlabeled_outputs`.
_JACOBIAN_SCALE = {'probability_mse': 2.0, 'cross_entropy': 1.0}
PROJECTIONS = ('relu_normalize', 'simplex')


def inner_loss(params: Params, apply_fn: ApplyFn, x_u: jax.Array, ytil: jax.Array,
               kind: str = 'probability_mse') -> jax.Array:
  """L_u: the unlabeled loss of `params` against the pseudo-labels (`kind` one of INNER_LOSSES)."""
  if kind == 'probability_mse':
    return losses.probability_mse(apply_fn(params, x_u), ytil)
  if kind == 'cross_entropy':
    log_probs = jax.nn.log_softmax(losses.at_least_float32(apply_fn(params, x_u)))
    return -jnp.mean(jnp.sum(ytil * log_probs, axis=-1))
  raise ValueError(f'Unknown inner loss {kind!r}; expected one of {INNER_LOSSES}.')


def outer_loss(params: Params, apply_fn: ApplyFn, x_l: jax.Array, y_l: jax.Array) -> jax.Array:
  """L_l: the labeled cross-entropy of `params`."""
  return losses.cross_entropy(apply_fn(params, x_l), y_l)


def virtual_step(params: Params, apply_fn: ApplyFn, x_u: jax.Array, ytil: jax.Array, *,
                 alpha: jax.Array, inner_steps: int = 1, inner_loss_kind: str = 'probability_mse') -> Params:
  """theta~: `inner_steps` SGD steps of size `alpha` on L_u, differentiable in `ytil`."""
  for _ in range(inner_steps):
    grads = jax.grad(inner_loss)(params, apply_fn, x_u, ytil, inner_loss_kind)
    params = jax.tree.map(lambda p, g: p - alpha * g, params, grads)
  return params


def exact(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha, inner_steps: int = 1,
          inner_loss_kind: str = 'probability_mse'):
  """Exact hypergradient by differentiating through the unrolled virtual steps."""

  def bilevel_objective(y):
    adapted = virtual_step(params, apply_fn, x_u, y, alpha=alpha, inner_steps=inner_steps,
                           inner_loss_kind=inner_loss_kind)
    return outer_loss(adapted, apply_fn, x_l, y_l)

  return jax.grad(bilevel_objective)(ytil)


def first_order(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha,
                inner_loss_kind: str = 'probability_mse'):
  """The paper's first-order approximation: L_l(theta~) ~ L_l(theta) + <grad L_l(theta), theta~ - theta>."""
  v = jax.lax.stop_gradient(jax.grad(outer_loss)(params, apply_fn, x_l, y_l))

  def linearised_objective(y):
    inner_grads = jax.grad(inner_loss)(params, apply_fn, x_u, y, inner_loss_kind)
    return -alpha * optax.tree.vdot(v, inner_grads)

  return jax.grad(linearised_objective)(ytil)


def _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, *, alpha, theta_tilde_is_theta,
                     inner_steps: int = 1, loop_unroll: int = 1,
                     inner_loss_kind: str = 'probability_mse'):
  """u = grad L_l(theta~) after `inner_steps` virtual steps, skipped where known to be a no-op.

  Nothing differentiates through theta~ here, so the steps run in a loop whose
  memory does not grow with their number.
  """
  if theta_tilde_is_theta:
    return jax.grad(outer_loss)(params, apply_fn, x_l, y_l)
  adapted = hypergrad_output_space.gradient_descent_endpoint(
      lambda p: inner_loss(p, apply_fn, x_u, ytil, inner_loss_kind), params, alpha=alpha,
      steps=inner_steps,
      unroll=loop_unroll)
  return jax.grad(outer_loss)(adapted, apply_fn, x_l, y_l)


def _unlabeled_probabilities(apply_fn, x_u):
  """params -> softmax(f(x_u; params)) in at least float32: the forward inside L_u."""
  return lambda p: jax.nn.softmax(losses.at_least_float32(apply_fn(p, x_u)))


def _unlabeled_outputs(apply_fn, x_u, inner_loss_kind: str):
  """The outputs L_u is linear in ytil through: probabilities (squared error) or log-probabilities."""
  if inner_loss_kind == 'cross_entropy':
    return lambda p: jax.nn.log_softmax(losses.at_least_float32(apply_fn(p, x_u)))
  return _unlabeled_probabilities(apply_fn, x_u)


def _require_squared_error(mode: str, inner_loss_kind: str):
  if inner_loss_kind != 'probability_mse':
    raise ValueError(f'Hypergradient mode {mode!r} holds for the squared-error inner loss only, '
                     f'not {inner_loss_kind!r}; use one of '
                     f'{MODES_FOR_INNER_LOSS[inner_loss_kind]} (see hypergrad\'s docstring).')


def jvp(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha,
        theta_tilde_is_theta: bool = False, inner_loss_kind: str = 'probability_mse'):
  """Exact K = 1 hypergradient in forward mode: g_i = (2 alpha / B_u) J_i u.

  J_i is the Jacobian of softmax(f(x_u_i; .)) at theta (the forward of L_u) and
  u = grad L_l(theta~). Because grad_theta L_u is affine in the pseudo-labels,
  d theta~ / d ytil_i = (2 alpha / B_u) J_i^T for every ytil, so this is exact.
  With the cross-entropy inner loss, J_i is that of log_softmax and the scale
  alpha / B_u.

  Args:
    theta_tilde_is_theta: static; set when ytil is the prediction of this very
      forward (the official evaluation-mode meta step), where grad L_u = 0 and
      theta~ = theta, to skip the virtual step.
  """
  u = _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                       theta_tilde_is_theta=theta_tilde_is_theta, inner_loss_kind=inner_loss_kind)
  _, jacobian_times_u = jax.jvp(_unlabeled_outputs(apply_fn, x_u, inner_loss_kind), (params,), (u,))
  return (_JACOBIAN_SCALE[inner_loss_kind] * alpha / x_u.shape[0]) * jacobian_times_u


def finite_difference_direction(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *,
                                alpha, epsilon: float, theta_tilde_is_theta: bool = False,
                                inner_loss_kind: str = 'probability_mse'):
  """The official direction d = (softmax(f(theta + eps v)) - softmax(f(theta - eps v))) / eps.

  v = grad L_l(theta~) and eps = epsilon / ||v||; d approximates 2 J_i v (log_softmax
  in place of softmax with the cross-entropy inner loss).
  """
  v = _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                       theta_tilde_is_theta=theta_tilde_is_theta, inner_loss_kind=inner_loss_kind)
  # A zero labeled gradient (a perfect fit) gives d = 0, not a division by zero.
  eps = epsilon / jnp.maximum(optax.tree.norm(v), jnp.finfo(jnp.float32).tiny)
  shifted = lambda sign: jax.tree.map(lambda p, g: p + sign * eps * g, params, v)
  outputs = _unlabeled_outputs(apply_fn, x_u, inner_loss_kind)
  return (outputs(shifted(1.0)) - outputs(shifted(-1.0))) / eps


def finite_difference(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha,
                      epsilon: float, theta_tilde_is_theta: bool = False,
                      inner_loss_kind: str = 'probability_mse'):
  """The official estimator in hypergradient units: g = (alpha / B_u) d (alpha / (2 B_u) d for CE)."""
  d = finite_difference_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                                  epsilon=epsilon, theta_tilde_is_theta=theta_tilde_is_theta,
                                  inner_loss_kind=inner_loss_kind)
  # d approximates 2 J v: half the Jacobian's scale (exactly 1.0 * alpha for the squared error).
  return (0.5 * _JACOBIAN_SCALE[inner_loss_kind] * alpha / x_u.shape[0]) * d


def neumann(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha, inner_steps: int = 1,
            theta_tilde_is_theta: bool = False, loop_unroll: int = 1):
  """K-step hypergradient as an output-space Neumann series, memory independent of K.

  g_K = c sum_{k<K} (I - c J J^T)^k J v with J the Jacobian of softmax(f(x_u; .))
  at theta, c = 2 alpha / B_u and v = grad L_l(theta~_K) (theta~_K by K virtual
  steps that are not differentiated through). Where the residual of L_u is zero
  (`theta_tilde_is_theta`: the evaluation-mode meta forward, ytil its own
  prediction) this equals `exact` with K unrolled steps. Elsewhere (training-mode
  forward: dropout, batch statistics) it is a Gauss-Newton approximation of it,
  exact at K = 1 (where it is `jvp`).

  Args:
    inner_steps: static K >= 1.
    theta_tilde_is_theta: static; see `jvp`.
    loop_unroll: static; loop iterations unrolled into one (same values; faster
      on XLA:CPU, longer to compile).
  """
  v = _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                       theta_tilde_is_theta=theta_tilde_is_theta, inner_steps=inner_steps,
                       loop_unroll=loop_unroll)
  return hypergrad_output_space.neumann_hypergradient(
      _unlabeled_probabilities(apply_fn, x_u), params, v, alpha=alpha, num_terms=inner_steps,
      unroll=loop_unroll)


def implicit(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, cg_iterations: int,
             cg_damping, loop_unroll: int = 1):
  """Implicit-function-theorem hypergradient: (J J^T + damping I)^{-1} J v by conjugate gradient.

  The limit of `neumann` (and of unrolled `exact` in evaluation mode) as K grows:
  d L_l(theta*(ytil)) / d ytil for theta*(y) = argmin_theta L_u(theta, y), taking
  theta* = theta and v = grad L_l(theta). Exact (up to damping and CG's
  convergence) where theta minimises L_u(., ytil), i.e. the evaluation-mode meta
  forward; a Gauss-Newton approximation elsewhere. It does not depend on alpha,
  so its scale is not that of the K = 1 hypergradient: choose beta
  (config.hypergrad.meta_lr) for it rather than the official K = 1 value, or
  rescale it (`match_first_step_norm`).

  Args:
    cg_iterations: static number of CG steps.
    cg_damping: >= 0, added to the diagonal of J J^T (singular: softmax rows sum to one);
      mu > 0 gives the exact implicit hypergradient of the proximal inner problem
      L_u + (mu / B_u) ||theta - theta_t||^2 (see `hypergrad_output_space`).
    loop_unroll: static; CG steps unrolled into one loop iteration (see `neumann`).
  """
  del ytil  # theta itself stands in for theta*(ytil).
  v = jax.grad(outer_loss)(params, apply_fn, x_l, y_l)
  return hypergrad_output_space.implicit_hypergradient(
      _unlabeled_probabilities(apply_fn, x_u), params, v, iterations=cg_iterations,
      damping=cg_damping, unroll=loop_unroll)


def hypergradient(mode: str, apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *,
                  alpha, inner_steps: int = 1, epsilon: float = 1e-2,
                  theta_tilde_is_theta: bool = False, cg_iterations: int = 20,
                  cg_damping: float = 1e-4, loop_unroll: int = 1,
                  inner_loss_kind: str = 'probability_mse') -> jax.Array:
  """g = d L_l(theta~(ytil)) / d ytil by the estimator `mode` (one of MODES).

  Args:
    mode: static; one of MODES.
    apply_fn: `(params, x) -> logits`, the forward used inside the bi-level
      objective (evaluation or training mode, dropout key bound).
    params: theta.
    x_l, y_l: the labeled batch (integer labels).
    x_u: the unlabeled batch.
    ytil: the pseudo-labels before the meta step, [B_u, num_classes].
    alpha: the virtual step size (inner learning rate).
    inner_steps: static; K virtual steps (`exact` and `neumann`; the other
      estimators are K = 1 formulas, or K = infinity for `implicit`).
    epsilon: static; the finite-difference step relative to ||v||.
    theta_tilde_is_theta: static; see `jvp`. Ignored by `exact`, `first_order`
      and `implicit`.
    cg_iterations: static; conjugate-gradient steps of `implicit`.
    cg_damping: the damping `implicit` adds to J J^T.
    loop_unroll: static; iterations of the loops of `neumann` and `implicit`
      unrolled into one (the same values).
    inner_loss_kind: static; one of INNER_LOSSES. 'cross_entropy' takes the
      modes of MODES_FOR_INNER_LOSS['cross_entropy'] only (ValueError otherwise).

  Returns:
    g with the shape of `ytil`.
  """
  if inner_loss_kind not in INNER_LOSSES:
    raise ValueError(f'Unknown inner loss {inner_loss_kind!r}; expected one of {INNER_LOSSES}.')
  loss_kind = {'inner_loss_kind': inner_loss_kind}
  if mode == 'exact':
    return exact(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, inner_steps=inner_steps,
                 **loss_kind)
  if mode == 'first_order':
    return first_order(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, **loss_kind)
  if mode == 'jvp':
    return jvp(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
               theta_tilde_is_theta=theta_tilde_is_theta, **loss_kind)
  if mode == 'finite_difference':
    return finite_difference(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, epsilon=epsilon,
                             theta_tilde_is_theta=theta_tilde_is_theta, **loss_kind)
  if mode in ('neumann', 'implicit'):
    _require_squared_error(mode, inner_loss_kind)
  if mode == 'neumann':
    return neumann(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, inner_steps=inner_steps,
                   theta_tilde_is_theta=theta_tilde_is_theta, loop_unroll=loop_unroll)
  if mode == 'implicit':
    return implicit(apply_fn, params, x_l, y_l, x_u, ytil, cg_iterations=cg_iterations,
                    cg_damping=cg_damping, loop_unroll=loop_unroll)
  raise ValueError(f'Unknown hypergradient mode {mode!r}; expected one of {MODES}.')


def is_first_step_hypergradient(mode: str, inner_steps: int) -> bool:
  """Whether `mode` with K = `inner_steps` computes the exact K = 1 hypergradient itself."""
  return mode == 'jvp' or (mode in MULTI_STEP_MODES and inner_steps == 1)


def match_first_step_norm(grad: jax.Array, first_step_grad: jax.Array) -> jax.Array:
  """`grad` rescaled to the norm of the K = 1 hypergradient (over the whole batch).

  The official beta = lr * B_u / alpha is the step size of the K = 1
  hypergradient, whose norm is proportional to alpha. A K-step one is about K
  times larger for small alpha (each virtual step adds a term of the Neumann
  series) and the implicit limit does not scale with alpha at all, so with the
  official beta the horizon ablation would compare step sizes as much as
  directions. Matching the norm batch-wide keeps the K = 1 step's size and each
  estimator's direction and per-example proportions: only the direction differs
  between the rows. A zero `grad` stays zero.
  """
  norm = jnp.linalg.norm(grad)
  # Not norm / max(norm, tiny): a large target norm over `tiny` overflows, and inf * 0 is NaN.
  ratio = jnp.linalg.norm(first_step_grad) / jnp.where(norm > 0, norm, 1.0)
  return grad * jnp.where(norm > 0, ratio, 0.0)


def official_meta_lr(lr, alpha, unlabeled_batch_size: int):
  """beta that reproduces the official update yhat = ytil - lr * d: lr * B_u / alpha.

  At alpha = 0 (the first warm-up step, where alpha = lr = 0) the hypergradient
  is zero and so is the official update; beta is then 0 rather than 0 / 0.
  """
  alpha = jnp.asarray(alpha)
  safe_alpha = jnp.where(alpha > 0, alpha, 1.0)
  return jnp.where(alpha > 0, lr * unlabeled_batch_size / safe_alpha, 0.0)


def relu_normalize(y: jax.Array, fallback: jax.Array) -> jax.Array:
  """The official projection: relu, then divide each row by its sum.

  A row that sums to zero (the step pushed every class below zero) has no
  direction left; the official code keeps it as an all-zero target, which
  silently drops that example from L_u. We keep `fallback` (the pre-update
  pseudo-label) for such rows instead, so every target stays a distribution.
  """
  y = jax.nn.relu(y)
  sums = jnp.sum(y, axis=-1, keepdims=True)
  return jnp.where(sums > 0, y / jnp.where(sums > 0, sums, 1.0), fallback)


def simplex_projection(y: jax.Array) -> jax.Array:
  """Euclidean projection of each row onto the probability simplex (optax's, row by row)."""
  return jax.vmap(optax.projections.projection_simplex)(y)


def update_pseudo_labels(ytil: jax.Array, grad: jax.Array, *, beta, projection: str = 'relu_normalize'):
  """yhat = project(ytil - beta * g) with `projection` one of PROJECTIONS."""
  stepped = ytil - beta * grad
  if projection == 'relu_normalize':
    return relu_normalize(stepped, fallback=ytil)
  if projection == 'simplex':
    return simplex_projection(stepped)
  raise ValueError(f'Unknown pseudo-label projection {projection!r}; expected one of {PROJECTIONS}.')
