"""The planted bugs of `mutation_check.py` in SNTG, VAT + VAdD, TNAR-VAE (and its VAE), MA-DNN,
ADA-Net (the two-network methods and Pseudo-Label: `mutants_two_networks.py`).

Same form as `mutants.py` (file, exact snippet, replacement, the bug, the tests that
catch it). Each subset is only the tests that pin the exact value (a loss, a mask or
a direction against a NumPy, brute-force or dense linear-algebra reference). Names
start with the method's prefix (`sntg-`, `vadd-`, `tnar-`, `vae-`, `madnn-`,
`adanet-`; `cot-`, `dual-`, `second-`, `pseudo-` in `mutants_two_networks.py`), for `--only`:
  python -m experiments.mutation_check --only=sntg-,vadd-,tnar-,vae-,madnn-,adanet-,cot-,dual-,second-,pseudo-
(57 of 57 killed in 9.7 min on 2 shared CPU cores; the 17 added or rewritten with the rows'
reference scales and the Pseudo-Label ramp, 17 of 17 in 6.7 min). Fourteen of the first 57 change only how
a step composes parts that are checked on their own (a weight, an operand, a gradient
path, the running averages kept); their tests rebuild the step's loss, gradient or
statistics from those parts: TNAR's loss at the VAE's code, co-training's forward
chain, Dual Student's terms, ADA-Net's reversed gradient and MA-DNN's gradient
through the unlabeled features.

Left out on purpose (equivalent mutants, no test can tell them apart):
  * MA-DNN: dropping `_normalise_rows` from the value update. Each updated row
    v - eta / (1 + n) (n v - sum p_i) sums to 1 - eta n / (1 + n) + eta n / (1 + n)
    = 1 when v and the p_i are distributions, so the normalisation changes rounding only.
  * VAdD: dropping the `stop_gradient` on the target inside `adversarial_mask`: the
    search differentiates with respect to the mask only, never the target.
  * SNTG: dropping the `stop_gradient` around `hard_labels`: an argmax and integer
    labels carry no gradient either way.
  * MA-DNN: dropping the `stop_gradient` on the updated memory in `objective`: the
    update's inputs (labeled features and predictions) are already held constant, and
    the old memory is state, not a parameter.
"""

from experiments.mutants import group

_SNTG = 'tests/test_sntg.py::'
SNTG_LOOP = (_SNTG + 'test_graph_loss_equals_a_loop_over_the_pairs',)
SNTG_GRAD = (_SNTG + 'test_the_gradient_reaches_both_halves_as_the_loop_says',)
SNTG_LABELS = (_SNTG + 'test_the_labels_are_constants_of_the_teacher_target',)
SNTG_STEP = (_SNTG + 'test_the_step_adds_the_ramped_weight_times_the_loop_loss[mean_teacher]',)
SNTG_PAIRS = (_SNTG + 'test_the_pairs_are_two_rows_of_the_batch_drawn_without_replacement',)

_VADD = 'tests/test_vadd.py::'
VADD_MASK = (_VADD + 'test_the_mask_is_the_brute_force_maximiser_of_the_linearised_divergence',)
VADD_STEP = (_VADD + 'test_the_step_traces_once_and_adds_lambda_times_the_masked_kl',)

_TNAR = 'tests/test_tnar.py::'
TNAR_CG = (_TNAR + 'test_conjugate_gradient_solves_the_explicit_gram_system',)
TNAR_TANGENT = (_TNAR + 'test_the_tangent_perturbation_is_the_top_generalised_eigenvector_'
                       'in_the_tangent_space',)
TNAR_NORMAL = (_TNAR + 'test_the_normal_perturbation_is_orthogonal_to_the_tangent_one_'
                      'and_vats_projected_direction',)
