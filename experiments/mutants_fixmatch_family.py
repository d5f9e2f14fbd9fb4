"""The planted bugs of `mutation_check.py` in the FixMatch family (FixMatch, UDA, FlexMatch,
FreeMatch, SoftMatch and their shared step, `methods/confidence.py`).

Same form as `mutants.py`. Names start with `conf-`, `fixm-`, `uda-`, `flex-`, `free-` or
`soft-`, for `--only`:
  python -m experiments.mutation_check --only=conf-,fixm-,uda-,flex-,free-,soft-
(34 of 34 killed on 2 shared CPU cores: 32 in 6.6 min; flex-linear-mapping and flex-no-guard
survived that first run, their tests were rewritten to tell them apart, and both were killed.)
Each subset is the tests that pin the value against USB's hooks restated in NumPy
(tests/test_fixmatch_family.py) or the step's loss and gradient against them
(tests/test_fixmatch_family_state.py, its quick cases).

Left out on purpose (equivalent mutants, no test can tell them apart):
  * FreeMatch's `stop_gradient` on mod_p and on the strong histogram: p_model and
    label_hist are statistics of constants, and a histogram of argmaxes has no gradient.
  * `>=` turned into `>` in the thresholds: equal only where a probability equals the
    threshold exactly, which random logits never produce.
"""

from experiments.mutants import group

C, FIX, UDA = 'semimeta_jax/methods/confidence.py', 'semimeta_jax/methods/fixmatch.py', 'semimeta_jax/methods/uda.py'
FLEX, FREE = 'semimeta_jax/methods/flexmatch.py', 'semimeta_jax/methods/freematch.py'
SOFT = 'semimeta_jax/methods/softmatch.py'

_F = 'tests/test_fixmatch_family.py::'
CE = (_F + 'test_consistency_loss_divides_by_the_batch_for_hard_and_soft_targets',)
FIXMATCH = (_F + 'test_fixmatch_masks_at_p_cutoff_and_targets_the_argmax_or_the_probabilities',)
UDA_TARGETS = (_F + 'test_uda_targets_are_the_probabilities_unless_sharpened',)
UDA_TSA = (_F + 'test_uda_tsa_masks_the_labeled_rows_above_its_threshold',)
FLEX_STEPS = (_F + 'test_flexmatch_memory_and_thresholds_follow_usb_over_several_steps',)
FLEX_SAME = (_F + 'test_flexmatch_same_index_twice_keeps_the_last_selected_row',)
FLEX_GUARD = (_F + 'test_flexmatch_sigma_is_kept_when_one_count_fills_the_pool',)
FLEX_MAPPING = (_F + 'test_flexmatch_mask_is_the_convex_mapping_of_sigma',)
FREE_STATS = (_F + 'test_freematch_statistics_update_before_the_mask_as_usb',)
FREE_FAIR = (_F + 'test_freematch_fairness_is_usbs_entropy_loss_with_its_sign',)
FREE_GRAD = (_F + 'test_freematch_fairness_gradient_matches_finite_differences_of_usbs_loss',)
SOFT_STEPS = (_F + 'test_softmatch_alignment_and_gaussian_follow_usb_over_several_steps',)
_S = 'tests/test_fixmatch_family_state.py::test_a_step_is_usbs_loss_gradient_and_statistics_and_traces_once'
STEP = (_S + '[flexmatch]', _S + '[softmatch]')

