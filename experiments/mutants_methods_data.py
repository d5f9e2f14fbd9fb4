"""The planted bugs of `mutation_check.py` in the methods' loss terms and timing, the
checkpoint checksums, the datasets' loading, the workdir's links and the dispatch queue.

Same form as `mutants.py` (file, exact snippet, replacement, the bug, the tests that
catch it). Each subset is only the tests that pin the exact value (a loss against a
numpy reference, a boundary one unit either side): pytest runs a file's tests in
file order, so a wider subset could name a broader test that happens to fail first.
"""

from experiments.mutants import group

MIXUP_TARGET = 'tests/test_semimeta_mixup_target.py'
MEAN_TEACHER = 'tests/test_mean_teacher.py'
TE_LOSS = ('tests/test_temporal_ensembling.py::'
           'test_the_loss_is_the_ce_plus_the_weighted_class_averaged_squared_error_over_the_batch')
VAT_TERMS = ('tests/test_vat.py::test_the_lds_is_the_kl_from_the_clean_to_the_perturbed_prediction',
             'tests/test_vat.py::test_the_objective_adds_the_weighted_lds_and_entropy_to_the_ce')
FAST_SWA_TIMING = 'tests/test_fast_swa_timing.py'
INTEGRITY = 'tests/test_integrity.py'
FOLDER = 'tests/test_folder_labels.py'
TFDS_MEMORY = 'tests/test_tfds_memory_decision.py'
RELATIVE_LINKS = ('tests/test_faults_workdir.py::test_a_relative_link_out_is_resolved_and_refused',)
FOLDER_LOOPS = ('tests/test_faults_inputs.py::test_a_folder_linking_to_itself_or_a_folder_above_is_a_loop',)
RUN_AHEAD = ('tests/test_dispatch.py::test_the_host_runs_ahead_by_exactly_max_in_flight_steps',)

