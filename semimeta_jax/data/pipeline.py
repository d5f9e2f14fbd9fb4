"""`build_input`: the training batches and evaluation batches of a run.

Everything is checked before any data is read: the dataset name, the label
budget, and that every global batch size divides by the process count. Then
the data's presence (`DatasetNotFoundError` otherwise), the labeled split (saved
in / restored from the workdir), and the training batches, by one of two paths
that both produce an `input_contract.Input`:

  * in-memory datasets: the uint8 split on the devices, each global batch a
    pure function of (seed, step) computed there (`resident_input.py`);
  * ImageNet and large TFDS datasets: host-local uint8 record streams,
    prefetched to the devices and normalised there (`streamed_input.py`).

TensorFlow and TFDS are imported only to read TFDS data: a registered
in-memory dataset (`specs.register_in_memory`) runs without them.
"""

import jax

from semimeta_jax import parallel
from semimeta_jax.data import catalog
from semimeta_jax.data import input_contract
from semimeta_jax.data import resident_input
from semimeta_jax.data import splits
from semimeta_jax.data import strong_view as strong_view_lib

_BATCH_FIELDS = ('labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size')


def _check_arguments(config, mesh, process_index, process_count, start_step):
  """The arguments, and the batch sizes against the devices and processes (one rule: parallel's)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  parallel.check_batch_sizes({field: config[field] for field in _BATCH_FIELDS}, mesh,
                             process_count)


def build_input(config, workdir, *, start_step=0, process_index=None, process_count=None,
                mesh=None, uses_unlabeled=True, strong_view=False) -> input_contract.Input:
  """Builds the training batches and evaluation batches of a run.

  Args:
    config: the run's config (see `configs/default.py`); reads
      `config.data.*`, `seed`, `method` and the three batch sizes. Optional:
      `config.data.pad_mode` ('constant' | 'reflect', default 'constant'),
      `config.data.image_size` (ImageNet crop, default 224),
      `config.data.shuffle_buffer` (ImageNet, default 16384).
    workdir: run directory for `labeled_indices.json` (and `normalization.json`
      for a dataset without registered statistics: a folder of images); None
      = not saved.
    start_step: index of the first training batch (streamed data starts there).
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    mesh: the device mesh of the training batches; default all devices.
    uses_unlabeled: whether to build the unlabeled stream (the method's
      `uses_unlabeled`).
    strong_view: whether the unlabeled batches carry 'strong_image', the strong
      view of `config.data.randaugment` (the method's `strong_view(config)`).

  Returns:
    An `Input`.

  Raises:
    InputConfigError, splits.LabelBudgetError: bad configuration (the message
      names the field).
    DatasetNotFoundError: the dataset is not prepared in the data_dir.
    splits.SplitMismatchError: the workdir's split was drawn differently.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  mesh = parallel.make_mesh() if mesh is None else mesh
  _check_arguments(config, mesh, process_index, process_count, start_step)
  data = config.data
  spec = catalog.get_spec(data)
  splits.check_label_config(data.num_labels, data.label_fraction, spec.num_classes)
  if data.validation_size and not spec.in_memory:
    # A held-out share of a streamed split would need a masked record reader of its own; such a
    # dataset names its validation share as a split instead.
    raise input_contract.InputConfigError(
        f'config.data.validation_size={data.validation_size} holds examples out of an in-memory '
        f'training split; {spec.name} is streamed. Set it to 0 and name a held-out share as the '
        "evaluated split instead (e.g. config.data.train_split='train[:95%]', "
        "config.data.test_split='train[95%:]').")
  augment_kind = spec.augment if data.augment else 'none'
  strong = strong_view_lib.from_config(data) if strong_view and uses_unlabeled else None
  if spec.in_memory:
    return resident_input.build(config, workdir, spec, augment_kind, process_index=process_index,
                                process_count=process_count, mesh=mesh,
                                uses_unlabeled=uses_unlabeled, strong_view=strong)
  from semimeta_jax.data import streamed_input  # pylint: disable=g-import-not-at-top
  return streamed_input.build(config, workdir, spec, augment_kind, start_step=start_step,
                              process_index=process_index, process_count=process_count,
                              mesh=mesh, uses_unlabeled=uses_unlabeled, strong_view=strong)