TNAR_PROBE = (_TNAR + 'test_the_finite_difference_probe_approximates_the_exact_directions',)
TNAR_LOSS = (_TNAR + 'test_the_loss_weighs_the_two_kls_and_the_entropy_at_the_vae_code',)
TNAR_RADII = (_TNAR + 'test_the_radii_in_the_references_units_are_the_presets[digits]',)
TNAR_MASKS = (_TNAR + 'test_the_clean_and_the_two_adversarial_forwards_draw_their_own_dropout_masks',)
VAE_ELBO = ('tests/test_vae.py::test_the_elbo_equals_a_numpy_computation',)

_MEMORY = 'tests/test_memory.py::'
MEMORY_UPDATE = (_MEMORY + 'test_the_update_equals_a_loop_over_the_batch',)
MEMORY_LOSS = (_MEMORY + 'test_the_prediction_and_loss_equal_numpy',)
MEMORY_STEP = (_MEMORY + 'test_a_step_updates_the_memory_first_and_trains_on_the_numpy_loss',)
MEMORY_GRAD = (_MEMORY + 'test_the_weighted_memory_loss_trains_the_unlabeled_features_'
                        'and_not_the_memory_update',)

_ADANET = 'tests/test_adanet.py::'
ADANET_REVERSAL = (_ADANET + 'test_the_reversal_layer_is_the_identity_with_minus_c_times_its_gradient',)
ADANET_SCHEDULE = (_ADANET + 'test_the_reversal_coefficient_follows_its_schedule',)
ADANET_LOSS = (_ADANET + 'test_the_mixed_batch_and_the_loss_equal_numpy',)
ADANET_PSEUDO = (_ADANET + 'test_the_pseudo_labels_carry_no_gradient',)
ADANET_REVERSED = (_ADANET + 'test_the_features_receive_minus_c_times_the_weighted_alignment_gradient',)