MUTANTS = [
    *group(C, CE + FIXMATCH, (
        'conf-ce-over-kept-rows',
        'return jnp.mean(weight * per_example)',
        'return jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(weight), 1.0)',
        'consistency CE divided by the kept rows, not by B_u',
    )),
    *group(C, STEP, (
        'conf-lambda-u-ignored',
        'loss = supervised_loss + config[name].lambda_u * unsupervised',
        'loss = supervised_loss + unsupervised',
        'the consistency loss not weighted by lambda_u',
    ), (
        'conf-views-swapped',
        "images = jnp.concatenate([labeled['image'], unlabeled['image'], unlabeled['strong_image']])",
        "images = jnp.concatenate([labeled['image'], unlabeled['strong_image'], unlabeled['image']])",
        'targets from the strong view, the loss on the weak one',
    ), (
        'conf-weak-with-gradient',
        'weak_logits = jax.lax.stop_gradient(logits[num_labeled:num_labeled + num_unlabeled])',
        'weak_logits = logits[num_labeled:num_labeled + num_unlabeled]',
        'gradient through the weak view (its targets and weights)',
    ), (
        'conf-statistics-not-kept',
        'return new_state.replace(extra=dict(new_state.extra, **{name: made.state})), metrics',
        'return new_state, metrics',
        "the method's statistics after the batch dropped",
    )),
    *group(FIX, FIXMATCH, (
        'fixm-no-threshold',
        'mask = confidence.fixed_threshold_mask(probs, block.p_cutoff)',
        'mask = confidence.fixed_threshold_mask(probs, 0.0)',
        'every unlabeled row kept',
    ), (
        'fixm-soft-sharpened',
        'targets = confidence.pseudo_labels(probs, hard=block.hard_label, from_logits=False)',
        'targets = confidence.pseudo_labels(weak_logits, hard=block.hard_label, temperature=block.T, '
        'from_logits=True)',
        'soft targets sharpened by T (USB passes the probabilities through)',
    )),
    *group(UDA, UDA_TARGETS, (
        'uda-always-sharpened',
        'targets = confidence.pseudo_labels(probs, hard=False, from_logits=False)',
        'targets = confidence.pseudo_labels(weak_logits, hard=False, temperature=block.T, from_logits=True)',
        "the paper's sharpening where USB's code passes the probabilities through",
    )),
    *group(UDA, UDA_TSA, (
        'uda-tsa-keeps-the-confident',
        'mask = (jnp.max(confidence.probabilities(logits), axis=-1) <= eta).astype(jnp.float32)',
        'mask = (jnp.max(confidence.probabilities(logits), axis=-1) >= eta).astype(jnp.float32)',
        'TSA keeps the rows above eta instead of below',
    ), (
        'uda-tsa-next-step',
        'progress = jnp.asarray(step, jnp.float32) / num_train_steps',
        'progress = (jnp.asarray(step, jnp.float32) + 1.0) / num_train_steps',
        'TSA read at the step after the one being taken',
    ), (
        'uda-tsa-exp-scale',
        'tau = jnp.exp((progress - 1.0) * 5.0)',
        'tau = jnp.exp((progress - 1.0) * 3.0)',
        "exp schedule's scale 3, not 5",
    )),
    *group(FLEX, FLEX_STEPS, (
        'flex-warmup-ignored',
        'denominator = largest if thresh_warmup else largest_class',
        'denominator = largest_class',
        'sigma divided by the largest class count even with thresh_warmup',
    ), (
        'flex-unused-over-the-split',
        'unused = pool_size - jnp.sum(counts)',
        'unused = jnp.sum(selected_label < 0)',
        'unused entries counted over the whole train split, not the pool',
    ), (
        'flex-selects-by-the-mask',
        '                    max_probs >= block.p_cutoff)',
        '                    mask > 0)',
        'the memory written where the flexible mask keeps a row, not at p_cutoff',
    ), (
        'flex-sigma-after-the-batch',
        "sigma = state['classwise_acc'][predicted]",
        "sigma = learning_effect(remember(state['selected_label'], unlabeled['index'].astype(jnp.int32), "
        "predicted, max_probs >= block.p_cutoff), state['classwise_acc'], pool_size=pool_size, "
        "thresh_warmup=block.thresh_warmup)[predicted]",
        "the mask from sigma after this batch's selections (USB masks first)",
    )),
    *group(FLEX, FLEX_MAPPING, (
        'flex-linear-mapping',
        'mask = (max_probs >= block.p_cutoff * (sigma / (2.0 - sigma))).astype(probs.dtype)',
        'mask = (max_probs >= block.p_cutoff * sigma).astype(probs.dtype)',
        'linear mapping of sigma, not the convex sigma / (2 - sigma)',
    )),
    *group(FLEX, FLEX_SAME, (
        'flex-first-row-wins',
        'later = jnp.triu(indices[:, None] == indices[None, :], k=1) & selected[None, :]',
        'later = jnp.tril(indices[:, None] == indices[None, :], k=-1) & selected[None, :]',
        'of one index twice in a batch, the first selected row writes',
    )),
    *group(FLEX, FLEX_GUARD, (
        'flex-no-guard',
        'return jnp.where(largest < pool_size, sigma, previous)',
        'return sigma',
        "sigma recomputed when one count fills the pool (USB's guard keeps it)",
    )),
    *group(FREE, FREE_STATS, (
        'free-mask-before-update',
        '  state = update_statistics(state, probs, momentum=block.ema_p, use_quantile=block.use_quantile,\n'
        '                            clip_thresh=block.clip_thresh)\n'
        '  mask = self_adaptive_mask(probs, state)',
        '  mask = self_adaptive_mask(probs, state)\n'
        '  state = update_statistics(state, probs, momentum=block.ema_p, use_quantile=block.use_quantile,\n'
        '                            clip_thresh=block.clip_thresh)',
        'the mask from the statistics before this batch',
    ), (
        'free-p-model-unscaled',
        "scaled = state['p_model'] / jnp.max(state['p_model'])",
        "scaled = state['p_model']",
        'class threshold time_p * p_model, not normalised by max(p_model)',
    ), (
        'free-quantile-ignored',
        'level = jnp.quantile(max_probs, 0.8) if use_quantile else jnp.mean(max_probs)',
        'level = jnp.mean(max_probs)',
        'use_quantile ignored',
    ), (
        'free-hist-of-probs',
        'confidence.class_histogram(predicted, probs.shape[-1]), momentum)}',
        'jnp.mean(probs, axis=0), momentum)}',
        'label_hist follows the mean probability, not the argmax histogram',
    )),
    *group(FREE, FREE_FAIR, (
        'free-fairness-sign',
        'return jnp.where(kept > 0, jnp.sum(mod_p * jnp.log(mod_q + 1e-12)), 0.0)',
        'return jnp.where(kept > 0, -jnp.sum(mod_p * jnp.log(mod_q + 1e-12)), 0.0)',
        "the fairness term's sign flipped (the cross-entropy, not USB's negative)",
    ), (
        'free-fairness-every-row',
        'keep = (mask > 0).astype(jnp.float32)',
        'keep = jnp.ones_like(mask, jnp.float32)',
        'the fairness term over every row, not the masked ones',
    ), (
        'free-fairness-label-hist-ignored',
        'mod_p = p_model * _inverse_or_zero(label_hist)',
        'mod_p = p_model',
        'p_model not divided by label_hist',
    )),
    *group(FREE, FREE_GRAD, (
        'free-fairness-mean-stopped',
        'mod_q = mean_q * jax.lax.stop_gradient(_inverse_or_zero(hist))',
        'mod_q = jax.lax.stop_gradient(mean_q) * jax.lax.stop_gradient(_inverse_or_zero(hist))',
        'no gradient through the mean strong probability',
    )),
    *group(C, SOFT_STEPS, (
        'soft-p-model-from-zero',
        "p_model = jnp.where(state['p_model_set'], ema(state['p_model'], batch_mean, momentum), batch_mean)",
        "p_model = ema(state['p_model'], batch_mean, momentum)",
        "p_model's EMA started at 0, not at the first batch's mean",
    ), (
        'soft-target-ema-ignored',
        '    p_target = ema(p_target, jnp.mean(probs_labeled, axis=0), momentum)',
        '    p_target = jnp.mean(probs_labeled, axis=0)',
        "p_target the labeled batch's mean, not its EMA",
    )),
    *group(SOFT, SOFT_STEPS, (
        'soft-targets-aligned',
        'targets = confidence.pseudo_labels(weak_logits, hard=block.hard_label, temperature=block.T,',
        'targets = confidence.pseudo_labels(aligned, hard=block.hard_label, temperature=block.T,',
        'targets from the aligned probabilities (USB: the unaligned logits)',
    ), (
        'soft-variance-biased',
        'batch_mu, batch_var = jnp.mean(max_probs), jnp.var(max_probs, ddof=1)',
        'batch_mu, batch_var = jnp.mean(max_probs), jnp.var(max_probs)',
        'the biased variance (USB: unbiased)',
    ), (
        'soft-untruncated',
        'return jnp.exp(-jnp.square(jnp.minimum(max_probs - mu, 0.0)) / (2.0 * var / n_sigma ** 2))',
        'return jnp.exp(-jnp.square(max_probs - mu) / (2.0 * var / n_sigma ** 2))',
        'the Gaussian not truncated above the mean',
    ), (
        'soft-n-sigma-unsquared',
        'return jnp.exp(-jnp.square(jnp.minimum(max_probs - mu, 0.0)) / (2.0 * var / n_sigma ** 2))',
        'return jnp.exp(-jnp.square(jnp.minimum(max_probs - mu, 0.0)) / (2.0 * var / n_sigma))',
        'var / n_sigma, not var / n_sigma^2',
    ), (
        'soft-single-member-counted',
        '  enough = count > 1',
        '  enough = count > 0',
        'per-class statistics from a single row (USB: two or more)',
    ), (
        'soft-weights-before-update',
        "row_mu, row_var = (mu[predicted], var[predicted]) if block.per_class else (mu, var)",
        "row_mu, row_var = (state['mu'][predicted], state['var'][predicted]) if block.per_class else (state['mu'], state['var'])",
        'the weights from the Gaussian before this batch',
    )),
]
