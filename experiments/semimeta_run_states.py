"""A finished SemiMeta run's states and batches, read back for measurements at chosen steps."""

import pathlib
from typing import Iterator, NamedTuple

from absl import app
import jax

from experiments import feature_embedding
from experiments import hypergrad_ablation
from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import errors
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import train


class RunState(NamedTuple):
  """The train state of `step` (the seed's initial one at step 0), its input and learning rate."""
  step: int
  state: object
  input: object
  learning_rate: jax.Array


def saved_semimeta_config(run_dir: pathlib.Path):
  """The run's config in today's field names, as a resume reads it; a UsageError if not SemiMeta's."""
  try:
    config = feature_embedding.saved_config(str(run_dir))
  except errors.UserError as e:
    raise app.UsageError(f'--run_dir: {e}') from e
  if config.method != 'semimeta':
    raise app.UsageError(f'{run_dir} is a {config.method!r} run; the hypergradient is SemiMeta\'s.')
  return config


def run_states(run_dir: pathlib.Path, config, steps) -> Iterator[RunState]:
  """Yields a `RunState` per step of `steps` (ascending), read only; a UsageError for a step not saved.

  The batches of `input.train_batch(step + i)` are the ones the run trained on.
  """
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  fresh = train.create_train_state(config, models.get_model(config, info.num_classes),
                                   info.image_shape, mesh)
  checkpointer = checkpoint.Checkpointer(str(run_dir), keep=max(config.keep_checkpoints, 1),
                                         async_save=False, read_only=True)
  try:
    saved = set(checkpointer.all_steps())
    missing = [s for s in steps if s and s not in saved]
    if missing:
      raise app.UsageError(f'{run_dir} has no checkpoint of step(s) {missing} (it has {sorted(saved)}).')
    for step in sorted(set(steps)):
      yield RunState(step, checkpointer.restore(fresh, step) if step else fresh,
                     data.build_input(config, str(run_dir), start_step=step, mesh=mesh),
                     hypergrad_ablation.meta_learning_rate(config, step))
  finally:
    checkpointer.close()
