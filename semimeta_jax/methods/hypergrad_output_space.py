"""Hypergradients in output space: any horizon K at the memory of K = 1, and the implicit limit.

Write p(theta) for the stacked softmax outputs of the unlabeled batch (B_u * C
numbers), J = dp/dtheta (B_u*C x P), v = grad L_l and c = 2 alpha / B_u. The inner
loss L_u = (1/B_u) ||p(theta) - y||^2 has gradient (2/B_u) J^T (p - y) and Hessian
(2/B_u) (J^T J + sum (p - y) d^2 p). When the residual p - y is zero (evaluation-mode
meta forward, y its own prediction) every virtual step leaves theta where it is,
yet d theta_K / d y accumulates, and the K-step unrolled hypergradient is

  g_K = c sum_{k<K} (I - c J J^T)^k J v                      (output-space Neumann series)

exactly (push J through (I - c J^T J)^k). Each term costs one Jacobian-vector and
one vector-Jacobian product on the unlabeled batch; what is kept between terms is a
few B_u x C arrays, so the memory does not grow with K. As K grows, g_K tends to the
implicit-function-theorem hypergradient of theta*(y) = argmin_theta L_u(theta, y),

  g* = (J J^T)^+ J v,

which conjugate gradient finds from the same products. Softmax rows sum to one, so
J J^T has a B_u-dimensional null space; J v lies in its range, and a small damping
term keeps CG well-posed in floating point: (J J^T + damping I) g = J v. Note g* does
not depend on alpha: its scale is not that of the K = 1 hypergradient.

A damping mu is also a problem of its own: (J J^T + mu I)^{-1} J v is exactly the
implicit hypergradient of the proximal inner problem argmin_theta L_u(theta, y) +
(mu / B_u) ||theta - theta_t||^2 (iMAML's regulariser, lambda = 2 mu / B_u; push J
through ((2/B_u) J^T J + lambda I)^{-1}), and the K -> infinity limit of unrolled
descent on it. On a real network most eigenvalues of J J^T are tiny (on digits,
two thirds to three quarters below 1e-4 of the largest), so the undamped limit is dominated by
directions no finite horizon reaches and CG needs hundreds of steps for it, while a
damping that cuts them off converges in tens (experiments/implicit_spectrum.py).

With a non-zero residual (training-mode forward with dropout and batch statistics,
or pseudo-labels from elsewhere) both drop the second-order term of the Hessian and
hold J at theta: they are Gauss-Newton approximations of the unrolled result there
(the K = 1 term is still exact when v is taken at theta~, as `hypergrad.jvp` does).
"""

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

Params = Any
ProbsFn = Callable[[Params], jax.Array]
Matvec = Callable[[jax.Array], jax.Array]


def output_jacobian_products(probs_fn: ProbsFn, params: Params) -> Tuple[Callable, Callable]:
  """(J u, J^T w) of `probs_fn` at `params`, sharing one linearised forward.

  Args:
    probs_fn: params -> [B_u, C] probabilities.
    params: where J is taken.

  Returns:
    `jacobian_times(u)` for a parameter-shaped u and `transpose_times(w)` for a
    [B_u, C] w; each call costs one linear pass, not a new forward.
  """
  _, jacobian_times = jax.linearize(probs_fn, params)
  transpose = jax.linear_transpose(jacobian_times, params)
  return jacobian_times, lambda w: transpose(w)[0]


def gram_matvec(jacobian_times: Callable, transpose_times: Callable) -> Matvec:
  """w -> J J^T w, the B_u*C x B_u*C Gram matrix of the output Jacobian, never materialised."""
  return lambda w: jacobian_times(transpose_times(w))


def loop_unroll(unroll: int, trips: int) -> int:
  """lax.fori_loop's `unroll` for a loop of `trips` iterations; `unroll=0` means all of them.

  On XLA:CPU a loop that is only partly unrolled is still a loop and keeps most of
  its slowness (40 CG steps as 2 iterations of 20 trained digits at under 0.1
  steps/s, as 1 iteration of 40 at 0.5), so "all" is the setting a CPU wants.
  """
  return max(trips, 1) if unroll == 0 else unroll


def neumann_series(gram: Matvec, rhs: jax.Array, *, scale, num_terms: int,
                   unroll: int = 1) -> jax.Array:
  """scale * sum_{k < num_terms} (I - scale * gram)^k rhs, by `num_terms - 1` products with `gram`.

  The loop carries two arrays shaped like `rhs`, whatever `num_terms` is. On
  XLA:CPU a loop body runs several times slower than the same code unrolled
  (measured ~10x on a small ConvLarge), so `unroll` (lax.fori_loop's: that many
  terms per loop iteration; 0 = all, see `loop_unroll`) trades compile time for
  speed there; nothing is differentiated through the loop, so XLA may free each
  unrolled term's buffers.
  """

  def add_term(_, carry):
    total, term = carry
    term = term - scale * gram(term)
    return total + term, term

  total, _ = jax.lax.fori_loop(0, num_terms - 1, add_term, (rhs, rhs),
                               unroll=loop_unroll(unroll, num_terms - 1))
  return scale * total


