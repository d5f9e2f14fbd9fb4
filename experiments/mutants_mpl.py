"""The planted bugs of `mutation_check.py` in Meta Pseudo Labels and the engine's cross-entropy inner loss.

Same form as `mutants.py`. Names start with `mpl-`, for `--only`:
  python -m experiments.mutation_check --only=mpl-
"""

from experiments.mutants import group

_F = 'tests/test_mpl_feedback.py::'
FD = (_F + 'test_exact_teacher_meta_gradient_equals_central_differences[1]',)
MODES = (_F + 'test_jvp_and_first_step_modes_equal_exact_where_the_engine_says_so',)
PAPER_H = (_F + 'test_paper_h_is_the_dot_product_and_the_taylor_estimate_of_old_minus_new',)
RELEASED_TERM = (_F + 'test_released_code_term_has_zero_gradient_and_a_nonzero_coefficient',)

_S = 'tests/test_mpl.py::'
EXACT_STEP = (_S + 'test_exact_step_updates_both_networks_by_their_rebuilt_gradients',)
PAPER_STEP = (_S + 'test_paper_step_scales_the_sampled_labels_cross_entropy_by_h[1.0]',
              _S + 'test_paper_step_scales_the_sampled_labels_cross_entropy_by_h[-1.0]')
RELEASED_STEP = (_S + 'test_released_code_teacher_steps_as_without_feedback_and_keeps_its_baseline',)
WAIT = (_S + 'test_the_step_traces_once_and_a_waiting_student_holds_still',)
UDA = (_S + 'test_uda_teacher_term_and_the_student_on_the_strong_view',)
FINETUNE = (_S + 'test_the_last_finetune_steps_train_the_student_on_the_labels_and_hold_the_teacher',)

HYPERGRAD = 'semimeta_jax/methods/hypergrad.py'
FEEDBACK = 'semimeta_jax/methods/mpl_feedback.py'
MPL = 'semimeta_jax/methods/mpl.py'
MPL_UDA = 'semimeta_jax/methods/mpl_uda.py'