MUTANTS = [
    *group('semimeta_jax/methods/sntg.py', SNTG_LOOP, (
        'sntg-pairs-adjacent',
        'distance2 = jnp.mean(jnp.square(features[:half] - features[half:2 * half]), axis=-1)',
        'distance2 = jnp.mean(jnp.square(features[0:2 * half:2] - features[1:2 * half:2]), axis=-1)',
        'features paired (2i, 2i + 1), the labels (i, i + B // 2)',
    ), (
        'sntg-odd-batch-drops-middle',
        'neighbours = (labels[:half] == labels[half:2 * half]).astype(features.dtype)',
        'neighbours = (labels[:half] == labels[-half:]).astype(features.dtype)',
        'odd batch: the labels of example i compared with example i + B // 2 + 1',
    ), (
        'sntg-hinge-unsquared',
        'pushed = jnp.square(jnp.maximum(margin - _safe_sqrt(distance2), 0.0))',
        'pushed = jnp.maximum(margin - _safe_sqrt(distance2), 0.0)',
        'margin hinge max(0, m - d) without its square',
    ), (
        'sntg-distance-summed',
        'distance2 = jnp.mean(jnp.square(features[:half] - features[half:2 * half]), axis=-1)',
        'distance2 = jnp.sum(jnp.square(features[:half] - features[half:2 * half]), axis=-1)',
        'squared distance summed over the feature dimensions, not averaged',
    )),
    *group('semimeta_jax/methods/sntg.py', SNTG_GRAD, (
        'sntg-second-half-stopped',
        'distance2 = jnp.mean(jnp.square(features[:half] - features[half:2 * half]), axis=-1)',
        'distance2 = jnp.mean(jnp.square(features[:half] - jax.lax.stop_gradient(features[half:2 * half])),'
        ' axis=-1)',
        'the second half of the pairs held fixed (no gradient)',
    )),
    *group('semimeta_jax/methods/sntg.py', SNTG_LABELS, (
        'sntg-true-labels-ignored',
        'return jax.lax.stop_gradient(predicted.at[:labels.shape[0]].set(labels))',
        'return jax.lax.stop_gradient(predicted)',
        "the teacher's argmax on the labeled rows too, not their true labels",
    )),
    *group('semimeta_jax/methods/sntg.py', SNTG_STEP, (
        'sntg-no-rampup',
        'weight = config.sntg.weight * consistency_weight',
        'weight = config.sntg.weight * config.consistency_weight',
        'SNTG weight without the consistency ramp-up',
    ), (
        'sntg-weight-without-wmax',
        'weight = config.sntg.weight * consistency_weight',
        'weight = config.sntg.weight * consistency_weight / config.consistency_weight',
        "SNTG weight times the ramp only, without the host's w_max",
    )),
    *group('semimeta_jax/methods/sntg.py', SNTG_PAIRS, (
        'sntg-pairs-unshuffled',
        'return jax.random.permutation(state.step_key(common.NOISE, PAIRS_TAG), batch_size)',
        'return jnp.arange(batch_size)',
        'rows paired in the batch order: every pair labeled-unlabeled',
    )),
    *group('semimeta_jax/methods/vadd.py', VADD_MASK, (
        'vadd-flip-smallest',
        'top_gain, top_index = jax.lax.top_k(gain, num_flips)',
        'top_gain, top_index = jax.lax.top_k(-jnp.abs(grad), num_flips)',
        'the k entries of smallest |g| flipped, not the k largest gains',
    ), (
        'vadd-gain-sign',
        'gain = grad * (1.0 - 2.0 * mask)',
        'gain = grad * (2.0 * mask - 1.0)',
        'the flips that lower the divergence chosen',
    ), (
        'vadd-flips-without-gain',
        '* (top_gain > 0)[..., None].astype(mask.dtype), axis=-2)',
        '* (top_gain > -jnp.inf)[..., None].astype(mask.dtype), axis=-2)',
        'always k flips, also those that lower the divergence',
    ), (
        'vadd-not-rescaled',
        'return rescale(flip(ones, grad, num_flips)), grad',
        'return flip(ones, grad, num_flips), grad',
        "the mask not rescaled to mean 1 (the authors' normalisation)",
    ), (
        'vadd-rescale-over-batch',
        'return mask * (dim / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))',
        'return mask * (dim / jnp.maximum(jnp.mean(jnp.sum(mask, axis=-1, keepdims=True)), 1.0))',
        "rescaled by the batch's mean kept count, not each example's",
    )),
    *group('semimeta_jax/methods/vadd.py', VADD_STEP, (
        'vadd-kl-reversed',
        'vadd_loss = kl_with_logits(clean, masked_head(fc_params, features, mask))',
        'vadd_loss = kl_with_logits(masked_head(fc_params, features, mask), clean)',
        'the VAdD term as KL(f(x; m) || f(x)), the other direction',
    ), (
        'vadd-lambda-unramped',
        'lam = config.vadd.weight * sntg.rampup(config, state.step)',
        'lam = config.vadd.weight',
        'lambda without the ramp-up',
    ), (
        'vadd-vat-term-ramped',
        'weight = jnp.asarray(config.consistency_weight, jnp.float32)',
        'weight = config.consistency_weight * sntg.rampup(config, state.step)',
        "the VAT term ramped up with lambda (the authors' combined loss has it at full weight)",
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_CG, (
        'tnar-cg-beta-inverted',
        'beta = jnp.where(squared > 0, new_squared / jnp.where(squared > 0, squared, 1), 0)',
        'beta = jnp.where(squared > 0, squared / jnp.where(new_squared > 0, new_squared, 1), 0)',
        "CG's beta inverted (old over new residual norm)",
    ), (
        'tnar-cg-residual-sign',
        'residual = residual - alpha * product',
        'residual = residual + alpha * product',
        "CG's residual updated with the wrong sign",
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_TANGENT, (
        'tnar-tangent-without-gram-solve',
        'r = normalize(jax.lax.stop_gradient(conjugate_gradient(gram, h_r, cg_iterations)))',
        'r = h_r',
        'tangent: ordinary power iteration on H_z, without the solve against J^T J',
    ), (
        'tnar-tangent-from-x',
        'return jax.lax.stop_gradient(decode(z + epsilon * r) - reconstruction)',
        'return jax.lax.stop_gradient(decode(z + epsilon * r) - x)',
        'x_tan = g(z + eps r), not x + g(z + eps r) - g(z)',
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_NORMAL, (
        'tnar-normal-unprojected-iterates',
        'd = normalize(project(jax.lax.stop_gradient(_curvature_product(kl, d, xi))))',
        'd = normalize(jax.lax.stop_gradient(_curvature_product(kl, d, xi)))',
        "normal: VAT's iterates without the tangent projection (only the last one projected)",
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_PROBE, (
        'tnar-probe-at-d',
        'return jax.grad(kl)(xi * d)',
        'return jax.grad(kl)(d)',
        'finite-difference probe at the unit direction, not at xi d',
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_LOSS, (
        'tnar-weights-swapped',
        'weight * (block.weight_tangent * tangent_loss + block.weight_normal * normal_loss)',
        'weight * (block.weight_normal * tangent_loss + block.weight_tangent * normal_loss)',
        'the tangent KL weighted by the normal weight and the other way round',
    ), (
        'tnar-code-is-logvar',
        'encode = lambda x: model.apply(variables, x, method=vae_lib.VAE.encode)[0]',
        'encode = lambda x: model.apply(variables, x, method=vae_lib.VAE.encode)[1]',
        "the code z taken as the encoder's log-variance, not its mean",
    ), (
        'tnar-normal-kl-at-tangent',
        'normal_loss = vat.kl_to_clean(clean, logits_fn(params, x_u + normal, NORMAL_PASS))',
        'normal_loss = vat.kl_to_clean(clean, logits_fn(params, x_u + tangent, NORMAL_PASS))',
        'the normal KL evaluated at the tangent perturbation',
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_RADII, (
        'tnar-l2-normalisation',
        "return {'max': max_normalize, 'l2': vat.normalize}[normalization]",
        'return vat.normalize',
        "unit L2 directions under the 'max' setting, not the authors' max-norm ones",
    ), (
        'tnar-normal-radius-standardised',
        'return jax.lax.stop_gradient(epsilon * normalize(project(d)) / std)',
        'return jax.lax.stop_gradient(epsilon * normalize(project(d)))',
        'normal radius applied to the standardised inputs, not in [0, 1] pixel units',
    )),
    *group('semimeta_jax/methods/tnar.py', TNAR_MASKS, (
        'tnar-one-dropout-mask',
        'state, p, x, stats, state.step_key(common.DROPOUT_UNLABELED, *tags))[0]',
        'state, p, x, stats, state.step_key(common.DROPOUT_UNLABELED))[0]',
        'the adversarial forwards share the clean forward\'s dropout mask',
    )),
    *group('semimeta_jax/models/vae.py', VAE_ELBO, (
        'vae-kl-logvar-sign',
        'kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=1)',
        'kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 + logvar, axis=1)',
        "KL to N(0, I) with the log-variance's sign flipped",
    ), (
        'vae-std-is-variance',
        'return self.decode(mu + jnp.exp(0.5 * logvar) * noise), mu, logvar',
        'return self.decode(mu + jnp.exp(logvar) * noise), mu, logvar',
        'reparameterisation scaled by the variance, not the standard deviation',
    ), (
        'vae-nll-sigma-unsquared',
        'nll = 0.5 * squared / decoder_std ** 2 + dims',
        'nll = 0.5 * squared / decoder_std + dims',
        'Gaussian likelihood divided by sigma, not sigma^2',
    )),
    *group('semimeta_jax/methods/memory.py', MEMORY_UPDATE, (
        'madnn-update-without-count',
        'step = update_rate / (1.0 + counts)',
        'step = update_rate',
        'memory update without the per-class count 1 / (1 + n_c)',
    ), (
        'madnn-key-pulled-once',
        'new_keys = keys - step * (counts * keys - per_class(features))',
        'new_keys = keys - step * (keys - per_class(features))',
        'key update subtracts k_c once, not once per example of the class',
    )),
    *group('semimeta_jax/methods/memory.py', MEMORY_LOSS, (
        'madnn-memberships-to-far-keys',
        'memberships = jnp.clip(jax.nn.softmax(-distances, axis=-1), DISTANCE_EPSILON, 1.0)',
        'memberships = jnp.clip(jax.nn.softmax(distances, axis=-1), DISTANCE_EPSILON, 1.0)',
        'memberships favour the farthest keys (softmax of +d)',
    ), (
        'madnn-kl-unweighted',
        'return jnp.mean(entropy + certainty * divergence), jnp.mean(entropy), jnp.mean(divergence)',
        'return jnp.mean(entropy + divergence), jnp.mean(entropy), jnp.mean(divergence)',
        'divergence without the factor max(p_mem)',
    )),
    *group('semimeta_jax/methods/memory.py', MEMORY_STEP, (
        'madnn-prediction-from-old-memory',
        'memory_probs = memory_prediction(memory, labels, features[num_labeled:])',
        'memory_probs = memory_prediction(state.extra[NAME], labels, features[num_labeled:])',
        "p_mem read from the memory before this batch's update",
    )),
    *group('semimeta_jax/methods/memory.py', MEMORY_GRAD, (
        'madnn-unlabeled-features-stopped',
        'memory_probs = memory_prediction(memory, labels, features[num_labeled:])',
        'memory_probs = memory_prediction(memory, labels, jax.lax.stop_gradient(features[num_labeled:]))',
        'no gradient from the memory loss into the unlabeled features',
    ), (
        'madnn-loss-unweighted',
        'loss = supervised + config.ma_dnn.weight * unsupervised',
        'loss = supervised + unsupervised',
        'memory loss without its weight',
    )),
    *group('semimeta_jax/methods/adanet.py', ADANET_REVERSAL, (
        'adanet-reversal-sign',
        'return -coefficient * cotangent, jnp.zeros_like(coefficient)',
        'return coefficient * cotangent, jnp.zeros_like(coefficient)',
        'gradient-reversal layer passes +c times the gradient',
    )),
    *group('semimeta_jax/methods/adanet.py', ADANET_SCHEDULE, (
        'adanet-coefficient-sign',
        'return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0',
        'return 2.0 / (1.0 + jnp.exp(10.0 * progress)) - 1.0',
        'reversal coefficient from 0 down to -1 (sign of the exponent)',
    )),
    *group('semimeta_jax/methods/adanet.py', ADANET_LOSS, (
        'adanet-target-lambda-swapped',
        'return images, lam[:, None] * one_hot + (1.0 - lam[:, None]) * targets',
        'return images, (1.0 - lam[:, None]) * one_hot + lam[:, None] * targets',
        "mixed target with lambda on the pseudo-label, not on the true label",
    ), (
        'adanet-discriminator-target-swapped',
        'jnp.stack([lam, 1.0 - lam], axis=-1)',
        'jnp.stack([1.0 - lam, lam], axis=-1)',
        "discriminator's target [1 - lambda, lambda]",
    ), (
        'adanet-ce-unweighted',
        'classification = jnp.mean(lam * soft_cross_entropy_per_example(logits, mixed_targets))',
        'classification = jnp.mean(soft_cross_entropy_per_example(logits, mixed_targets))',
        'mixed cross-entropy without its per-pair weight lambda',
    )),
    *group('semimeta_jax/methods/adanet.py', ADANET_PSEUDO, (
        'adanet-pseudo-labels-differentiated',
        'return jax.lax.stop_gradient(probs), jax.lax.stop_gradient(logits)',
        'return probs, jax.lax.stop_gradient(logits)',
        'the pseudo-labels pass a gradient into the classifier',
    )),
    *group('semimeta_jax/methods/adanet.py', ADANET_REVERSED, (
        'adanet-coefficient-ignored',
        'reverse_gradient(losses.at_least_float32(features), coefficient))',
        'reverse_gradient(losses.at_least_float32(features), jnp.ones_like(coefficient)))',
        'gradient reversed at full strength from step 0 (the schedule c ignored)',
    ), (
        'adanet-alignment-unweighted',
        'loss = classification + config.adanet.alignment_weight * alignment',
        'loss = classification + alignment',
        'alignment loss without its weight',
    )),
]
