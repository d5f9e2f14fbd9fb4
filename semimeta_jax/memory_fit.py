"""Whether a run fits the machine's memory, estimated before anything is allocated or written.

The estimate is a lower bound, from shapes only (`jax.eval_shape`, no compute):
the training state (weights, optimizer and method buffers, replicated on every
device), and per example of a device's batch its input and the outputs of each
module of one forward pass (what the backward pass keeps). A real step needs
more (gradients, the method's extra passes, XLA's scratch), so a config refused
here could never run; one accepted may still run short on a full device.

The limits are what the machine has free now: on an accelerator, the smallest
free memory of the local devices (`Device.memory_stats()`); on CPU, whose
devices live in the host's memory, the host's. The host's is the smaller of
/proc/meminfo's MemAvailable (or `os.sysconf`) and the room left under the
process's cgroup memory limit, where there is one.
"""

import copy
import dataclasses
import functools
import math
import os

from absl import logging
import jax
import jax.numpy as jnp

from semimeta_jax import errors
from semimeta_jax import models

_CGROUP_FILES = (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),  # cgroup v2
                 ('/sys/fs/cgroup/memory/memory.limit_in_bytes',  # cgroup v1
                  '/sys/fs/cgroup/memory/memory.usage_in_bytes'))


class DoesNotFitError(errors.ConfigError):
  """The run's estimated memory exceeds what the machine has free."""


def _read_int(path: str) -> int | None:
  try:
    with open(path, encoding='ascii') as f:
      text = f.read().strip()
    return int(text)  # 'max' (no limit) is not an int.
  except (OSError, ValueError):
    return None


def _mem_available() -> int | None:
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def host_memory_limit() -> int | None:
  """Bytes of host memory free for this process now, or None if it cannot be read."""
  candidates = [_mem_available()]
  for limit_file, usage_file in _CGROUP_FILES:
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    # cgroup v1 reports "no limit" as a huge number; it then exceeds MemAvailable and is ignored.
    if limit is not None and usage is not None:
      candidates.append(max(limit - usage, 0))
  candidates = [c for c in candidates if c is not None]
  return min(candidates) if candidates else None


