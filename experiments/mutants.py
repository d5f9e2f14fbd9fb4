"""The planted bugs of `mutation_check.py`: realistic one-line slips in the core modules.

Each mutant names its file, an exact snippet that must occur once in that file,
its replacement, what bug it plants, and the fast tests that should catch it
(the most targeted file first: `pytest -x` stops at the first failure).

Left out on purpose (equivalent mutants, no test can tell them apart):
  * `count < warmup_steps` -> `<=` in the step schedule: at t = warmup both
    branches give base_lr.
  * removing `stop_gradient` on ytil in `meta_pseudo_labels`: the real update
    differentiates the parameters only, and ytil enters it through yhat, which
    is computed from values, never differentiated.
  * not sorting the decay boundaries: the count of boundaries passed does not
    depend on their order.
The planted bugs outside the training step (evaluation, models) are in
`mutants_evaluation_models.py`.
data/augment.py is being rewritten (sampling and augmentation on the device); its
mutants belong with its new tests.
"""

import dataclasses

CORE = 'tests/test_semimeta_core.py'
MIXUP = 'tests/test_mixup.py'
HYPERGRAD = 'tests/test_hypergrad.py'
LOSSES = 'tests/test_losses.py'
SCHEDULES = 'tests/test_schedules.py'
VAT = 'tests/test_vat.py'
TE = 'tests/test_temporal_ensembling.py'
FAST_SWA = 'tests/test_fast_swa.py'
# The baselines' tests train for 30 steps in a module fixture (~45 s in all); each
# baseline mutant runs only the tests of its own method.
_B = 'tests/test_baselines.py::'
_L = 'tests/test_baseline_losses.py::test_supervised_loss_is_the_ce_of_the_labeled_rows'
PI_TESTS = (_L + '[pi_model-extra0]', _B + 'test_trains_and_compiles_once[pi_model]',
            _B + 'test_pi_consistency_is_zero_exactly_when_the_views_coincide')
TEACHER_TESTS = (_L + '[mean_teacher-extra1]', _B + 'test_teacher_targets_carry_no_gradient',
                 _B + 'test_teacher_is_the_ema_of_the_student[mean_teacher]')
PERTURB_TESTS = (_B + 'test_perturbations_are_off_when_disabled_and_per_example_otherwise',)


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str
  original: str
  mutated: str
  description: str
  tests: tuple


def group(file, tests, *entries):
  return [Mutant(name, file, original, mutated, description, tests)
          for name, original, mutated, description in entries]


H, M, S = 'semimeta_jax/methods/hypergrad.py', 'semimeta_jax/methods/semimeta.py', 'semimeta_jax/schedules.py'

