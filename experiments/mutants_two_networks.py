"""The planted bugs of `mutation_check.py` in the two-network methods (Deep Co-Training,
Dual Student and their shared second network) and in Pseudo-Label's ramp.

Same form as `mutants.py`; kept apart from `mutants_new_methods.py` only to keep each
list short. Names start with `cot-`, `dual-`, `second-` or `pseudo-`, for `--only`:
  python -m experiments.mutation_check --only=cot-,dual-,second-,pseudo-
"""

from experiments.mutants import group

_COT = 'tests/test_co_training.py::'
COT_JSD = (_COT + 'test_jensen_shannon_is_the_mean_of_the_two_kls_to_the_mixture',)
COT_FGSM = (_COT + 'test_each_fgsm_example_is_its_own_gradient_sign_step',)
COT_STEP = (_COT + 'test_the_terms_and_statistics_equal_the_forward_chain_rebuilt',)
COT_DIF = (_COT + 'test_the_view_difference_is_the_references_sum_over_s_and_u_divided_by_their_size',)
COT_RADIUS = (_COT + 'test_the_fgsm_step_has_the_radius_in_its_units[pixels]',)

_DS = 'tests/test_dual_student.py::'
DS_LOOP = (_DS + 'test_stability_and_who_learns_equal_the_authors_loop',)
DS_STABLE = (_DS + 'test_stability_needs_the_same_argmax_and_one_confident_view',)
DS_TERMS = (_DS + 'test_each_students_terms_are_rebuilt_from_its_own_and_the_other_view',)
DS_VIEWS = (_DS + 'test_the_two_views_translate_and_flip_each_example_independently[cifar10]',)

PSEUDO_ALPHA = ('tests/test_pseudo_label.py::test_alpha_is_lees_delayed_ramp_read_at_the_step_being_taken',)