def device_memory_limit() -> int | None:
  """Bytes free on the fullest local device, or None where devices report none (CPU)."""
  free = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if not stats or 'bytes_limit' not in stats:
      return None
    free.append(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  return min(free) if free else None


def _bytes(tree) -> int:
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
             if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'))


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Lower bounds, in bytes, of what one device and the host hold."""
  state: int  # The training state, on every device.
  train_batch: int  # A training step's examples on one device (inputs and module outputs).
  eval_batch: int  # An evaluation batch on one device.
  host_eval_batch: int  # An evaluation batch as the host builds it (float32).

  @property
  def device(self) -> int:
    return self.state + max(self.train_batch, self.eval_batch)


def estimate(config, method, image_shape, num_classes: int, num_train: int,
             num_devices: int, process_count: int) -> Estimate:
  """The lower bounds of `config`'s run (shapes only; nothing is computed or allocated)."""
  model = models.get_model(config, num_classes)
  init = functools.partial(method.init_train_state, model, tuple(image_shape),
                           num_train=num_train, num_classes=num_classes)
  state = _bytes(jax.eval_shape(init, jax.random.key(0)))
  one_image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False, capture_intermediates=True,
                                               mutable=True), jax.random.key(0), one_image)
  per_example = _bytes(variables.get('intermediates', {})) + _bytes(one_image)
  train_examples = math.ceil((config.labeled_batch_size + config.unlabeled_batch_size) / num_devices)
  return Estimate(state=state, train_batch=train_examples * per_example,
                  eval_batch=math.ceil(config.eval_batch_size / num_devices) * per_example,
                  host_eval_batch=config.eval_batch_size // process_count * _bytes(one_image))


def _size(num_bytes: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if num_bytes < 1024 or unit == 'TiB':
      return f'{num_bytes:.1f} {unit}' if unit != 'B' else f'{int(num_bytes)} B'
    num_bytes /= 1024
  return ''


def _field_to_change(parts: dict[str, int]) -> str:
  largest = max(parts, key=parts.get)
  return {'the training state': 'config.model_width (or a smaller config.model)',
          'a training step\'s batch': 'config.labeled_batch_size and config.unlabeled_batch_size',
          'an evaluation batch': 'config.eval_batch_size'}[largest]


def _compare(config, method, image_shape, num_classes: int, num_train: int, num_devices: int,
             local_devices: int, process_count: int):
  """(bytes needed, limit or None, where the limit is, {part: bytes}) of the run."""
  fit = estimate(config, method, image_shape, num_classes, num_train, num_devices, process_count)
  device_limit = device_memory_limit()
  step = max(fit.train_batch, fit.eval_batch)
  parts = {'the training state': fit.state,
           'a training step\'s batch' if fit.train_batch >= fit.eval_batch
           else 'an evaluation batch': step}
  if device_limit is not None:
    needed, limit, where = fit.device, device_limit, 'free on each device'
  else:  # CPU devices: every device's share is host memory.
    needed, limit, where = fit.device * local_devices + fit.host_eval_batch, host_memory_limit(), (
        'of host memory available')
    parts = {name: value * local_devices for name, value in parts.items()}
  return needed, limit, where, parts


def _listing(parts) -> str:
  return ', '.join(f'{name} {_size(value)}' for name, value in parts.items())


def check_fits(config, method, image_shape, num_classes: int, num_train: int, num_devices: int,
               local_devices: int, process_count: int):
  """Raises `DoesNotFitError` when even the lower bound of the run exceeds the free memory.

  Names the estimate, the limit and the field to change (the largest part's).
  """
  needed, limit, where, parts = _compare(config, method, image_shape, num_classes, num_train,
                                         num_devices, local_devices, process_count)
  if limit is not None and needed > limit:
    raise DoesNotFitError(
        f'this run needs at least {_size(needed)} of memory ({_listing(parts)}), more than the '
        f'{_size(limit)} {where}: lower {_field_to_change(parts)}.')


def describe(config, method, image_shape, num_classes: int, num_train: int, num_devices: int,
             local_devices: int, process_count: int) -> str:
  """The estimate and the limit in words, for the run plan."""
  needed, limit, where, parts = _compare(config, method, image_shape, num_classes, num_train,
                                         num_devices, local_devices, process_count)
  verdict = ('' if limit is None else
             f'; does NOT fit, lower {_field_to_change(parts)}' if needed > limit else '')
  return (f'at least {_size(needed)} ({_listing(parts)}); '
          + (f'{_size(limit)} {where}' if limit is not None else 'free memory unknown') + verdict)


def clamp_eval_batch(config, num_eval_examples: int, num_devices: int):
  """`config`, or a copy whose `eval_batch_size` is the largest evaluated split rounded up to the devices.

  A larger evaluation batch only pads the split with masked rows (the whole split
  is one batch either way), so the results are the same; a batch of a billion
  rows would allocate hundreds of GiB of padding. The copy is what the run
  evaluates with; the config the run records keeps the value given, so a rerun
  of the same command (or of an earlier run) resumes.
  """
  needed = max(1, math.ceil(num_eval_examples / num_devices)) * num_devices
  if config.eval_batch_size <= needed:
    return config
  # Said when the value is far off (a slip); a default a little above a small test set is not.
  log = logging.warning if config.eval_batch_size > 2 * needed else logging.debug
  log('config.eval_batch_size=%d is larger than the %d examples evaluated: evaluating them in one '
      'batch of %d (a multiple of the %d devices).', config.eval_batch_size, num_eval_examples,
      needed, num_devices)
  clamped = copy.deepcopy(config)
  clamped.eval_batch_size = needed
  return clamped