MUTANTS = [
    *group(H, (HYPERGRAD, CORE), (
        'hg-virtual-step-sign',
        'lambda p, g: p - alpha * g, params, grads)',
        'lambda p, g: p + alpha * g, params, grads)',
        'virtual step climbs L_u instead of descending it',
    ), (
        'hg-inner-steps-off-by-one',
        'for _ in range(inner_steps):',
        'for _ in range(inner_steps - 1):',
        'one virtual step too few',
    ), (
        'hg-exact-at-theta',
        '    return outer_loss(adapted, apply_fn, x_l, y_l)',
        '    return outer_loss(params, apply_fn, x_l, y_l)',
        'exact: outer loss at theta, not theta~',
    ), (
        'hg-first-order-sign',
        'return -alpha * optax.tree.vdot(v, inner_grads)',
        'return alpha * optax.tree.vdot(v, inner_grads)',
        'first_order: sign of the Taylor term flipped',
    ), (
        'hg-outer-direction-at-theta',
        '  return jax.grad(outer_loss)(adapted, apply_fn, x_l, y_l)',
        '  return jax.grad(outer_loss)(params, apply_fn, x_l, y_l)',
        'jvp/fd: u taken at theta instead of theta~',
    ), (
        'hg-jvp-factor-2',
        "_JACOBIAN_SCALE = {'probability_mse': 2.0, 'cross_entropy': 1.0}",
        "_JACOBIAN_SCALE = {'probability_mse': 1.0, 'cross_entropy': 1.0}",
        'jvp: factor 2 of the squared error dropped',
    ), (
        'hg-fd-central-difference',
        'return (outputs(shifted(1.0)) - outputs(shifted(-1.0))) / eps',
        'return (outputs(shifted(1.0)) - outputs(shifted(-1.0))) / (2.0 * eps)',
        'fd direction: divided by 2 eps (d must approximate 2 J v)',
    ), (
        'hg-fd-eps-not-relative',
        'eps = epsilon / jnp.maximum(optax.tree.norm(v), jnp.finfo(jnp.float32).tiny)',
        'eps = epsilon',
        'fd: epsilon not scaled by 1 / ||v||',
    ), (
        'hg-fd-units',
        'return (0.5 * _JACOBIAN_SCALE[inner_loss_kind] * alpha / x_u.shape[0]) * d',
        'return (0.5 * _JACOBIAN_SCALE[inner_loss_kind] * alpha) * d',
        'fd: hypergradient units miss 1 / B_u',
    ), (
        'hg-dispatch-jvp-skips-virtual-step',
        '    return jvp(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,\n'
        '               theta_tilde_is_theta=theta_tilde_is_theta, **loss_kind)',
        '    return jvp(apply_fn, params, x_l, y_l, x_u, ytil, alpha=alpha,\n'
        '               theta_tilde_is_theta=True, **loss_kind)',
        'dispatch: jvp always assumes theta~ = theta',
    ), (
        'hg-official-beta',
        'lr * unlabeled_batch_size / safe_alpha',
        'lr / safe_alpha',
        'official beta misses the factor B_u',
    ), (
        'hg-relu-dropped',
        '  y = jax.nn.relu(y)\n',
        '',
        'projection: relu dropped (negative entries kept)',
    ), (
        'hg-zero-row-fallback',
        'y / jnp.where(sums > 0, sums, 1.0), fallback)',
        'y / jnp.where(sums > 0, sums, 1.0), y)',
        'projection: an all-negative row becomes all zeros',
    ), (
        'hg-update-sign',
        'stepped = ytil - beta * grad',
        'stepped = ytil + beta * grad',
        'pseudo-label step climbs the outer loss',
    ), (
        # The sort-based threshold this used to mutate is optax's code now; the bug
        # left in ours is how we call it: without the vmap optax projects the whole
        # [B_u, C] matrix (a pytree) onto one simplex, so the batch sums to 1.
        'hg-simplex-not-per-row',
        'return jax.vmap(optax.projections.projection_simplex)(y)',
        'return optax.projections.projection_simplex(y)',
        'simplex projection of the whole batch, not row by row (no vmap)',
    )),
    *group('semimeta_jax/losses.py', (LOSSES, CORE), (
        'loss-ce-sign',
        'return optax.losses.softmax_cross_entropy_with_integer_labels(',
        'return -optax.losses.softmax_cross_entropy_with_integer_labels(',
        'cross-entropy sign flipped (in our wrapper of optax)',
    ), (
        'loss-ce-sum',
        'return jnp.mean(cross_entropy_per_example(logits, labels))',
        'return jnp.sum(cross_entropy_per_example(logits, labels))',
        'cross-entropy summed over the batch',
    ), (
        'loss-kl-sign',
        'return jnp.mean(optax.losses.kl_divergence(log_probs, targets))',
        'return -jnp.mean(optax.losses.kl_divergence(log_probs, targets))',
        'KL sign flipped (in our wrapper of optax)',
    ), (
        # optax's kl_divergence takes log-probabilities; raw logits make its cross
        # term -<t, logits>, whose gradient is -t instead of softmax - t.
        'loss-kl-raw-logits',
        'log_probs = jax.nn.log_softmax(at_least_float32(logits))',
        'log_probs = at_least_float32(logits)',
        'KL: optax given raw logits, not log-probabilities',
    ), (
        'loss-kl-sum',
        'return jnp.mean(optax.losses.kl_divergence(log_probs, targets))',
        'return jnp.sum(optax.losses.kl_divergence(log_probs, targets))',
        'KL summed over the batch, not batchmean',
    ), (
        'loss-mse-mean-classes',
        'return jnp.mean(jnp.sum(jnp.square(probs - targets), axis=-1))',
        'return jnp.mean(jnp.square(probs - targets))',
        'probability MSE averaged over classes, not summed',
    ), (
        'loss-entropy-sign',
        'return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))',
        'return jnp.mean(jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))',
        'entropy sign flipped',
    ), (
        'loss-topk-off-by-one',
        'return (num_larger + num_tied_before < k)',
        'return (num_larger + num_tied_before <= k)',
        'top-k counts the (k+1)-th as correct',
    ), (
        'loss-topk-ties',
        'jnp.arange(logits.shape[-1]) < labels[:, None]',
        'jnp.arange(logits.shape[-1]) > labels[:, None]',
        'top-k: ties broken the wrong way',
    ), (
        'loss-no-upcast',
        'return x.astype(jnp.promote_types(x.dtype, jnp.float32))',
        'return x',
        'half-precision logits not upcast',
    )),
    *group(S, (SCHEDULES,), (
        'sched-warmup-off-by-one',
        'base_lr * count / warmup_steps',
        'base_lr * (count + 1) / warmup_steps',
        'warm-up one step ahead (planted bug 3a)',
    ), (
        'sched-first-boundary-dropped',
        'np.asarray(sorted(boundaries) or',
        'np.asarray(sorted(boundaries)[1:] or',
        'first decay boundary dropped (planted bug 3b)',
    ), (
        'sched-decay-at-boundary',
        'decays = jnp.sum(count > boundaries)',
        'decays = jnp.sum(count >= boundaries)',
        'decay at the boundary instead of after it',
    ), (
        'sched-warmup-ignores-decay',
        'base_lr * count / warmup_steps, lr)',
        'base_lr * count / warmup_steps, base_lr)',
        'after warm-up the decay is ignored',
    ), (
        'sched-cosine-decay-steps',
        'decay_steps=max(main_steps, config.warmup_steps + 1)',
        'decay_steps=max(main_steps - config.warmup_steps, 1)',
        'cosine: decay_steps read as excluding the warm-up',
    ), (
        'sched-linear-rampup-off-by-one',
        'jnp.clip(jnp.asarray(count, jnp.float32) / rampup',
        'jnp.clip((jnp.asarray(count, jnp.float32) + 1) / rampup',
        'consistency ramp one step ahead',
    ), (
        'sched-sigmoid-square',
        'jnp.exp(-5.0 * jnp.square(1.0 - progress))',
        'jnp.exp(-5.0 * (1.0 - progress))',
        'sigmoid ramp: square dropped',
    ), (
        'sched-decoupled-decay',
        '      optax.add_decayed_weights(config.weight_decay),\n'
        '      optax.sgd(learning_rate_schedule(config, tail), momentum=config.momentum or None))',
        '      optax.sgd(learning_rate_schedule(config, tail), momentum=config.momentum or None),\n'
        '      optax.add_decayed_weights(config.weight_decay))',
        'weight decay added after momentum and lr (decoupled)',
    ), (
        'sched-no-momentum',
        'momentum=config.momentum or None',
        'momentum=None',
        'momentum ignored',
    )),
    *group(M, (CORE, MIXUP), (
        'sm-consistency-on-ytil',
        'consistency = losses.probability_mse(unlabeled_logits, yhat)',
        'consistency = losses.probability_mse(unlabeled_logits, ytil)',
        'real update trains on ytil, not yhat (planted bug 1)',
    )),
    *group(M, (MIXUP, CORE), (
        'sm-mixup-labeled-side',
        'image = lam_image * labeled[\'image\'] + (1.0 - lam_image) * unlabeled_image',
        'image = (1.0 - lam_image) * labeled[\'image\'] + lam_image * unlabeled_image',
        'mix-up image weighs the labeled side by 1 - lam (planted bug 2)',
    ), (
        'sm-mixup-target-swapped',
        'target = lam[:, None] * onehot + (1.0 - lam[:, None]) * yhat',
        'target = (1.0 - lam[:, None]) * onehot + lam[:, None] * yhat',
        'mix-up target weighs the label by 1 - lam',
    ), (
        'sm-mixup-one-lambda',
        'lam = jax.random.beta(key, concentration, concentration, (labeled[\'image\'].shape[0],))',
        'lam = jnp.full((labeled[\'image\'].shape[0],), jax.random.beta(key, concentration, concentration))',
        'one mix-up coefficient for the whole batch',
    ), (
        'sm-mixup-beta-shape',
        'jax.random.beta(key, concentration, concentration,',
        'jax.random.beta(key, concentration, 1.0,',
        'lam ~ Beta(a, 1) instead of Beta(a, a)',
    ), (
        'sm-no-mixup-kl',
        'supervised = losses.kl_divergence(target, logits)',
        'supervised = losses.cross_entropy(logits, labeled[\'label\'])',
        'mix-up path trains on hard labels',
    )),
    *group(M, (CORE, MIXUP), (
        'sm-weight-dropped',
        'return supervised + weight * consistency, (stats',
        'return supervised + consistency, (stats',
        'consistency weight w(t) dropped from the loss',
    ), (
        'sm-unlabeled-stats',
        'unlabeled_logits, stats = common.train_forward(state, params, consistency_view, stats,',
        'unlabeled_logits, stats = common.train_forward(state, params, consistency_view, state.batch_stats,',
        'second forward restarts from the old running averages',
    ), (
        'sm-strong-view-ignored',
        "consistency_view = unlabeled['strong_image' if config.semimeta.strong_view else 'image']",
        "consistency_view = unlabeled['image']",
        'semimeta.strong_view trains the consistency term on the weak view',
    ), (
        'sm-alpha-default',
        'alpha = hg.inner_lr if hg.inner_lr > 0 else lr',
        'alpha = hg.inner_lr if hg.inner_lr > 0 else 1.0',
        'default inner step size is 1, not the learning rate',
    ), (
        'sm-beta-default',
        'else hypergrad.official_meta_lr(lr, alpha, x_u.shape[0])',
        'else lr',
        'default beta is lr, not lr * B_u / alpha',
    ), (
        'sm-theta-tilde-always-theta',
        "theta_tilde_is_theta = hg.forward_mode == 'eval'",
        'theta_tilde_is_theta = True',
        'training-mode meta forward skips the virtual step',
    )),
    *group('semimeta_jax/methods/common.py', (CORE,), (
        'common-running-averages-frozen',
        "  return logits, updates['batch_stats']",
        '  return logits, batch_stats',
        'training forward never updates the running averages',
    )),
    *group('semimeta_jax/methods/pi_model.py', PI_TESTS, (
        'pi-supervised-on-unlabeled',
        'supervised = losses.cross_entropy(logits[0][:num_labeled]',
        'supervised = losses.cross_entropy(logits[0][num_labeled:]',
        'Pi-model CE on the wrong half of the batch',
    ), (
        'pi-views-share-a-key',
        'view_images = perturb(state.step_key(common.NOISE, view), images)',
        'view_images = perturb(state.step_key(common.NOISE), images)',
        'both Pi-model views get the same perturbation',
    )),
    *group('semimeta_jax/methods/mean_teacher.py', TEACHER_TESTS, (
        'mt-ema-warmup',
        'return jnp.minimum(config.ema.decay, 1.0 - 1.0 / (updates_taken + 1.0))',
        'return jnp.minimum(config.ema.decay, 1.0 - 1.0 / updates_taken)',
        'teacher EMA warm-up one update off',
    ), (
        'mt-teacher-gradient',
        '  teacher_logits = jax.lax.stop_gradient(teacher_logits)\n',
        '',
        'gradient flows into the teacher',
    )),
    *group('semimeta_jax/methods/augment.py', PERTURB_TESTS, (
        'aug-flip-never',
        'images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)',
        'images = jnp.where(mirrored[:, None, None, None], images, images)',
        'per-view horizontal flip never applied',
    )),
    *group('semimeta_jax/methods/vat.py', (VAT,), (
        'vat-clean-gradient',
        'return losses.kl_divergence(jax.nn.softmax(jax.lax.stop_gradient(losses.at_least_float32(clean_logits))),',
        'return losses.kl_divergence(jax.nn.softmax(losses.at_least_float32(clean_logits)),',
        'no stop_gradient on the clean prediction of the LDS',
    ), (
        'vat-direction-unnormalised',
        'd = normalize(jax.lax.stop_gradient(h_d))',
        'd = jax.lax.stop_gradient(h_d)',
        'power iteration does not renormalise d (r_adv norm is not eps)',
    ), (
        'vat-probe-unscaled',
        'h_d = jax.grad(kl)(xi * d)',
        'h_d = jax.grad(kl)(d)',
        'finite-difference probe at r = d, not xi d',
    )),
    *group('semimeta_jax/methods/temporal_ensembling.py', (TE,), (
        'te-bias-correction-off-by-one',
        'correction = 1.0 - jnp.power(momentum, visits.astype(jnp.float32))',
        'correction = 1.0 - jnp.power(momentum, (visits + 1).astype(jnp.float32))',
        'startup correction 1 - a^(t+1), exponent one too high',
    ), (
        'te-ema-weight-swapped',
        'weights = jnp.where(same, (1.0 - momentum) * jnp.power(',
        'weights = jnp.where(same, momentum * jnp.power(',
        'new prediction weighted by a instead of 1 - a',
    ), (
        'te-targetless-examples-count',
        'consistency = jnp.mean(jnp.where(has_target, per_example, 0.0))',
        'consistency = jnp.mean(per_example)',
        'examples never seen are pulled towards a zero target',
    )),
    *group('semimeta_jax/methods/fast_swa.py', (FAST_SWA,), (
        'fswa-average-weight-off-by-one',
        'weight = include.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)',
        'weight = include.astype(jnp.float32) / (count + 1).astype(jnp.float32)',
        'running-mean weight 1 / (n + 1), not 1 / n',
    ), (
        'fswa-averages-tail-start',
        'return (into_tail > 0) & (',
        'return (into_tail >= 0) & (',
        'the weights at the end of the main schedule join the average',
    ), (
        'fswa-bn-momentum-not-undone',
        'return jax.tree.map(lambda s: s / (1.0 - layers.BN_MOMENTUM), after)',
        'return after',
        'recomputed statistics left scaled by 1 - momentum',
    )),
    *group(S, (FAST_SWA, SCHEDULES), (
        'sched-swa-main-schedule-full-length',
        'main = _main_schedule(config, config.num_train_steps - tail_steps)',
        'main = _main_schedule(config, config.num_train_steps)',
        'cosine main schedule spans the fast-SWA tail too',
    )),
]
