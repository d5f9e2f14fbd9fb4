"""The planted bugs of `mutation_check.py` outside the training step: evaluation and models.

Same form as `mutants.py` (file, exact snippet, replacement, the bug, the tests that catch it).
"""

from experiments.mutants import group

EVALUATION = 'tests/test_evaluation.py'
PADDED_SHARES = 'tests/test_evaluation.py::TestPaddedShares'
REMAT = 'tests/test_remat.py'

MUTANTS = [
    *group('semimeta_jax/evaluation.py', (EVALUATION,), (
        'eval-padding-summed',
        'masked_sum = lambda values: jnp.sum(values * mask)',
        'masked_sum = lambda values: jnp.sum(values)',
        'sums over padded rows, count masked (planted bug 5)',
    ), (
        'eval-count-unmasked',
        "'count': jnp.sum(mask),",
        "'count': jnp.asarray(mask.shape[0], jnp.float32),",
        'padded rows counted',
    ), (
        'eval-top5-is-top1',
        "masked_sum(losses.topk_correct(logits, batch['label'], 5))",
        "masked_sum(losses.topk_correct(logits, batch['label'], 1))",
        'top-5 computed as top-1',
    ), (
        'eval-last-batch-only',
        'totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)',
        'totals = sums',
        'only the last batch is kept',
    )),
    *group('semimeta_jax/methods/ema.py', (EVALUATION,), (
        'eval-ema-params-ignored',
        "return state.extra[NAME]['params'], state.extra[NAME]['batch_stats']",
        "return state.params, state.extra[NAME]['batch_stats']",
        'EMA evaluation reads the raw weights',
    )),
    *group('semimeta_jax/data/eval_batches.py', (PADDED_SHARES,), (
        'data-eval-batches-floor',
        'largest_share = math.ceil(num_examples / process_count)',
        'largest_share = num_examples // process_count',
        'too few batches for the largest share',
    ), (
        'data-eval-mask-short',
        'mask[:count] = True',
        'mask[:max(count - 1, 0)] = True',
        'last real row of a batch masked out',
    ), (
        'data-eval-normalise',
        "yield {'image': (chunk - mean) / std,",
        "yield {'image': (chunk - mean) * std,",
        'normalisation multiplies by std',
    ), (
        'data-eval-padding-short',
        'for _ in range(num_batches - count):',
        'for _ in range(num_batches - count - 1):',
        'one fully masked batch too few',
    ), (
        'data-eval-longer-stream-accepted',
        'if count == num_batches:',
        'if count > num_batches:',
        'a stream longer than num_batches is accepted',
    ), (
        'data-eval-share-overlap',
        'return int(bounds[process_index]), int(bounds[process_index + 1])',
        'return int(bounds[process_index]), int(bounds[process_index + 1]) + 1',
        'process shares overlap by one example',
    )),
    *group('semimeta_jax/models/layers.py', (REMAT,), (
        'remat-ignored',
        'RematBatchNorm if remat else nn.BatchNorm,',
        'nn.BatchNorm,',
        'remat=batch_norm keeps every activation',
    ), (
        'remat-renames-layers',
        "RematBatchNorm.__name__ = RematBatchNorm.__qualname__ = 'BatchNorm'",
        'pass',
        'rematerialised layers get other names (checkpoints no longer interchangeable)',
    )),
]