MUTANTS = [
    *group('semimeta_jax/methods/semimeta.py', (MIXUP_TARGET,), (
        'sm-mixup-target-from-ytil',
        "image, target = mixup(labeled, unlabeled['image'], yhat, num_classes=num_classes,",
        "image, target = mixup(labeled, unlabeled['image'], ytil, num_classes=num_classes,",
        'mix-up target built from the pseudo-labels before the meta step',
    )),
    *group('semimeta_jax/methods/vat.py', VAT_TERMS, (
        'vat-kl-reversed',
        'return losses.kl_divergence(jax.nn.softmax(jax.lax.stop_gradient(losses.at_least_float32(clean_logits))),\n'
        '                              logits)',
        'return losses.kl_divergence(jax.nn.softmax(losses.at_least_float32(logits)),\n'
        '                              jax.lax.stop_gradient(clean_logits))',
        'LDS as the KL from the perturbed to the clean prediction (the other direction)',
    ), (
        'vat-ent-entropy-subtracted',
        'supervised + weight * vat_loss + config.vat.entropy_weight * entropy, config',
        'supervised + weight * vat_loss - config.vat.entropy_weight * entropy, config',
        'VAT+Ent: entropy subtracted (maximised) instead of added',
    ), (
        'vat-lds-unweighted',
        'supervised + weight * vat_loss + config.vat.entropy_weight * entropy, config',
        'supervised + vat_loss + config.vat.entropy_weight * entropy, config',
        'VAT term without its weight w(t)',
    )),
    *group('semimeta_jax/methods/temporal_ensembling.py', (TE_LOSS,), (
        'te-mse-summed-over-classes',
        'per_example = jnp.mean(jnp.square(probs - ensemble_targets), axis=-1)',
        'per_example = jnp.sum(jnp.square(probs - ensemble_targets), axis=-1)',
        'squared error summed over classes, not averaged (10x the weight)',
    ), (
        'te-consistency-over-targets-only',
        'consistency = jnp.mean(jnp.where(has_target, per_example, 0.0))',
        'consistency = jnp.sum(jnp.where(has_target, per_example, 0.0)) / jnp.maximum(jnp.sum(has_target), 1)',
        'consistency divided by the examples with a target, not the batch',
    )),
    *group('semimeta_jax/methods/mean_teacher.py', (MEAN_TEACHER,), (
        'mt-consistency-unlabeled-only',
        'consistency = pi_model.softmax_mse(logits, teacher_logits)',
        'consistency = pi_model.softmax_mse(logits[num_labeled:], teacher_logits[num_labeled:])',
        'consistency on the unlabeled rows only, not every row',
    ), (
        'mt-supervised-on-teacher',
        "supervised = losses.cross_entropy(logits[:num_labeled], labeled['label'])",
        "supervised = losses.cross_entropy(teacher_logits[:num_labeled], labeled['label'])",
        'CE of the teacher (no gradient) instead of the student',
    )),
    *group('semimeta_jax/methods/fast_swa.py', (FAST_SWA_TIMING,), (
        'fswa-eval-raw-batch-stats',
        "return state.extra[NAME]['params'], state.extra[NAME]['batch_stats']",
        "return state.extra[NAME]['params'], state.batch_stats",
        "the average evaluated with the raw model's batch-norm statistics",
    )),
    *group('semimeta_jax/methods/fast_swa.py', (FAST_SWA_TIMING,), (
        'sched-swa-cycles-from-step-0',
        'phase = jnp.mod(jnp.asarray(count) - start, cycle_steps)',
        'phase = jnp.mod(jnp.asarray(count), cycle_steps)',
        "cycles timed from step 0, not from the tail's start",
    )),
    *group('semimeta_jax/methods/fast_swa.py', (FAST_SWA_TIMING,), (
        'fswa-snapshots-from-step-0',
        'into_tail % config.fast_swa.average_every_steps == 0',
        'updates_taken % config.fast_swa.average_every_steps == 0',
        "snapshots every k steps from step 0, not from the tail's start",
    )),
    *group('semimeta_jax/integrity.py', (INTEGRITY,), (
        'integrity-record-skips-last-array',
        'for path, leaf in _paths_and_leaves(tree):',
        'for path, leaf in _paths_and_leaves(tree)[:-1]:',
        'the checksum record leaves out the last stored array',
    ), (
        'integrity-check-skips-first-array',
        'for path in sorted(record.keys() | actual.keys()):',
        'for path in sorted(record.keys() | actual.keys())[1:]:',
        'the verification skips the first stored array',
    )),
    *group('semimeta_jax/data/folder.py', (FOLDER,), (
        'folder-test-labels-renumbered',
        'labels = [i for i, name in enumerate(names) if name in by_class for _ in by_class[name]]',
        'labels = [i for i, name in enumerate(sorted(by_class)) for _ in by_class[name]]',
        "labels numbered among the split's own classes (a class missing from test/ shifts the rest)",
    ), (
        'folder-unlabeled-not-counted',
        '_check_fits(train_paths + unlabeled_paths, root, image_size, max_in_memory_gb)',
        '_check_fits(train_paths, root, image_size, max_in_memory_gb)',
        'size limit ignores the unlabeled images',
    ), (
        'folder-limit-in-mib',
        'if num_bytes > max_in_memory_gb * 2**30:',
        'if num_bytes > max_in_memory_gb * 2**20:',
        'size limit read in MiB',
    )),
    *group('semimeta_jax/data/tfds_by_name.py', (TFDS_MEMORY,), (
        'tfds-limit-in-mib',
        'num_bytes > data_config.max_in_memory_gb * 2**30:',
        'num_bytes > data_config.max_in_memory_gb * 2**20:',
        'memory limit read in MiB',
    ), (
        'tfds-limit-decimal-gb',
        'num_bytes > data_config.max_in_memory_gb * 2**30:',
        'num_bytes > data_config.max_in_memory_gb * 1e9:',
        'memory limit read in decimal GB',
    ), (
        'tfds-channels-dropped',
        'return rows * height * width * channels',
        'return rows * height * width',
        'training bytes counted at one channel',
    )),
    *group('semimeta_jax/data/tfds_builders.py', (TFDS_MEMORY,), (
        'tfds-unlabeled-not-counted',
        'rows += split_size(builder, spec.unlabeled_split)',
        'pass',
        'the unlabeled split left out of the training bytes',
    )),
    *group('semimeta_jax/workdir_files.py', RELATIVE_LINKS, (
        'workdir-relative-link-unresolved',
        '        target = os.path.realpath(path)\n',
        '        target = os.path.join(dirpath, os.readlink(path))\n',
        "a relative link's target joined to its folder without resolving '..' (a link out accepted)",
    )),
    *group('semimeta_jax/data/folder.py', FOLDER_LOOPS, (
        'folder-self-not-an-ancestor',
        '      _check_link(entry, root, ancestors)',
        '      _check_link(entry, root, ancestors[:-1])',
        'a folder not counted among its own ancestors (a link to itself walked endlessly)',
    )),
    *group('semimeta_jax/dispatch.py', RUN_AHEAD, (
        'dispatch-one-step-fewer-in-flight',
        'while len(self._pending) > self.max_in_flight:',
        'while len(self._pending) >= self.max_in_flight:',
        'one step fewer runs ahead than max_steps_in_flight (depth 1 is synchronous)',
    )),
]