def conjugate_gradient(matvec: Matvec, rhs: jax.Array, *, iterations: int,
                       unroll: int = 1) -> jax.Array:
  """`iterations` steps of conjugate gradient on matvec(x) = rhs from x = 0 (matvec symmetric PSD).

  A fixed count, so it compiles to one loop (`unroll` steps per iteration, as in
  `neumann_series`). Once the residual is exactly zero (or
  a direction has no curvature) the remaining steps change nothing instead of
  dividing by zero.
  """
  dot = lambda a, b: jnp.vdot(a, b).real

  def safe_ratio(numerator, denominator):
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)

  def step(_, carry):
    x, residual, direction, residual_sq = carry
    image = matvec(direction)
    step_size = safe_ratio(residual_sq, dot(direction, image))
    x = x + step_size * direction
    residual = residual - step_size * image
    new_residual_sq = dot(residual, residual)
    direction = residual + safe_ratio(new_residual_sq, residual_sq) * direction
    return x, residual, direction, new_residual_sq

  init = (jnp.zeros_like(rhs), rhs, rhs, dot(rhs, rhs))
  x, _, _, _ = jax.lax.fori_loop(0, iterations, step, init, unroll=loop_unroll(unroll, iterations))
  return x


def neumann_hypergradient(probs_fn: ProbsFn, params: Params, v: Params, *, alpha,
                          num_terms: int, unroll: int = 1) -> jax.Array:
  """g_K = c sum_{k<K} (I - c J J^T)^k J v with c = 2 alpha / B_u and K = `num_terms`.

  Args:
    probs_fn: params -> [B_u, C] softmax outputs of the unlabeled batch (the forward of L_u).
    params: theta, where J is taken.
    v: grad L_l (parameter-shaped), at theta~ for the K = 1 term to be exact.
    alpha: the virtual step size.
    num_terms: static K >= 1.
    unroll: static; terms per loop iteration (see `neumann_series`).

  Returns:
    g, [B_u, C]: the K-step unrolled hypergradient where the residual of L_u is zero,
    its Gauss-Newton approximation elsewhere.
  """
  jacobian_times, transpose_times = output_jacobian_products(probs_fn, params)
  rhs = jacobian_times(v)
  scale = 2.0 * alpha / rhs.shape[0]
  return neumann_series(gram_matvec(jacobian_times, transpose_times), rhs, scale=scale,
                        num_terms=num_terms, unroll=unroll)


def implicit_hypergradient(probs_fn: ProbsFn, params: Params, v: Params, *, iterations: int,
                           damping, unroll: int = 1) -> jax.Array:
  """g* = (J J^T + damping I)^{-1} J v by conjugate gradient: the K -> infinity limit.

  Args:
    probs_fn: params -> [B_u, C] softmax outputs of the unlabeled batch.
    params: theta, where J is taken (theta*(ytil) itself where the residual is zero).
    v: grad L_l at theta (parameter-shaped).
    iterations: static number of CG steps (each one J and one J^T product).
    damping: >= 0; added to the Gram matrix, whose null space (softmax rows sum
      to one) J v does not enter but rounding does.
    unroll: static; CG steps per loop iteration (see `neumann_series`).

  Returns:
    g*, [B_u, C]; independent of alpha, so not on the scale of the K = 1 g.
  """
  jacobian_times, transpose_times = output_jacobian_products(probs_fn, params)
  gram = gram_matvec(jacobian_times, transpose_times)
  damped = lambda w: gram(w) + damping * w
  return conjugate_gradient(damped, jacobian_times(v), iterations=iterations, unroll=unroll)


def gradient_descent_endpoint(loss_fn: Callable[[Params], jax.Array], params: Params, *, alpha,
                              steps: int, unroll: int = 1) -> Params:
  """`steps` SGD steps of size alpha on `loss_fn`, in a loop (not differentiated: constant memory)."""
  descend = lambda _, p: jax.tree.map(lambda q, g: q - alpha * g, p, jax.grad(loss_fn)(p))
  if steps == 1:  # The common case needs no loop, and XLA:CPU runs a loop's body several times slower.
    return descend(0, params)
  return jax.lax.fori_loop(0, steps, descend, params, unroll=loop_unroll(unroll, steps))

