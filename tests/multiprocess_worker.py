"""One process of the multi-process test (`test_multiprocess.py` starts it).

Modes:
  train    runs the real training loop (`train.train_and_evaluate`) on mock
           CIFAR-10, alone or as one of several `jax.distributed` processes,
           and dumps this process's copies of the last state it saved.
  restore  restores a workdir's latest checkpoint in a single process and
           dumps it, to check that a multi-process checkpoint restores there.

Each mode writes `<out>.npz` (one array per state leaf, stacked over this
process's devices: [local devices, ...]) and `<out>.json` (what happened);
`train` also writes `<out>.batch2.npz`, the global batch of step 2 as made on
the devices and gathered from every process.
The CPU device count and the distributed runtime must be set up before JAX
starts its backend, which is why this is a separate script and not a test.
"""

import argparse
import functools
import json
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds

# Importing these does not start JAX's backend; `__main__` configures it first.
from configs import default
from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import methods
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position

# Few examples keep the mock data small; 40 leaves at least two of each of the
# ten classes for the 20 labels.
NUM_EXAMPLES = 40
NUM_TRAIN_STEPS = 4


def make_config(num_train_steps: int = NUM_TRAIN_STEPS):
  """A tiny SemiMeta run on CIFAR-10 shapes that evaluates and saves at its last step."""
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.num_labels = 20
  config.model = 'convlarge_digits'
  config.model_width = 4
  config.labeled_batch_size = 8
  config.unlabeled_batch_size = 8
  config.eval_batch_size = 8
  config.learning_rate = 0.05
  config.warmup_steps = 0
  config.consistency_rampup_steps = 0
  config.lr_decay_boundaries = ()
  config.num_train_steps = num_train_steps
  config.log_every_steps = 1
  config.eval_every_steps = num_train_steps
  config.checkpoint_every_steps = num_train_steps
  config.keep_checkpoints = 1
  return config


def _host_copies(tree) -> dict:
  """{leaf path: [local devices, ...] array} of every leaf's addressable shards.

  Replicated leaves have one full copy per local device; stacking them lets
  the test check that the copies agree within and across processes.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      jax.tree_util.keystr(path, simple=True, separator='/'):
          np.stack([np.asarray(shard.data) for shard in leaf.addressable_shards])
      for path, leaf in leaves
  }


def _saved_tree(state) -> dict:
  """The leaves a checkpoint holds (this config keeps no EMA weights)."""
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'rng': state.rng}


def _write(out: str, arrays: dict, record: dict):
  np.savez(out + '.npz', **arrays)
  record.update(process_index=jax.process_index(), process_count=jax.process_count(),
                device_count=jax.device_count(), local_device_count=jax.local_device_count())
  with open(out + '.json', 'w') as f:
    json.dump(record, f)


def _train(args):
  """Trains into `args.workdir` and dumps the last state the loop saved."""
  saved_steps, last_saved = [], {}
  original_save = checkpoint.Checkpointer.save

  def recording_save(self, step, state, **kwargs):
    # Copied before the save starts: the next step donates (overwrites) `state`.
    saved_steps.append(int(step))
    last_saved.update(_host_copies(_saved_tree(state)))
    return original_save(self, step, state, **kwargs)

  checkpoint.Checkpointer.save = recording_save
  config = make_config(args.num_train_steps)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    summary = train.train_and_evaluate(config, args.workdir)
    # The global batch of step 2 as this process sees it: gathered from every process's devices.
    batch = data.build_input(config, None).train_batch(2)
  global_batch = multihost_utils.process_allgather(batch, tiled=True)
  if not saved_steps:
    raise RuntimeError('The training loop saved no checkpoint.')
  np.savez(args.out + '.batch2.npz', **{f'{stream}/{key}': np.asarray(value)
                                         for stream, part in global_batch.items()
                                         for key, value in part.items()})
  _write(args.out, last_saved, {
      'saved_steps': saved_steps,
      'summary': {k: summary[k] for k in ('steps', 'completed', 'preempted', 'final_error_top1')},
  })


def _restore(args):
  """Restores the latest checkpoint of `args.workdir` onto this process's mesh."""
  config = make_config(args.num_train_steps)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    info = data.dataset_info(config.data)
  model = models.get_model(config, info.num_classes)
  init = functools.partial(methods.init_train_state, config, model, info.image_shape,
                           num_train=info.num_train, num_classes=info.num_classes)
  # Shapes and shardings are all a restore needs: no initialisation is computed.
  replicated = parallel.replicated(parallel.make_mesh())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(init, jax.random.key(config.seed)))
  with checkpoint.Checkpointer(args.workdir, keep=config.keep_checkpoints,
                             read_only=True) as checkpointer:
    step = checkpointer.latest_step()
    state = checkpointer.restore(target)
  _write(args.out, _host_copies(_saved_tree(state)), {'restored_step': step})


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('mode', choices=('train', 'restore'))
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True, help='Output path without extension.')
  parser.add_argument('--num_devices', type=int, required=True, help='CPU devices of this process.')
  parser.add_argument('--num_train_steps', type=int, default=NUM_TRAIN_STEPS)
  parser.add_argument('--coordinator_address', help='host:port; starts jax.distributed.')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  return parser.parse_args(argv)


if __name__ == '__main__':
  _args = _parse(sys.argv[1:])
  jax.config.update('jax_num_cpu_devices', _args.num_devices)
  if _args.coordinator_address:
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_args.coordinator_address,
                               num_processes=_args.num_processes, process_id=_args.process_id)
  {'train': _train, 'restore': _restore}[_args.mode](_args)
