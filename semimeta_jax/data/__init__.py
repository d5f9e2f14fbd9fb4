"""Input: datasets, the labeled split, training batches, evaluation.

The training loop uses:

  data.dataset_info(config.data) -> data.DatasetInfo
  data.build_input(config, workdir, start_step=..., ...) -> data.Input
  data.DatasetNotFoundError

Layers, top to bottom (a module imports from its own layer or the ones below, never above):

  pipeline.py         build_input: the checks, then one of the two input paths
  resident_input.py   in-memory data, batches made on the devices
  streamed_input.py   record streams decoded on the host (record_streams.py,
                      stream_augment.py), prefetched to the devices
  input_contract.py   the `Input` both paths produce; beside it what both share:
                      train_pools.py, normalization.py, eval_batches.py, device_input.py
  catalog.py          config.data -> DatasetSpec, the dispatcher over the dataset kinds:
                      folder.py, tfds_by_name.py, the built-in and registered specs
                      (digits.py, synthetic.py); TFDS reading in tfds_builders.py, tfds_arrays.py
  specs.py, config_checks.py, splits.py, validation_split.py, sampling.py, device_augment.py
                      the bottom

Importing this package does not import TensorFlow: only reading TFDS data does
(`tfds_builders.py`, `tfds_arrays.py`, `streamed_input.py`), so a registered
in-memory dataset (`register_in_memory`, e.g. `synthetic.register`) trains without it.
"""

from semimeta_jax.data.catalog import dataset_info
from semimeta_jax.data.input_contract import Input
from semimeta_jax.data.pipeline import build_input
from semimeta_jax.data.specs import DatasetInfo
from semimeta_jax.data.specs import DatasetNotFoundError
from semimeta_jax.data.specs import DatasetSpec
from semimeta_jax.data.specs import register_in_memory
from semimeta_jax.data.splits import SplitMismatchError

__all__ = [
    'build_input',
    'dataset_info',
    'DatasetInfo',
    'DatasetNotFoundError',
    'DatasetSpec',
    'Input',
    'register_in_memory',
    'SplitMismatchError',
]
