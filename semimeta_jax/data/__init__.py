"""Input: datasets, the labeled split, training batches, evaluation.

The training loop uses:

  data.dataset_info(config.data) -> data.DatasetInfo
  data.build_input(config, workdir, start_step=..., ...) -> data.Input
  data.DatasetNotFoundError

Importing this package does not import TensorFlow: only reading TFDS data does
(`datasets.py`, `in_memory.py`, `streamed_input.py`), so a registered in-memory
dataset (`register_in_memory`, e.g. `synthetic.register`) trains without it.
"""

from semimeta_jax.data.pipeline import build_input
from semimeta_jax.data.pipeline import dataset_info
from semimeta_jax.data.pipeline import Input
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
