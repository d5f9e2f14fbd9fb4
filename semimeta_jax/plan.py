"""The run plan that `--dry_run` prints: what a command would do, computed without writing."""

import os

from etils import epath
import jax

from semimeta_jax import errors
from semimeta_jax import memory_fit
from semimeta_jax import methods


def _labeled_count(data, num_train: int, num_classes: int) -> int:
  """How many training examples the split labels (the class-balanced budget, before drawing)."""
  if data.label_fraction:
    return max(num_classes, round(data.label_fraction * num_train))
  return num_train if data.num_labels == -1 else data.num_labels


def _checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir`, read from the directory names."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def run_plan(config, workdir: str) -> str:
  """Describes the run: data, pools, steps, epochs, devices and the workdir's state.

  Args:
    config: the validated config.
    workdir: the run directory (only read).

  Returns:
    Lines of text.
  """
  from semimeta_jax.data import catalog  # pylint: disable=g-import-not-at-top
  method = methods.configure(config)
  spec = catalog.get_spec(config.data)
  sizes = catalog.prepared_sizes(config.data)
  prepared = sizes is not None
  num_train, num_test, num_unlabeled = sizes if prepared else (*spec.sizes, spec.num_unlabeled)
  # A truly unlabeled pool (a folder's unlabeled/, an unlabeled split) is the last rows: not
  # labeled train images.
  num_train -= num_unlabeled
  num_labeled = _labeled_count(config.data, num_train, spec.num_classes)
  steps = config.num_train_steps
  # A TFDS dataset by name documents no sizes here: they are known once it is prepared.
  sizes_known = prepared or spec.sizes != (0, 0)
  counts = (f'{num_train} train / {num_test} test'
            + (f' / {num_unlabeled} unlabeled' if num_unlabeled else '')) if sizes_known else (
                'sizes unknown')
  lines = [
      f'dataset       {spec.name}: {counts}, {spec.num_classes} classes'
      + (f', {spec.image_shape[0]}x{spec.image_shape[1]}x{spec.image_shape[2]} '
         f'{"on the devices" if spec.in_memory else "streamed"}')
      + ('' if prepared else (' (documented sizes: ' if sizes_known else ' (')
         + 'not prepared in the data_dir yet'
         + ('; it is built offline from scikit-learn on first use)' if spec.name == 'digits'
            else '; the run will stop and say how to prepare it)')),
      f'method        {method.describe()}',
      f'model         {config.model}' + (' in bfloat16' if config.half_precision else ''),
      f'steps         {steps} (checkpoint every {config.checkpoint_every_steps}, evaluate every '
      f'{config.eval_every_steps}, log every {config.log_every_steps})',
      f'labeled       {num_labeled} examples, batch {config.labeled_batch_size}: '
      f'{steps * config.labeled_batch_size / max(num_labeled, 1):.1f} epochs' if sizes_known else
      f'labeled       batch {config.labeled_batch_size}',
  ]
  if method.uses_unlabeled:
    if num_unlabeled:
      pool = num_unlabeled + (num_labeled if config.data.unlabeled_includes_labeled else 0)
    else:
      pool = (num_train if config.data.unlabeled_includes_labeled else num_train - num_labeled
              ) - config.data.validation_size
    lines.append(f'unlabeled     {pool} examples, batch {config.unlabeled_batch_size}: '
                 f'{steps * config.unlabeled_batch_size / max(pool, 1):.1f} epochs' if sizes_known
                 else f'unlabeled     batch {config.unlabeled_batch_size}'
                 + (f' from the {spec.unlabeled_split!r} split' if spec.unlabeled_split else ''))
  if method.strong_view:
    strong = config.data.randaugment
    lines.append(f'strong view   RandAugment on the devices: {strong.num_ops} ops each at '
                 + ('a value uniform in its range' if strong.magnitude < 0
                    else f'magnitude {strong.magnitude:g}/{strong.max_magnitude:g}')
                 + f', then Cutout up to {strong.cutout:g} of the side (data.randaugment)')
  if config.data.validation_size:
    lines.append(f'validation    {config.data.validation_size} training examples held out of the pools, '
                 f'evaluated at every evaluation (val/)')
  devices = jax.device_count()
  lines.append(f'devices       {devices} x {jax.devices()[0].platform} in {jax.process_count()} '
               f'process(es); per device: {config.labeled_batch_size / devices:g} labeled + '
               f'{config.unlabeled_batch_size / devices:g} unlabeled')
  # Sizes not known yet (a dataset by name, unprepared): nothing to clamp the evaluation batch to.
  eval_config = memory_fit.clamp_eval_batch(config, max(num_test, config.data.validation_size),
                                            devices) if sizes_known else config
  try:
    memory = memory_fit.describe(
        eval_config, method, spec.image_shape, spec.num_classes, num_train + num_unlabeled,
        num_devices=devices, local_devices=jax.local_device_count(), process_count=jax.process_count())
  except errors.UserError as e:  # A state built from files not there yet (TNAR's VAE): the run says so.
    memory = f'not estimated: {e}'
  lines.append('memory        ' + memory)
  done = _checkpoint_steps(workdir)
  if not os.path.exists(workdir) and '://' not in workdir:
    state = 'new (will be created)'
  elif done:
    state = (f'holds checkpoints up to step {done[-1]}: ' +
             ('finished; rerunning evaluates it again' if done[-1] >= steps else
              f'resumes from step {done[-1]}'))
  else:
    state = 'exists, no checkpoint yet: starts at step 0'
  lines.append(f'workdir       {workdir}: {state}')
  return '\n'.join(lines)
