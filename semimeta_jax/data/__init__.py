"""Input pipelines: datasets, the labeled split, training streams, evaluation.

The only part of the package that imports TensorFlow / TFDS. The training loop
uses:

  data.dataset_info(config.data) -> data.DatasetInfo
  data.build_input(config, workdir, start_step=..., ...) -> data.Input
  data.DatasetNotFoundError
"""

from semimeta_jax.data.datasets import dataset_info
from semimeta_jax.data.datasets import DatasetInfo
from semimeta_jax.data.datasets import DatasetNotFoundError
from semimeta_jax.data.pipeline import build_input
from semimeta_jax.data.pipeline import Input
from semimeta_jax.data.splits import SplitMismatchError

__all__ = [
    'build_input',
    'dataset_info',
    'DatasetInfo',
    'DatasetNotFoundError',
    'Input',
    'SplitMismatchError',
]
