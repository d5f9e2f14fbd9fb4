"""What both input paths produce: the `Input` of a run, and the error of a config it cannot use.

The device-resident path (`resident_input.py`) and the streamed one
(`streamed_input.py`) each build an `Input`; the training loop reads nothing
else of the data layer's input side.
"""

import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from semimeta_jax import errors
from semimeta_jax import parallel
from semimeta_jax.data import specs


class InputConfigError(errors.UserError, ValueError):
  """A config field the input pipeline cannot use (batch share, padding, pools)."""


@dataclasses.dataclass
class Input:
  """The input side of a run.

  Attributes:
    info: the `DatasetInfo` (sizes as read).
    labeled_indices: ascending train-split indices of the labeled examples.
    unlabeled_indices: ascending train-split indices of the unlabeled pool
      (None when the method reads no unlabeled stream).
    train_batch: `train_batch(i)` is the global batch of the i-th training step
      of the run (i = 0 first; the state at step i trains on it), jax.Arrays
      sharded `P('data')`: {'labeled': {'image' float32, 'label' int32, 'index'
      int32 (train-split index)}, 'unlabeled': {...}}. In-memory data computes any i; streamed data must be
      asked for i = start_step, start_step + 1, ... in order.
    num_eval_examples: size of the evaluation split.
    make_eval_batches: returns a new iterator over this process's evaluation batches.
    host_batches: streamed data only: the host-local uint8 batches that feed
      `train_batch` (for inspection; do not consume both).
    keep_eval_on_devices: whether `global_eval_batches` keeps the evaluation
      batches on the devices after building them once (small test splits).
    validation_indices: ascending train-split indices of the validation split
      (`config.data.validation_size`; empty when there is none), in no training pool.
    make_validation_batches: as `make_eval_batches`, over the validation split
      (None when there is none); kept on the devices as the test split is.
  """
  info: specs.DatasetInfo
  labeled_indices: np.ndarray
  unlabeled_indices: Optional[np.ndarray]
  train_batch: Callable[[int], dict]
  num_eval_examples: int
  make_eval_batches: Callable[[], Iterator[dict]]
  host_batches: Optional[Iterator[dict]] = None
  keep_eval_on_devices: bool = False
  validation_indices: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int64))
  make_validation_batches: Optional[Callable[[], Iterator[dict]]] = None
  _device_eval: Optional[list] = dataclasses.field(default=None, repr=False)
  _device_validation: Optional[list] = dataclasses.field(default=None, repr=False)

  @property
  def num_validation_examples(self) -> int:
    """Size of the validation split (0: none)."""
    return len(self.validation_indices)

  def global_validation_batches(self, mesh) -> Iterable[dict]:
    """The validation split's padded batches as global arrays on `mesh`, kept on the devices.

    Raises:
      ValueError: the run has no validation split.
    """
    if self.make_validation_batches is None:
      raise ValueError('This input has no validation split (config.data.validation_size=0).')
    if self._device_validation is None:
      self._device_validation = [parallel.to_global(batch, mesh)
                                 for batch in self.make_validation_batches()]
    return self._device_validation

  def global_eval_batches(self, mesh) -> Iterable[dict]:
    """The evaluation batches as global arrays on `mesh` (every process's share).

    A small test split is shipped once and kept on the devices (CIFAR's: 123 MB
    float32), so an evaluation then costs the device its forward passes only.
    """
    if not self.keep_eval_on_devices:
      return (parallel.to_global(batch, mesh) for batch in self.eval_batches())
    if self._device_eval is None:
      self._device_eval = [parallel.to_global(batch, mesh) for batch in self.eval_batches()]
    return self._device_eval

  def eval_batches(self):
    """A new iterator over this process's padded evaluation batches.

    Every process yields the same number of batches of `eval_batch_size //
    process_count` rows: {'image' float32, 'label' int32, 'mask' bool}; over
    all processes each test example has exactly one True mask entry.
    """
    return self.make_eval_batches()
