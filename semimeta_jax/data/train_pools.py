"""The training streams of a run: which rows each draws from, and its seeds.

Shared by both input paths, so that a labeled split and a seed give the same
pools and stream seeds whether the data is on the devices or streamed.
"""

import numpy as np

from semimeta_jax.data import input_contract
from semimeta_jax.data import splits

_LABELED, _UNLABELED = 0, 1
UNLABELED_STREAM = _UNLABELED  # Its id, for the draws of its strong view (streamed_input.py).


def stream_seeds(seed, stream_id):
  """(order seed, augmentation seed) of a stream, independent across streams."""
  state = np.random.SeedSequence([seed % 2**32, stream_id]).generate_state(2)
  return int(state[0]), int(state[1])


def pools(config, num_train, labeled, uses_unlabeled, num_unlabeled=0, held_out=None):
  """{stream: (train indices, global batch size, stream id)} of the run.

  With a truly unlabeled pool (the last `num_unlabeled` of the `num_train`
  rows, `DatasetSpec.num_unlabeled`), the unlabeled stream draws from those
  rows only (plus the labeled ones if `config.data.unlabeled_includes_labeled`).
  The `held_out` rows (the validation split) are in no pool.

  Raises:
    input_contract.InputConfigError: the unlabeled pool would be empty.
  """
  out = {'labeled': (labeled, config.labeled_batch_size, _LABELED)}
  if not uses_unlabeled:
    return out
  if num_unlabeled:
    unlabeled = np.arange(num_train - num_unlabeled, num_train, dtype=np.int64)
    if config.data.unlabeled_includes_labeled:
      unlabeled = np.union1d(labeled, unlabeled)
  else:
    unlabeled = splits.unlabeled_indices(
        num_train, labeled, config.data.unlabeled_includes_labeled)
  if held_out is not None and len(held_out):
    unlabeled = np.setdiff1d(unlabeled, held_out)
  if not unlabeled.size:
    raise input_contract.InputConfigError(
        'The unlabeled pool is empty (every training example is labeled or held out by '
        'config.data.validation_size); '
        'set config.data.unlabeled_includes_labeled=True, or choose a method that reads '
        'no unlabeled data.')
  out['unlabeled'] = (unlabeled, config.unlabeled_batch_size, _UNLABELED)
  return out