MUTANTS = [
    *group(HYPERGRAD, FD, (
        'mpl-inner-ce-summed-over-batch',
        'return -jnp.mean(jnp.sum(ytil * log_probs, axis=-1))',
        'return -jnp.sum(ytil * log_probs)',
        "the student's cross-entropy summed over the batch, not averaged",
    )),
    *group(HYPERGRAD, MODES, (
        'mpl-inner-ce-jvp-scale',
        "_JACOBIAN_SCALE = {'probability_mse': 2.0, 'cross_entropy': 1.0}",
        "_JACOBIAN_SCALE = {'probability_mse': 2.0, 'cross_entropy': 2.0}",
        "jvp with the squared error's scale 2 alpha / B_u for the cross-entropy",
    ), (
        'mpl-inner-ce-jvp-probabilities',
        'return lambda p: jax.nn.log_softmax(losses.at_least_float32(apply_fn(p, x_u)))',
        'return lambda p: jax.nn.softmax(losses.at_least_float32(apply_fn(p, x_u)))',
        "jvp through the probabilities, not the log-probabilities the cross-entropy is linear through",
    )),
    *group(FEEDBACK, FD, (
        'mpl-exact-surrogate-no-temperature',
        'return jnp.sum(jax.lax.stop_gradient(grad_labels) * soft_labels(teacher_logits_u, temperature))',
        'return jnp.sum(jax.lax.stop_gradient(grad_labels) * soft_labels(teacher_logits_u, 1.0))',
        'the VJP through softmax(T), not softmax(T / tau)',
    )),
    *group(FEEDBACK, PAPER_H, (
        'mpl-paper-h-without-lr',
        'return student_lr * optax.tree.vdot(new_labeled_grads, unlabeled_grads)',
        'return optax.tree.vdot(new_labeled_grads, unlabeled_grads)',
        "h without the student's learning rate",
    )),
    *group(FEEDBACK, RELEASED_TERM, (
        'mpl-released-baseline-after',
        'return jax.lax.stop_gradient(difference - baseline), jax.lax.stop_gradient(baseline)',
        'return jax.lax.stop_gradient(difference), jax.lax.stop_gradient(baseline)',
        'the released h without its moving baseline subtracted',
    ), (
        'mpl-released-term-differentiated',
        'own = jax.lax.stop_gradient(jax.nn.softmax(losses.at_least_float32(teacher_logits_u)))',
        'own = jax.nn.softmax(losses.at_least_float32(teacher_logits_u))',
        "the released term's soft label not held constant (a non-zero gradient, unlike the release)",
    )),
    *group(FEEDBACK, PAPER_STEP, (
        'mpl-paper-ce-without-temperature',
        'scaled = losses.at_least_float32(teacher_logits_u) / temperature',
        'scaled = losses.at_least_float32(teacher_logits_u)',
        "the paper's CE on T, not on T / tau the labels were drawn from",
    )),
    *group(MPL, PAPER_STEP, (
        'mpl-h-sign-ignored',
        'h = block.h_sign * mpl_feedback.paper_coefficient(',
        'h = mpl_feedback.paper_coefficient(',
        'mpl.h_sign ignored',
    )),
    *group(MPL, EXACT_STEP, (
        'mpl-teacher-label-smoothing-ignored',
        'targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)',
        'targets = jax.nn.one_hot(labels, num_classes)',
        "the teacher's label smoothing ignored",
    ), (
        'mpl-teacher-student-learning-rate',
        'teacher_config.learning_rate = config.mpl.teacher_learning_rate',
        'teacher_config.learning_rate = config.learning_rate',
        "the teacher stepped at the student's learning rate",
    ), (
        'mpl-virtual-step-doubled',
        'labels, alpha=lr, inner_steps=block.inner_steps, epsilon=block.epsilon)',
        'labels, alpha=2 * lr, inner_steps=block.inner_steps, epsilon=block.epsilon)',
        "the exact feedback's virtual step twice the student's learning rate",
    ), (
        'mpl-soft-labels-without-temperature',
        'labels = jax.lax.stop_gradient(mpl_feedback.soft_labels(logits_u, block.temperature))',
        'labels = jax.lax.stop_gradient(mpl_feedback.soft_labels(logits_u, 1.0))',
        "the student's soft labels softmax(T), not softmax(T / tau)",
    )),
    *group(MPL, RELEASED_STEP, (
        'mpl-baseline-not-kept',
        "'baseline': teacher['baseline'] if baseline is None else baseline}",
        "'baseline': teacher['baseline']}",
        "the released code's moving baseline never updated",
    ), (
        'mpl-teacher-batch-stats-not-kept',
        "'batch_stats': teacher_stats, 'opt_state': teacher_opt_state,",
        "'batch_stats': teacher['batch_stats'], 'opt_state': teacher_opt_state,",
        "the teacher's running averages never updated",
    )),
    *group(MPL, WAIT, (
        'mpl-wait-one-step-longer',
        'waiting = step < wait_steps',
        'waiting = step <= wait_steps',
        'the student waits one step more than mpl.student_wait_steps',
    )),
    *group(MPL, FINETUNE, (
        'mpl-finetune-one-step-late',
        'finetuning = state.step >= config.num_train_steps - config.mpl.finetune_steps',
        'finetuning = state.step > config.num_train_steps - config.mpl.finetune_steps',
        'the fine-tuning phase starts one step after the last mpl.finetune_steps',
    ), (
        'mpl-finetune-trains-both',
        'return jax.tree.map(lambda tuned, trained: jnp.where(finetuning, tuned, trained), tuned, trained)',
        'return jax.tree.map(lambda tuned, trained: trained, tuned, trained)',
        'mpl.finetune_steps ignored: the teacher and the student keep training together',
    )),
    *group(MPL_UDA, UDA, (
        'mpl-uda-targets-unsharpened',
        'confidence.pseudo_labels(weak_logits, hard=False, temperature=temperature, from_logits=True))',
        'confidence.pseudo_labels(weak_logits, hard=False, temperature=1.0, from_logits=True))',
        "UDA's weak-view targets not sharpened by uda_temperature",
    ), (
        'mpl-uda-no-ramp',
        'return block.uda_weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / block.uda_rampup_steps)',
        'return jnp.asarray(block.uda_weight, jnp.float32)',
        "UDA's weight at full strength from the first step, its ramp ignored",
    )),
    *group(MPL, UDA, (
        'mpl-student-on-weak-view',
        "return batch['unlabeled']['strong_image' if mpl_uda.enabled(config) else 'image']",
        "return batch['unlabeled']['image']",
        'the student (and the feedback) on the weak view under UDA, not the strong one',
    )),
]
