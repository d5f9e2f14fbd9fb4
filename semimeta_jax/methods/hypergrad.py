"""The pseudo-label hypergradient of SemiMeta, in four ways, and the pseudo-label update.

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
                     eps = epsilon / ||v||, rescaled to exact-hypergradient units.

Every function is pure and jit-able; static arguments are keyword-only Python values.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from semimeta_jax import losses

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

MODES = ('exact', 'first_order', 'jvp', 'finite_difference')
PROJECTIONS = ('relu_normalize', 'simplex')


def inner_loss(params: Params, apply_fn: ApplyFn, x_u: jax.Array, ytil: jax.Array) -> jax.Array:
  """L_u: the unlabeled loss of `params` against the pseudo-labels."""
  return losses.probability_mse(apply_fn(params, x_u), ytil)


def outer_loss(params: Params, apply_fn: ApplyFn, x_l: jax.Array, y_l: jax.Array) -> jax.Array:
  """L_l: the labeled cross-entropy of `params`."""
  return losses.cross_entropy(apply_fn(params, x_l), y_l)


def virtual_step(params: Params, apply_fn: ApplyFn, x_u: jax.Array, ytil: jax.Array, *,
                 alpha: jax.Array, inner_steps: int = 1) -> Params:
  """theta~: `inner_steps` SGD steps of size `alpha` on L_u, differentiable in `ytil`."""
  for _ in range(inner_steps):
    grads = jax.grad(inner_loss)(params, apply_fn, x_u, ytil)
    params = jax.tree.map(lambda p, g: p - alpha * g, params, grads)
  return params


def exact(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha, inner_steps: int = 1):
  """Exact hypergradient by differentiating through the unrolled virtual steps."""

  def bilevel_objective(y):
    adapted = virtual_step(params, apply_fn, x_u, y, alpha=alpha, inner_steps=inner_steps)
    return outer_loss(adapted, apply_fn, x_l, y_l)

  return jax.grad(bilevel_objective)(ytil)


def first_order(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha):
  """The paper's first-order approximation: L_l(theta~) ~ L_l(theta) + <grad L_l(theta), theta~ - theta>."""
  v = jax.lax.stop_gradient(jax.grad(outer_loss)(params, apply_fn, x_l, y_l))

  def linearised_objective(y):
    inner_grads = jax.grad(inner_loss)(params, apply_fn, x_u, y)
    return -alpha * optax.tree.vdot(v, inner_grads)

  return jax.grad(linearised_objective)(ytil)


def _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, *, alpha, theta_tilde_is_theta):
  """u = grad L_l(theta~), skipping the virtual step when it is known to be a no-op."""
  if theta_tilde_is_theta:
    return jax.grad(outer_loss)(params, apply_fn, x_l, y_l)
  adapted = virtual_step(params, apply_fn, x_u, ytil, alpha=alpha)
  return jax.grad(outer_loss)(adapted, apply_fn, x_l, y_l)


def jvp(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha,
        theta_tilde_is_theta: bool = False):
  """Exact K = 1 hypergradient in forward mode: g_i = (2 alpha / B_u) J_i u.

  J_i is the Jacobian of softmax(f(x_u_i; .)) at theta (the forward of L_u) and
  u = grad L_l(theta~). Because grad_theta L_u is affine in the pseudo-labels,
  d theta~ / d ytil_i = (2 alpha / B_u) J_i^T for every ytil, so this is exact.

  Args:
    theta_tilde_is_theta: static; set when ytil is the prediction of this very
      forward (the official evaluation-mode meta step), where grad L_u = 0 and
      theta~ = theta, to skip the virtual step.
  """
  u = _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                       theta_tilde_is_theta=theta_tilde_is_theta)
  probs = lambda p: jax.nn.softmax(losses.at_least_float32(apply_fn(p, x_u)))
  _, jacobian_times_u = jax.jvp(probs, (params,), (u,))
  return (2.0 * alpha / x_u.shape[0]) * jacobian_times_u


def finite_difference_direction(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *,
                                alpha, epsilon: float, theta_tilde_is_theta: bool = False):
  """The official direction d = (softmax(f(theta + eps v)) - softmax(f(theta - eps v))) / eps.

  v = grad L_l(theta~) and eps = epsilon / ||v||; d approximates 2 J_i v.
  """
  v = _outer_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                       theta_tilde_is_theta=theta_tilde_is_theta)
  # A zero labeled gradient (a perfect fit) gives d = 0, not a division by zero.
  eps = epsilon / jnp.maximum(optax.tree.norm(v), jnp.finfo(jnp.float32).tiny)
  shifted = lambda sign: jax.tree.map(lambda p, g: p + sign * eps * g, params, v)
  probs = lambda p: jax.nn.softmax(losses.at_least_float32(apply_fn(p, x_u)))
  return (probs(shifted(1.0)) - probs(shifted(-1.0))) / eps


def finite_difference(apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *, alpha,
                      epsilon: float, theta_tilde_is_theta: bool = False):
  """The official estimator in hypergradient units: g = (alpha / B_u) d."""
  d = finite_difference_direction(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
                                  epsilon=epsilon, theta_tilde_is_theta=theta_tilde_is_theta)
  return (alpha / x_u.shape[0]) * d


def hypergradient(mode: str, apply_fn: ApplyFn, params: Params, x_l, y_l, x_u, ytil, *,
                  alpha, inner_steps: int = 1, epsilon: float = 1e-2,
                  theta_tilde_is_theta: bool = False) -> jax.Array:
  """g = d L_l(theta~(ytil)) / d ytil by the estimator `mode` (one of MODES).

  Args:
    mode: static; 'exact', 'first_order', 'jvp' or 'finite_difference'.
    apply_fn: `(params, x) -> logits`, the forward used inside the bi-level
      objective (evaluation or training mode, dropout key bound).
    params: theta.
    x_l, y_l: the labeled batch (integer labels).
    x_u: the unlabeled batch.
    ytil: the pseudo-labels before the meta step, [B_u, num_classes].
    alpha: the virtual step size (inner learning rate).
    inner_steps: static; K unrolled virtual steps (`exact` only; the other
      estimators are K = 1 formulas).
    epsilon: static; the finite-difference step relative to ||v||.
    theta_tilde_is_theta: static; see `jvp`. Ignored by `exact` and `first_order`.

  Returns:
    g with the shape of `ytil`.
  """
  if mode == 'exact':
    return exact(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, inner_steps=inner_steps)
  if mode == 'first_order':
    return first_order(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha)
  if mode == 'jvp':
    return jvp(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,
               theta_tilde_is_theta=theta_tilde_is_theta)
  if mode == 'finite_difference':
    return finite_difference(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha, epsilon=epsilon,
                             theta_tilde_is_theta=theta_tilde_is_theta)
  raise ValueError(f'Unknown hypergradient mode {mode!r}; expected one of {MODES}.')


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