MUTANTS = [
    *group('semimeta_jax/methods/co_training.py', COT_JSD, (
        'cot-jsd-entropies-not-halved',
        'return losses.entropy((p1 + p2) / 2) - (losses.entropy(p1) + losses.entropy(p2)) / 2',
        'return losses.entropy((p1 + p2) / 2) - (losses.entropy(p1) + losses.entropy(p2))',
        'JSD subtracts the sum of the two entropies, not their mean',
    ), (
        'cot-jsd-mixture-unhalved',
        'return losses.entropy((p1 + p2) / 2) - (losses.entropy(p1) + losses.entropy(p2)) / 2',
        'return losses.entropy(p1 + p2) - (losses.entropy(p1) + losses.entropy(p2)) / 2',
        'JSD on the sum p1 + p2, not the mixture (p1 + p2) / 2',
    )),
    *group('semimeta_jax/methods/co_training.py', COT_FGSM, (
        'cot-fgsm-descends',
        'return jax.lax.stop_gradient(x + epsilon * jnp.sign(jax.grad(loss)(x)))',
        'return jax.lax.stop_gradient(x - epsilon * jnp.sign(jax.grad(loss)(x)))',
        'FGSM step down the loss (a helpful, not an adversarial, example)',
    )),
    *group('semimeta_jax/methods/co_training.py', COT_STEP, (
        'cot-dif-own-target',
        'total = sum(jnp.sum(soft_cross_entropy_per_example(clean[other[net]], adv[net]))',
        'total = sum(jnp.sum(soft_cross_entropy_per_example(clean[net], adv[net]))',
        "view difference against the network's own clean prediction, not the other's",
    ), (
        'cot-adversarial-against-self',
        'adv_s = {net: forward(net, against[other[net]][:num_labeled], ADVERSARIAL_LABELED)',
        'adv_s = {net: forward(net, against[net][:num_labeled], ADVERSARIAL_LABELED)',
        "each network on its own FGSM examples of S, not the other's",
    ), (
        'cot-fgsm-pseudo-labels-of-other',
        'pseudo = jnp.argmax(clean_u[net], axis=-1)',
        'pseudo = jnp.argmax(clean_u[FIRST], axis=-1)',
        "FGSM on U against the first network's argmax for both networks",
    )),
    *group('semimeta_jax/methods/co_training.py', COT_DIF, (
        'cot-dif-mean-per-part',
        'total = sum(jnp.sum(soft_cross_entropy_per_example',
        'total = (clean_s[FIRST].shape[0] + clean_u[FIRST].shape[0]) * sum(jnp.mean(soft_cross_entropy_per_example',
        'view difference averaged over S and over U apart and added (twice the reference weight)',
    )),
    *group('semimeta_jax/methods/co_training.py', COT_RADIUS, (
        'cot-radius-in-standardised-units',
        'return block.fgsm_epsilon / std',
        'return block.fgsm_epsilon',
        'FGSM radius applied to the standardised inputs, not in [0, 1] pixel units',
    )),
    *group('semimeta_jax/methods/second_network.py', COT_STEP, (
        'second-batch-stats-not-kept',
        "'batch_stats': batch_stats, 'opt_state': opt_state}",
        "'batch_stats': second['batch_stats'], 'opt_state': opt_state}",
        "the second network's running averages never updated",
    )),
    *group('semimeta_jax/methods/dual_student.py', DS_LOOP, (
        'dual-threshold-flipped',
        'confident = (jnp.max(own, axis=-1) > threshold) | (jnp.max(other, axis=-1) > threshold)',
        'confident = (jnp.max(own, axis=-1) < threshold) | (jnp.max(other, axis=-1) < threshold)',
        'stability: confident below the threshold, not above',
    ), (
        'dual-more-stable-learns',
        'first_learns = stable_second & ~(both & (distance_first < distance_second))',
        'first_learns = stable_second & ~(both & (distance_first > distance_second))',
        'both stable: the more stable student learns, not the less stable one',
    ), (
        'dual-target-own-class',
        'to_other = per_example_softmax_mse(cons_own[s], frozen(class_own[other[s]]))',
        'to_other = per_example_softmax_mse(cons_own[s], frozen(class_own[s]))',
        "stabilisation towards its own class head, not the other student's",
    ), (
        'dual-no-unlabeled-share',
        'result[s] = (num_unlabeled / batch_size) * jnp.sum(',
        'result[s] = jnp.sum(',
        'stabilisation loss without the unlabeled share of the batch',
    ), (
        'dual-distance-same-view',
        'distance = {s: frozen(per_example_softmax_mse(cons_own[s], class_other[s])) for s in students}',
        'distance = {s: frozen(per_example_softmax_mse(cons_own[s], class_own[s])) for s in students}',
        "stability distance to the class head on its own view, not the other view",
    )),
    *group('semimeta_jax/methods/dual_student.py', DS_STABLE, (
        'dual-both-views-confident',
        'confident = (jnp.max(own, axis=-1) > threshold) | (jnp.max(other, axis=-1) > threshold)',
        'confident = (jnp.max(own, axis=-1) > threshold) & (jnp.max(other, axis=-1) > threshold)',
        'stability needs both views confident, not either',
    )),
    *group('semimeta_jax/methods/augment.py', DS_VIEWS, (
        'dual-one-flip-per-view',
        'mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))',
        'mirrored = jnp.broadcast_to(jax.random.bernoulli(flip_key, 0.5), (batch,))',
        'one flip drawn per view for the whole batch, not one per example',
    )),
    *group('semimeta_jax/methods/dual_student.py', DS_TERMS, (
        'dual-consistency-same-view',
        'consistency = jnp.mean(per_example_softmax_mse(cons_own[s], class_other[s]))',
        'consistency = jnp.mean(per_example_softmax_mse(cons_own[s], class_own[s]))',
        'consistency against the class head on its own view, not the other view',
    ), (
        'dual-logit-distance-unweighted',
        'total += (supervised + block.logit_distance_weight * logit_distance',
        'total += (supervised + logit_distance',
        'logit distance without its weight',
    ), (
        'dual-students-share-a-view',
        'return {s: perturb(state.step_key(common.NOISE, _STUDENT_TAG[s]), images) for s in (FIRST, SECOND)}',
        'return {s: perturb(state.step_key(common.NOISE), images) for s in (FIRST, SECOND)}',
        'both students perturbed by one key: one view, not one each',
    )),
    *group('semimeta_jax/methods/pseudo_label.py', PSEUDO_ALPHA, (
        'pseudo-weight-one-step-ahead',
        'weight = alpha_schedule(config)(state.step)',
        'weight = alpha_schedule(config)(state.step + 1)',
        'alpha read one step ahead of the step being taken',
    ), (
        'pseudo-ramp-without-delay',
        'return alpha_f * jnp.clip((count - start) / (end - start), 0.0, 1.0)',
        'return alpha_f * jnp.clip(count / end, 0.0, 1.0)',
        "alpha ramped from step 0, without Lee's delay T1",
    )),
]
