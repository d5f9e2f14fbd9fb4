"""One tiny end-to-end run with a validation split, shared by the protocol tests (made once per process).

A Pi-model run on a synthetic in-memory 8x8 dataset whose reported weights are an
exponential moving average (`eval_ema`, so its validation errors are `val_ema`),
evaluated at every other step: enough evaluations for the summary's figures.
"""

import atexit
import functools
import pathlib
import shutil
import tempfile

from configs import default
from semimeta_jax import train
from semimeta_jax.data import synthetic

DATASET = 'synthetic_protocol'
NUM_TRAIN, NUM_TEST, NUM_CLASSES = 120, 24, 4
NUM_STEPS, EVAL_EVERY = 8, 2
VALIDATION_SIZE = 20


def config(**data_overrides):
  """The run's config; `data_overrides` replace `config.data` fields."""
  synthetic.register(DATASET, num_train=NUM_TRAIN, num_test=NUM_TEST, image_shape=(8, 8, 1),
                     num_classes=NUM_CLASSES)
  run = default.get_config()
  run.update({'method': 'pi_model', 'model': 'convlarge_digits', 'model_width': 4,
              'labeled_batch_size': 8, 'unlabeled_batch_size': 8, 'eval_batch_size': 16,
              'warmup_steps': 0, 'consistency_rampup_steps': 0, 'lr_decay_boundaries': (),
              'learning_rate': 0.05, 'num_train_steps': NUM_STEPS, 'log_every_steps': EVAL_EVERY,
              'eval_every_steps': EVAL_EVERY, 'checkpoint_every_steps': NUM_STEPS // 2})
  run.ema.decay = 0.9
  run.ema.headline = True
  run.data.update({'name': DATASET, 'num_labels': 8, 'validation_size': VALIDATION_SIZE,
                   **data_overrides})
  return run


@functools.cache
def finished_run():
  """(config, workdir, summary) of the run, trained once per test process."""
  root = pathlib.Path(tempfile.mkdtemp(prefix='protocol_run_'))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  run_config = config()
  summary = train.train_and_evaluate(run_config, str(root / 'run'))
  return run_config, root / 'run', summary
